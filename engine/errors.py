"""Errors a user can cause, as their own types; anything else that escapes is a bug.

The CLI prints a user error as one line ``Error: <message>`` with status 2. Every other
exception (a ``ValueError`` from deep inside numpy included) is shown as an internal error
with status 1. So an error meant for the user must be raised on purpose as one of these
types. They subclass the builtin PyTorch would raise (``ValueError``, ``TypeError``,
``IndexError``) so that Python callers catching those keep working.
"""

from __future__ import annotations


class XentError(Exception):
    """Base of every error a user can cause with their data, options or arguments."""


class XentUsageError(XentError, ValueError):
    """An option or argument value the engine does not accept."""


class XentTypeError(XentError, TypeError):
    """An argument of the wrong type (an array of the wrong dtype or dimensionality)."""


class XentInputError(XentError, ValueError):
    """Bad input data: carries the file and (where known) the row, for one clear CLI line.

    ``str(err)`` is ``"<file>: <what>, row <n>"``; the CLI prints ``Error: `` + that.
    """

    def __init__(self, what: str, *, file: str | None = None, row: int | None = None):
        self.what = what
        self.file = file
        self.row = row
        super().__init__(self._format())

    def _format(self) -> str:
        text = self.what
        if self.row is not None:
            text = f"{text} (row {self.row})"
        if self.file:
            text = f"{self.file}: {text}"
        return text

    def located(self, *, file: str | None = None, row_offset: int = 0) -> XentInputError:
        """The same error with a file name and the row shifted into file coordinates."""
        row = None if self.row is None else self.row + row_offset
        return XentInputError(self.what, file=file or self.file, row=row)


class TargetOutOfRange(XentError, IndexError):
    """A class index outside [0, C) that is not the ignore index (PyTorch's wording)."""

    def __init__(self, value: int, row: int, classes: int):
        self.value, self.row, self.classes = value, row, classes
        super().__init__(f"Target {value} is out of bounds (row {row}).")
