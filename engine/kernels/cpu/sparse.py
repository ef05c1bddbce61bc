"""Rows stored as their top k classes (SPEC §8): per-row checks and evaluation values.

A sparse row is k (class, value) pairs of a distribution over C classes. Values are
log-probs over all C (MODE_LOGPROBS), raw logits with the row's lse over all C from a
column (MODE_LSE), or raw logits normalised over the k alone (MODE_TOPK). Per row, in
float64 (k is small; the row is read once):

- checks: every class in [0, C), no class twice (a per-thread stamp array of C entries:
  one look-up per pair instead of k² comparisons), no NaN or +inf value;
- the stored mass Σp and the tail 1 - Σp (the classes not stored, as one outcome), the
  entropy of "the stored classes plus the tail" (a lower bound of the row's entropy: the
  coarser outcome set has less), the argmax among the stored classes (the first maximal
  index, as everywhere in xent) and its log-prob;
- for a counted target: its log-prob and rank among the stored classes when stored (the
  rank among all C when the stored classes are the top k: an unstored class is no more
  probable than any stored one), else the lower bound -log(tail) of its loss. The tail is
  widened by the rounding the stored values may carry (``unit``: their unit roundoff),
  so the bound stays a bound when 1 - Σp is tiny or rounds to <= 0.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from engine.kernels.cpu.scalars import JIT, PAR, widen

MODE_LOGPROBS, MODE_LSE, MODE_TOPK = 0, 1, 2
MODES = {"logprobs": MODE_LOGPROBS, "lse": MODE_LSE, "topk": MODE_TOPK}  # by value_mode

# rows of the float64 output
F_TARGET_LOGP, F_MAX_LOGP, F_TAIL, F_ENTROPY_LB, F_NLL_LB, F_NORMALISER = range(6)
N_F = 6
# rows of the int64 output
I_STATUS, I_BAD_COLUMN, I_ARGMAX, I_RANK = range(4)
N_I = 4
# I_STATUS values
OK, BAD_VALUE, BAD_INDEX, DUPLICATE_INDEX = 0, 1, 2, 3


@njit(**JIT)
def _check_row(vals, idx, C, stamp, mark):
    """(status, column) of one row's pairs; ``stamp`` holds ``mark`` for classes seen."""
    for j in range(idx.shape[0]):
        c = idx[j]
        if c < 0 or c >= C:
            return BAD_INDEX, j
        if stamp[c] == mark:
            return DUPLICATE_INDEX, j
        stamp[c] = mark
    for j in range(vals.shape[0]):
        v = np.float64(widen(vals[j]))
        if v != v or v == np.inf:
            return BAD_VALUE, j
    return OK, -1


@njit(**JIT)
def _normaliser(vals, mode, lse_i):
    """What each value has subtracted to be a log-prob over all C (or over the k)."""
    if mode == MODE_LOGPROBS:
        return 0.0
    if mode == MODE_LSE:
        return lse_i
    m = -np.inf
    for j in range(vals.shape[0]):
        m = max(m, np.float64(widen(vals[j])))
    if m == -np.inf:
        return m
    s = 0.0
    for j in range(vals.shape[0]):
        s += math.exp(np.float64(widen(vals[j])) - m)
    return m + math.log(s)


@njit(**JIT)
def sparse_row(vals, idx, yi, C, mode, lse_i, unit, stamp, mark, f, ii, i):
    """Fill column i of ``f`` (F_*) and ``ii`` (I_*) for one row."""
    status, col = _check_row(vals, idx, C, stamp, mark)
    ii[I_STATUS, i] = status
    ii[I_BAD_COLUMN, i] = col
    L = _normaliser(vals, mode, lse_i)
    if L != L and status == OK:
        status = BAD_VALUE  # a NaN lse column value poisons the row like a NaN value
        ii[I_STATUS, i] = status
        ii[I_BAD_COLUMN, i] = -1
    total = 0.0
    h = 0.0
    slack = 0.0
    best = -np.inf
    best_class = -1
    for j in range(vals.shape[0]):
        v = np.float64(widen(vals[j]))
        lp = v - L
        p = math.exp(lp)
        total += p
        if p > 0.0:
            h -= p * lp
            slack += p * (abs(v) + abs(L) + 1.0)
        c = idx[j]
        if v > best or (v == best and c < best_class) or best_class < 0:
            if v == v:
                best = v
                best_class = c
    tail = 0.0 if mode == MODE_TOPK else max(1.0 - total, 0.0)
    if tail > 0.0:
        h -= tail * math.log(tail)
    f[F_MAX_LOGP, i] = best - L
    f[F_TAIL, i] = tail
    f[F_ENTROPY_LB, i] = h
    f[F_NORMALISER, i] = L
    ii[I_ARGMAX, i] = best_class
    f[F_TARGET_LOGP, i] = np.nan
    f[F_NLL_LB, i] = np.nan
    ii[I_RANK, i] = -1
    if yi < 0:
        if status == BAD_VALUE:
            f[F_ENTROPY_LB, i] = np.nan
            f[F_TAIL, i] = np.nan
        return
    at = -1
    for j in range(idx.shape[0]):
        if idx[j] == yi:
            at = j
            break
    if at >= 0:
        vt = np.float64(widen(vals[at]))
        rank = 0
        for j in range(vals.shape[0]):
            v = np.float64(widen(vals[j]))
            if v > vt or (v == vt and idx[j] < yi):
                rank += 1
        f[F_TARGET_LOGP, i] = vt - L
        f[F_NLL_LB, i] = L - vt
        ii[I_RANK, i] = rank
    elif mode != MODE_TOPK:
        # the target's probability is at most the tail (widened by the values' rounding)
        bound = min(1.0, tail + slack * unit)
        f[F_NLL_LB, i] = -math.log(bound) if bound > 0.0 else np.inf
    if status == BAD_VALUE:  # kept by --nan-policy propagate: NaN, as PyTorch would give
        f[F_ENTROPY_LB, i] = np.nan
        f[F_TAIL, i] = np.nan
        f[F_NLL_LB, i] = np.nan
        f[F_TARGET_LOGP, i] = np.nan


@njit(**PAR)
def sparse_rows_kernel(vals, idx, y, lse, mode, C, unit, nthreads, f, ii):
    """Every row of a chunk; ``lse`` is empty unless mode is MODE_LSE, ``y`` holds -1 for
    rows without a counted target."""
    n = vals.shape[0]
    nb = max(1, min(nthreads, n))
    for b in prange(nb):
        lo = b * n // nb
        hi = (b + 1) * n // nb
        stamp = np.zeros(C, np.int64)  # per thread; row i marks its classes with i + 1
        for i in range(lo, hi):
            lse_i = lse[i] if mode == MODE_LSE else 0.0
            sparse_row(vals[i], idx[i], y[i], C, mode, lse_i, unit, stamp, i + 1, f, ii, i)


# -- host side ------------------------------------------------------------------------------

_KERNEL_VIEWS = {"float16": np.uint16, "bfloat16": np.int16}
# unit roundoff of each storage: how far a stored value may be from the value it stands for
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


def sparse_rows(values, storage: str, indices, y, lse, mode: str, classes: int):
    """(f, ii): float64 (N_F x rows) and int64 (N_I x rows) per-row values (see F_*, I_*)
    of sparse rows: ``values`` rows x k of the given storage kind, ``indices`` rows x k
    integers, ``y`` int64 targets (-1: not counted), ``lse`` float64 per row or None;
    ``mode``: a key of MODES (engine.io.layouts.SparseLayout.value_mode)."""
    import numba

    n = values.shape[0]
    f = np.empty((N_F, n))
    ii = np.empty((N_I, n), np.int64)
    if n:
        vals = values.view(_KERNEL_VIEWS[storage]) if storage in _KERNEL_VIEWS else values
        idx = indices if indices.dtype in (np.int32, np.int64) else indices.astype(np.int64)
        lse_arr = np.zeros(0) if lse is None else np.ascontiguousarray(lse, dtype=np.float64)
        sparse_rows_kernel(
            vals, idx, np.ascontiguousarray(y, dtype=np.int64), lse_arr, MODES[mode],
            int(classes), UNIT_ROUNDOFF[storage], numba.get_num_threads(), f, ii,
        )  # fmt: skip
    return f, ii
