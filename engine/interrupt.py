"""Ctrl-C that cannot be lost.

Python turns SIGINT into a KeyboardInterrupt in whatever the main thread runs next, and
some places swallow it: a ctypes callback inside Numba's compiler prints "Exception
ignored" and carries on, so a job interrupted while it compiles would finish and commit its
output. The CLI installs `handle_sigint`, which also remembers the request; streaming loops
call `check()` per chunk and sinks call it before they commit, so an interrupted job never
writes its output.
"""

from __future__ import annotations

import signal
import sys
import threading

_requested = False


def _silent(unraisable) -> None:
    """After Ctrl-C: the KeyboardInterrupt a ctypes callback swallows, or the __del__ of
    an object it cut short (llvmlite's, while Numba compiles), would print tracebacks
    around the one "Interrupted" line; the request is remembered, the process ends."""


def handle_sigint(signum, frame):
    global _requested
    _requested = True
    sys.unraisablehook = _silent
    raise KeyboardInterrupt


def requested() -> bool:
    """Whether Ctrl-C was pressed (an error raised since may be its aftermath: Numba's
    compiler fails with "no compiled object yet" when the interrupt cut its callback)."""
    return _requested


def install() -> None:
    """Use `handle_sigint` for SIGINT (only possible on the main thread; else a no-op)."""
    global _requested
    _requested = False
    sys.unraisablehook = sys.__unraisablehook__
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handle_sigint)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if it was swallowed since."""
    if _requested:
        raise KeyboardInterrupt
