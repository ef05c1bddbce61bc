"""Rows of few classes, TILE rows at a time, transposed (C x TILE) so that every max,
exp and sum runs across TILE rows at once, one vector per class; and the finish (log,
loss, lse) of any reduced tile, also across its rows."""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

from engine.kernels import SUM_ROWS
from engine.kernels.cpu.rows import row_scale
from engine.kernels.cpu.scalars import JIT, as_t, narrow, vexp, widen
from engine.kernels.cpu.transpose import LANES, STORAGE, transpose16
from engine.kernels.cpu.vecmath import log_pos_f64

# Rows with few classes are processed in transposed tiles (see tile_reduce); longer
# ones up to BLOCK row by row, pipelined, with the finish across a tile (rows_loss).
# (the measurements behind these constants: engine/kernels/README.md)
TILE = SUM_ROWS  # rows per tile: 4 float32 vectors across rows
# Where the transposed tiles stop is set in bytes per row: the row loops' cost is their
# scalar remainder, which float16 pays per element converted.
TILE_ROW_BYTES = 96  # forward: transposed tiles for rows up to here (float32: C <= 24)
TILE_GRAD_ROW_BYTES = 63  # forward+grad: ... (float32: C <= 15, float16: C <= 31)
TILE_STATS_C = 512  # row stats: tiles for rows of up to this many classes


# float64 scratch rows of a tile (tmp[k] has TILE lanes)
T_TGT, T_ZY, T_WY, T_LOSS, T_LSE, T_S, T_EY, T_GY, T_SC, T_ZS, T_M, T_D = range(12)
# compute-dtype rows (acc[k])
_A_MAX, _A_ONES, _A_REST, _A_DEV, _A_K, _A_SE, _A_SH, _A_H, _A_ZYT, _A_RANK, _A_AM, _A_Y = range(12)


@njit(**JIT)
def tile_scratch(C, w):
    return (
        np.empty((C, TILE), dtype=w.dtype),
        np.empty((12, TILE), dtype=w.dtype),
        np.empty((12, TILE)),
    )


def transpose_tile(x, r0, count, buf):  # pragma: no cover
    raise NotImplementedError


@overload(transpose_tile)
def _transpose_tile(x, r0, count, buf):
    """buf[:C, :TILE] = x[r0 : r0 + TILE].T in registers (transpose.py);
    False where the caller must copy element by element: float64 logits, a strided class
    axis, a short tile, or rows too close to the array's end for 16-wide reads."""
    if x.dtype not in STORAGE:
        return lambda x, r0, count, buf: False

    def vector(x, r0, count, buf):
        n, C = x.shape
        step = x.strides[0] // x.itemsize  # rows apart, in elements
        last_col = (C - 1) // LANES * LANES + LANES - 1  # the last element a row read touches
        if (
            count != TILE
            or x.strides[1] != x.itemsize
            or (r0 + TILE - 1) * step + last_col > (n - 1) * step + C - 1
        ):
            return False
        for q in range(0, TILE, LANES):
            for c0 in range(0, C, LANES):
                transpose16(x, r0 + q, c0, min(LANES, C - c0), buf, q)
        return True

    return vector


@njit(**JIT)
def tile_reduce(x, y, r0, count, w, eps, buf, acc, tmp, keep_exp, entropy):
    """Max, exp-sum split and Σ w·(m - z) of rows r0 .. r0+count (count <= TILE).

    Per-row loops over 10 classes are all overhead (horizontal max and sum, a scalar
    remainder). The tile is transposed into ``buf`` (C x TILE) so every max/exp/sum below
    runs across TILE rows at once, one vector per class. A short last tile is padded, so
    every row gets the same arithmetic wherever it falls (results never depend on splits).
    With ``keep_exp``, buf ends up holding exp(z - m) instead of z; with ``entropy``,
    acc[_A_H] gets Σ e·(m - z).
    """
    C = x.shape[1]
    m = acc[_A_MAX]
    ones = acc[_A_ONES]
    rest = acc[_A_REST]
    dev = acc[_A_DEV]
    tgt = tmp[T_TGT]
    zy = tmp[T_ZY]
    wy = tmp[T_WY]
    if not transpose_tile(x, r0, count, buf):
        blk = x[r0 : r0 + count]
        for j in range(C):  # column-wise: strided loads, contiguous stores (measured faster)
            col = buf[j]
            for r in range(count):
                col[r] = widen(blk[r, j])
            for r in range(count, TILE):
                col[r] = as_t(0.0, w)
    for r in range(TILE):
        m[r] = buf[0, r]
    for j in range(1, C):
        col = buf[j]
        for r in range(TILE):
            v = col[r]
            m[r] = v if v > m[r] else m[r]
    # each row's target logit and weight (padding and ignored rows: a harmless 0)
    for r in range(TILE):
        yi = y[r0 + r] if r < count else -1
        tgt[r] = yi
        zy[r] = np.float64(buf[yi, r]) if yi >= 0 else 0.0
        wy[r] = np.float64(w[yi]) if yi >= 0 else 0.0
    one = as_t(1.0, w)
    zero = as_t(0.0, w)
    sh = acc[_A_SH]  # the exp shift: the max, or 0 in an all -inf row (so S is 0, not NaN)
    h = acc[_A_H]
    for r in range(TILE):
        ones[r] = zero
        rest[r] = zero
        dev[r] = zero
        h[r] = zero
        sh[r] = m[r] if m[r] > -np.inf else zero
    if eps != 0.0:
        for j in range(C):
            col = buf[j]
            wj = w[j]
            if wj != zero:
                for r in range(TILE):
                    dev[r] += wj * (m[r] - col[r])
    if keep_exp:
        for j in range(C):
            col = buf[j]
            for r in range(TILE):
                e = vexp(col[r] - sh[r])
                big = e >= one
                ones[r] += one if big else zero
                rest[r] += zero if big else e
                col[r] = e
    elif entropy:
        for j in range(C):
            col = buf[j]
            for r in range(TILE):
                d = sh[r] - col[r]
                e = vexp(-d)
                big = e >= one
                ones[r] += one if big else zero
                rest[r] += zero if big else e
                h[r] += e * d if e > zero else zero
    else:
        for j in range(C):
            col = buf[j]
            for r in range(TILE):
                e = vexp(col[r] - sh[r])
                big = e >= one
                ones[r] += one if big else zero
                rest[r] += zero if big else e
    for r in range(TILE):
        tmp[T_M, r] = np.float64(m[r])
        tmp[T_S, r] = np.float64(ones[r]) + np.float64(rest[r])
        tmp[T_D, r] = np.float64(dev[r])


@njit(**JIT)
def tile_finish(C, eps, zeta, W, tmp):
    """Per-row loss and lse of a reduced tile (M, S, D in tmp), branch-free with a
    polynomial log (libm's log is scalar), so this too runs across the tile."""
    c1 = 1.0 - eps
    ce = eps / C
    for r in range(TILE):
        M = tmp[T_M, r]
        S = tmp[T_S, r]
        log_s = log_pos_f64(S)
        L = M + log_s
        li = c1 * tmp[T_WY, r] * ((M - tmp[T_ZY, r]) + log_s)
        li = li + ce * (tmp[T_D, r] + W * log_s) if eps != 0.0 else li
        li = li + zeta * L * L if zeta != 0.0 else li
        finite = M > -np.inf  # False for NaN and all -inf rows: loss NaN
        tmp[T_LOSS, r] = li if finite else np.nan
        # lse: -inf for an all -inf row, NaN where a NaN is in it
        tmp[T_LSE, r] = L if finite else (np.nan if M != M or S != 0.0 else -np.inf)


@njit(**JIT)
def tile_store_losses(r0, count, tmp, loss, lse):
    for r in range(count):
        i = r0 + r
        counted = tmp[T_TGT, r] >= 0
        loss[i] = tmp[T_LOSS, r] if counted else 0.0
        lse[i] = tmp[T_LSE, r] if counted else np.nan


@njit(**JIT)
def tile_loss(x, y, r0, count, w, eps, zeta, W, loss, lse, buf, acc, tmp):
    """Losses of rows r0 .. r0+count of a short-row (up to TILE_ROW_BYTES) matrix."""
    tile_reduce(x, y, r0, count, w, eps, buf, acc, tmp, False, False)
    tile_finish(x.shape[1], eps, zeta, W, tmp)
    tile_store_losses(r0, count, tmp, loss, lse)


@njit(**JIT)
def tile_loss_grad(x, y, r0, count, w, eps, zeta, W, scale, zscale, loss, lse, out, buf, acc, tmp):
    """tile_loss plus the gradient rows into ``out`` (any storage dtype, may alias x).

    g = K·e - scale·c0·w with K = (scale·(c1·w_y + c0·W) + 2ζ·zscale·L)/S; the target
    entry in float64 from S and the stored e_y (p_y - 1 cancels badly in float32).
    """
    C = x.shape[1]
    tile_reduce(x, y, r0, count, w, eps, buf, acc, tmp, True, False)
    tile_finish(C, eps, zeta, W, tmp)
    c1 = 1.0 - eps
    c0 = eps / C
    for r in range(TILE):
        yi = np.int64(tmp[T_TGT, r])
        tmp[T_EY, r] = np.float64(buf[yi, r]) if yi >= 0 else 0.0
        tmp[T_SC, r] = row_scale(scale, r0 + r) if r < count else 0.0
        tmp[T_ZS, r] = row_scale(zscale, r0 + r) if r < count else 0.0
    for r in range(TILE):
        sc = tmp[T_SC, r]
        zterm = tmp[T_ZS, r] * 2.0 * zeta * tmp[T_LSE, r] if zeta != 0.0 else 0.0
        S = tmp[T_S, r]
        wy = tmp[T_WY, r]
        ey = tmp[T_EY, r]
        acc[_A_K, r] = as_t((sc * (c1 * wy + c0 * W) + zterm) / S, w)
        acc[_A_SE, r] = as_t(sc * c0, w)
        gy = sc * c1 * wy * (-(S - ey) / S) + (sc * c0 * W + zterm) * (ey / S) - sc * c0 * wy
        tmp[T_GY, r] = gy
    K = acc[_A_K]
    se = acc[_A_SE]
    for j in range(C):
        col = buf[j]
        wj = w[j]
        for r in range(TILE):
            col[r] = K[r] * col[r] - se[r] * wj
    for r in range(count):
        orow = out[r0 + r]
        yi = np.int64(tmp[T_TGT, r])
        if yi < 0:  # not counted: a zero row
            for j in range(C):
                narrow(orow, j, as_t(0.0, w))
        elif tmp[T_LSE, r] == -np.inf:  # all -inf row: NaN everywhere, as the general path
            for j in range(C):
                narrow(orow, j, as_t(np.nan, w))
        else:
            for j in range(C):
                narrow(orow, j, buf[j, r])
            narrow(orow, yi, as_t(tmp[T_GY, r], w))
    tile_store_losses(r0, count, tmp, loss, lse)


@njit(**JIT)
def tile_stats(x, y, r0, count, w, eps, zeta, W, buf, acc, tmp, res):
    """Row stats of rows r0 .. r0+count of a short-row matrix (see row_stats), across
    the tile like tile_loss. ``res`` = (loss, lse, tlogp, amax, maxp, ent, rank)."""
    loss, lse, tlogp, amax, maxp, ent, rank = res
    C = x.shape[1]
    tile_reduce(x, y, r0, count, w, eps, buf, acc, tmp, False, True)
    tile_finish(C, eps, zeta, W, tmp)
    m = acc[_A_MAX]
    zyt = acc[_A_ZYT]
    rk = acc[_A_RANK]
    am = acc[_A_AM]
    yt = acc[_A_Y]  # the target's class, in the compute dtype (-1: none)
    zero = as_t(0.0, w)
    one = as_t(1.0, w)
    for r in range(TILE):
        yi = np.int64(tmp[T_TGT, r])
        zyt[r] = buf[yi, r] if yi >= 0 else zero
        yt[r] = as_t(yi, w)
        rk[r] = zero
        am[r] = as_t(-1.0, w)
    # first index of the max (a NaN first, as torch.argmax) and the target's rank: the
    # classes above it, and those tied with it before it (argmax takes the first)
    for j in range(C):
        col = buf[j]
        jt = as_t(j, w)
        for r in range(TILE):
            v = col[r]
            hit = am[r] < zero and (v != v or v == m[r])
            am[r] = jt if hit else am[r]
            above = v > zyt[r] or (v == zyt[r] and jt < yt[r])
            rk[r] += one if above else zero
    for r in range(count):
        i = r0 + r
        M = tmp[T_M, r]
        S = tmp[T_S, r]
        L = tmp[T_LSE, r]
        finite = M > -np.inf
        counted = tmp[T_TGT, r] >= 0
        loss[i] = tmp[T_LOSS, r] if counted else 0.0
        lse[i] = L
        tlogp[i] = tmp[T_ZY, r] - L if counted else np.nan
        amax[i] = np.int64(am[r])
        inv_s = 1.0 / S if finite else np.nan  # max prob = exp(M - L) = 1/S
        maxp[i] = inv_s
        ent[i] = (np.float64(acc[_A_H, r]) * inv_s + (L - M)) if finite else np.nan
        rank[i] = np.int64(rk[r]) if counted else -1
