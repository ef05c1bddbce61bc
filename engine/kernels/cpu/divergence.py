"""Two models' rows side by side: KL both ways, JSD, TVD, both argmaxes, the candidate's
rank of the base's argmax and both target log-probs, all from one read of each row pair.

Per row (p = softmax(base/T), q = softmax(candidate/T)):

- pass 1, per side: max and Σ exp(z - max) by the same block loops as the loss kernels
  (row_reduce), and the first maximal index;
- pass 2, both rows together: with la, lb the log-probs and δ = lb - la, every divergence
  is a sum of terms that are each >= 0, so nothing large cancels when p and q nearly
  agree (bf16-vs-fp32 rows have KL ~ 1e-8):
      KL(p‖q)  = Σ p·φ(δ),          φ(δ) = e^δ - 1 - δ   (Σ p·(e^δ - 1) = Σq - Σp = 0)
      KL(q‖p)  = Σ q·φ(-δ)
      JSD      = Σ ½(p + q)·G(t),   G(t) = log 2 - H((1 + t)/2), t = tanh(δ/2)
                 (G(t) >= 0: the binary entropy of p/(p+q) is at most log 2)
      TVD      = Σ ½·p·|e^δ - 1|
  For |δ| < ½ φ, G and e^δ - 1 come from short series (no cancellation); beyond, the
  plain forms q - p - p·δ etc. lose at most a digit. δ is formed as (zb - za) + K with
  K = (Ma - Mb) + (log Sa - log Sb) in float64: an error ε in K moves Σ p·φ(δ) by only
  ε²/2 (its first-order term is ε·(Σq - Σp) = 0).

Arithmetic is float32 unless either side is float64; row sums are merged in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from engine.kernels.cpu.blocks import BLOCK
from engine.kernels.cpu.rows import first_max_index, row_reduce
from engine.kernels.cpu.scalars import JIT, PAR, as_t, vexp, widen
from engine.kernels.cpu.vecmath import max_skip_nan, sub_strict

# rows of ``vals`` (float64, one column per input row)
V_KL, V_KL_REVERSE, V_JSD, V_TVD, V_LOGP_BASE, V_LOGP_CANDIDATE = range(6)
N_VALS = 6
# rows of ``idx`` (int64)
I_BASE_ARGMAX, I_CANDIDATE_ARGMAX, I_CANDIDATE_RANK = range(3)
N_IDX = 3

# The helpers of the hot loop are register_jitable, not njit(inline="always"): those were
# left as calls that LLVM could not see into, and the loop ran scalar (measured: 0 packed
# divisions, 1.2 GB/s at C = 1000); compiled into the caller, it vectorises 8-wide.
_SMALL = 0.5  # |δ| below this: the series forms (truncation < 4e-8 relative at the edge)


@register_jitable
def _phi_parts(d, like):
    """Even and odd parts of φ(d) = e^d - 1 - d (φ(-d) = even - odd), to d^9."""
    d2 = d * d
    even = d2 * (
        as_t(0.5, like)
        + d2 * (as_t(1 / 24, like) + d2 * (as_t(1 / 720, like) + d2 * as_t(1 / 40320, like)))
    )
    odd = (d2 * d) * (
        as_t(1 / 6, like)
        + d2 * (as_t(1 / 120, like) + d2 * (as_t(1 / 5040, like) + d2 * as_t(1 / 362880, like)))
    )
    return even, odd


@register_jitable
def _jsd_series(d, like):
    """G(tanh(d/2)) / d² for |d| <= ½, where G(t) = ½[(1+t)·log(1+t) + (1-t)·log(1-t)]:
    a fit in d² (relative error 6e-13; its leading terms are the Taylor ones, 1/8 - d²/64),
    so the small branch's JSD needs no tanh and no division."""
    u = d * d
    return as_t(0.125, like) + u * (
        as_t(-0.015625, like)
        + u
        * (
            as_t(1.73611086e-03, like)
            + u
            * (
                as_t(-1.84457321e-04, like)
                + u * (as_t(1.91844325e-05, like) + u * as_t(-1.84404243e-06, like))
            )
        )
    )


@register_jitable
def _log1p_unit(u, like):
    """log(1 + u) for u in [0, 1], ~1e-7 relative, without a division: Cephes' logf
    polynomial on f = u (u <= √2 - 1) or f = (u - 1)/2 (then + ln 2); f stays in
    [√½ - 1, √2 - 1] and small u keeps its relative accuracy."""
    big = u > as_t(0.41421356237309503, like)
    f = (u - as_t(1.0, like)) * as_t(0.5, like) if big else u
    z = f * f
    poly = as_t(7.0376836292e-2, like)
    poly = poly * f + as_t(-1.1514610310e-1, like)
    poly = poly * f + as_t(1.1676998740e-1, like)
    poly = poly * f + as_t(-1.2420140846e-1, like)
    poly = poly * f + as_t(1.4249322787e-1, like)
    poly = poly * f + as_t(-1.6668057665e-1, like)
    poly = poly * f + as_t(2.0000714765e-1, like)
    poly = poly * f + as_t(-2.4999993993e-1, like)
    poly = poly * f + as_t(3.3333331174e-1, like)
    r = f + (poly * f * z - as_t(0.5, like) * z)
    return r + (as_t(0.6931471805599453, like) if big else as_t(0.0, like))


@register_jitable
def _block_near(za, zb, lo, hi, Ma, la0, K, vstar, like):
    """The sums of _block_divergences for a block where every |δ| < ½ (rows that nearly
    agree: bf16 vs fp32, a good quantisation), plus the number of elements where that
    failed (then the caller redoes the block with _block_divergences). Only the series
    forms, and one exp: q = p·(1 + (e^δ - 1)); about half the work per element."""
    zero = as_t(0.0, like)
    one = as_t(1.0, like)
    half = as_t(0.5, like)
    small = as_t(_SMALL, like)
    kl = zero
    klr = zero
    js = zero
    tv = zero
    rank = zero
    far = zero
    a = za[lo:hi]
    b = zb[lo:hi]
    for j in range(a.shape[0]):
        va = as_t(widen(a[j]), like)
        vb = as_t(widen(b[j]), like)
        p = vexp(sub_strict(va, Ma) - la0)
        d = sub_strict(vb, va) + K
        even, odd = _phi_parts(d, like)
        em1 = d + even + odd
        q = p + p * em1
        kl += p * (even + odd)
        klr += q * (even - odd)
        js += half * (p + q) * (d * d) * _jsd_series(d, like)
        tv += half * p * abs(em1)
        rank += one if vb > vstar else zero
        far += zero if abs(d) < small else one  # NaN counts as far
    return kl, klr, js, tv, rank, far


@register_jitable
def _block_divergences(za, zb, lo, hi, Ma, la0, Mb, lb0, K, vstar, like):
    """(KL, reverse KL, JSD, TVD, count above vstar) over [lo, hi) of a row pair (the module)."""
    zero = as_t(0.0, like)
    one = as_t(1.0, like)
    half = as_t(0.5, like)
    ln2 = as_t(math.log(2.0), like)
    small = as_t(_SMALL, like)
    kl = zero
    klr = zero
    js = zero
    tv = zero
    # counted in the compute dtype (exact: a block has 2048 elements), with no index test
    # (ties before the argmax are counted apart): int64 lanes held the loop to 4 float32
    # lanes with spills (measured 8.0 -> 6.1 -> ... ns per pair)
    rank = zero
    a = za[lo:hi]  # sliced loops vectorise (see blocks.block_max)
    b = zb[lo:hi]
    for j in range(a.shape[0]):
        va = as_t(widen(a[j]), like)
        vb = as_t(widen(b[j]), like)
        la = sub_strict(va, Ma) - la0
        lb = sub_strict(vb, Mb) - lb0
        p = vexp(la)
        q = vexp(lb)
        d = sub_strict(vb, va) + K
        # the series forms (|d| < ½: p and q both > 0)
        even, odd = _phi_parts(d, like)
        em1 = d + even + odd  # e^d - 1
        kl_s = p * (even + odd)
        klr_s = q * (even - odd)
        js_s = half * (p + q) * (d * d) * _jsd_series(d, like)
        tv_s = half * p * abs(em1)
        # the plain forms (zero probabilities included: 0·(±inf) never formed)
        pd = p * d if p > zero else zero
        qd = q * d if q > zero else zero
        kl_l = q - p - pd
        klr_l = p - q + qd
        hi_pq = p if p > q else q
        lo_pq = q if p > q else p
        u = lo_pq / (hi_pq if hi_pq > zero else one)
        lg = _log1p_unit(u, like)
        dpos = d if d > zero else zero
        dneg = zero if d > zero else -d
        tp = p * (ln2 - lg - dpos) if p > zero else zero
        tq = q * (ln2 - lg - dneg) if q > zero else zero
        js_l = half * (tp + tq)
        tv_l = half * abs(p - q)
        s = abs(d) < small
        kl += kl_s if s else kl_l
        klr += klr_s if s else klr_l
        js += js_s if s else js_l
        tv += tv_s if s else tv_l
        # the candidate's rank of the base's argmax: strictly above it, or tied before it
        rank += one if vb > vstar else zero
    return kl, klr, js, tv, rank


@register_jitable
def _short_row_sums(za, zb, like_a, like_b):
    """(max, Σ exp(z - max)) of both rows of one block: one loop for both maxima, one for
    both sums (row_reduce's block machinery costs more than the work at small C). NaN is
    skipped by the max and poisons the sum; an all -inf row gives max -inf, sum NaN."""
    ma = as_t(-np.inf, like_a)
    mb = as_t(-np.inf, like_b)
    for j in range(za.shape[0]):
        ma = max_skip_nan(widen(za[j]), ma)
    for j in range(zb.shape[0]):
        mb = max_skip_nan(widen(zb[j]), mb)
    sa = as_t(0.0, like_a)
    sb = as_t(0.0, like_b)
    for j in range(za.shape[0]):
        sa += vexp(widen(za[j]) - ma)
        sb += vexp(widen(zb[j]) - mb)
    return np.float64(ma), np.float64(sa), np.float64(mb), np.float64(sb)


@njit(**JIT)
def _ties_before(z, end, v):
    n = 0
    for j in range(end):
        n += 1 if widen(z[j]) == v else 0
    return n


@njit(**JIT)
def compare_row(za, zb, yi, like_a, like_b, like, bms, vals, idx, i):
    """Every per-row value of one row pair (za, zb: storage or scaled rows)."""
    C = za.shape[0]
    if C <= BLOCK:
        Ma, Sa, Mb, Sb = _short_row_sums(za, zb, like_a, like_b)
    else:
        empty = like_a[0:0]
        Ma, Sa, _, _, _ = row_reduce(za, like_a, empty, 1.0, 0.0, True, False, False, empty, bms)
        emptyb = like_b[0:0]
        Mb, Sb, _, _, _ = row_reduce(zb, like_b, emptyb, 1.0, 0.0, True, False, False, emptyb, bms)
    ia = first_max_index(za, as_t(Ma, like_a), Sa != Sa)
    ib = first_max_index(zb, as_t(Mb, like_b), Sb != Sb)
    log_sa = math.log(Sa)
    log_sb = math.log(Sb)
    K = (Ma - Mb) + (log_sa - log_sb)
    if Ma == -np.inf or Mb == -np.inf:  # an all -inf row: nothing is defined
        K = np.nan
    vstar = as_t(widen(zb[ia]), like)
    kl = 0.0
    klr = 0.0
    js = 0.0
    tv = 0.0
    rank = 0
    lo = 0
    near = True  # until a block of this row has some |δ| >= ½
    while lo < C:
        hi = min(lo + BLOCK, C)
        if near:
            k1, k2, k3, k4, r, far = _block_near(
                za, zb, lo, hi, as_t(Ma, like), as_t(log_sa, like), as_t(K, like), vstar, like
            )
            if far == 0:
                kl += np.float64(k1)
                klr += np.float64(k2)
                js += np.float64(k3)
                tv += np.float64(k4)
                rank += int(r)
                lo = hi
                continue
            near = False
        k1, k2, k3, k4, r = _block_divergences(
            za, zb, lo, hi, as_t(Ma, like), as_t(log_sa, like), as_t(Mb, like),
            as_t(log_sb, like), as_t(K, like), vstar, like,
        )  # fmt: skip
        kl += np.float64(k1)
        klr += np.float64(k2)
        js += np.float64(k3)
        tv += np.float64(k4)
        rank += int(r)
        lo = hi
    rank += _ties_before(zb, ia, vstar)  # ties rank by index, as argmax takes the first
    bad = K != K
    vals[V_KL, i] = np.nan if bad else kl
    vals[V_KL_REVERSE, i] = np.nan if bad else klr
    vals[V_JSD, i] = np.nan if bad else js
    vals[V_TVD, i] = np.nan if bad else tv
    if yi >= 0:
        vals[V_LOGP_BASE, i] = (np.float64(widen(za[yi])) - Ma) - log_sa
        vals[V_LOGP_CANDIDATE, i] = (np.float64(widen(zb[yi])) - Mb) - log_sb
    else:
        vals[V_LOGP_BASE, i] = np.nan
        vals[V_LOGP_CANDIDATE, i] = np.nan
    idx[I_BASE_ARGMAX, i] = ia
    idx[I_CANDIDATE_ARGMAX, i] = ib
    idx[I_CANDIDATE_RANK, i] = rank


@njit(**JIT)
def _scale_into(row, inv_t, scratch):
    for j in range(row.shape[0]):
        scratch[j] = as_t(widen(row[j]), scratch) * inv_t


@njit(**PAR)
def compare_kernel(a, b, y, inv_t, like_a, like_b, like, nthreads, vals, idx):
    """Row pairs split evenly over threads. ``y``: target per row (-1: none/ignored), or
    empty. ``inv_t`` != 1 first scales each row into per-thread scratch (compute dtype)."""
    n, C = a.shape
    nb = max(1, min(nthreads, n))
    scaled = inv_t != 1.0
    has_y = y.shape[0] != 0
    for t in prange(nb):
        lo = t * n // nb
        hi = (t + 1) * n // nb
        bms = np.empty(0)
        sa = np.empty(C if scaled else 0, dtype=like_a.dtype)
        sb = np.empty(C if scaled else 0, dtype=like_b.dtype)
        for i in range(lo, hi):
            yi = y[i] if has_y else -1
            if scaled:
                _scale_into(a[i], as_t(inv_t, like_a), sa)
                _scale_into(b[i], as_t(inv_t, like_b), sb)
                compare_row(sa, sb, yi, like_a, like_b, like, bms, vals, idx, i)
            else:
                compare_row(a[i], b[i], yi, like_a, like_b, like, bms, vals, idx, i)
