"""Block loops: the hot loops over one L1-sized block of a row (max, exp sums, the
weighted deviation sums, the NaN scan). Every row path is built from these."""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.kernels.cpu.scalars import JIT, as_t, vexp, widen
from engine.kernels.cpu.vecmath import max_nan_unspecified, max_skip_nan

BLOCK = 2048  # elements per block: 8 KiB of float32, stays in L1 between the two reads
# (2048 measured best of 512..8192: short enough that memory reads keep flowing while
# the previous block's exps are computed)


# -- block loops (the hot code) -----------------------------------------------------------


@njit(**JIT)
def block_max(row, lo, hi, w):
    """Max over row[lo:hi]; NaN never wins, so it is skipped here and surfaces in the exp
    sum (llvm.maxnum: the one form of max that LLVM vectorises without nnan)."""
    # a slice, so indices start at 0: no negative-index wraparound checks (those checks
    # alone stop LLVM from vectorising these loops)
    row = row[lo:hi]
    m = as_t(-np.inf, w)
    for j in range(row.shape[0]):
        m = max_skip_nan(widen(row[j]), m)
    return m


# inlined: a call between Numba functions is a real call that passes every field of every
# array (LLVM inlined block_max on its own, not this); +15-19% forward at C = 128-256
@njit(inline="always", **JIT)
def block_sumexp(row, lo, hi, bm, w, store):
    """Σ exp(z - bm), split as (count of exact 1s, sum of the rest).

    The max element contributes exactly 1; keeping it out of the float32 sum lets
    log S = log1p(...) stay accurate for confident rows whose loss is ~1e-5.
    A non-empty ``store`` also receives each exp(z - bm) (the gradient pass then needs a
    multiply per element instead of a second exp).
    """
    ones = as_t(0.0, w)
    rest = as_t(0.0, w)
    one = as_t(1.0, w)
    zero = as_t(0.0, w)
    row = row[lo:hi]  # see block_max: sliced loops vectorise, offset ones do not
    if store.shape[0] == 0:
        for j in range(row.shape[0]):
            e = vexp(widen(row[j]) - bm)
            big = e >= one
            ones += one if big else zero
            rest += zero if big else e
    else:
        sb = store[lo:hi]
        for j in range(row.shape[0]):
            e = vexp(widen(row[j]) - bm)
            sb[j] = e
            big = e >= one
            ones += one if big else zero
            rest += zero if big else e
    return ones, rest


@njit(**JIT)
def block_sumexp_below(row, lo, hi, M, w, store):
    """Σ exp(z - M) for a shift M that is not the block's max (the row's running max), and
    whether some z >= M: then the caller redoes the block.

    No exact-1 split here: a block with nothing reaching M holds no max term, so a plain
    sum loses nothing; the loop is 2 operations shorter than block_sumexp's (measured
    +20% forward at C = 32000, +30% at 262144 over the split version). Whether z reaches
    M comes from the block's max (one operation per vector, where counting z >= M took
    two: forward float16 C = 32000-262144 +8-12%, float32 +3-6%). That max may drop a
    NaN, but a NaN already makes the sum NaN.
    """
    rest = as_t(0.0, w)
    top = as_t(-np.inf, w)
    row = row[lo:hi]  # see block_max: sliced loops vectorise, offset ones do not
    if store.shape[0] == 0:
        for j in range(row.shape[0]):
            v = widen(row[j])
            rest += vexp(v - M)
            top = max_nan_unspecified(v, top)
    else:
        sb = store[lo:hi]
        for j in range(row.shape[0]):
            v = widen(row[j])
            e = vexp(v - M)
            sb[j] = e
            rest += e
            top = max_nan_unspecified(v, top)
    return rest, top >= M


@njit(**JIT)
def block_has_nan(row, lo, hi):
    for j in range(lo, hi):
        v = widen(row[j])
        if v != v:
            return True
    return False


@njit(**JIT)
def block_sumexp_entropy(row, lo, hi, bm, w):
    """block_sumexp plus Σ e·(bm - z); e = 0 terms add 0 even where z = -inf."""
    ones = as_t(0.0, w)
    rest = as_t(0.0, w)
    h = as_t(0.0, w)
    one = as_t(1.0, w)
    zero = as_t(0.0, w)
    row = row[lo:hi]
    for j in range(row.shape[0]):
        d = bm - widen(row[j])
        e = vexp(-d)
        big = e >= one
        ones += one if big else zero
        rest += zero if big else e
        h += e * d if e > zero else zero
    return ones, rest, h


@njit(**JIT)
def block_deviation(row, lo, hi, bm, w, t, c1, c0):
    """Σ u·(bm - z) and Σ u with u_j = w_j (class smoothing) or w_j·(c1·t_j + c0) (soft).

    u = 0 terms add 0 even where z = -inf (PyTorch's 0·log 0 = 0 convention).
    """
    a = as_t(0.0, w)
    total = as_t(0.0, w)
    zero = as_t(0.0, w)
    row = row[lo:hi]
    wb = w[lo:hi]
    if t.shape[0] == 0:
        for j in range(row.shape[0]):
            u = wb[j]
            d = bm - widen(row[j])
            a += u * d if u != zero else zero
            total += u
    else:
        tb = t[lo:hi]
        for j in range(row.shape[0]):
            u = wb[j] * (c1 * tb[j] + c0)
            d = bm - widen(row[j])
            a += u * d if u != zero else zero
            total += u
    return a, total
