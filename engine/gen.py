"""Synthetic logit datasets for `xent gen` and `xent demo`.

The data look like a real classifier's saved outputs rather than white noise: each row has
a true class and a confidence ``c`` drawn from a Beta distribution; the predicted class
(the true one with probability about ``c``, so accuracy is ~60%, a little below the mean
confidence, as with a slightly over-confident model) receives exactly probability ``c``
under softmax, and on a wrong row the true class keeps part of the remaining mass, or
(for a quarter of the wrong rows) stays among the noise, a little above it. The result
has a realistic loss, top-k accuracy that grows with k, and a small calibration error.

Rows are generated and written in batches, so memory stays bounded for any row count;
the file appears complete under its name at the end (temporary name + rename).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from engine.atomic import temp_path
from engine.dtypes import BF16_METADATA_KEY, BF16_METADATA_VALUE, float32_to_bf16_bits
from engine.errors import XentInputError, XentUsageError

DTYPES = ("float32", "float16", "float64", "bfloat16")
LAYOUTS = ("fixed_size_list", "list", "large_list", "tensor", "wide")
FORMATS = ("parquet", "arrow", "arrow-stream")
IGNORE_INDEX = -100
WIDE_PREFIX = "logit_"

_LAYOUT_ALIASES = {"fixed_shape_tensor": "tensor", "fsl": "fixed_size_list"}
_FORMAT_ALIASES = {
    "arrow-file": "arrow",
    "feather": "arrow",
    "ipc": "arrow",
    "stream": "arrow-stream",
}
_VALUE_TYPES = {
    "float32": pa.float32(),
    "float16": pa.float16(),
    "float64": pa.float64(),
    "bfloat16": pa.uint16(),
}
_BATCH_BYTES = 32 * 2**20  # logits generated per batch (float32 working copy)
_ROW_GROUP_BYTES = 4 * 2**20
_NOISE_LEVELS = 65536  # normal noise via a quantile table: ~3x faster than standard_normal


@dataclass
class GenResult:
    """What `generate` wrote."""

    path: str
    rows: int
    classes: int
    dtype: str
    layout: str
    format: str
    soft: bool
    row_group_rows: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def default_row_group_rows(classes: int, dtype: str = "float32") -> int:
    """About 1k rows, or fewer so that one row group stays near 4 MB of logits."""
    itemsize = 8 if dtype == "float64" else (2 if dtype in ("float16", "bfloat16") else 4)
    return max(1, min(1024, _ROW_GROUP_BYTES // max(1, classes * itemsize)))


def _norm(value: str, allowed: tuple[str, ...], aliases: dict, what: str) -> str:
    v = str(value).strip().lower()
    v = aliases.get(v, v)
    if v not in allowed:
        raise XentUsageError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return v


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------


class _RowMaker:
    """Draws batches of (logits float32, targets) from one seeded generator."""

    def __init__(self, classes: int, seed: int, ignore_frac: float, soft: bool):
        self.classes = classes
        self.rng = np.random.default_rng(seed)
        self.table = np.sort(self.rng.standard_normal(_NOISE_LEVELS)).astype(np.float32)
        self.ignore_frac = ignore_frac
        self.soft = soft

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng, c_ = self.rng, self.classes
        idx = rng.integers(0, _NOISE_LEVELS, (n, c_), dtype=np.uint16)
        x = np.take(self.table, idx)
        rows = np.arange(n)
        y = rng.integers(0, c_, n)
        if c_ > 1:
            self._shape(x, y, rows)
        else:
            x[:] = 0.0
        if self.soft:
            return x, self._soft_targets(x)
        if self.ignore_frac > 0:
            y = np.where(rng.random(n) < self.ignore_frac, IGNORE_INDEX, y)
        return x, y.astype(np.int64)

    def _shape(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> None:
        """Give the predicted class probability c and the true class its share, in place."""
        rng, c_ = self.rng, self.classes
        n = len(y)
        conf = rng.beta(2.4, 1.2, n).clip(1e-3, 1.0 - 1e-4)
        correct = rng.random(n) < conf**1.25  # a little over-confident: ECE ~ 0.05
        other = (y + 1 + rng.integers(0, c_ - 1, n)) % c_
        pred = np.where(correct, y, other)
        # a quarter of the wrong rows never saw the true class: its logit stays near the noise
        shared = ~correct & (rng.random(n) >= 0.25)
        e = np.exp(x, dtype=np.float32)
        rest = e.sum(axis=1, dtype=np.float64) - e[rows, pred]
        rest -= np.where(shared, e[rows, y], 0.0)
        share = np.minimum(rng.uniform(0.05, 0.95, n), 0.9 * conf / (1.0 - conf))
        q = np.where(shared, share * (1.0 - conf), 0.0)  # probability of the true class
        free = 1.0 - conf - q
        empty = rest <= 0  # two classes, both assigned: the true class takes what is left
        q = np.where(empty & shared, 1.0 - conf, q)
        with np.errstate(divide="ignore"):
            log_z = np.where(empty, 0.0, np.log(np.maximum(rest, 1e-300) / np.maximum(free, 1e-12)))
        x[rows, pred] = top = (np.log(conf) + log_z).astype(np.float32)
        w = np.flatnonzero(shared)
        x[w, y[w]] = (np.log(np.maximum(q[w], 1e-12)) + log_z[w]).astype(np.float32)
        # the unseen ones still lean towards the truth a little: top-k keeps growing with k
        u = np.flatnonzero(~correct & ~shared)
        lean = rng.uniform(0.0, 3.5, u.size).astype(np.float32)
        x[u, y[u]] = np.minimum(x[u, y[u]] + lean, top[u] - np.float32(0.1))

    def _soft_targets(self, x: np.ndarray) -> np.ndarray:
        """A teacher's distribution: softmax of the logits plus noise at temperature 2."""
        idx = self.rng.integers(0, _NOISE_LEVELS, x.shape, dtype=np.uint16)
        teacher = (x + np.take(self.table, idx)) / np.float32(2.0)
        teacher -= teacher.max(axis=1, keepdims=True)
        np.exp(teacher, out=teacher)
        teacher /= teacher.sum(axis=1, keepdims=True)
        return teacher


# --------------------------------------------------------------------------------------
# Arrow
# --------------------------------------------------------------------------------------


def _logits_fields(classes: int, dtype: str, layout: str) -> list[pa.Field]:
    value_type = _VALUE_TYPES[dtype]
    meta = {BF16_METADATA_KEY: BF16_METADATA_VALUE} if dtype == "bfloat16" else None
    if layout == "wide":
        return [pa.field(f"{WIDE_PREFIX}{j}", value_type, metadata=meta) for j in range(classes)]
    if layout == "fixed_size_list":
        t = pa.list_(value_type, classes)
    elif layout == "list":
        t = pa.list_(value_type)
    elif layout == "large_list":
        t = pa.large_list(value_type)
    else:
        t = pa.fixed_shape_tensor(value_type, [classes])
    return [pa.field("logits", t, metadata=meta)]


def schema_for(classes: int, dtype: str, layout: str, soft: bool) -> pa.Schema:
    """id int64, the logits (one column, or one per class for wide), target."""
    target = pa.field("target", pa.list_(pa.float32(), classes) if soft else pa.int64())
    return pa.schema([pa.field("id", pa.int64()), *_logits_fields(classes, dtype, layout), target])


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return float32_to_bf16_bits(x).reshape(x.shape)
    return x.astype(dtype, copy=False)


def _logits_arrays(x: np.ndarray, schema: pa.Schema, layout: str) -> list[pa.Array]:
    n, c = x.shape
    if layout == "wide":
        return [pa.array(x[:, j].copy()) for j in range(c)]
    values = pa.array(x.reshape(-1))
    t = schema.field("logits").type
    if layout == "fixed_size_list":
        return [pa.FixedSizeListArray.from_arrays(values, type=t)]
    if layout == "list":
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * c)
        return [pa.ListArray.from_arrays(offsets, values, type=t)]
    if layout == "large_list":
        offsets = pa.array(np.arange(n + 1, dtype=np.int64) * c)
        return [pa.LargeListArray.from_arrays(offsets, values, type=t)]
    storage = pa.FixedSizeListArray.from_arrays(values, c)
    return [pa.ExtensionArray.from_storage(t, storage)]


def _batch_table(first_id, x, target, schema, dtype, layout) -> pa.Table:
    n, c = x.shape
    ids = pa.array(np.arange(first_id, first_id + n, dtype=np.int64))
    if target.ndim == 2:
        tcol = pa.FixedSizeListArray.from_arrays(
            pa.array(target.astype(np.float32, copy=False).reshape(-1)), c
        )
    else:
        tcol = pa.array(target)
    arrays = [ids, *_logits_arrays(_encode(x, dtype), schema, layout), tcol]
    return pa.Table.from_arrays(arrays, schema=schema)


class _Writer:
    def __init__(self, path: str, schema: pa.Schema, fmt: str, row_group_rows: int):
        self.fmt = fmt
        self.row_group_rows = row_group_rows
        self._file = pa.OSFile(path, "wb")
        if fmt == "parquet":
            # No dictionary encoding: logits have no repeated values, and trying costs 3x.
            self._w = pq.ParquetWriter(
                self._file, schema, compression="snappy", use_dictionary=["target"]
            )
        elif fmt == "arrow":
            self._w = pa.ipc.new_file(self._file, schema)
        else:
            self._w = pa.ipc.new_stream(self._file, schema)

    def write(self, table: pa.Table) -> None:
        if self.fmt == "parquet":
            self._w.write_table(table, row_group_size=self.row_group_rows)
        else:
            self._w.write_table(table, max_chunksize=self.row_group_rows)

    def close(self) -> None:
        try:
            self._w.close()
        finally:
            self._file.close()


# --------------------------------------------------------------------------------------
# Public
# --------------------------------------------------------------------------------------


def generate(
    path: str | os.PathLike,
    *,
    rows: int,
    classes: int,
    dtype: str = "float32",
    layout: str = "fixed_size_list",
    format: str = "parquet",
    seed: int = 0,
    ignore_frac: float = 0.0,
    soft: bool = False,
    row_group_rows: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> GenResult:
    """Write a synthetic dataset of `rows` x `classes` logits to `path`.

    Columns: ``id`` (int64, 0..rows-1), the logits (``logits`` in the given layout, or
    ``logit_0 .. logit_{C-1}`` for wide), ``target`` (int64 class, ``-100`` for the
    `ignore_frac` of ignored rows; or ``fixed_size_list<float32>`` probabilities with
    `soft`). bfloat16 logits are uint16 bit patterns with field metadata
    ``xent.dtype=bfloat16``. `progress(rows_done, bytes_done, rows)` is called per batch.
    The same arguments give the same file.
    """
    path = os.fspath(path)
    dtype = _norm(dtype, DTYPES, {}, "dtype")
    layout = _norm(layout, LAYOUTS, _LAYOUT_ALIASES, "layout")
    fmt = _norm(format, FORMATS, _FORMAT_ALIASES, "format")
    rows, classes = int(rows), int(classes)
    if rows < 1:
        raise XentUsageError(f"rows must be >= 1, got {rows}")
    if classes < 1:
        raise XentUsageError(f"classes must be >= 1, got {classes}")
    if not 0.0 <= float(ignore_frac) <= 1.0:
        raise XentUsageError(f"ignore fraction must be between 0 and 1, got {ignore_frac}")
    if soft and ignore_frac > 0:
        raise XentUsageError(
            "--ignore-frac has no meaning with --soft: probability targets are never ignored"
        )
    if row_group_rows is None:
        row_group_rows = default_row_group_rows(classes, dtype)
    row_group_rows = int(row_group_rows)
    if row_group_rows < 1:
        raise XentUsageError(f"row group size must be >= 1, got {row_group_rows}")
    if os.path.isdir(path):
        raise XentInputError("is a directory; give a file name for the output", file=path)
    if os.path.exists(path) and not overwrite:
        raise XentInputError("exists; pass --overwrite to replace it", file=path)

    # Batches hold whole row groups, so that every group but the last has row_group_rows.
    per_batch = max(1, _BATCH_BYTES // (classes * 4))
    per_batch = max(row_group_rows, per_batch // row_group_rows * row_group_rows)
    schema = schema_for(classes, dtype, layout, soft)
    maker = _RowMaker(classes, seed, float(ignore_frac), soft)

    start = time.perf_counter()
    temp = temp_path(path)
    try:
        writer = _Writer(temp, schema, fmt, row_group_rows)
    except OSError as e:
        raise XentInputError(f"cannot write ({e.strerror or e})", file=path) from None
    try:
        try:
            done = 0
            while done < rows:
                n = min(per_batch, rows - done)
                x, target = maker.batch(n)
                writer.write(_batch_table(done, x, target, schema, dtype, layout))
                done += n
                if progress is not None:
                    progress(done, os.path.getsize(temp), rows)
        finally:
            writer.close()
        if os.path.exists(path) and not overwrite:  # appeared while we worked
            raise XentInputError("exists; pass --overwrite to replace it", file=path)
        os.replace(temp, path)
    except OSError as e:
        _remove(temp)
        raise XentInputError(f"cannot write ({e.strerror or e})", file=path) from None
    except BaseException:  # Ctrl-C included: leave nothing behind
        _remove(temp)
        raise
    return GenResult(
        path=path,
        rows=rows,
        classes=classes,
        dtype=dtype,
        layout=layout,
        format=fmt,
        soft=bool(soft),
        row_group_rows=row_group_rows,
        bytes=os.path.getsize(path),
        seconds=time.perf_counter() - start,
    )


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["DTYPES", "FORMATS", "LAYOUTS", "GenResult", "default_row_group_rows", "generate"]
