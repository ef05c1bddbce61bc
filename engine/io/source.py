"""An opened logit dataset (`Source`): files, layout, classes, and its chunks in order."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from engine import interrupt
from engine.errors import XentInputError
from engine.io.decode import first_null, index_targets, list_matrix, wide_matrix
from engine.io.formats import end_of_file, open_reader, open_stream, ordered
from engine.io.layouts import (
    Entry,
    SparseRequest,
    detect_logits_layout,
    detect_sparse_layout,
    detect_target_layout,
    missing_column,
    wants_sparse,
)
from engine.io.parquet import ParquetChunks
from engine.io.paths import (
    ARROW_ERRORS,
    detect_format,
    expand_paths,
    file_size,
    open_random,
    unreadable,
)
from engine.io.records import DEFAULT_CHUNK_BYTES, Chunk, FileInfo, Fragment


class Source:
    """An opened logit dataset: files, layout, classes; iterate with `iter_chunks`."""

    def __init__(
        self,
        entries: list[Entry],
        *,
        logits: str,
        target: str | None,
        keep: tuple[str, ...],
        group_by: str | None,
        logits_dtype: str | None,
        first_row: int = 0,
    ):
        self.entries = entries
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
        # values per row of the logits matrix: C, or k for sparse top-k rows
        self.row_width: int | None = next(
            (e.layout.classes for e in entries if e.layout.classes is not None), None
        )
        self.sparse = first.sparse  # SparseLayout of top-k rows, or None
        self.num_classes: int | None = (
            self.sparse.classes if self.sparse is not None else self.row_width
        )
        self.soft_targets: bool = bool(first.target and first.target.soft)

    # -- facts -------------------------------------------------------------------------

    @property
    def num_rows(self) -> int | None:
        rows = [e.info.rows for e in self.entries]
        return None if any(r is None for r in rows) else sum(rows)

    @property
    def logits_dtype_numpy(self) -> np.dtype:
        """The dtype of `Chunk.logits` (uint16 for bfloat16)."""
        return self.entries[0].layout.numpy_dtype

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def describe(self) -> dict:
        """Facts for `xent inspect` (plain JSON types)."""
        first = self.entries[0]
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
            "layout": "sparse_topk" if self.sparse is not None else self.layout,
            "logits": list(first.layout.columns),
            "sparse": None
            if self.sparse is None
            else {
                "indices": self.sparse.indices,
                "values": self.sparse.values,
                "k": self.row_width,
                "kind": self.sparse.kind,
                "lse": self.sparse.lse,
                "normalised_over": self.sparse.normalised_over,
            },
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

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of the logits matrix (and of its indices, for sparse rows)."""
        per_value = self.logits_dtype_numpy.itemsize + (4 if self.sparse is not None else 0)
        return max(1, (self.row_width or 1) * per_value)

    def default_chunk_rows(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
        return max(1, int(chunk_bytes) // self.row_bytes)

    # -- reading -----------------------------------------------------------------------

    def columns_for(self, entry: Entry, targets_only: bool) -> list[str]:
        wanted: list[str] = []
        if not targets_only:
            wanted += list(entry.layout.columns)
            if entry.sparse is not None:
                wanted += [c for c in (entry.sparse.indices, entry.sparse.lse) if c]
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
            entry = self.entries[index]
            cols = self.columns_for(entry, targets_only)
            for job in entry.reader.jobs(cols):
                yield index, job
            yield index, end_of_file  # flushes the file's last chunk, even for no rows

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
        while index < len(self.entries):
            parquet = self.entries[index].reader.format == "parquet"
            end = index
            while end < len(self.entries) and (
                (self.entries[end].reader.format == "parquet") == parquet
            ):
                end += 1
            run = range(index, end)
            if parquet:
                pipeline = ParquetChunks(self, run, chunk_rows, readahead, targets_only, row)
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
        for index, batches in ordered(jobs, readahead):
            if index != current:
                current = index
                file_row = self.entries[index].first_file_row
            entry = self.entries[index]
            for batch in batches or ():
                pos = 0
                while pos < batch.num_rows:
                    take = min(chunk_rows - pending, batch.num_rows - pos)
                    pieces.append((batch.slice(pos, take), file_row))
                    pos += take
                    file_row += take
                    pending += take
                    if pending == chunk_rows:
                        yield self.make_chunk(entry, pieces, row, targets_only)
                        row += pending
                        pieces, pending = [], 0
            if batches is None:  # end of this file
                if pieces:
                    yield self.make_chunk(entry, pieces, row, targets_only)
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

    def make_chunk(
        self,
        entry: Entry,
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
        classes = self.row_width
        indices = lse = None
        if not targets_only and entry.sparse is not None:
            indices, lse = self._decode_sparse(entry, pieces)
        if not targets_only and logits is None:
            parts = [self.decode_logits(entry, b, r, classes) for b, r in pieces]
            logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if soft is not None:
            target = soft
        elif entry.target is not None:
            tparts = [self.decode_target(entry, b, r, classes) for b, r in pieces]
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
        return Chunk(logits, target, valid, keep, group, path, file_row, row, indices, lse)

    def _decode_sparse(self, entry: Entry, pieces):
        """(rows x k class indices, float64 lse per row or None) of sparse pieces."""
        sp = entry.sparse
        parts = [
            list_matrix(
                b.column(sp.indices), self.row_width, column=sp.indices,
                path=entry.info.path, file_row=r,
            )
            for b, r in pieces
        ]  # fmt: skip
        indices = parts[0] if len(parts) == 1 else np.concatenate(parts)
        lse = None
        if sp.lse is not None:
            cols = []
            for b, r in pieces:
                col = b.column(sp.lse)
                if col.null_count:
                    raise XentInputError(
                        f"null {sp.lse}", file=entry.info.path, row=r + first_null(col)
                    )
                cols.append(col.to_numpy(zero_copy_only=False).astype(np.float64))
            lse = cols[0] if len(cols) == 1 else np.concatenate(cols)
        return indices, lse

    def decode_logits(self, entry: Entry, batch: pa.RecordBatch, file_row: int, classes):
        lay = entry.layout
        path = entry.info.path
        if lay.kind == "wide":
            cols = [batch.column(n) for n in lay.columns]
            return wide_matrix(cols, lay.columns, lay.numpy_dtype, path, file_row)
        m = list_matrix(
            batch.column(lay.columns[0]),
            classes,
            column=lay.columns[0],
            path=path,
            file_row=file_row,
        )
        # Integer bit patterns of bfloat16 reach callers as uint16 (a free view of int16).
        return m if m.dtype == lay.numpy_dtype else m.view(lay.numpy_dtype)

    def decode_target(self, entry: Entry, batch: pa.RecordBatch, file_row: int, classes):
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
        for entry in self.entries:
            info = entry.info
            if info.rows is None:
                try:
                    info.rows = sum(b.num_rows for b in open_stream(info.path))
                except ARROW_ERRORS as e:
                    raise unreadable(info.path, e) from None
            if entry.reader.format != "parquet" or max_rows is None:
                rows = self.entry_rows(entry)
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

    def entry_rows(self, entry: Entry) -> int:
        if entry.selection is None:
            return int(entry.info.rows or 0)
        return sum(entry.reader.group_rows(g) for g in entry.selection)


# --------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------


def open_entry(path, logits, target, keep, group_by, logits_dtype, sparse=None) -> Entry:
    reader = open_reader(path)
    schema = reader.schema
    sparse_layout = None
    if wants_sparse(schema, logits, sparse):
        layout, sparse_layout = detect_sparse_layout(
            schema, sparse or SparseRequest(), logits_dtype=logits_dtype, path=path
        )
        logits = sparse_layout.values
    for name, role in [(k, "keep") for k in keep] + [(group_by, "group-by")]:
        if name is not None and name not in schema.names:
            raise missing_column(schema, name, path, role)
    # A glob such as '*' must not swallow the target or group column (keep columns may
    # legitimately be logit columns too, so they stay eligible).
    exclude = [n for n in (target, group_by) if n is not None]
    if sparse_layout is None:
        layout = detect_logits_layout(
            schema, logits, logits_dtype=logits_dtype, exclude=exclude, path=path
        )
    tlayout = detect_target_layout(schema, target, path=path)
    if layout.classes is None:
        # List layouts carry C in the data only: read the first row to learn it.
        try:
            first = reader.probe(logits) if reader.format == "parquet" else _probe_ipc(path)
        except ARROW_ERRORS as e:
            raise unreadable(path, e) from None
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
        bytes=file_size(path),
    )
    if sparse_layout is not None and tlayout is not None and tlayout.soft:
        raise XentInputError(
            f"sparse top-k rows take class-index targets; '{target}' holds probabilities",
            file=path,
        )
    return Entry(info, reader, layout, tlayout, sparse=sparse_layout)


def _probe_ipc(path: str) -> pa.RecordBatch | None:
    fmt = detect_format(path)
    if fmt == "arrow-file":
        reader = pa.ipc.open_file(open_random(path))
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if batch.num_rows:
                return batch
        return None
    for batch in open_stream(path):
        if batch.num_rows:
            return batch
    return None


def _check_consistent(entries: list[Entry]) -> None:
    """All files must agree on classes, storage and target kind (chunks share kernels)."""
    first = entries[0]
    ref = next((e for e in entries if e.layout.classes is not None), first)
    for e in entries[1:]:
        path = e.info.path
        if (e.sparse is None) != (first.sparse is None) or (
            e.sparse is not None and e.sparse.classes != first.sparse.classes
        ):
            raise XentInputError(
                "sparse top-k layout or class count differs from "
                f"{first.info.path}; all files must share one layout",
                file=path,
            )
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


def normalise_keep(keep) -> tuple[str, ...]:
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
    sparse: SparseRequest | None = None,
) -> Source:
    """Open files / directories / globs as one Source (reads footers and schemas only).

    logits: the logits column, or a glob of scalar float columns (wide layout).
    target: the target column, or None for a source without targets.
    keep: columns to carry into `Chunk.keep`; group_by: a column for `Chunk.group`.
    logits_dtype: "bfloat16" marks uint16/int16 logits as bfloat16 bit patterns.
    sparse: read top-k rows (class-index and value list columns); also chosen when the
    logits column is absent and the default top-k columns are present.
    """
    keep = normalise_keep(keep)
    files = expand_paths(paths)
    entries = [open_entry(p, logits, target, keep, group_by, logits_dtype, sparse) for p in files]
    _check_consistent(entries)
    return Source(
        entries,
        logits=logits,
        target=target,
        keep=keep,
        group_by=group_by,
        logits_dtype=logits_dtype,
    )
