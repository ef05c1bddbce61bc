"""One exception type for errors a user can cause with their data or options."""

from __future__ import annotations


class XentInputError(ValueError):
    """Bad input: carries the file and (where known) the row, for one clear CLI line.

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
