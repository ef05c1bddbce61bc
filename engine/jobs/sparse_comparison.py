"""`compare` when one or both sides store only top-k rows (SPEC §8).

KL both ways, JSD and TVD are over the coarsened outcome set of
engine/kernels/cpu/sparse_divergence.py (lower bounds: ``kl_is_lower_bound``); top-1
agreement is exact (a top-k row stores its argmax); top-k agreement is exact for k up to
the candidate's stored k (the base's argmax is either stored, with its rank, or ranks
past them) and null beyond. Per-target statistics need every class's value on both
sides, so they are not computed here (a warning says so; `xent eval` reads each side).
"""

from __future__ import annotations

import numpy as np

from engine import api, dtypes
from engine.errors import XentInputError, XentUsageError
from engine.io import Chunk, Source
from engine.jobs.sparse_eval import sparse_values
from engine.kernels.cpu.sparse import F_NORMALISER, I_ARGMAX
from engine.kernels.cpu.sparse_divergence import (
    D_JSD,
    D_KL,
    D_KL_REVERSE,
    D_TVD,
    sparse_divergence,
)
from engine.options import make_options

TARGET_WARNING = (
    "a side holds sparse top-k rows: the per-target statistics (nll, perplexity ratio, "
    "delta_p) need every class's value on both sides and are not computed; "
    "`xent eval` reports each side's exact nll over its stored targets"
)


def check_spec(spec, sides) -> None:
    """Options whose meaning needs every class of a side."""
    if spec.temperature != 1.0:
        raise XentUsageError(
            "--temperature needs every class's logit; a side holds sparse top-k rows"
        )
    if spec.vocab is not None:
        raise XentUsageError("--vocab cannot cut sparse top-k rows; both sides must share C")


def _dense_side(chunk: Chunk, src: Source, spec, kernels, y: np.ndarray):
    """(values, storage kind, lse, argmax, rank of y) of dense rows, from the stats kernel
    (one pass: lse, first maximal index, and the rank of class y per row)."""
    x = np.ascontiguousarray(chunk.logits)
    marked = "bfloat16" if src.storage == "bfloat16" else spec.logits_dtype
    kind = dtypes.storage_kind(x.dtype, marked if x.dtype.kind in "ui" else None)
    opts = make_options(logits_dtype="bfloat16" if kind == "bfloat16" else None)
    targets = api.Targets(np.ascontiguousarray(y, np.int64), None, y >= 0, 0.0, 0)
    stats = kernels.stats(api.make_problem(x, targets, opts))
    return x, kind, stats["lse"].astype(np.float64), stats["argmax"], stats["target_rank"]


def _sparse_rank(chunk: Chunk, storage: str, cls: np.ndarray) -> np.ndarray:
    """Rank of class ``cls`` per row among the stored classes (ties by index, as §5);
    the stored k when the row does not store it (it ranks past them all)."""
    v = dtypes.decode(np.asarray(chunk.logits), "bfloat16" if storage == "bfloat16" else None)
    v = v.astype(np.float64)
    idx = np.asarray(chunk.indices, np.int64)
    at = idx == cls[:, None]
    found = at.any(axis=1)
    vt = np.where(found, np.where(at, v, 0.0).sum(axis=1), np.nan)[:, None]
    rank = (v > vt).sum(axis=1) + ((v == vt) & (idx < cls[:, None])).sum(axis=1)
    return np.where(found, rank, idx.shape[1])


def values(a: Chunk, b: Chunk, sides, spec, kernels, ignored: np.ndarray):
    """(per-row values as compare_chunk's, rows to drop or NaN) of one chunk pair."""
    classes = sides.classes
    n = a.num_rows
    none = np.full(n, -1, np.int64)
    policy = spec.nan_policy
    if sides.base.sparse is not None:
        f, ii, bad_a = sparse_values(a, sides.base, policy, none, "base: ")
        base = (a.logits, sides.base.storage, a.indices, f[F_NORMALISER])
        base_argmax = ii[I_ARGMAX]
    else:
        x, kind, lse, base_argmax, _ = _dense_side(a, sides.base, spec, kernels, none)
        bad_a = np.isnan(lse)
        base = (x, kind, None, lse)
    if sides.candidate.sparse is not None:
        f, ii, bad_b = sparse_values(b, sides.candidate, policy, none, "candidate: ")
        cand = (b.logits, sides.candidate.storage, b.indices, f[F_NORMALISER])
        cand_argmax = ii[I_ARGMAX]
        rank = _sparse_rank(b, sides.candidate.storage, base_argmax)
    else:
        y = np.where(base_argmax >= 0, base_argmax, 0)
        x, kind, lse, cand_argmax, rank = _dense_side(b, sides.candidate, spec, kernels, y)
        bad_b = np.isnan(lse)
        cand = (x, kind, None, lse)
    bad = bad_a | bad_b
    if policy == "error" and bad.any():
        r = int(np.argmax(bad))
        side, chunk = ("base", a) if bad_a[r] else ("candidate", b)
        raise XentInputError(
            f"{side}: NaN or +inf in logits (use --nan-policy skip or propagate)",
            file=chunk.file,
            row=chunk.file_row + r,
        )
    d = sparse_divergence(base, cand, classes)
    d[:, bad] = np.nan  # kept by --nan-policy propagate: NaN, whatever the cells held
    rows = {
        "kl": d[D_KL],
        "kl_reverse": d[D_KL_REVERSE],
        "jsd": d[D_JSD],
        "tvd": d[D_TVD],
        "base_argmax": base_argmax,
        "candidate_argmax": cand_argmax,
        "candidate_rank": rank,
    }
    return rows, bad if policy == "skip" else np.zeros(n, bool)


def finish_report(metrics: dict, sides) -> dict:
    """Mark the bounds, and null the top-k agreements past the candidate's stored k."""
    metrics["kl_is_lower_bound"] = True
    if sides.candidate.sparse is not None:
        k = sides.candidate.row_width or 0
        for key, v in metrics.get("top_k_agreement", {}).items():
            if int(key) > k:
                metrics["top_k_agreement"][key] = {name: None for name in v}
    return metrics
