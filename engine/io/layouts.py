"""Layout detection: which columns hold the logits and the target, and how they are stored."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine import dtypes
from engine.errors import XentInputError, XentUsageError
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


# -- sparse top-k rows (SPEC §8) ----------------------------------------------------------

CLASSES_METADATA_KEY = b"xent.classes"
TOPK_KINDS = ("logprobs", "logits")
DEFAULT_TOPK_INDICES = "topk_indices"
DEFAULT_TOPK_VALUES = "topk_logprobs"


@dataclass(frozen=True)
class SparseRequest:
    """What the user said about sparse rows (--topk-indices/--topk-values/--classes/
    --topk-kind/--lse); a source without a logits column but with the two default columns
    is read as sparse with these defaults."""

    indices: str = DEFAULT_TOPK_INDICES
    values: str = DEFAULT_TOPK_VALUES
    classes: int | None = None
    kind: str = "logprobs"  # values are log-probs over all C classes, or raw logits
    lse: str | None = None  # logits: the column of each row's lse over all C classes

    def __post_init__(self):
        if self.kind not in TOPK_KINDS:
            raise XentUsageError(f"topk kind must be one of {', '.join(TOPK_KINDS)}")
        if self.classes is not None and int(self.classes) < 1:
            raise XentUsageError(f"classes must be >= 1, got {self.classes}")


@dataclass(frozen=True)
class SparseLayout:
    """Sparse rows: ``values`` is read as the logits matrix (rows x k), ``indices`` names
    the class of each value; ``classes`` is C, the full number of classes."""

    indices: str
    values: str
    lse: str | None
    kind: str
    classes: int

    @property
    def value_mode(self) -> str:
        """What a value has to subtract to be a log-prob over all C: 'logprobs' (nothing),
        'lse' (the lse column), 'topk' (the lse of the k values: normalised over k)."""
        if self.kind == "logprobs":
            return "logprobs"
        return "lse" if self.lse is not None else "topk"

    @property
    def normalised_over(self) -> str:
        """'all': log-probs over all C classes are known; 'topk': over the k alone."""
        return "topk" if self.kind == "logits" and self.lse is None else "all"


def _classes_from_metadata(*metadatas) -> int | None:
    for md in metadatas:
        if md is not None and CLASSES_METADATA_KEY in md:
            try:
                return int(md[CLASSES_METADATA_KEY])
            except ValueError:
                return None
    return None


def wants_sparse(schema: pa.Schema, logits: str, request: SparseRequest | None) -> bool:
    """Sparse when asked, or when the logits column is absent and the default top-k
    columns are there (a file written by ``xent score --emit-topk``)."""
    if request is not None:
        return True
    names = set(schema.names)
    return logits not in names and {DEFAULT_TOPK_INDICES, DEFAULT_TOPK_VALUES} <= names


def detect_sparse_layout(
    schema: pa.Schema, request: SparseRequest, *, logits_dtype=None, path: str = ""
) -> tuple[LogitsLayout, SparseLayout]:
    """(the values column as a list layout of k per row, the sparse facts)."""
    for name, role in ((request.indices, "top-k indices"), (request.values, "top-k values")):
        if name not in schema.names:
            raise missing_column(schema, name, path, role)
    ifield = schema.field(request.indices)
    if not (_is_list_like(ifield.type) and pa.types.is_integer(_list_kind(ifield.type)[1].type)):
        raise XentInputError(
            f"top-k indices column '{request.indices}' has type {ifield.type}; "
            "expected a list of integers",
            file=path,
        )
    values = detect_logits_layout(schema, request.values, logits_dtype=logits_dtype, path=path)
    vfield = schema.field(request.values)
    classes = request.classes
    if classes is None:
        classes = _classes_from_metadata(
            ifield.metadata,
            vfield.metadata,
            _list_kind(ifield.type)[1].metadata,
            _list_kind(vfield.type)[1].metadata,
            schema.metadata,
        )
    if classes is None:
        raise XentInputError(
            f"sparse top-k rows ('{request.indices}', '{request.values}') need the number "
            "of classes: pass --classes C (classes=C), or store it as field metadata "
            "xent.classes",
            file=path,
        )
    lse = request.lse
    if lse is not None:
        if lse not in schema.names:
            raise missing_column(schema, lse, path, "lse")
        if not pa.types.is_floating(schema.field(lse).type):
            raise XentInputError(
                f"lse column '{lse}' has type {schema.field(lse).type}; expected floats",
                file=path,
            )
    sparse = SparseLayout(request.indices, request.values, lse, request.kind, int(classes))
    return values, sparse


@dataclass
class Entry:
    """A file of the source with what we learned about it at open time."""

    info: FileInfo
    reader: object
    layout: LogitsLayout
    target: TargetLayout | None
    selection: tuple[int, ...] | None = None  # Parquet row groups, None for all
    first_file_row: int = 0  # file row of the selection's first row
    sparse: SparseLayout | None = None  # top-k rows: layout then describes the values
