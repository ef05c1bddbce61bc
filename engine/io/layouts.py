"""Layout detection: which columns hold the logits and the target, and how they are stored."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine import dtypes
from engine.errors import XentInputError
from engine.io.paths import is_glob
from engine.io.records import FileInfo

# --------------------------------------------------------------------------------------
# Layout detection: which columns hold the logits and target, and how
# --------------------------------------------------------------------------------------


TENSOR_EXTENSION = "arrow.fixed_shape_tensor"


@dataclass(frozen=True)
class LogitsLayout:
    kind: str  # one of LAYOUTS
    columns: tuple[str, ...]  # the wide layout has many, the others one
    classes: int | None  # None: a list layout learns C from the data
    storage: str  # float16 | float32 | float64 | bfloat16
    numpy_dtype: np.dtype  # what chunks hold: float16/32/64, uint16 for bfloat16


@dataclass(frozen=True)
class TargetLayout:
    column: str
    soft: bool
    kind: str  # 'index' or a list layout for soft targets
    classes: int | None


def missing_column(schema: pa.Schema, name: str, path: str, role: str = "") -> XentInputError:
    available = ", ".join(schema.names) or "none"
    label = f"{role} column" if role else "column"
    return XentInputError(f"no {label} '{name}' (available: {available})", file=path)


def _is_list_like(t: pa.DataType) -> bool:
    return (
        pa.types.is_fixed_size_list(t)
        or pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or (isinstance(t, pa.BaseExtensionType) and t.extension_name == TENSOR_EXTENSION)
    )


def _list_kind(t: pa.DataType) -> tuple[str, pa.Field, int | None]:
    """(layout, value field, C or None) of a list-like column type."""
    if isinstance(t, pa.BaseExtensionType) and t.extension_name == TENSOR_EXTENSION:
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
) -> LogitsLayout:
    """How a file stores its logits: one list-like column, or wide scalar columns."""
    if is_glob(logits):
        return _detect_wide(schema, logits, logits_dtype, exclude, path)
    if logits not in schema.names:
        raise missing_column(schema, logits, path, "logits")
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
    return LogitsLayout(kind, (logits,), classes, storage, np_dtype)


def _detect_wide(schema, pattern, logits_dtype, exclude, path) -> LogitsLayout:
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
    return LogitsLayout("wide", tuple(names), len(names), storage, np_dtype)


def detect_target_layout(
    schema: pa.Schema, target: str | None, *, path: str = ""
) -> TargetLayout | None:
    """Class indices (any integer type) or probability rows (a list of floats)."""
    if target is None:
        return None
    if target not in schema.names:
        raise missing_column(schema, target, path, "target")
    t = schema.field(target).type
    if pa.types.is_integer(t):
        return TargetLayout(target, False, "index", None)
    if _is_list_like(t):
        kind, value_field, classes = _list_kind(t)
        if pa.types.is_floating(value_field.type):
            return TargetLayout(target, True, kind, classes)
    raise XentInputError(
        f"target column '{target}' has type {t}; expected an integer type (class "
        "indices) or a list of floats (probabilities)",
        file=path,
    )


@dataclass
class Entry:
    """A file of the source with what we learned about it at open time."""

    info: FileInfo
    reader: object
    layout: LogitsLayout
    target: TargetLayout | None
    selection: tuple[int, ...] | None = None  # Parquet row groups, None for all
    first_file_row: int = 0  # file row of the selection's first row
