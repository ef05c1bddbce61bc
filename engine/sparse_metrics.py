"""Mergeable sums of `xent eval` over sparse top-k rows (SPEC §8).

What the stored classes decide exactly, over every counted row: ``accuracy`` and
``top_k_accuracy`` for k up to the stored k (a target that is not stored is not among the
top k; beyond the stored k they are unknown: null), and ``ece`` (each row's max
probability is stored). ``nll`` is exact over the rows whose target is stored
(``target_stored``; the others are ``target_outside_topk``); ``nll_lower_bound`` covers
every counted row (a stored target's -log p, else -log(tail): the least loss the missing
mass allows), and ``entropy_lower_bound`` takes the stored classes plus the tail as one
outcome. Sums and counts only, so chunks and Dask workers merge exactly, as engine.metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.kernels.cpu.sparse import (
    F_ENTROPY_LB,
    F_MAX_LOGP,
    F_NLL_LB,
    F_NORMALISER,
    F_TAIL,
    F_TARGET_LOGP,
    I_RANK,
)
from engine.metrics import MetricState, MetricSums, standard_error

_ORDER = (
    "rows", "counted", "ignored", "nan_rows", "classes", "target_stored",
    "target_outside_topk", "loss", "nll", "nll_lower_bound", "perplexity", "bits_per_token",
    "accuracy", "top_k_accuracy", "entropy_lower_bound", "tail_mass", "ece",
)  # fmt: skip
_EXTRA = ("stored", "stored_nll_sum", "stored_nll_sq_sum", "tail_sum")


@dataclass
class SparseSums(MetricSums):
    """MetricSums whose nll is the lower bound and whose entropy is the lower bound, plus
    the exact nll over the rows whose target is stored."""

    stored_k: int = 0  # values stored per row (the same in every file of a source)
    stored: int = 0  # counted rows whose target is stored
    stored_nll_sum: float = 0.0
    stored_nll_sq_sum: float = 0.0
    tail_sum: float = 0.0

    def add_rows(self, f: np.ndarray, ii: np.ndarray, counted: np.ndarray, nan_rows: int, k: int):
        """Fold one chunk's per-row values (engine.kernels.cpu.sparse) in; k: values per row."""
        self.stored_k = k
        rank = ii[I_RANK]
        stored = counted & (rank >= 0)
        nll_lb = f[F_NLL_LB]
        stats = {
            "loss": nll_lb,
            "lse": f[F_NORMALISER],
            "target_logprob": -nll_lb,
            "max_prob": np.exp(f[F_MAX_LOGP]),
            "entropy": f[F_ENTROPY_LB],
            # a target that is not stored ranks at k or later: a miss for every top-j, j <= k
            "target_rank": np.where(rank >= 0, rank, k),
        }
        self.add(stats, counted, np.ones(counted.shape[0]), 0.0, False, nan_rows)
        nll = -f[F_TARGET_LOGP][stored]
        self.stored += int(nll.shape[0])
        self.stored_nll_sum += float(np.sum(nll))
        self.stored_nll_sq_sum += float(np.dot(nll, nll))
        self.tail_sum += float(np.sum(f[F_TAIL][counted]))

    def merge(self, other: SparseSums) -> SparseSums:
        super().merge(other)
        self.stored_k = max(self.stored_k, other.stored_k)
        for name in _EXTRA:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def finalize(self, *, classes: int, reduction: str, z_loss: float, soft: bool) -> dict:
        out = super().finalize(classes=classes, reduction=reduction, z_loss=0.0, soft=False)
        se = out["se"]
        n = self.counted
        out["nll_lower_bound"] = out.pop("nll")
        se["nll_lower_bound"] = se.pop("nll")
        out["entropy_lower_bound"] = out.pop("entropy")
        se["entropy_lower_bound"] = se.pop("entropy")
        for k in list(out["top_k_accuracy"]):
            if int(k) > self.stored_k:  # a target past the stored k may or may not rank < k
                out["top_k_accuracy"][k] = math.nan
                se["top_k_accuracy"][k] = math.nan
        m = self.stored
        nll = self.stored_nll_sum / m if m else math.nan
        se_nll = standard_error(self.stored_nll_sum, self.stored_nll_sq_sum, m)
        out["loss"] = self.stored_nll_sum if reduction == "sum" else nll
        out["nll"] = nll
        se["nll"] = se_nll
        out["perplexity"] = math.exp(nll) if nll < 709 else math.inf
        out["bits_per_token"] = nll / math.log(2)
        out["perplexity_ci95"] = (
            [math.exp(nll - 1.96 * se_nll), math.exp(nll + 1.96 * se_nll)]
            if math.isfinite(se_nll) and math.isfinite(nll) and nll + 1.96 * se_nll < 709
            else None
        )
        out["target_stored"] = m
        out["target_outside_topk"] = n - m
        out["tail_mass"] = self.tail_sum / n if n else math.nan
        first = [k for k in _ORDER if k in out]
        return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}


@dataclass
class SparseState(MetricState):
    """MetricState whose sums are SparseSums."""

    SUMS = SparseSums
