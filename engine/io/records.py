"""The records the io layer hands out: files, chunks of rows, and fragments for Dask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

#: The target value that stands for a null target (the row is ignored). Equal to PyTorch's
#: default ignore_index, so that code which forgets `target_valid` still ignores the row
#: by default; with another ignore_index it would be out of range and raise, not miscount.
NULL_TARGET = -100

FORMATS = ("parquet", "arrow-file", "arrow-stream", "llama-kld")
LAYOUTS = ("fixed_size_list", "list", "large_list", "fixed_shape_tensor", "wide")
DEFAULT_CHUNK_BYTES = 64 * 2**20


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

    logits: rows x C NumPy array (sparse top-k rows: rows x k values; ``indices`` holds
        their classes) (a read-only view of the Arrow buffer when the layout
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
    indices: np.ndarray | None = None  # sparse top-k rows: the class of each logits value
    lse: np.ndarray | None = None  # sparse rows with an --lse column: float64 per row

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
