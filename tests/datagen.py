"""Write small logit datasets in every layout and format the sources understand.

Test helper only: `write_dataset` builds a table from NumPy arrays in one of the logit
layouts (SPEC §4) and writes it as Parquet, an Arrow IPC file or an Arrow IPC stream.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from engine.dtypes import BF16_METADATA_KEY, BF16_METADATA_VALUE

LAYOUTS = ("fixed_size_list", "list", "large_list", "fixed_shape_tensor", "wide")
FORMATS = ("parquet", "arrow-file", "arrow-stream")
BF16_MARKER = {BF16_METADATA_KEY: BF16_METADATA_VALUE}


def list_array(matrix: np.ndarray, layout: str, value_field: pa.Field | None = None) -> pa.Array:
    """A rows x C matrix as one list-like Arrow column of the given layout."""
    matrix = np.ascontiguousarray(matrix)
    rows, classes = matrix.shape
    values = pa.array(matrix.reshape(-1))
    item = value_field if value_field is not None else pa.field("item", values.type)
    if layout == "fixed_size_list":
        return pa.FixedSizeListArray.from_arrays(values, type=pa.list_(item, classes))
    if layout == "list":
        offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * classes)
        return pa.ListArray.from_arrays(offsets, values, type=pa.list_(item))
    if layout == "large_list":
        offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * classes)
        return pa.LargeListArray.from_arrays(offsets, values, type=pa.large_list(item))
    if layout == "fixed_shape_tensor":
        storage = pa.FixedSizeListArray.from_arrays(values, classes)
        tensor_type = pa.fixed_shape_tensor(values.type, [classes])
        return pa.ExtensionArray.from_storage(tensor_type, storage)
    raise ValueError(f"not a list layout: {layout}")


def make_table(
    logits: np.ndarray,
    target=None,
    *,
    layout: str = "fixed_size_list",
    bf16: bool | str = False,
    soft: np.ndarray | None = None,
    soft_layout: str = "fixed_size_list",
    logits_name: str = "logits",
    target_name: str = "target",
    wide_prefix: str = "logit_",
    columns: dict | None = None,
) -> pa.Table:
    """The table `write_dataset` writes.

    bf16: False (no marker), True or "field" (marker on the logits field), "value" (marker
    on the list's value field). target: NumPy array, pa.Array (nulls allowed) or None.
    soft: probability targets (rows x C), written instead of `target`.
    columns: extra columns (name -> array-like), appended after the target.
    """
    logits = np.asarray(logits)
    field_meta = BF16_MARKER if bf16 in (True, "field") else None
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    if layout == "wide":
        for j in range(logits.shape[1]):
            col = pa.array(np.ascontiguousarray(logits[:, j]))
            arrays.append(col)
            fields.append(pa.field(f"{wide_prefix}{j}", col.type, metadata=field_meta))
    else:
        value_field = None
        if bf16 == "value":
            value_type = pa.from_numpy_dtype(logits.dtype)
            value_field = pa.field("item", value_type, metadata=BF16_MARKER)
        col = list_array(logits, layout, value_field)
        arrays.append(col)
        fields.append(pa.field(logits_name, col.type, metadata=field_meta))
    if soft is not None:
        col = list_array(np.asarray(soft), soft_layout)
        arrays.append(col)
        fields.append(pa.field(target_name, col.type))
    elif target is not None:
        col = target if isinstance(target, pa.Array) else pa.array(np.asarray(target))
        arrays.append(col)
        fields.append(pa.field(target_name, col.type))
    for name, values in (columns or {}).items():
        col = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
        arrays.append(col)
        fields.append(pa.field(name, col.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_table(path, table: pa.Table, fmt: str = "parquet", row_group_rows: int | None = None):
    """Write `table` as parquet / arrow-file / arrow-stream; row_group_rows sets the row
    group size (Parquet) or record batch size (IPC)."""
    path = os.fspath(path)
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=row_group_rows or max(1, table.num_rows))
        return path
    batches = table.to_batches(max_chunksize=row_group_rows) if table.num_rows else []
    with pa.OSFile(path, "wb") as sink:
        if fmt == "arrow-file":
            writer = pa.ipc.new_file(sink, table.schema)
        elif fmt == "arrow-stream":
            writer = pa.ipc.new_stream(sink, table.schema)
        else:
            raise ValueError(f"unknown format {fmt}")
        with writer:
            for batch in batches:
                writer.write_batch(batch)
    return path


def write_dataset(
    path,
    logits: np.ndarray,
    target=None,
    *,
    layout: str = "fixed_size_list",
    fmt: str = "parquet",
    row_group_rows: int | None = None,
    **table_kwargs,
) -> str:
    """Write one dataset file; see `make_table` for the table options."""
    table = make_table(logits, target, layout=layout, **table_kwargs)
    return write_table(path, table, fmt, row_group_rows)


def random_logits(rows: int, classes: int, dtype="float32", seed: int = 0) -> np.ndarray:
    """Random logits; dtype "bfloat16" gives uint16 bit patterns."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, classes)).astype(np.float32) * 3
    if dtype == "bfloat16":
        from engine.dtypes import float32_to_bf16_bits

        return float32_to_bf16_bits(x).reshape(rows, classes)
    return x.astype(dtype)
