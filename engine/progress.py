"""Progress of streaming jobs: one protocol and one terminal bar (rows, GB/s, ETA on stderr).

The protocol is a callable ``progress(rows_done, bytes_done, total_rows)``, called with
running totals; the API's ``progress=`` takes such a callable, ``True`` (a bar when stderr is
a terminal) or ``False``. The commands pass a `TerminalBar` with their label.
"""

from __future__ import annotations

import shutil
import sys
import time


class _NoProgress:
    def update(self, rows: int, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Callback:
    """Adapts a user callable ``f(rows_done, bytes_done, total_rows)`` to per-chunk updates."""

    def __init__(self, fn, total_rows):
        self.fn, self.total = fn, total_rows
        self.rows = self.bytes = 0

    def update(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes
        self.fn(self.rows, self.bytes, self.total)

    def close(self) -> None:
        pass


def format_seconds(s: float) -> str:
    """``12.3s``, ``4m05s``, ``2h03m``."""
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class TerminalBar:
    """A one-line bar on stderr: label, rows, percent, GB/s, ETA.

    Called as ``bar(rows_done, bytes_done, total_rows)`` (the protocol above), or fed
    per-chunk deltas with `update`; redraws at most every `interval` seconds; `close`
    ends the line.
    """

    def __init__(
        self,
        label: str = "",
        total_rows: int | None = None,
        stream=None,
        interval: float = 0.1,
        width: int | None = None,
    ):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.width = width
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = 0
        self._state = (0, 0, total_rows)

    def __call__(self, rows_done: int, bytes_done: int = 0, total_rows: int | None = None):
        self._state = (int(rows_done), int(bytes_done), total_rows)
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def update(self, rows: int, nbytes: int) -> None:
        done, done_bytes, total = self._state
        self(done + rows, done_bytes + nbytes, total)

    def line(self, now: float | None = None) -> str:
        rows, nbytes, total = self._state
        elapsed = max((now if now is not None else time.perf_counter()) - self.start, 1e-9)
        parts = [self.label] if self.label else []
        if total:
            frac = min(rows / total, 1.0)
            filled = int(frac * 20)
            parts.append("[" + "#" * filled + "." * (20 - filled) + "]")
            parts.append(f"{frac:4.0%}")
            parts.append(f"{rows:,}/{total:,} rows")
        else:
            parts.append(f"{rows:,} rows")
        parts.append(f"{nbytes / elapsed / 1e9:.2f} GB/s")
        if total and 0 < rows < total:
            parts.append(f"ETA {format_seconds(elapsed * (total - rows) / rows)}")
        else:
            parts.append(format_seconds(elapsed))
        return "  ".join(parts)

    def _draw(self, now: float | None = None) -> None:
        width = self.width or shutil.get_terminal_size((80, 20)).columns
        text = self.line(now)[: max(10, width - 1)]
        pad = " " * max(0, self._shown - len(text))
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._shown = len(text)

    def close(self) -> None:
        if self._shown or self._state[0]:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def make_progress(progress, source):
    """False -> nothing; True -> terminal bar if stderr is a TTY; callable -> callback."""
    total = getattr(source, "num_rows", None)
    if callable(progress):
        return _Callback(progress, total)
    if progress and stderr_is_terminal():
        return TerminalBar(total_rows=total)
    return _NoProgress()
