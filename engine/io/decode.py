"""Arrow arrays to NumPy matrices: list and wide layouts, integer targets with nulls."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.errors import XentInputError
from engine.io.records import NULL_TARGET

# --------------------------------------------------------------------------------------
# Arrow arrays -> NumPy (zero-copy where the layout allows)
# --------------------------------------------------------------------------------------


def first_null(arr: pa.Array) -> int:
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
        raise XentInputError(f"null {column} row", file=path, row=file_row + first_null(arr))
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
        i = first_null(values) // max(size, 1)
        raise XentInputError(f"null value in {column}", file=path, row=file_row + i)
    return values.to_numpy(zero_copy_only=True).reshape(n, size)


def wide_matrix(columns: list[pa.Array], names, np_dtype, path, file_row) -> np.ndarray:
    n = len(columns[0]) if columns else 0
    out = np.empty((n, len(columns)), dtype=np_dtype)
    for j, (col, name) in enumerate(zip(columns, names, strict=True)):
        if col.null_count:
            raise XentInputError(
                f"null logit in column '{name}'", file=path, row=file_row + first_null(col)
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
