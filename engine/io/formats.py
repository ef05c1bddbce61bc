"""Per-format readers: metadata at open, then read jobs (Parquet, Arrow IPC file, IPC stream),
and the ordered thread pool that runs jobs ahead of the caller."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from engine.io.llama import LlamaKldReader
from engine.io.paths import ARROW_ERRORS, detect_format, locate, open_random, unreadable

# --------------------------------------------------------------------------------------
# Per-format readers: metadata at open, then read jobs
# --------------------------------------------------------------------------------------

# IPC files and streams are read by jobs: a job is a callable that returns the next record
# batches of one file; jobs may run concurrently (ordered), a file's batches come back in
# order. Parquet files have their own pipeline (ParquetChunks).
Job = Callable[[], list[pa.RecordBatch]]

# Each Parquet column is streamed through a buffer of this size (pyarrow's pre_buffer would
# hold whole column chunks in memory; see engine/io/parquet.py).
STREAM_BUFFER_BYTES = 1 * 2**20


class ParquetReader:
    format = "parquet"

    def __init__(self, path: str):
        self.path = path
        try:
            self._fs, self._where = locate(path)
            pf = pq.ParquetFile(self._where, filesystem=self._fs, pre_buffer=False)
        except ARROW_ERRORS as e:
            raise unreadable(path, e, "not a readable Parquet file") from None
        self.metadata = pf.metadata
        self.schema = pf.schema_arrow
        self.rows = self.metadata.num_rows
        self.row_groups = self.metadata.num_row_groups
        pf.close()

    def group_rows(self, i: int) -> int:
        return self.metadata.row_group(i).num_rows

    def _open(self, **kwargs) -> pq.ParquetFile:
        # A fresh handle per job (sharing the parsed footer): concurrent reads of one
        # ParquetFile object are not documented as safe.
        return pq.ParquetFile(self._where, filesystem=self._fs, metadata=self.metadata, **kwargs)

    def _unit_bytes(self, i: int, columns: Sequence[str]) -> int:
        rg = self.metadata.row_group(i)
        wanted = set(columns)
        total = 0
        for j in range(rg.num_columns):
            col = rg.column(j)
            if col.path_in_schema.split(".")[0] in wanted:
                total += col.total_uncompressed_size
        return total or rg.total_byte_size

    def probe(self, column: str) -> pa.Array | None:
        """The first row of `column` (to learn C of a list layout), reading one page."""
        for i in range(self.row_groups):
            if self.group_rows(i):
                pf = self._open(pre_buffer=False, buffer_size=STREAM_BUFFER_BYTES)
                batch = next(pf.iter_batches(batch_size=1, row_groups=[i], columns=[column]))
                return batch.column(0).slice(0, 1)
        return None

    def units(
        self, columns: Sequence[str], selection: tuple[int, ...] | None, unit_bytes: int
    ) -> Iterator[tuple[tuple[int, ...], int, int]]:
        """(row groups, rows, bytes) of the units one thread decodes in order: runs of
        consecutive non-empty row groups up to about `unit_bytes`, a larger group alone."""
        groups = selection if selection is not None else range(self.row_groups)
        run: list[int] = []
        rows = size = 0
        for i in groups:
            n = self.group_rows(i)
            if not n:
                continue
            nbytes = self._unit_bytes(i, columns)
            if run and size + nbytes > unit_bytes:
                yield tuple(run), rows, size
                run, rows, size = [], 0, 0
            run.append(i)
            rows += n
            size += nbytes
        if run:
            yield tuple(run), rows, size

    def iter_batches(
        self, groups: tuple[int, ...], columns: list[str], batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        """The rows of `groups` in batches of `batch_rows`, streamed: no pre-buffering
        (which would hold whole column chunks), a small read buffer per column."""
        pf = self._open(pre_buffer=False, buffer_size=STREAM_BUFFER_BYTES)
        return pf.iter_batches(
            batch_size=batch_rows, row_groups=list(groups), columns=columns, use_threads=False
        )


class IpcFileReader:
    format = "arrow-file"

    def __init__(self, path: str):
        self.path = path
        try:
            reader = pa.ipc.open_file(open_random(path))
            self.schema = reader.schema
            self.row_groups = reader.num_record_batches
            self.rows = reader.count_rows()
        except ARROW_ERRORS as e:
            raise unreadable(path, e, "not a readable Arrow IPC file") from None

    def jobs(self, columns) -> Iterator[Job]:
        # Memory-mapped (local paths): a batch is a zero-copy view of the file, so reading
        # is cheap and done under one lock (sharing a file reader across threads is not
        # documented). A URI's file is read through its filesystem, under the same lock.
        try:
            reader = pa.ipc.open_file(open_random(self.path))
        except ARROW_ERRORS as e:
            raise unreadable(self.path, e) from None
        lock = threading.Lock()
        names = list(columns)

        def job(i: int) -> Job:
            def read() -> list[pa.RecordBatch]:
                try:
                    with lock:
                        batch = reader.get_batch(i)
                    return [batch.select(names)]
                except ARROW_ERRORS as e:
                    raise unreadable(self.path, e) from None

            return read

        for i in range(reader.num_record_batches):
            yield job(i)


def open_stream(path: str):
    fs, where = locate(path)
    if fs is not None:
        return pa.ipc.open_stream(fs.open_input_stream(where))
    try:
        source = pa.memory_map(path)
    except ARROW_ERRORS:
        source = pa.OSFile(path)  # a pipe or device cannot be mapped
    return pa.ipc.open_stream(source)


class IpcStreamReader:
    format = "arrow-stream"
    row_groups = None

    def __init__(self, path: str):
        self.path = path
        self.rows = None
        try:
            self.schema = open_stream(path).schema
        except ARROW_ERRORS as e:
            raise unreadable(path, e, "not a Parquet or Arrow file") from None

    def jobs(self, columns) -> Iterator[Job]:
        names = list(columns)

        def start():
            for batch in open_stream(self.path):
                yield batch.select(names)

        return _SerialJobs(self.path, start).jobs()


class _SerialJobs:
    """Jobs that each take the next item of one iterator, strictly in ticket order.

    This lets a sequential reader (an IPC stream) share the ordered thread pool with
    independent reads: job k waits until job k-1 has run. The executor's queue is FIFO,
    so job k-1 always starts first: no deadlock.
    """

    def __init__(self, path: str, start: Callable[[], Iterator[pa.RecordBatch]]):
        self._path = path
        self._start = start
        self._it: Iterator[pa.RecordBatch] | None = None
        self._turn = 0
        self._cond = threading.Condition()
        self.done = False

    def _job(self, ticket: int) -> Job:
        def run() -> list[pa.RecordBatch]:
            with self._cond:
                self._cond.wait_for(lambda: self._turn == ticket)
                try:
                    if self.done:
                        return []
                    if self._it is None:
                        self._it = iter(self._start())
                    return [next(self._it)]
                except StopIteration:
                    self.done = True
                    return []
                except ARROW_ERRORS as e:
                    self.done = True
                    raise unreadable(self._path, e) from None
                except BaseException:
                    self.done = True
                    raise
                finally:
                    self._turn += 1
                    self._cond.notify_all()

        return run

    def jobs(self) -> Iterator[Job]:
        ticket = 0
        while not self.done:
            yield self._job(ticket)
            ticket += 1


def open_reader(path: str):
    fmt = detect_format(path)
    if fmt == "parquet":
        return ParquetReader(path)
    if fmt == "arrow-file":
        return IpcFileReader(path)
    if fmt == "llama-kld":
        return LlamaKldReader(path)
    return IpcStreamReader(path)


def end_of_file() -> None:
    return None


def ordered(jobs: Iterator[tuple[int, Job]], readahead: int):
    """Run jobs with up to `readahead` in flight; yield (tag, result) in job order."""
    if readahead <= 0:
        for tag, job in jobs:
            yield tag, job()
        return
    pool = ThreadPoolExecutor(max_workers=readahead, thread_name_prefix="xent-read")
    pending: deque = deque()

    def fill():
        while len(pending) < readahead:
            item = next(jobs, None)
            if item is None:
                return
            pending.append((item[0], pool.submit(item[1])))

    try:
        fill()
        while pending:
            tag, fut = pending.popleft()
            result = fut.result()
            fill()  # keep `readahead` jobs decoding while the caller works on this one
            yield tag, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
