"""Every file xent writes appears complete under its own name, or not at all.

Data goes to a hidden temporary name beside the target (same directory, so ``os.replace``
is an atomic rename on one file system; the leading dot keeps directory scans from reading
it), and is renamed into place at the end. Any exception, Ctrl-C included, removes the
temporary file. Sinks, the Dask manifest, `gen` and the CLI's JSON files all go through
this module.
"""

from __future__ import annotations

import contextlib
import os
import secrets

from engine import interrupt


def temp_path(path: str | os.PathLike) -> str:
    """A fresh hidden name beside ``path`` (``.name.tmp-<pid>-<random>``)."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of `temp_path`'s (left behind by a killed process)."""
    return name.startswith(".") and ".tmp-" in name


class AtomicPath:
    """A temporary name reserved for ``path``; `commit` renames it into place.

    With ``create=True`` the (empty) temporary file is created at once, so an unwritable
    place fails before any work is done. Used as a context manager, leaving the block
    without `commit` (an error, Ctrl-C) removes the temporary file.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = os.fspath(path)
        self.temp: str | None = temp_path(self.path)
        if create:
            with open(self.temp, "w"):
                pass

    def commit(self) -> None:
        """Rename the finished temporary file to its name (not after a Ctrl-C)."""
        if self.temp is None:
            raise RuntimeError(f"{self.path}: already committed or discarded")
        interrupt.check()
        os.replace(self.temp, self.path)
        self.temp = None

    def discard(self) -> None:
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
            self.temp = None

    def __enter__(self) -> AtomicPath:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.discard()
        return False


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """Write a whole text file atomically (fsync'd before the rename unless told not to)."""
    with AtomicPath(path) as target:
        with open(target.temp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        target.commit()
