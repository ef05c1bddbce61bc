"""The CUDA twin of the compare kernel (engine/kernels/cpu/divergence.py): the same per-row
values from the same formulas, with a warp (small C) or a block (large C) per row pair,
shaped by `driver.launch_shape` like the loss kernels.

Pass 1: each side's max and its first index (`rargmax`), then Σ exp(z - max) (`rsum3`).
Pass 2 reads the two rows together: δ = (zb - za) + K per element, the divergences as sums
of non-negative terms (series forms for |δ| < ½, plain forms beyond), the candidate's
rank of the base's argmax (ties before it by index); `rsum3` twice gathers the five sums.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from engine.kernels.cuda import device

# numba.cuda, bound on first use (a module global: the simulator swaps the module a
# kernel's globals name for its own, which a closure variable would escape)
cuda = None
_LOCK = threading.Lock()
_KERNELS: dict = {}
LN2 = math.log(2.0)


def compare_kernel(bf16_a: bool, bf16_b: bool, compute: np.dtype):
    """The kernel for one pair of encodings (bfloat16 bits or not) and compute dtype."""
    key = (bool(bf16_a), bool(bf16_b), np.dtype(compute).name)
    with _LOCK:
        if key not in _KERNELS:
            _KERNELS[key] = _make(*key)
    return _KERNELS[key]


def _make(bf16_a: bool, bf16_b: bool, compute: str):
    global cuda
    from numba import cuda as _cuda
    from numba import types

    cuda = _cuda
    helpers = device.helpers()
    rsum3, rargmax = helpers["rsum3"], helpers["rargmax"]
    F = types.float32 if compute == "float32" else types.float64
    I64 = types.int64
    NEG_INF = F(-math.inf)
    INF = F(math.inf)
    ZERO = F(0.0)
    ONE = F(1.0)
    HALF = F(0.5)

    load_a = device.make_load(bf16_a, F)
    load_b = device.make_load(bf16_b, F)

    @cuda.jit(device=True)
    def terms(p, q, d):
        """(KL, reverse KL, JSD, TVD) terms of one class (see the CPU kernel)."""
        if abs(d) < HALF:
            d2 = d * d
            even = d2 * (F(0.5) + d2 * (F(1 / 24) + d2 * (F(1 / 720) + d2 * F(1 / 40320))))
            odd = d2 * d * (F(1 / 6) + d2 * (F(1 / 120) + d2 * (F(1 / 5040) + d2 * F(1 / 362880))))
            em1 = d + even + odd
            u = d2
            g = F(0.125) + u * (
                F(-0.015625)
                + u
                * (
                    F(1.73611086e-03)
                    + u * (F(-1.84457321e-04) + u * (F(1.91844325e-05) + u * F(-1.84404243e-06)))
                )
            )
            return (
                p * (even + odd),
                q * (even - odd),
                HALF * (p + q) * d2 * g,
                HALF * p * abs(em1),
            )
        pd = p * d if p > ZERO else ZERO
        qd = q * d if q > ZERO else ZERO
        hi = max(q, p)
        lo = min(p, q)
        lg = F(math.log1p(lo / hi)) if hi > ZERO else ZERO
        tp = p * (F(LN2) - lg - (max(ZERO, d))) if p > ZERO else ZERO
        tq = q * (F(LN2) - lg - (-d if d < ZERO else ZERO)) if q > ZERO else ZERO
        return q - p - pd, p - q + qd, HALF * (tp + tq), HALF * abs(p - q)

    @cuda.jit(device=True)
    def exp_nonpos(v):
        return F(math.exp(v)) if v == v else v  # v <= 0 or NaN here

    @cuda.jit
    def kernel(a, b, y, inv_t, vals, idx, n, C, T):  # fmt: skip
        sh = cuda.shared.array(32, F)
        shi = cuda.shared.array(32, I64)
        sh3 = cuda.shared.array((3, 32), F)
        tid = cuda.threadIdx.x
        rpb = cuda.blockDim.x // T
        r = cuda.blockIdx.x * rpb + tid // T
        lane = tid % T
        valid = r < n
        stop = C if valid else 0
        # pass 1a: maxima and first maximal indices (a NaN counts as +inf: it wins, and
        # its row's sums are NaN anyway, as on the CPU)
        ma = NEG_INF
        mb = NEG_INF
        ia = I64(C)
        ib = I64(C)
        for j in range(lane, stop, T):
            va = load_a(a, r, j) * inv_t
            vb = load_b(b, r, j) * inv_t
            ka = INF if va != va else va
            kb = INF if vb != vb else vb
            if ka > ma or ia == C:
                ma = ka
                ia = j
            if kb > mb or ib == C:
                mb = kb
                ib = j
        Ma, ia = rargmax(ma, ia, sh, shi, T)
        Mb, ib = rargmax(mb, ib, sh, shi, T)
        # pass 1b: the exp sums
        sa = ZERO
        sb = ZERO
        for j in range(lane, stop, T):
            sa += exp_nonpos(load_a(a, r, j) * inv_t - Ma)
            sb += exp_nonpos(load_b(b, r, j) * inv_t - Mb)
        Sa, Sb, _ = rsum3(sa, sb, ZERO, sh3, T)
        la0 = F(math.log(Sa)) if Sa > ZERO else F(math.nan)
        lb0 = F(math.log(Sb)) if Sb > ZERO else F(math.nan)
        K = (Ma - Mb) + (la0 - lb0)
        if Ma == NEG_INF or Mb == NEG_INF or Ma == INF or Mb == INF:
            K = F(math.nan)
        vstar = ZERO
        if valid and ia < C:
            vstar = load_b(b, r, ia) * inv_t
        # pass 2: both rows together
        kl = ZERO
        klr = ZERO
        js = ZERO
        tv = ZERO
        rank = ZERO
        for j in range(lane, stop, T):
            va = load_a(a, r, j) * inv_t
            vb = load_b(b, r, j) * inv_t
            p = exp_nonpos((va - Ma) - la0)
            q = exp_nonpos((vb - Mb) - lb0)
            d = (vb - va) + K
            t1, t2, t3, t4 = terms(p, q, d)
            kl += t1
            klr += t2
            js += t3
            tv += t4
            if vb > vstar or (vb == vstar and j < ia):
                rank += ONE
        KL, KLR, JS = rsum3(kl, klr, js, sh3, T)
        TV, RANK, _ = rsum3(tv, rank, ZERO, sh3, T)
        if valid and lane == 0:
            bad = K != K
            vals[0, r] = F(math.nan) if bad else KL
            vals[1, r] = F(math.nan) if bad else KLR
            vals[2, r] = F(math.nan) if bad else JS
            vals[3, r] = F(math.nan) if bad else TV
            yi = y[r] if y.shape[0] > 0 else -1
            if yi >= 0:
                vals[4, r] = (load_a(a, r, yi) * inv_t - Ma) - la0
                vals[5, r] = (load_b(b, r, yi) * inv_t - Mb) - lb0
            else:
                vals[4, r] = F(math.nan)
                vals[5, r] = F(math.nan)
            idx[0, r] = ia
            idx[1, r] = ib
            idx[2, r] = I64(RANK)

    return kernel
