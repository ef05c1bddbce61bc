"""The Parquet chunk pipeline: row groups decoded ahead on threads into bounded, reused memory."""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from engine.errors import XentInputError
from engine.io.layouts import Entry
from engine.io.paths import ARROW_ERRORS, unreadable
from engine.io.records import Chunk
from engine.threads import cpu_count

if TYPE_CHECKING:  # the pipeline is given its Source; it never imports it
    from engine.io.source import Source


# Parquet reading (see ParquetChunks). Row groups are decoded in batches of about
# _DECODE_BYTES, each column streamed through a STREAM_BUFFER_BYTES buffer (pyarrow's
# pre_buffer would hold whole column chunks): pyarrow's working memory while decoding a
# list column is three to four times the rows decoded at once (values, levels, builder
# growth), so decoding a 131 MB row group whole needs 400-800 MB. Consecutive small row
# groups form one unit of work of about a chunk (at least _MIN_UNIT_BYTES). Decoders run
# at most `readahead` chunks ahead of the caller, or _MIN_AHEAD_BYTES when chunks are
# small (else tiny chunks would leave no room to decode two units at once).
_MIN_UNIT_BYTES = 4 * 2**20
_DECODE_BYTES = 4 * 2**20
_MIN_AHEAD_BYTES = 32 * 2**20


@dataclass(frozen=True)
class _PlanFile:
    """A Parquet file of a ParquetChunks plan; its chunks are slots first..first+count-1."""

    entry: int  # index into Source.entries
    first: int  # its first slot
    count: int  # its number of chunks
    rows: int  # its selected rows
    row: int  # global row of its first selected row
    columns: list[str]  # columns read
    other: list[str]  # columns kept as Arrow pieces (all but the copied matrices)


@dataclass(frozen=True)
class _Unit:
    """Row groups of one file that one thread decodes in order."""

    file: int  # index into ParquetChunks.files
    groups: tuple[int, ...]
    pos: int  # its first row, counted within the file's selected rows
    rows: int
    batch_rows: int


class _Slot:
    """One chunk being assembled by the decoding threads."""

    __slots__ = ("errors", "filled", "logits", "missing", "pieces", "soft", "view")

    def __init__(self, rows: int):
        self.missing = rows  # rows not yet written
        self.view: pa.RecordBatch | None = None  # one decoded slice holding the whole chunk
        self.logits: np.ndarray | None = None  # else the matrices, copied in piece by piece
        self.soft: np.ndarray | None = None
        self.pieces: list[tuple[int, pa.RecordBatch]] = []  # (file row, other columns)
        # Positions count rows within the file's selected rows.
        self.filled: list[tuple[int, int]] = []  # (position, rows) written
        self.errors: list[tuple[int, BaseException]] = []  # (position, error)


class ParquetChunks:
    """The chunks of consecutive Parquet files, decoded ahead on threads, memory bounded.

    The footers give every row group's rows, so chunk boundaries are known before any
    read: chunk k of a file holds its selected rows [k * chunk_rows, (k+1) * chunk_rows).
    Units of row groups (ParquetReader.units) are decoded by up to `readahead` threads
    at once, each unit sequentially in batches of about _DECODE_BYTES, without
    pre-buffering, so a decoder needs a few batches of memory however large its row
    group. Each batch goes at once into its chunk: kept as is when it holds the whole
    chunk (zero copy), else its logits (and probability targets) are copied into the
    chunk's matrix and the small columns kept as Arrow slices. While the caller holds
    chunk k, threads write only into chunks k+1 .. k+ahead and otherwise wait, so at most
    ahead + 1 chunks exist at once (ahead + 2 for a moment, while the caller's loop
    variable still holds chunk k as k+1 is handed over). Chunk matrices are reused once
    released (Buffers). readahead 0 decodes on the calling thread, as chunks are asked.
    """

    def __init__(self, source: Source, indices, chunk_rows, readahead, targets_only, row):
        self.src = source
        self.chunk_rows = chunk_rows
        self.targets_only = targets_only
        self.files: list[_PlanFile] = []
        self.units: list[_Unit] = []
        row_bytes = source.row_bytes
        unit_bytes = max(chunk_rows * row_bytes, _MIN_UNIT_BYTES)
        self._count = 0  # chunks in all
        total_bytes = total_rows = 0
        for index in indices:
            entry = source.entries[index]
            columns = source.columns_for(entry, targets_only)
            matrices = set() if targets_only else set(entry.layout.columns)
            if entry.target is not None and entry.target.soft:
                matrices.add(entry.target.column)
            carried = {*source.keep_columns, source.group_by}
            other = [c for c in columns if c not in matrices or c in carried]
            rows = source.entry_rows(entry)
            count = -(-rows // chunk_rows)
            f = len(self.files)
            self.files.append(_PlanFile(index, self._count, count, rows, row, columns, other))
            pos = 0
            for groups, n, nbytes in entry.reader.units(columns, entry.selection, unit_bytes):
                batch_rows = max(1, _DECODE_BYTES * n // max(nbytes, 1))
                self.units.append(_Unit(f, groups, pos, n, batch_rows))
                pos += n
                total_bytes += nbytes
                total_rows += n
            self._count += count
            row += rows
        self.end_row = row
        self._firsts = [f.first for f in self.files]
        chunk_bytes = chunk_rows * max(1, total_bytes // max(total_rows, 1))
        self.ahead = max(readahead, -(-_MIN_AHEAD_BYTES // chunk_bytes))
        self.threads = 0
        if readahead > 0 and self.units:
            self.threads = max(1, min(readahead, cpu_count(), len(self.units)))
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._next_out = 0  # the chunk the caller asks for next
        self._next_unit = 0
        self._cancelled = False
        self._inline: Iterator[int] | None = None  # readahead 0: the unit being decoded
        self._buffers = Buffers(keep=self.ahead + 2)

    # -- geometry ----------------------------------------------------------------------

    def _file_of(self, j: int) -> _PlanFile:
        return self.files[bisect.bisect_right(self._firsts, j) - 1]

    def _bounds(self, f: _PlanFile, j: int) -> tuple[int, int]:
        """(position of the first row within the file's selected rows, rows) of chunk j."""
        pos = (j - f.first) * self.chunk_rows
        return pos, min(self.chunk_rows, f.rows - pos)

    def _slot(self, j: int) -> _Slot:  # under the lock
        slot = self._slots.get(j)
        if slot is None:
            slot = self._slots[j] = _Slot(self._bounds(self._file_of(j), j)[1])
        return slot

    # -- decoding (on the threads, or inline) ------------------------------------------

    def _steps(self, unit: _Unit) -> Iterator[int]:
        """Decode `unit`, yielding each chunk index before writing a piece into it.

        Errors are recorded on the chunk at which they happen, for the caller to raise
        in order: a later unit's failure must not hide the rows before it.
        """
        f = self.files[unit.file]
        entry = self.src.entries[f.entry]
        path = entry.info.path
        pos, end = unit.pos, unit.pos + unit.rows
        j = f.first + pos // self.chunk_rows
        try:
            for batch in entry.reader.iter_batches(unit.groups, f.columns, unit.batch_rows):
                n = batch.num_rows
                if pos + n > end:
                    raise XentInputError("more rows than the footer says", file=path)
                done = 0
                while done < n:
                    chunk_end = (j - f.first + 1) * self.chunk_rows
                    take = min(chunk_end - pos, n - done)
                    yield j
                    self._put(j, f, entry, batch.slice(done, take), pos)
                    done += take
                    pos += take
                    if pos == chunk_end:
                        j += 1
            if pos != end:
                raise XentInputError("fewer rows than the footer says", file=path)
        except GeneratorExit:
            raise
        except ARROW_ERRORS as e:
            self._fail(f, j, pos, end, unreadable(path, e))
        except BaseException as e:
            self._fail(f, j, pos, end, e)

    def _put(self, j: int, f: _PlanFile, entry: Entry, piece: pa.RecordBatch, pos: int):
        first, rows = self._bounds(f, j)
        take = piece.num_rows
        file_row = entry.first_file_row + pos
        if take == rows:  # the whole chunk: keep the decoded slice, no copy
            with self._cond:
                slot = self._slot(j)
                slot.view = piece
                slot.filled.append((pos, take))
                slot.missing = 0
                self._cond.notify_all()
            return
        src = self.src
        logits = soft = None
        if not self.targets_only:
            logits = src.decode_logits(entry, piece, file_row, src.row_width)
        if entry.target is not None and entry.target.soft:
            soft = src.decode_target(entry, piece, file_row, src.num_classes)[0]
        other = piece.select(f.other) if f.other else None
        del piece  # the copied columns' buffers go as soon as they are copied
        with self._cond:
            slot = self._slot(j)
            if logits is not None and slot.logits is None:
                slot.logits = self._buffers.empty((rows, *logits.shape[1:]), logits.dtype)
            if soft is not None and slot.soft is None:
                slot.soft = self._buffers.empty((rows, *soft.shape[1:]), soft.dtype)
        at = pos - first
        if logits is not None:
            slot.logits[at : at + take] = logits  # disjoint rows: no lock needed
        if soft is not None:
            slot.soft[at : at + take] = soft
        with self._cond:
            if other is not None:
                slot.pieces.append((file_row, other))
            slot.filled.append((pos, take))
            slot.missing -= take
            if slot.missing == 0 or slot.errors:  # errors: the caller may be waiting on us
                self._cond.notify_all()

    def _fail(self, f: _PlanFile, j: int, pos: int, end: int, err: BaseException) -> None:
        if pos >= end:  # past the unit's last row: blame its last chunk
            pos = end - 1
            j = f.first + pos // self.chunk_rows
        with self._cond:
            self._slot(j).errors.append((pos, err))
            self._cond.notify_all()

    def _ready(self, j: int) -> bool:  # under the lock
        slot = self._slots.get(j)
        if slot is None:
            return False
        if slot.errors:
            # Raise the first error only once every row before it is in: an earlier
            # unit may yet fail at an earlier row.
            pos = min(p for p, _ in slot.errors)
            first = self._bounds(self._file_of(j), j)[0]
            return sum(n for p, n in slot.filled if p < pos) >= pos - first
        return slot.missing == 0

    def _work(self) -> None:
        """A decoding thread: take the next unit, decode it within the window, repeat."""
        cond = self._cond
        while True:
            with cond:
                if self._cancelled or self._next_unit >= len(self.units):
                    return
                unit = self.units[self._next_unit]
                self._next_unit += 1
            steps = self._steps(unit)
            for j in steps:
                with cond:
                    cond.wait_for(lambda j=j: self._cancelled or j < self._next_out + self.ahead)
                    if self._cancelled:
                        steps.close()
                        return

    def _decode_until(self, j: int) -> None:
        """readahead 0: decode on this thread until chunk j is ready."""
        while not self._ready(j):
            if self._inline is None:
                if self._next_unit >= len(self.units):
                    raise RuntimeError(f"chunk {j} was never filled")  # a bug, not input
                self._inline = self._steps(self.units[self._next_unit])
                self._next_unit += 1
            if next(self._inline, None) is None:
                self._inline = None

    # -- the caller's side -------------------------------------------------------------

    def __iter__(self) -> Iterator[Chunk]:
        cond = self._cond
        threads = [
            threading.Thread(target=self._work, name=f"xent-read-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for t in threads:
            t.start()
        try:
            for j in range(self._count):
                if threads:
                    with cond:
                        while not cond.wait_for(lambda j=j: self._ready(j), timeout=1.0):
                            if not any(t.is_alive() for t in threads):  # a bug, not input
                                raise RuntimeError(f"chunk {j} was never filled")
                else:
                    self._decode_until(j)
                with cond:
                    slot = self._slots.pop(j)
                if slot.errors:
                    raise min(slot.errors, key=lambda e: e[0])[1]
                chunk = self._chunk(j, slot)
                del slot
                with cond:
                    self._next_out = j + 1  # the window moves on: decode into j+1 ...
                    cond.notify_all()
                yield chunk
                del chunk
        finally:
            with cond:
                self._cancelled = True
                cond.notify_all()
            if self._inline is not None:
                self._inline.close()
            for t in threads:
                t.join()
            self._buffers.close()

    def _chunk(self, j: int, slot: _Slot) -> Chunk:
        f = self._file_of(j)
        entry = self.src.entries[f.entry]
        pos, _ = self._bounds(f, j)
        file_row = entry.first_file_row + pos
        row = f.row + pos
        if slot.view is not None:
            return self.src.make_chunk(entry, [(slot.view, file_row)], row, self.targets_only)
        pieces = [(batch, r) for r, batch in sorted(slot.pieces, key=lambda p: p[0])]
        return self.src.make_chunk(
            entry,
            pieces,
            row,
            self.targets_only,
            logits=slot.logits,
            soft=slot.soft,
            file_row=file_row,
        )


class Buffers:
    """Memory for chunk matrices, used again once the caller has let go of a chunk.

    Fresh pages from the OS cost a page fault each (zeroed by the kernel), as much as
    the copy into them again; reusing the same few buffers costs only the copy. A buffer
    returns to the free list only when no array can reach it any more.
    """

    def __init__(self, keep: int):
        self._keep = keep
        self._free: list[np.ndarray] = []
        # Reentrant: a finalizer may run (garbage collection) while the lock is held.
        self._lock = threading.RLock()
        self.closed = False

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= nbytes]
            store = min(fits, key=lambda b: b.nbytes) if fits else None
            if store is not None:
                self._free.remove(store)
        if store is None:
            store = np.empty(nbytes, np.uint8)
        flat = np.frombuffer(memoryview(store), dtype, count)
        if not isinstance(flat.base, np.ndarray):
            # Views of `flat` (reshapes, slices, buffers exported from them) all keep it
            # alive: NumPy collapses a view's base only down to the first array whose base
            # is not an array, which is `flat`. So `flat` dies with the last of them.
            weakref.finalize(flat, self._release, store)
        return flat.reshape(shape)

    def _release(self, store: np.ndarray) -> None:
        with self._lock:
            if not self.closed and len(self._free) < self._keep:
                self._free.append(store)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._free.clear()
