"""The one definition of the per-row output columns (`row_stats`, `score` files).

Each column: its name, the NumPy dtype kernels hand over, and the Arrow type written.
`kl` exists only for probability (soft) targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    numpy: type  # as written (float32 / int32)
    arrow: pa.DataType
    meaning: str


ROW_STATS = (
    Column("loss", np.float32, pa.float32(), "the row's loss with every option"),
    Column("target_logprob", np.float32, pa.float32(), "log p of the target (NaN if ignored)"),
    Column("lse", np.float32, pa.float32(), "log-sum-exp of the row"),
    Column("argmax", np.int32, pa.int32(), "the first maximal class"),
    Column("max_prob", np.float32, pa.float32(), "p of the argmax"),
    Column("entropy", np.float32, pa.float32(), "predictive entropy (nats)"),
    Column("target_rank", np.int32, pa.int32(), "classes ranked before the target (-1 ignored)"),
)
KL = Column("kl", np.float32, pa.float32(), "KL(target || prediction), soft targets")


def row_stats_columns(soft: bool) -> tuple[Column, ...]:
    """The per-row columns, in output order."""
    return ROW_STATS + ((KL,) if soft else ())


def empty_row_stats(soft: bool) -> dict[str, np.ndarray]:
    """Row stats of no rows (an empty input still gets every output column)."""
    return {c.name: np.zeros(0, c.numpy) for c in row_stats_columns(soft)}
