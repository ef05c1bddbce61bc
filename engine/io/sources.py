"""Logit data sources: find the files, detect format and layout, yield bounded chunks.

A source is one or more Parquet files, Arrow IPC files (Feather v2) or Arrow IPC streams,
given as files, directories or globs, as local paths or pyarrow filesystem URIs
(`s3://bucket/prefix/`, `gs://...`, `file:///abs/path`; SPEC §4). `open_source` reads
only footers and schemas; `Source.iter_chunks` then yields `Chunk`s whose `logits` is a
2-D NumPy view of the Arrow buffer whenever the layout allows it, reading ahead on a
small thread pool so that decoding overlaps the caller's computation. Memory stays
bounded by chunk size times read-ahead, never by file size.

Every problem a user can cause raises `XentInputError` with the file (and row, numbered
from 0 within its file) in the message.
"""

from __future__ import annotations

import bisect
import fnmatch
import glob
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc
import pyarrow.parquet as pq

from engine import dtypes, interrupt
from engine.errors import XentInputError

#: The target value that stands for a null target (the row is ignored). Equal to PyTorch's
#: default ignore_index, so that code which forgets `target_valid` still ignores the row
#: by default; with another ignore_index it would be out of range and raise, not miscount.
NULL_TARGET = -100

FORMATS = ("parquet", "arrow-file", "arrow-stream")
LAYOUTS = ("fixed_size_list", "list", "large_list", "fixed_shape_tensor", "wide")
DEFAULT_CHUNK_BYTES = 64 * 2**20

# Suffixes that mark a file inside a directory as data even when its bytes are not
# recognised, so that a corrupt part raises instead of being skipped silently.
DATA_SUFFIXES = (".parquet", ".pq", ".parq", ".arrow", ".feather", ".ipc", ".arrows")
_GLOB_CHARS = "*?["
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_STREAM_CONTINUATION = b"\xff\xff\xff\xff"
_TENSOR_EXTENSION = "arrow.fixed_shape_tensor"

# Parquet reading (see _ParquetChunks). Row groups are decoded in batches of about
# _DECODE_BYTES, each column streamed through a _STREAM_BUFFER_BYTES buffer (pyarrow's
# pre_buffer would hold whole column chunks): pyarrow's working memory while decoding a
# list column is three to four times the rows decoded at once (values, levels, builder
# growth), so decoding a 131 MB row group whole needs 400-800 MB. Consecutive small row
# groups form one unit of work of about a chunk (at least _MIN_UNIT_BYTES). Decoders run
# at most `readahead` chunks ahead of the caller, or _MIN_AHEAD_BYTES when chunks are
# small (else tiny chunks would leave no room to decode two units at once).
_MIN_UNIT_BYTES = 4 * 2**20
_DECODE_BYTES = 4 * 2**20
_MIN_AHEAD_BYTES = 32 * 2**20
_STREAM_BUFFER_BYTES = 1 * 2**20


# --------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------


@dataclass
class FileInfo:
    """One input file. `rows` is None for an IPC stream until it has been read through."""

    path: str
    format: str
    rows: int | None
    row_groups: int | None
    bytes: int


@dataclass
class Chunk:
    """Consecutive rows of one file.

    logits: rows x C NumPy array (a read-only view of the Arrow buffer when the layout
        allows; float16 as np.float16, bfloat16 as np.uint16 bit patterns).
    target: int64 class indices (nulls replaced by NULL_TARGET), or rows x C
        probabilities for soft targets, or None without a target column.
    target_valid: bool mask, False where the target was null; None when none was null.
    keep: the --keep columns, or None.   group: the --group-by column, or None.
    file / file_row: the file and the index within it of the first row; row: the global
        index of the first row (over all files of the source, in order).
    """

    logits: np.ndarray | None
    target: np.ndarray | None
    target_valid: np.ndarray | None
    keep: pa.Table | None
    group: pa.Array | None
    file: str
    file_row: int
    row: int

    @property
    def num_rows(self) -> int:
        if self.logits is not None:
            return int(self.logits.shape[0])
        if self.target is not None:
            return int(self.target.shape[0])
        return 0


@dataclass(frozen=True)
class Fragment:
    """A picklable piece of a source (a file or some of its row groups), for Dask tasks.

    row_groups: Parquet row-group indices, or None for the whole file. first_row: global
    index of the fragment's first row; rows: its row count.
    """

    path: str
    format: str
    row_groups: tuple[int, ...] | None
    first_row: int
    rows: int


# --------------------------------------------------------------------------------------
# Finding files and their format
# --------------------------------------------------------------------------------------


def _is_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _hidden(name: str) -> bool:
    # Writers (Spark, Dask, pyarrow datasets, we) keep metadata and temp files under these.
    return name.startswith((".", "_"))


def _is_uri(path: str) -> bool:
    return "://" in path


# URI -> (filesystem, path within it). Filled by expand_paths for the files it lists (so
# that a directory of many files builds one filesystem) and by _locate; bounded, so that
# a long-lived process does not grow it without end.
_LOCATIONS: dict[str, tuple[pafs.FileSystem, str]] = {}
_LOCATIONS_LOCK = threading.Lock()
_MAX_LOCATIONS = 4096


def _remember(uri: str, fs: pafs.FileSystem, path: str) -> None:
    with _LOCATIONS_LOCK:
        if len(_LOCATIONS) >= _MAX_LOCATIONS:
            _LOCATIONS.clear()
        _LOCATIONS[uri] = (fs, path)


def _resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a URI; XentInputError naming the URI when pyarrow refuses."""
    with _LOCATIONS_LOCK:
        found = _LOCATIONS.get(uri)
    if found is not None:
        return found
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except _ARROW_ERRORS as e:
        raise _unreadable(uri, e, "cannot open URI") from None
    _remember(uri, fs, path)
    return fs, path


def _locate(path: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for a URI; (None, path) for a local path."""
    if _is_uri(path):
        return _resolve_uri(path)
    return None, path


def _open_random(path: str):
    """A random-access file: a memory map for local paths, else the filesystem's file."""
    fs, where = _locate(path)
    return pa.memory_map(where) if fs is None else fs.open_input_file(where)


def _file_size(path: str) -> int:
    fs, where = _locate(path)
    if fs is None:
        return os.path.getsize(where)
    try:
        return int(fs.get_file_info(where).size or 0)
    except _ARROW_ERRORS as e:
        raise _unreadable(path, e) from None


def _read_magic(path: str) -> bytes:
    try:
        fs, where = _locate(path)
        if fs is not None:
            with fs.open_input_file(where) as f:
                return f.read(8)
        with open(where, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise XentInputError(f"cannot read: {e.strerror or e}", file=path) from None
    except pa.ArrowException as e:
        raise _unreadable(path, e) from None


def _looks_like_data(path: str) -> bool:
    """Whether a file found by a directory scan or glob is one of ours."""
    if path.lower().endswith(DATA_SUFFIXES):
        return True
    head = _read_magic(path)
    return head.startswith((_PARQUET_MAGIC, _ARROW_FILE_MAGIC, _STREAM_CONTINUATION))


def _scan_directory(path: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        for name in files:
            full = os.path.join(root, name)
            if not _hidden(name) and os.path.isfile(full) and _looks_like_data(full):
                found.append(full)
    return sorted(found, key=lambda p: os.path.relpath(p, path))


def _split_query(uri: str) -> tuple[str, str]:
    """('scheme://.../path', '?query' or '')."""
    base, sep, query = uri.partition("?")
    return base, sep + query


def _list_uri(base: str, query: str) -> list[tuple[str, str]]:
    """(path relative to `base`, URI) of the visible files under the directory URI
    `base` (without its query), recursively, sorted by relative path."""
    fs, root = _resolve_uri(base + query)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except _ARROW_ERRORS as e:
        raise _unreadable(base + query, e, "cannot list") from None
    prefix = root.rstrip("/") + "/" if root.rstrip("/") else root
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.startswith(prefix):
            continue
        rel = info.path[len(prefix) :]
        if any(_hidden(part) for part in rel.split("/")):
            continue
        uri = base.rstrip("/") + "/" + rel + query
        _remember(uri, fs, info.path)
        out.append((rel, uri))
    return sorted(out)


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Whether the path `parts`, or a directory above it, matches the glob `pattern`
    (split on '/'): '*' stays within a name, '**' spans directories, as in glob.glob."""
    if not pattern:
        return True  # a matched directory takes in everything below it
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and (
        fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])
    )


def _expand_uri(uri: str) -> list[str]:
    """Files named by a URI: a file, a directory (scanned recursively) or a glob."""
    base, query = _split_query(uri)
    first = min((base.index(c) for c in _GLOB_CHARS if c in base), default=None)
    scheme_end = base.index("://") + 3
    if first is not None and first > scheme_end:
        cut = base.rfind("/", scheme_end, first)
        if cut < 0:
            raise XentInputError("a glob needs a directory before it", file=uri)
        pattern = [p for p in base[cut + 1 :].split("/") if p]
        listing = _list_uri(base[: cut + 1], query)
        matches = [
            u for rel, u in listing if _glob_match(rel.split("/"), pattern) and _looks_like_data(u)
        ]
        if not matches:
            raise XentInputError("no Parquet or Arrow files match this pattern", file=uri)
        return matches
    fs, path = _resolve_uri(uri)
    try:
        kind = fs.get_file_info(path).type
    except _ARROW_ERRORS as e:
        raise _unreadable(uri, e) from None
    if kind == pafs.FileType.Directory:
        found = [u for _, u in _list_uri(base, query) if _looks_like_data(u)]
        if not found:
            raise XentInputError("directory holds no Parquet or Arrow files", file=uri)
        return found
    if kind == pafs.FileType.NotFound:
        raise XentInputError("no such file or directory", file=uri)
    return [uri]


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by `paths` (files, directories scanned recursively, globs), in order.

    A path containing '://' is a pyarrow filesystem URI; the files it names are returned
    as URIs (so that they stay picklable and readable by remote workers)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if _is_uri(p):
            out.extend(_expand_uri(p))
        elif os.path.isdir(p):
            found = _scan_directory(p)
            if not found:
                raise XentInputError("directory holds no Parquet or Arrow files", file=p)
            out.extend(found)
        elif os.path.exists(p):
            out.append(p)
        elif _is_glob(p):
            matches = []
            for m in sorted(glob.glob(p, recursive=True)):
                if os.path.isdir(m):
                    matches.extend(_scan_directory(m))
                elif not _hidden(os.path.basename(m)) and _looks_like_data(m):
                    matches.append(m)
            if not matches:
                raise XentInputError("no Parquet or Arrow files match this pattern", file=p)
            out.extend(matches)
        else:
            raise XentInputError("no such file or directory", file=p)
    if not out:
        raise XentInputError("no input files given")
    return out


def detect_format(path: str) -> str:
    """'parquet' or 'arrow-file' from the magic bytes; anything else may be a stream.

    IPC streams have no magic (modern ones open with a 0xFFFFFFFF continuation marker,
    old ones with a length), so the stream reader is left to accept or refuse them.
    """
    head = _read_magic(path)
    if not head:
        raise XentInputError("empty file (0 bytes), not Parquet or Arrow", file=path)
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if head.startswith(_ARROW_FILE_MAGIC):
        return "arrow-file"
    return "arrow-stream"


def _unreadable(path: str, err: BaseException, what: str = "cannot read") -> XentInputError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return XentInputError(f"{what} ({text})", file=path)


_ARROW_ERRORS = (pa.ArrowException, OSError)


# --------------------------------------------------------------------------------------
# Per-format readers: metadata at open, then read jobs
# --------------------------------------------------------------------------------------

# IPC files and streams are read by jobs: a job is a callable that returns the next record
# batches of one file; jobs may run concurrently (_ordered), a file's batches come back in
# order. Parquet files have their own pipeline (_ParquetChunks).
Job = Callable[[], list[pa.RecordBatch]]


class _ParquetReader:
    format = "parquet"

    def __init__(self, path: str):
        self.path = path
        try:
            self._fs, self._where = _locate(path)
            pf = pq.ParquetFile(self._where, filesystem=self._fs, pre_buffer=False)
        except _ARROW_ERRORS as e:
            raise _unreadable(path, e, "not a readable Parquet file") from None
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
                pf = self._open(pre_buffer=False, buffer_size=_STREAM_BUFFER_BYTES)
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
        pf = self._open(pre_buffer=False, buffer_size=_STREAM_BUFFER_BYTES)
        return pf.iter_batches(
            batch_size=batch_rows, row_groups=list(groups), columns=columns, use_threads=False
        )


class _IpcFileReader:
    format = "arrow-file"

    def __init__(self, path: str):
        self.path = path
        try:
            reader = pa.ipc.open_file(_open_random(path))
            self.schema = reader.schema
            self.row_groups = reader.num_record_batches
            self.rows = reader.count_rows()
        except _ARROW_ERRORS as e:
            raise _unreadable(path, e, "not a readable Arrow IPC file") from None

    def jobs(self, columns) -> Iterator[Job]:
        # Memory-mapped (local paths): a batch is a zero-copy view of the file, so reading
        # is cheap and done under one lock (sharing a file reader across threads is not
        # documented). A URI's file is read through its filesystem, under the same lock.
        try:
            reader = pa.ipc.open_file(_open_random(self.path))
        except _ARROW_ERRORS as e:
            raise _unreadable(self.path, e) from None
        lock = threading.Lock()
        names = list(columns)

        def job(i: int) -> Job:
            def read() -> list[pa.RecordBatch]:
                try:
                    with lock:
                        batch = reader.get_batch(i)
                    return [batch.select(names)]
                except _ARROW_ERRORS as e:
                    raise _unreadable(self.path, e) from None

            return read

        for i in range(reader.num_record_batches):
            yield job(i)


def _open_stream(path: str):
    fs, where = _locate(path)
    if fs is not None:
        return pa.ipc.open_stream(fs.open_input_stream(where))
    try:
        source = pa.memory_map(path)
    except _ARROW_ERRORS:
        source = pa.OSFile(path)  # a pipe or device cannot be mapped
    return pa.ipc.open_stream(source)


class _IpcStreamReader:
    format = "arrow-stream"
    row_groups = None

    def __init__(self, path: str):
        self.path = path
        self.rows = None
        try:
            self.schema = _open_stream(path).schema
        except _ARROW_ERRORS as e:
            raise _unreadable(path, e, "not a Parquet or Arrow file") from None

    def jobs(self, columns) -> Iterator[Job]:
        names = list(columns)

        def start():
            for batch in _open_stream(self.path):
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
                except _ARROW_ERRORS as e:
                    self.done = True
                    raise _unreadable(self._path, e) from None
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


def _open_reader(path: str):
    fmt = detect_format(path)
    if fmt == "parquet":
        return _ParquetReader(path)
    if fmt == "arrow-file":
        return _IpcFileReader(path)
    return _IpcStreamReader(path)


# --------------------------------------------------------------------------------------
# Layout detection: which columns hold the logits and target, and how
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LogitsLayout:
    kind: str  # one of LAYOUTS
    columns: tuple[str, ...]  # the wide layout has many, the others one
    classes: int | None  # None: a list layout learns C from the data
    storage: str  # float16 | float32 | float64 | bfloat16
    numpy_dtype: np.dtype  # what chunks hold: float16/32/64, uint16 for bfloat16


@dataclass(frozen=True)
class _TargetLayout:
    column: str
    soft: bool
    kind: str  # 'index' or a list layout for soft targets
    classes: int | None


def _missing_column(schema: pa.Schema, name: str, path: str, role: str = "") -> XentInputError:
    available = ", ".join(schema.names) or "none"
    label = f"{role} column" if role else "column"
    return XentInputError(f"no {label} '{name}' (available: {available})", file=path)


def _is_list_like(t: pa.DataType) -> bool:
    return (
        pa.types.is_fixed_size_list(t)
        or pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or (isinstance(t, pa.BaseExtensionType) and t.extension_name == _TENSOR_EXTENSION)
    )


def _list_kind(t: pa.DataType) -> tuple[str, pa.Field, int | None]:
    """(layout, value field, C or None) of a list-like column type."""
    if isinstance(t, pa.BaseExtensionType) and t.extension_name == _TENSOR_EXTENSION:
        storage = t.storage_type
        return "fixed_shape_tensor", storage.value_field, storage.list_size
    if pa.types.is_fixed_size_list(t):
        return "fixed_size_list", t.value_field, t.list_size
    if pa.types.is_large_list(t):
        return "large_list", t.value_field, None
    return "list", t.value_field, None


def _has_bf16_marker(*metadatas) -> bool:
    return any(
        md is not None and md.get(dtypes.BF16_METADATA_KEY) == dtypes.BF16_METADATA_VALUE
        for md in metadatas
    )


def _storage(value_type: pa.DataType, marked: bool, logits_dtype, column: str, path: str):
    """(storage kind, NumPy dtype of chunks) of a logits value type."""
    if not (
        pa.types.is_floating(value_type)
        or pa.types.is_uint16(value_type)
        or pa.types.is_int16(value_type)
    ):
        raise XentInputError(
            f"logits column '{column}' holds {value_type} values; expected float16, "
            "float32, float64 or bfloat16 bits (uint16)",
            file=path,
        )
    np_dtype = np.dtype(value_type.to_pandas_dtype())
    try:
        kind = dtypes.storage_kind(np_dtype, "bfloat16" if marked else logits_dtype)
    except TypeError as e:
        raise XentInputError(f"logits column '{column}': {e}", file=path) from None
    return kind, (np.dtype(np.uint16) if kind == "bfloat16" else np_dtype)


def detect_logits_layout(
    schema: pa.Schema,
    logits: str,
    *,
    logits_dtype: str | None = None,
    exclude: Sequence[str] = (),
    path: str = "",
) -> _LogitsLayout:
    """How a file stores its logits: one list-like column, or wide scalar columns."""
    if _is_glob(logits):
        return _detect_wide(schema, logits, logits_dtype, exclude, path)
    if logits not in schema.names:
        raise _missing_column(schema, logits, path, "logits")
    fld = schema.field(logits)
    t = fld.type
    if not _is_list_like(t):
        raise XentInputError(
            f"logits column '{logits}' has type {t}; expected a list of floats "
            "(fixed_size_list, list, large_list or fixed_shape_tensor), or a glob "
            "such as 'logit_*' naming one float column per class",
            file=path,
        )
    kind, value_field, classes = _list_kind(t)
    if kind == "fixed_shape_tensor" and len(t.shape) != 1:
        raise XentInputError(
            f"logits column '{logits}' is a tensor of shape {list(t.shape)}; "
            "expected one dimension [classes]",
            file=path,
        )
    marked = _has_bf16_marker(fld.metadata, value_field.metadata)
    storage, np_dtype = _storage(value_field.type, marked, logits_dtype, logits, path)
    if classes == 0:
        raise XentInputError(f"logits column '{logits}' has no classes (size 0)", file=path)
    return _LogitsLayout(kind, (logits,), classes, storage, np_dtype)


def _detect_wide(schema, pattern, logits_dtype, exclude, path) -> _LogitsLayout:
    # Schema order, not name order: logit_10 follows logit_9 as the writer put it.
    names = [n for n in schema.names if fnmatch.fnmatchcase(n, pattern) and n not in set(exclude)]
    if not names:
        raise XentInputError(
            f"no columns match '{pattern}' (available: {', '.join(schema.names) or 'none'})",
            file=path,
        )
    fields = [schema.field(n) for n in names]
    types = {f.type for f in fields}
    if len(types) > 1:
        listed = ", ".join(f"{f.name}: {f.type}" for f in fields if f.type != fields[0].type)
        raise XentInputError(
            f"logit columns matching '{pattern}' must share one type; "
            f"{fields[0].name} is {fields[0].type} but {listed}",
            file=path,
        )
    marked = all(_has_bf16_marker(f.metadata) for f in fields)
    storage, np_dtype = _storage(fields[0].type, marked, logits_dtype, names[0], path)
    return _LogitsLayout("wide", tuple(names), len(names), storage, np_dtype)


def detect_target_layout(
    schema: pa.Schema, target: str | None, *, path: str = ""
) -> _TargetLayout | None:
    """Class indices (any integer type) or probability rows (a list of floats)."""
    if target is None:
        return None
    if target not in schema.names:
        raise _missing_column(schema, target, path, "target")
    t = schema.field(target).type
    if pa.types.is_integer(t):
        return _TargetLayout(target, False, "index", None)
    if _is_list_like(t):
        kind, value_field, classes = _list_kind(t)
        if pa.types.is_floating(value_field.type):
            return _TargetLayout(target, True, kind, classes)
    raise XentInputError(
        f"target column '{target}' has type {t}; expected an integer type (class "
        "indices) or a list of floats (probabilities)",
        file=path,
    )


# --------------------------------------------------------------------------------------
# Arrow arrays -> NumPy (zero-copy where the layout allows)
# --------------------------------------------------------------------------------------


def _first_null(arr: pa.Array) -> int:
    return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def list_matrix(
    arr: pa.Array,
    classes: int | None,
    *,
    column: str = "logits",
    path: str = "",
    file_row: int = 0,
) -> np.ndarray:
    """rows x C NumPy view of a fixed_size_list / list / large_list / tensor array.

    Zero-copy: the result shares the Arrow values buffer (slicing offsets honoured).
    Raises on null rows, null values and (list layouts) rows whose length is not C.
    """
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    n = len(arr)
    if arr.null_count:
        raise XentInputError(f"null {column} row", file=path, row=file_row + _first_null(arr))
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        if classes is not None and size != classes:
            raise XentInputError(f"{column} rows have {size} values, expected {classes}", file=path)
        values = arr.values.slice(arr.offset * size, n * size)
    else:
        offsets = arr.offsets.to_numpy()
        lengths = np.diff(offsets)
        size = classes if classes is not None else (int(lengths[0]) if n else 0)
        bad = np.flatnonzero(lengths != size)
        if bad.size:
            i = int(bad[0])
            raise XentInputError(
                f"ragged {column}: row has {int(lengths[i])} values, expected {size}",
                file=path,
                row=file_row + i,
            )
        values = arr.values.slice(int(offsets[0]) if n else 0, n * size)
    if values.null_count:
        i = _first_null(values) // max(size, 1)
        raise XentInputError(f"null value in {column}", file=path, row=file_row + i)
    return values.to_numpy(zero_copy_only=True).reshape(n, size)


def _wide_matrix(columns: list[pa.Array], names, np_dtype, path, file_row) -> np.ndarray:
    n = len(columns[0]) if columns else 0
    out = np.empty((n, len(columns)), dtype=np_dtype)
    for j, (col, name) in enumerate(zip(columns, names, strict=True)):
        if col.null_count:
            raise XentInputError(
                f"null logit in column '{name}'", file=path, row=file_row + _first_null(col)
            )
        out[:, j] = col.to_numpy(zero_copy_only=False).view(np_dtype)
    return out


def index_targets(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """(int64 targets with nulls as NULL_TARGET, validity mask or None)."""
    if not arr.null_count:
        return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), None
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    values = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values[~valid] = NULL_TARGET
    return values, valid


# --------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """A file of the source with what we learned about it at open time."""

    info: FileInfo
    reader: object
    layout: _LogitsLayout
    target: _TargetLayout | None
    selection: tuple[int, ...] | None = None  # Parquet row groups, None for all
    first_file_row: int = 0  # file row of the selection's first row


def _end_of_file() -> None:
    return None


def _ordered(jobs: Iterator[tuple[int, Job]], readahead: int):
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


@dataclass(frozen=True)
class _PlanFile:
    """A Parquet file of a _ParquetChunks plan; its chunks are slots first..first+count-1."""

    entry: int  # index into Source._entries
    first: int  # its first slot
    count: int  # its number of chunks
    rows: int  # its selected rows
    row: int  # global row of its first selected row
    columns: list[str]  # columns read
    other: list[str]  # columns kept as Arrow pieces (all but the copied matrices)


@dataclass(frozen=True)
class _Unit:
    """Row groups of one file that one thread decodes in order."""

    file: int  # index into _ParquetChunks.files
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


class _ParquetChunks:
    """The chunks of consecutive Parquet files, decoded ahead on threads, memory bounded.

    The footers give every row group's rows, so chunk boundaries are known before any
    read: chunk k of a file holds its selected rows [k * chunk_rows, (k+1) * chunk_rows).
    Units of row groups (_ParquetReader.units) are decoded by up to `readahead` threads
    at once, each unit sequentially in batches of about _DECODE_BYTES, without
    pre-buffering, so a decoder needs a few batches of memory however large its row
    group. Each batch goes at once into its chunk: kept as is when it holds the whole
    chunk (zero copy), else its logits (and probability targets) are copied into the
    chunk's matrix and the small columns kept as Arrow slices. While the caller holds
    chunk k, threads write only into chunks k+1 .. k+ahead and otherwise wait, so at most
    ahead + 1 chunks exist at once (ahead + 2 for a moment, while the caller's loop
    variable still holds chunk k as k+1 is handed over). Chunk matrices are reused once
    released (_Buffers). readahead 0 decodes on the calling thread, as chunks are asked.
    """

    def __init__(self, source: Source, indices, chunk_rows, readahead, targets_only, row):
        self.src = source
        self.chunk_rows = chunk_rows
        self.targets_only = targets_only
        self.files: list[_PlanFile] = []
        self.units: list[_Unit] = []
        row_bytes = (source.num_classes or 1) * source.logits_dtype_numpy.itemsize
        unit_bytes = max(chunk_rows * row_bytes, _MIN_UNIT_BYTES)
        self._count = 0  # chunks in all
        total_bytes = total_rows = 0
        for index in indices:
            entry = source._entries[index]
            columns = source._columns(entry, targets_only)
            matrices = set() if targets_only else set(entry.layout.columns)
            if entry.target is not None and entry.target.soft:
                matrices.add(entry.target.column)
            carried = {*source.keep_columns, source.group_by}
            other = [c for c in columns if c not in matrices or c in carried]
            rows = source._entry_rows(entry)
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
            self.threads = max(1, min(readahead, _cpu_count(), len(self.units)))
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._next_out = 0  # the chunk the caller asks for next
        self._next_unit = 0
        self._cancelled = False
        self._inline: Iterator[int] | None = None  # readahead 0: the unit being decoded
        self._buffers = _Buffers(keep=self.ahead + 2)

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
        entry = self.src._entries[f.entry]
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
        except _ARROW_ERRORS as e:
            self._fail(f, j, pos, end, _unreadable(path, e))
        except BaseException as e:
            self._fail(f, j, pos, end, e)

    def _put(self, j: int, f: _PlanFile, entry: _Entry, piece: pa.RecordBatch, pos: int):
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
            logits = src._logits(entry, piece, file_row, src.num_classes)
        if entry.target is not None and entry.target.soft:
            soft = src._target(entry, piece, file_row, src.num_classes)[0]
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
        entry = self.src._entries[f.entry]
        pos, _ = self._bounds(f, j)
        file_row = entry.first_file_row + pos
        row = f.row + pos
        if slot.view is not None:
            return self.src._chunk(entry, [(slot.view, file_row)], row, self.targets_only)
        pieces = [(batch, r) for r, batch in sorted(slot.pieces, key=lambda p: p[0])]
        return self.src._chunk(
            entry,
            pieces,
            row,
            self.targets_only,
            logits=slot.logits,
            soft=slot.soft,
            file_row=file_row,
        )


class _Buffers:
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


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Source:
    """An opened logit dataset: files, layout, classes; iterate with `iter_chunks`."""

    def __init__(
        self,
        entries: list[_Entry],
        *,
        logits: str,
        target: str | None,
        keep: tuple[str, ...],
        group_by: str | None,
        logits_dtype: str | None,
        first_row: int = 0,
    ):
        self._entries = entries
        self._first_row = first_row
        self.logits_column = logits
        self.target_column = target
        self.keep_columns = keep
        self.group_by = group_by
        self.logits_dtype = logits_dtype
        first = entries[0]
        self.files: list[FileInfo] = [e.info for e in entries]
        self.schema: pa.Schema = first.reader.schema
        self.layout: str = first.layout.kind
        self.storage: str = first.layout.storage
        self.num_classes: int | None = next(
            (e.layout.classes for e in entries if e.layout.classes is not None), None
        )
        self.soft_targets: bool = bool(first.target and first.target.soft)

    # -- facts -------------------------------------------------------------------------

    @property
    def num_rows(self) -> int | None:
        rows = [e.info.rows for e in self._entries]
        return None if any(r is None for r in rows) else sum(rows)

    @property
    def logits_dtype_numpy(self) -> np.dtype:
        """The dtype of `Chunk.logits` (uint16 for bfloat16)."""
        return self._entries[0].layout.numpy_dtype

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def describe(self) -> dict:
        """Facts for `xent inspect` (plain JSON types)."""
        first = self._entries[0]
        formats = sorted({f.format for f in self.files})
        return {
            "files": [
                {
                    "path": f.path,
                    "format": f.format,
                    "rows": f.rows,
                    "row_groups": f.row_groups,
                    "bytes": f.bytes,
                }
                for f in self.files
            ],
            "format": formats[0] if len(formats) == 1 else "mixed",
            "rows": self.num_rows,
            "classes": self.num_classes,
            "storage": self.storage,
            "layout": self.layout,
            "logits": list(first.layout.columns),
            "target": self.target_column,
            "target_type": (
                None if first.target is None else str(self.schema.field(first.target.column).type)
            ),
            "soft_targets": self.soft_targets,
            "keep": list(self.keep_columns),
            "group_by": self.group_by,
            "bytes": self.bytes,
            "columns": {
                name: str(t) for name, t in zip(self.schema.names, self.schema.types, strict=True)
            },
        }

    def default_chunk_rows(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
        row_bytes = (self.num_classes or 1) * self.logits_dtype_numpy.itemsize
        return max(1, int(chunk_bytes) // row_bytes)

    # -- reading -----------------------------------------------------------------------

    def _columns(self, entry: _Entry, targets_only: bool) -> list[str]:
        wanted: list[str] = []
        if not targets_only:
            wanted += list(entry.layout.columns)
        if entry.target is not None:
            wanted.append(entry.target.column)
        if not targets_only:
            wanted += list(self.keep_columns)
            if self.group_by:
                wanted.append(self.group_by)
        # Deduplicated, in schema order (what the readers return anyway).
        return [n for n in entry.reader.schema.names if n in set(wanted)]

    def _jobs(self, indices, targets_only: bool):
        for index in indices:
            entry = self._entries[index]
            cols = self._columns(entry, targets_only)
            for job in entry.reader.jobs(cols):
                yield index, job
            yield index, _end_of_file  # flushes the file's last chunk, even for no rows

    def iter_chunks(
        self,
        chunk_rows: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        readahead: int = 2,
        *,
        targets_only: bool = False,
    ) -> Iterator[Chunk]:
        """Chunks of `chunk_rows` rows (default: about `chunk_bytes` of logits), in input
        order, never spanning two files; the last chunk of a file may be shorter.

        Up to `readahead` chunks are decoded on threads (at most one per CPU) while the
        caller works on the current one; 0 reads on the calling thread. Memory is about
        chunk size x (readahead + 2), whatever the file and row-group sizes.
        """
        if chunk_rows is None:
            chunk_rows = self.default_chunk_rows(chunk_bytes)
        chunk_rows = int(chunk_rows)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        readahead = max(0, int(readahead))
        for chunk in self._chunks(chunk_rows, readahead, targets_only):
            interrupt.check()  # per chunk: a swallowed Ctrl-C still stops the job
            yield chunk

    def _chunks(self, chunk_rows: int, readahead: int, targets_only: bool) -> Iterator[Chunk]:
        row = self._first_row
        # Runs of consecutive Parquet files share one decoding pipeline; IPC files and
        # streams (memory-mapped, cheap to read) go through ordered read jobs.
        index = 0
        while index < len(self._entries):
            parquet = self._entries[index].reader.format == "parquet"
            end = index
            while end < len(self._entries) and (
                (self._entries[end].reader.format == "parquet") == parquet
            ):
                end += 1
            run = range(index, end)
            if parquet:
                pipeline = _ParquetChunks(self, run, chunk_rows, readahead, targets_only, row)
                yield from pipeline
                row = pipeline.end_row
            else:
                row = yield from self._ipc_chunks(run, chunk_rows, readahead, targets_only, row)
            index = end

    def _ipc_chunks(self, indices, chunk_rows, readahead, targets_only, row):
        jobs = self._jobs(indices, targets_only)
        current = -1
        pieces: list[tuple[pa.RecordBatch, int]] = []
        pending = 0
        file_row = 0
        for index, batches in _ordered(jobs, readahead):
            if index != current:
                current = index
                file_row = self._entries[index].first_file_row
            entry = self._entries[index]
            for batch in batches or ():
                pos = 0
                while pos < batch.num_rows:
                    take = min(chunk_rows - pending, batch.num_rows - pos)
                    pieces.append((batch.slice(pos, take), file_row))
                    pos += take
                    file_row += take
                    pending += take
                    if pending == chunk_rows:
                        yield self._chunk(entry, pieces, row, targets_only)
                        row += pending
                        pieces, pending = [], 0
            if batches is None:  # end of this file
                if pieces:
                    yield self._chunk(entry, pieces, row, targets_only)
                    row += pending
                    pieces, pending = [], 0
                if entry.info.rows is None and entry.selection is None:
                    entry.info.rows = file_row - entry.first_file_row
        return row

    def iter_targets(
        self, chunk_rows: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(target, target_valid) per chunk, reading only the target column."""
        if self.target_column is None:
            raise XentInputError("this source has no target column")
        for chunk in self.iter_chunks(chunk_rows, chunk_bytes, targets_only=True):
            yield chunk.target, chunk.target_valid

    def _chunk(
        self,
        entry: _Entry,
        pieces,
        row: int,
        targets_only: bool,
        *,
        logits: np.ndarray | None = None,
        soft: np.ndarray | None = None,
        file_row: int | None = None,
    ) -> Chunk:
        """A chunk of `pieces` ((batch, file row) in order); `logits` and `soft`, when
        given, are the matrices already assembled (the pieces then lack those columns)."""
        path = entry.info.path
        target = valid = keep = group = None
        classes = self.num_classes
        if not targets_only and logits is None:
            parts = [self._logits(entry, b, r, classes) for b, r in pieces]
            logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if soft is not None:
            target = soft
        elif entry.target is not None:
            tparts = [self._target(entry, b, r, classes) for b, r in pieces]
            if len(tparts) == 1:
                target, valid = tparts[0]
            else:
                target = np.concatenate([t for t, _ in tparts])
                if any(v is not None for _, v in tparts):
                    valid = np.concatenate(
                        [np.ones(len(t), bool) if v is None else v for t, v in tparts]
                    )
        if not targets_only and self.keep_columns:
            keep = pa.Table.from_batches([b.select(list(self.keep_columns)) for b, _ in pieces])
        if not targets_only and self.group_by:
            cols = [b.column(self.group_by) for b, _ in pieces]
            group = cols[0] if len(cols) == 1 else pa.concat_arrays(cols)
        if file_row is None:
            file_row = pieces[0][1]
        return Chunk(logits, target, valid, keep, group, path, file_row, row)

    def _logits(self, entry: _Entry, batch: pa.RecordBatch, file_row: int, classes):
        lay = entry.layout
        path = entry.info.path
        if lay.kind == "wide":
            cols = [batch.column(n) for n in lay.columns]
            return _wide_matrix(cols, lay.columns, lay.numpy_dtype, path, file_row)
        m = list_matrix(
            batch.column(lay.columns[0]),
            classes,
            column=lay.columns[0],
            path=path,
            file_row=file_row,
        )
        # Integer bit patterns of bfloat16 reach callers as uint16 (a free view of int16).
        return m if m.dtype == lay.numpy_dtype else m.view(lay.numpy_dtype)

    def _target(self, entry: _Entry, batch: pa.RecordBatch, file_row: int, classes):
        spec = entry.target
        arr = batch.column(spec.column)
        if not spec.soft:
            return index_targets(arr)
        m = list_matrix(arr, classes, column=spec.column, path=entry.info.path, file_row=file_row)
        return m, None

    # -- distribution ------------------------------------------------------------------

    def fragments(self, max_rows: int | None = None) -> list[Fragment]:
        """Pieces covering every row exactly once: whole files, or runs of Parquet row
        groups of at most `max_rows` rows (a larger row group is a fragment alone).
        IPC streams are counted by reading them (memory-mapped, cheap)."""
        out: list[Fragment] = []
        row = self._first_row
        for entry in self._entries:
            info = entry.info
            if info.rows is None:
                try:
                    info.rows = sum(b.num_rows for b in _open_stream(info.path))
                except _ARROW_ERRORS as e:
                    raise _unreadable(info.path, e) from None
            if entry.reader.format != "parquet" or max_rows is None:
                rows = self._entry_rows(entry)
                out.append(Fragment(info.path, info.format, entry.selection, row, rows))
                row += rows
                continue
            groups = entry.selection
            if groups is None:
                groups = tuple(range(entry.reader.row_groups))
            run: list[int] = []
            run_rows = 0
            for g in groups:
                n = entry.reader.group_rows(g)
                if run and run_rows + n > max_rows:
                    out.append(Fragment(info.path, info.format, tuple(run), row, run_rows))
                    row += run_rows
                    run, run_rows = [], 0
                run.append(g)
                run_rows += n
            if run or not groups:
                out.append(Fragment(info.path, info.format, tuple(run), row, run_rows))
                row += run_rows
        return out

    def _entry_rows(self, entry: _Entry) -> int:
        if entry.selection is None:
            return int(entry.info.rows or 0)
        return sum(entry.reader.group_rows(g) for g in entry.selection)


# --------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------


def _open_entry(path, logits, target, keep, group_by, logits_dtype) -> _Entry:
    reader = _open_reader(path)
    schema = reader.schema
    for name, role in [(k, "keep") for k in keep] + [(group_by, "group-by")]:
        if name is not None and name not in schema.names:
            raise _missing_column(schema, name, path, role)
    # A glob such as '*' must not swallow the target or group column (keep columns may
    # legitimately be logit columns too, so they stay eligible).
    exclude = [n for n in (target, group_by) if n is not None]
    layout = detect_logits_layout(
        schema, logits, logits_dtype=logits_dtype, exclude=exclude, path=path
    )
    tlayout = detect_target_layout(schema, target, path=path)
    if layout.classes is None:
        # List layouts carry C in the data only: read the first row to learn it.
        try:
            first = reader.probe(logits) if reader.format == "parquet" else _probe_ipc(path)
        except _ARROW_ERRORS as e:
            raise _unreadable(path, e) from None
        if isinstance(first, pa.RecordBatch):
            first = first.column(logits).slice(0, 1)
        if first is not None and len(first):
            if first.null_count:
                raise XentInputError(f"null {logits} row", file=path, row=0)
            layout = replace(layout, classes=len(first[0].values))
    info = FileInfo(
        path=path,
        format=reader.format,
        rows=reader.rows,
        row_groups=reader.row_groups,
        bytes=_file_size(path),
    )
    return _Entry(info, reader, layout, tlayout)


def _probe_ipc(path: str) -> pa.RecordBatch | None:
    fmt = detect_format(path)
    if fmt == "arrow-file":
        reader = pa.ipc.open_file(_open_random(path))
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if batch.num_rows:
                return batch
        return None
    for batch in _open_stream(path):
        if batch.num_rows:
            return batch
    return None


def _check_consistent(entries: list[_Entry]) -> None:
    """All files must agree on classes, storage and target kind (chunks share kernels)."""
    first = entries[0]
    ref = next((e for e in entries if e.layout.classes is not None), first)
    for e in entries[1:]:
        path = e.info.path
        if e.layout.storage != first.layout.storage:
            raise XentInputError(
                f"logits are {e.layout.storage}, but {first.info.path} has "
                f"{first.layout.storage}; all files must share one dtype",
                file=path,
            )
        if (e.target is None) != (first.target is None) or (
            e.target is not None and e.target.soft != first.target.soft
        ):
            raise XentInputError(
                f"target kind differs from {first.info.path} (class indices vs probabilities)",
                file=path,
            )
    for e in entries:
        if e.layout.classes is not None and e.layout.classes != ref.layout.classes:
            raise XentInputError(
                f"has {e.layout.classes} classes, but {ref.info.path} has "
                f"{ref.layout.classes}; all files must have the same number of classes",
                file=e.info.path,
            )
        t = e.target
        if t is not None and t.soft and t.classes is not None and t.classes != e.layout.classes:
            raise XentInputError(
                f"probability target '{t.column}' has {t.classes} columns, but the "
                f"logits have {e.layout.classes} classes",
                file=e.info.path,
            )


def _normalise_keep(keep) -> tuple[str, ...]:
    if keep is None:
        return ()
    if isinstance(keep, str):
        keep = [k for k in keep.split(",") if k]
    return tuple(keep)


def open_source(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    logits: str = "logits",
    target: str | None = "target",
    keep: Sequence[str] | str = (),
    group_by: str | None = None,
    logits_dtype: str | None = None,
) -> Source:
    """Open files / directories / globs as one Source (reads footers and schemas only).

    logits: the logits column, or a glob of scalar float columns (wide layout).
    target: the target column, or None for a source without targets.
    keep: columns to carry into `Chunk.keep`; group_by: a column for `Chunk.group`.
    logits_dtype: "bfloat16" marks uint16/int16 logits as bfloat16 bit patterns.
    """
    keep = _normalise_keep(keep)
    files = expand_paths(paths)
    entries = [_open_entry(p, logits, target, keep, group_by, logits_dtype) for p in files]
    _check_consistent(entries)
    return Source(
        entries,
        logits=logits,
        target=target,
        keep=keep,
        group_by=group_by,
        logits_dtype=logits_dtype,
    )


def open_fragment(
    fragment: Fragment,
    *,
    logits: str = "logits",
    target: str | None = "target",
    keep: Sequence[str] | str = (),
    group_by: str | None = None,
    logits_dtype: str | None = None,
) -> Source:
    """A Source over one fragment; chunk `row`s continue from `fragment.first_row`."""
    keep = _normalise_keep(keep)
    entry = _open_entry(fragment.path, logits, target, keep, group_by, logits_dtype)
    if fragment.row_groups is not None:
        reader = entry.reader
        entry.selection = tuple(fragment.row_groups)
        groups = fragment.row_groups
        entry.first_file_row = sum(reader.group_rows(g) for g in range(groups[0] if groups else 0))
        entry.info = replace(entry.info, rows=fragment.rows, row_groups=len(groups))
    return Source(
        [entry],
        logits=logits,
        target=target,
        keep=keep,
        group_by=group_by,
        logits_dtype=logits_dtype,
        first_row=fragment.first_row,
    )


__all__ = [
    "DATA_SUFFIXES",
    "DEFAULT_CHUNK_BYTES",
    "FORMATS",
    "LAYOUTS",
    "NULL_TARGET",
    "Chunk",
    "FileInfo",
    "Fragment",
    "Source",
    "detect_format",
    "detect_logits_layout",
    "detect_target_layout",
    "expand_paths",
    "index_targets",
    "list_matrix",
    "open_fragment",
    "open_source",
]
