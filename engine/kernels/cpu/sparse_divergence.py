"""Divergences between two models when one or both store only top-k rows (SPEC §8).

The outcome set is coarsened to what both sides know: one cell per class whose value both
sides hold (a dense side holds every class), and one tail cell for all other classes. Each
side's tail is 1 - Σ over the known cells, so a class the base stores but a sparse
candidate does not lands in both tails. KL, JSD and TVD of the coarsened distributions
are lower bounds of the full ones (data-processing inequality); they are exact per this
definition. In float64, from log-prob differences δ = log q - log p per cell:

    KL(p‖q) = Σ p·(e^δ - 1 - δ)   (the cells, tail included, sum to 1 on each side)

so nothing large cancels when p and q nearly agree (as engine/kernels/cpu/divergence.py).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from engine.kernels.cpu.scalars import JIT, PAR, widen

# rows of the float64 output
D_KL, D_KL_REVERSE, D_JSD, D_TVD = range(4)
N_D = 4
_LOG2 = math.log(2.0)


@njit(**JIT)
def _terms(lp, lq):
    """(p·φ(δ), q·φ(-δ), JSD term, |p - q|) of one cell with log-probs lp, lq."""
    p = math.exp(lp) if lp > -np.inf else 0.0
    q = math.exp(lq) if lq > -np.inf else 0.0
    if p == 0.0 and q == 0.0:
        return 0.0, 0.0, 0.0, 0.0
    if p == 0.0:
        return q, np.inf, q * _LOG2 * 0.5, q
    if q == 0.0:
        return np.inf, p, p * _LOG2 * 0.5, p
    d = lq - lp
    kl = p * (math.expm1(d) - d)
    klr = q * (math.expm1(-d) + d)
    m = 0.5 * (p + q)
    jsd = 0.5 * (p * (lp - math.log(m)) + q * (lq - math.log(m)))
    return kl, klr, max(jsd, 0.0), abs(p - q)


@njit(**JIT)
def _cell_value(vals, i, cls, sparse, stamp, pos, mark):
    """Side value of class ``cls`` in row i: dense rows by index, sparse ones by lookup
    (stamp[cls] == mark when the row stores it, at pos[cls]); NaN when not stored."""
    if not sparse:
        return np.float64(widen(vals[i, cls]))
    if stamp[cls] == mark:
        return np.float64(widen(vals[i, pos[cls]]))
    return np.nan


@njit(**PAR)
def sparse_divergence_kernel(
    b_vals, b_idx, b_norm, b_sparse, c_vals, c_idx, c_norm, c_sparse, C, nthreads, out
):
    """Per row: coarsened KL both ways, JSD and TVD into ``out`` (N_D x rows).

    ``*_norm``: each row's normaliser (value - norm = log-prob over all C classes).
    The cells are walked over the base's stored classes, or the candidate's when only it is
    sparse; the other side is looked up."""
    n = b_vals.shape[0]
    nb = max(1, min(nthreads, n))
    for t in prange(nb):
        lo = t * n // nb
        hi = (t + 1) * n // nb
        stamp = np.zeros(C, np.int64)
        pos = np.zeros(C, np.int64)
        for i in range(lo, hi):
            mark = i + 1
            walk_base = b_sparse  # else only the candidate is sparse: walk its classes
            # index the candidate's classes when it is looked up and sparse
            if walk_base and c_sparse:
                for j in range(c_idx.shape[1]):
                    stamp[c_idx[i, j]] = mark
                    pos[c_idx[i, j]] = j
            kl = 0.0
            klr = 0.0
            jsd = 0.0
            tvd = 0.0
            sp = 0.0
            sq = 0.0
            k = b_idx.shape[1] if walk_base else c_idx.shape[1]
            for j in range(k):
                if walk_base:
                    cls = b_idx[i, j]
                    lp = np.float64(widen(b_vals[i, j])) - b_norm[i]
                    v = _cell_value(c_vals, i, cls, c_sparse, stamp, pos, mark)
                    if v != v and c_sparse:
                        continue  # not stored by the candidate: in both tails
                    lq = v - c_norm[i]
                else:
                    cls = c_idx[i, j]
                    lq = np.float64(widen(c_vals[i, j])) - c_norm[i]
                    lp = np.float64(widen(b_vals[i, cls])) - b_norm[i]
                a, r, s, d = _terms(lp, lq)
                kl += a
                klr += r
                jsd += s
                tvd += d
                sp += math.exp(lp)
                sq += math.exp(lq)
            P = max(1.0 - sp, 0.0)
            Q = max(1.0 - sq, 0.0)
            lP = math.log(P) if P > 0.0 else -np.inf
            lQ = math.log(Q) if Q > 0.0 else -np.inf
            a, r, s, d = _terms(lP, lQ)
            bad = b_norm[i] != b_norm[i] or c_norm[i] != c_norm[i]
            out[D_KL, i] = np.nan if bad else kl + a
            out[D_KL_REVERSE, i] = np.nan if bad else klr + r
            out[D_JSD, i] = np.nan if bad else jsd + s
            out[D_TVD, i] = np.nan if bad else 0.5 * (tvd + d)


# -- host side ------------------------------------------------------------------------------

_KERNEL_VIEWS = {"float16": np.uint16, "bfloat16": np.int16}


def sparse_divergence(base, candidate, classes: int) -> np.ndarray:
    """N_D x rows float64. ``base``/``candidate``: (values, storage kind, indices or None,
    normaliser float64 per row); values are rows x k (sparse) or rows x C (dense)."""
    import numba

    (bv, bk, bi, bn), (cv, ck, ci, cn) = base, candidate
    n = bv.shape[0]
    out = np.empty((N_D, n))
    if n:
        none = np.zeros((n, 0), np.int64)
        bv = bv.view(_KERNEL_VIEWS[bk]) if bk in _KERNEL_VIEWS else bv
        cv = cv.view(_KERNEL_VIEWS[ck]) if ck in _KERNEL_VIEWS else cv
        bidx = none if bi is None else np.ascontiguousarray(bi, dtype=np.int64)
        cidx = none if ci is None else np.ascontiguousarray(ci, dtype=np.int64)
        sparse_divergence_kernel(
            bv, bidx, np.ascontiguousarray(bn, np.float64), bi is not None,
            cv, cidx, np.ascontiguousarray(cn, np.float64), ci is not None,
            int(classes), numba.get_num_threads(), out,
        )  # fmt: skip
    return out
