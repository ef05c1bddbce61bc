"""Progress reporting for streaming jobs: rows, GB/s and ETA on stderr, only on a terminal."""

from __future__ import annotations

import sys
import time


class _NoProgress:
    def update(self, rows: int, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Callback:
    """Adapts a user callable ``f(rows_done, bytes_done, total_rows)``."""

    def __init__(self, fn, total_rows):
        self.fn, self.total = fn, total_rows
        self.rows = self.bytes = 0

    def update(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes
        self.fn(self.rows, self.bytes, self.total)

    def close(self) -> None:
        pass


class TerminalBar:
    """A one-line bar redrawn at most 10 times a second; cleared on close."""

    def __init__(self, total_rows, stream=None):
        self.total = total_rows
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.rows = self.bytes = 0
        self._last = 0.0

    def update(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self._last >= 0.1:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        gbs = self.bytes / elapsed / 1e9
        if self.total:
            frac = min(self.rows / self.total, 1.0)
            filled = int(frac * 30)
            eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
            line = (
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.rows:,}/{self.total:,} rows"
                f"  {gbs:.2f} GB/s  ETA {eta:5.1f}s"
            )
        else:
            line = f"\r{self.rows:,} rows  {gbs:.2f} GB/s  {elapsed:.1f}s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.rows:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def make_progress(progress, source):
    """False -> nothing; True -> terminal bar if stderr is a TTY; callable -> callback."""
    total = getattr(source, "num_rows", None)
    if callable(progress):
        return _Callback(progress, total)
    if progress and sys.stderr.isatty():
        return TerminalBar(total)
    return _NoProgress()
