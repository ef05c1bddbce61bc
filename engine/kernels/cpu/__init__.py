"""Numba CPU kernels: fused row-wise log-sum-exp cross-entropy, its gradient, row stats.

Shape of the work (one row at a time, rows split statically over threads):

- The row is walked in L1-sized blocks. Per block: a vectorised max, then one vectorised
  sum of exp(z - block_max) (plus, when an option needs it, a weighted sum of
  (block_max - z)). Blocks are merged online in float64, so a 256k-class row costs one
  read from memory and one from L1; no softmax/log-softmax row is ever materialised.
- Losses are formed from max-relative quantities: loss = (M - z_y) + log S, which keeps
  float32 accurate for logits of 1e4 where lse - z_y would cancel.
- The gradient pass re-reads the row once (from cache for rows that fit) and writes
  d loss / d logits, possibly over the logits themselves.
- Softcap and probability inputs first transform the row into a per-thread scratch row,
  then reuse the same fast loops.

Dtype handling: float16 reaches the kernels as uint16 bits and bfloat16 as int16 bits (a
type each, so Numba compiles one specialisation per storage and caches it); they are
widened to float32 in registers. Arithmetic is float32 except for float64 input.

Fast-math: ``reassoc`` (and contract/nsz/arcp) so sums vectorise; never nnan/ninf, so
-inf masks and NaN rows behave exactly as in PyTorch.
"""

from __future__ import annotations

import numba
import numpy as np

from engine.kernels import STORAGE_BF16_BITS, STORAGE_F16_BITS, Problem
from engine.kernels.cpu.divergence import (
    I_BASE_ARGMAX,
    I_CANDIDATE_ARGMAX,
    I_CANDIDATE_RANK,
    N_IDX,
    N_VALS,
    V_JSD,
    V_KL,
    V_KL_REVERSE,
    V_LOGP_BASE,
    V_LOGP_CANDIDATE,
    V_TVD,
    compare_kernel,
)
from engine.kernels.cpu.parallel import forward_grad_kernel, forward_kernel, stats_kernel
from engine.kernels.cpu.topk import topk_kernel
from engine.options import KIND_LOGITS

__all__ = ["compare", "forward", "forward_grad", "stats", "topk"]

# -- host side: Problem -> kernel arguments -------------------------------------------------


def _kernel_view(a: np.ndarray, storage: int) -> np.ndarray:
    """float16 as uint16 bits, bfloat16 as int16 bits: the type picks the decoder."""
    if storage == STORAGE_F16_BITS:
        return a.view(np.uint16)
    if storage == STORAGE_BF16_BITS:
        return a.view(np.int16)
    return a


def _args(p: Problem):
    x = _kernel_view(p.x, p.storage)
    n, c = x.shape
    w = np.ascontiguousarray(p.w, dtype=p.compute)
    if p.t is not None:
        t = np.ascontiguousarray(p.t, dtype=p.compute)
        y = np.zeros(0, dtype=np.int64)
    else:
        t = np.empty((n, 0), dtype=p.compute)
        y = np.ascontiguousarray(p.y, dtype=np.int64)
    W = float(np.sum(w, dtype=np.float64))
    threads = numba.get_num_threads()
    return x, y, t, w, W, float(p.eps), float(p.zeta), float(p.cap), int(p.kind), threads


def _out_view(out: np.ndarray, p: Problem) -> np.ndarray:
    if out.dtype == np.float16:
        return out.view(np.uint16)
    if out.dtype in (np.uint16, np.int16):
        return _kernel_view(out, p.storage)  # in place over bf16/f16 bit buffers
    return out


def _rows_out(p: Problem, loss, lse):
    n = p.rows
    loss = np.empty(n, dtype=p.compute) if loss is None else loss
    lse = np.empty(n, dtype=p.compute) if lse is None else lse
    return loss, lse


def _sums_arg(sums):
    return np.empty(0) if sums is None else sums


def forward(p: Problem, loss=None, lse=None, sums=None):
    loss, lse = _rows_out(p, loss, lse)
    n = p.rows
    if n:
        forward_kernel(*_args(p), loss, lse, _sums_arg(sums))
    return loss, lse


def forward_grad(
    p: Problem,
    scale: np.ndarray,
    zscale: np.ndarray,
    out: np.ndarray,
    loss=None,
    lse=None,
    sums=None,
):
    loss, lse = _rows_out(p, loss, lse)
    n = p.rows
    if n:
        forward_grad_kernel(
            *_args(p),
            np.ascontiguousarray(scale, dtype=np.float64),
            np.ascontiguousarray(zscale, dtype=np.float64),
            bool(
                p.kind == KIND_LOGITS
                and p.cap == 0.0
                and out.dtype.kind == "f"
                and out.dtype != np.float16
                # in place: the exps go to a scratch row, as the logits must stay readable
                and not np.may_share_memory(out, p.x)
            ),
            loss,
            lse,
            _out_view(out, p),
            _sums_arg(sums),
        )
    return loss, lse


def stats(p: Problem) -> dict:
    n = p.rows
    f = p.compute
    res = {
        "loss": np.empty(n, dtype=f),
        "lse": np.empty(n, dtype=f),
        "target_logprob": np.empty(n, dtype=f),
        "argmax": np.empty(n, dtype=np.int64),
        "max_prob": np.empty(n, dtype=f),
        "entropy": np.empty(n, dtype=f),
        "target_rank": np.empty(n, dtype=np.int64),
        "kl": np.empty(n if p.soft else 0, dtype=f),
    }
    if n:
        stats_kernel(*_args(p), *res.values())
    if not p.soft:
        del res["kl"]
    return res


# -- comparing two models' rows (engine/kernels/cpu/divergence.py) ---------------------

_KERNEL_VIEWS = {"float16": np.uint16, "bfloat16": np.int16}


def compare(a: np.ndarray, kind_a: str, b: np.ndarray, kind_b: str, y, temperature: float):
    """Per-row values of two models' logits (rows x C each; kinds from engine.dtypes):
    dict of kl, kl_reverse, jsd, tvd, logp_base, logp_candidate (float64; log-probs NaN
    where y < 0) and base_argmax, candidate_argmax, candidate_rank (int64).
    ``y``: int64 targets (-1: none), or None."""
    n = a.shape[0]
    like_a = np.empty(0, np.float64 if kind_a == "float64" else np.float32)
    like_b = np.empty(0, np.float64 if kind_b == "float64" else np.float32)
    like = np.empty(0, np.float64 if "float64" in (kind_a, kind_b) else np.float32)
    vals = np.empty((N_VALS, n))
    idx = np.empty((N_IDX, n), np.int64)
    yk = np.zeros(0, np.int64) if y is None else np.ascontiguousarray(y, dtype=np.int64)
    if n:
        va = a.view(_KERNEL_VIEWS[kind_a]) if kind_a in _KERNEL_VIEWS else a
        vb = b.view(_KERNEL_VIEWS[kind_b]) if kind_b in _KERNEL_VIEWS else b
        compare_kernel(
            va, vb, yk, 1.0 / float(temperature), like_a, like_b, like,
            numba.get_num_threads(), vals, idx,
        )  # fmt: skip
    return {
        "kl": vals[V_KL],
        "kl_reverse": vals[V_KL_REVERSE],
        "jsd": vals[V_JSD],
        "tvd": vals[V_TVD],
        "logp_base": vals[V_LOGP_BASE],
        "logp_candidate": vals[V_LOGP_CANDIDATE],
        "base_argmax": idx[I_BASE_ARGMAX],
        "candidate_argmax": idx[I_CANDIDATE_ARGMAX],
        "candidate_rank": idx[I_CANDIDATE_RANK],
    }


# -- a row's top k classes and its lse (engine/kernels/cpu/topk.py) ------------------------


def topk(p: Problem, k: int):
    """(indices int32 rows x k, log-probs float32 rows x k, lse of the compute dtype) of
    the rows of ``p`` (its logits, softcap and input kind; targets are not read).
    Indices descend by probability, the smaller index first on ties; 1 <= k <= C."""
    n = p.rows
    idx = np.empty((n, k), np.int32)
    logp = np.empty((n, k), np.float32)
    lse = np.empty(n, p.compute)
    if n:
        x = _kernel_view(p.x, p.storage)
        like = np.empty(0, p.compute)
        topk_kernel(x, k, float(p.cap), int(p.kind), like, numba.get_num_threads(), idx, logp, lse)
    return idx, logp, lse
