"""A row's top K classes and its log-sum-exp from one read of the row (``--emit-topk``).

Per row, walked in blocks of TOPK_BLOCK elements:

- the block's max (vectorised), then Σ exp(z - block max) (vectorised), merged online in
  float64 as the loss kernels do (row_reduce);
- the top K so far sit in a min-heap ordered by rank (the root is the K-th best). The
  block's max already says whether anything in it beats the root: only then are its
  64-element pieces scanned (a vectorised max each) and the pieces that beat the root
  inserted element by element. On a row without structure a later block rarely holds a
  new top-K member (about K·ln(C/K) insertions per row), so the row costs about one read
  from memory, one from L1 and a few thousand heap steps.

Order: descending value, and on equal values the smaller class index first (the order of
§5 of the spec: the first maximal index is the argmax). Scanning in index order, an
element equal to the root comes after it, so only strictly greater values enter.

NaN never enters (comparisons with NaN are false) unless among the first K, and makes
the lse NaN; the classes picked for a row holding NaN are unspecified (a NaN among the
first K breaks the heap's order): the jobs' NaN policy decides about such rows.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from engine.kernels.cpu.blocks import block_has_nan, block_max, block_sumexp
from engine.kernels.cpu.rows import transform_row
from engine.kernels.cpu.scalars import JIT, PAR, as_t, widen
from engine.kernels.cpu.vecmath import max_skip_nan
from engine.options import KIND_LOGITS, KIND_PROBS

TOPK_BLOCK = 512  # elements per block: small, so that a block holding a new member is rare
PIECE = 64  # elements per piece scanned for members once a block holds one


@register_jitable
def _below(va, ia, vb, ib):
    """Entry a ranks after entry b (lower value, or equal value and larger index)."""
    return va < vb or (va == vb and ia > ib)


@register_jitable
def _sift_down(hv, hi, pos, n):
    """Restore the min-heap (by rank) of hv/hi[0:n] below ``pos``."""
    v = hv[pos]
    ix = hi[pos]
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        right = child + 1
        if right < n and _below(hv[right], hi[right], hv[child], hi[child]):
            child = right
        if _below(hv[child], hi[child], v, ix):
            hv[pos] = hv[child]
            hi[pos] = hi[child]
            pos = child
        else:
            break
    hv[pos] = v
    hi[pos] = ix


@register_jitable
def _insert_piece(z, lo, hi_, hv, hix, k):
    """Put every element of z[lo:hi_] that beats the heap's root into the heap."""
    for j in range(lo, hi_):
        v = widen(z[j])
        if v > hv[0]:  # equal values rank after the root: they come later in the row
            hv[0] = v
            hix[0] = j
            _sift_down(hv, hix, 0, k)


@njit(**JIT)
def row_topk(z, k, hv, hix):
    """Top k of row z into hv/hix (descending rank) and (M, S): the row's max and
    Σ exp(z - M) in float64, NaN when the row holds one."""
    C = z.shape[0]
    for j in range(k):
        hv[j] = widen(z[j])
        hix[j] = j
    for pos in range(k // 2 - 1, -1, -1):
        _sift_down(hv, hix, pos, k)
    M = -np.inf
    S = 0.0
    lo = 0
    while lo < C:
        hi_ = min(lo + TOPK_BLOCK, C)
        bm = block_max(z, lo, hi_, hv)
        bm64 = np.float64(bm)
        if bm64 != -np.inf:
            ones, rest = block_sumexp(z, lo, hi_, bm, hv, hv[0:0])
            s64 = np.float64(ones) + np.float64(rest)
            if bm64 > M:
                # (S stays NaN once an earlier block held a NaN and nothing finite)
                S = S * math.exp(M - bm64) + s64 if M != -np.inf else S + s64
                M = bm64
            else:
                S += s64 * math.exp(bm64 - M)
        elif block_has_nan(z, lo, hi_):
            S = np.nan
        if bm > hv[0] and hi_ > k:
            # some element here beats the root: scan the pieces whose max does
            p = max(lo, k)
            while p < hi_:
                q = min(p + PIECE, hi_)
                piece = z[p:q]
                pm = as_t(-np.inf, hv)
                for j in range(piece.shape[0]):
                    pm = max_skip_nan(widen(piece[j]), pm)
                if pm > hv[0]:
                    _insert_piece(z, p, q, hv, hix, k)
                p = q
        lo = hi_
    # heap sort: the root (the lowest rank) goes last, so the result descends
    for n in range(k - 1, 0, -1):
        v = hv[0]
        ix = hix[0]
        hv[0] = hv[n]
        hix[0] = hix[n]
        hv[n] = v
        hix[n] = ix
        _sift_down(hv, hix, 0, n)
    return M, S


@njit(**PAR)
def topk_kernel(x, k, cap, kind, like, nthreads, out_idx, out_logp, out_lse):
    """Per row: the k best classes (int32), their log-probs (float32) and the lse.

    ``like``: an empty array of the compute dtype. Log-probs subtract the lse for logits;
    log-prob and probability inputs are already normalised (probs take log(max(p, tiny)),
    as the loss does), so their values are the log-probs and the lse is reported only.
    """
    n, C = x.shape
    nb = max(1, min(nthreads, n))
    scratch_len = C if (cap != 0.0 or kind == KIND_PROBS) else 0
    for b in prange(nb):
        lo = b * n // nb
        hi = (b + 1) * n // nb
        hv = np.empty(k, dtype=like.dtype)
        hix = np.empty(k, dtype=np.int64)
        scratch = np.empty(scratch_len, dtype=like.dtype)
        for i in range(lo, hi):
            if scratch_len:
                transform_row(x[i], scratch, cap, kind)
                M, S = row_topk(scratch, k, hv, hix)
            else:
                M, S = row_topk(x[i], k, hv, hix)
            L = M + math.log(S) if S > 0.0 or S != S else -np.inf
            shift = L if kind == KIND_LOGITS else 0.0
            out_lse[i] = L
            for j in range(k):
                out_idx[i, j] = hix[j]
                out_logp[i, j] = np.float64(hv[j]) - shift
