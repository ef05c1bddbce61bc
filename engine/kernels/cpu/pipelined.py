"""One-block rows (C <= BLOCK) TILE at a time: each row's max is taken in the same loop
as the previous row's exp sum, so no row waits on its own max reduction; the finish runs
across the tile (tiles.tile_finish)."""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.kernels.cpu.blocks import BLOCK, block_deviation, block_max
from engine.kernels.cpu.rows import row_reduce, row_scale, zero_row
from engine.kernels.cpu.scalars import JIT, as_t, max_end, max_start, max_step, narrow, vexp, widen
from engine.kernels.cpu.tiles import (
    T_D,
    T_EY,
    T_GY,
    T_LSE,
    T_M,
    T_S,
    T_SC,
    T_TGT,
    T_WY,
    T_ZY,
    TILE,
    tile_finish,
    tile_store_losses,
)
from engine.kernels.cpu.transpose import LANES

_UNROLL = 4 * LANES  # elements per iteration of LLVM's vectorised row loops (16 x 4)


@njit(inline="always", **JIT)
def _masked_tail(x):
    """Whether one-block rows of x run their last C % 64 elements as one masked vector
    (see max_and_sumexp): 16-bit rows with such a remainder. Callers pass the answer on
    as a literal True / False, so each case compiles without the other's code."""
    return x.itemsize == 2 and x.shape[1] % _UNROLL != 0


@njit(inline="always", **JIT)
def max_and_sumexp(nxt, cur, bm, w, masked_tail):
    """max(nxt) and block_sumexp(cur, bm), in one loop over two rows of equal length.

    ``masked_tail`` (a compile-time constant): the last n % 64 elements, past what LLVM's
    16 x 4 unrolled vector loop covers, run as one masked 64-lane pass. LLVM leaves that
    remainder scalar, which for 16-bit rows (a conversion and an exp per element) made
    C = 127 take 3x as long as C = 128. Only there: float32 rows measured 26% slower with
    it at C = 129, and tail code in the same function slowed rows without a tail 8-25%.

    The exact-1 split of block_sumexp takes one operation fewer per vector here: the
    loop sums every exp (``total``) and the exps below 1 (``rest``), and ones is
    total - rest rounded to an integer, which is exact: at most BLOCK terms of at most 1
    each leave total's error far below 0.5. Same bits as the split, forward float32
    C = 64-128 +5-10%. (The storing twin keeps the split: this form measured 5% slower
    there.)
    """
    m = max_start(nxt, w)
    total = as_t(0.0, w)
    rest = as_t(0.0, w)
    one = as_t(1.0, w)
    zero = as_t(0.0, w)
    n = cur.shape[0]
    body = n - n % _UNROLL if masked_tail else n
    for j in range(body):
        m = max_step(nxt[j], m)
        e = vexp(widen(cur[j]) - bm)
        total += e
        rest += e if e < one else zero
    if masked_tail:
        tn = nxt[body:]
        tc = cur[body:]
        for k in range(_UNROLL):
            inside = k < tc.shape[0]
            m = max_step(tn[k], m) if inside else m
            e = vexp(widen(tc[k]) - bm) if inside else zero
            total += e
            rest += e if e < one else zero
    ones = as_t(np.rint(total - rest), w)  # NaN stays NaN: a NaN exp is in total only
    return max_end(m, w), ones, rest


@njit(**JIT)
def _rows_reduce_pipelined(x, y, r0, count, w, tmp, masked_tail):
    """_rows_reduce for one-block rows: each row's max is taken in the same loop as the
    previous row's exp sum, so no row waits on its own max reduction."""
    C = x.shape[1]
    p = -1  # lane of the pending row: its max is known, its exp sum not yet
    pbm = as_t(-np.inf, w)
    special = False
    for r in range(TILE + 1):
        if r < TILE:
            yi = y[r0 + r] if r < count else -1
            tmp[T_TGT, r] = yi
            tmp[T_M, r] = 0.0  # padding and rows not counted: a harmless finite lane
            tmp[T_S, r] = 1.0
            tmp[T_D, r] = 0.0
            tmp[T_ZY, r] = 0.0
            tmp[T_WY, r] = 0.0
            if yi < 0:
                continue
            nxt = r
        elif p < 0:
            break
        else:
            nxt = p  # past the last row: the pending row's own max rides along, unused
        if p >= 0:
            # one call site for every row: an exp sum from another loop would round
            # differently, and results must not depend on where a tile or thread ends
            bm, ones, rest = max_and_sumexp(x[r0 + nxt], x[r0 + p], pbm, w, masked_tail)
            if pbm > -np.inf:
                tmp[T_M, p] = np.float64(pbm)
                tmp[T_S, p] = np.float64(ones) + np.float64(rest)
            else:
                tmp[T_M, p] = np.nan  # no finite max (all -inf, or NaN): see below
                special = True
        else:
            bm = block_max(x[r0 + nxt], 0, C, w)
        p = nxt
        pbm = bm
    for r in range(count):
        yi = np.int64(tmp[T_TGT, r])
        if yi < 0:
            continue
        row = x[r0 + r]
        if special and tmp[T_M, r] != tmp[T_M, r]:  # the general path sorts these out
            none = w[0:0]
            M, S, _, _, _ = row_reduce(
                row, w, none, 1.0, 0.0, True, False, False, none, tmp[0, 0:0]
            )
            tmp[T_M, r] = M
            tmp[T_S, r] = S
        tmp[T_ZY, r] = np.float64(widen(row[yi]))
        tmp[T_WY, r] = np.float64(w[yi])


@njit(**JIT)
def _rows_reduce_short(x, y, r0, count, w, eps, tmp):
    """_rows_reduce of one-block rows: pipelined, then (smoothing) Σ w·(M - z) in a second
    pass over each row, from cache. (A function of its own: with this code in the same
    function as the long rows' loop, the pipelined rows measured 18-24% slower.)"""
    C = x.shape[1]
    if _masked_tail(x):
        _rows_reduce_pipelined(x, y, r0, count, w, tmp, True)
    else:
        _rows_reduce_pipelined(x, y, r0, count, w, tmp, False)
    if eps != 0.0:
        none = w[0:0]
        for r in range(count):
            if tmp[T_TGT, r] >= 0:  # (rows without a finite max score NaN anyway)
                bm = as_t(tmp[T_M, r], w)
                a, _ = block_deviation(x[r0 + r], 0, C, bm, w, none, 1.0, 0.0)
                tmp[T_D, r] = np.float64(a)


@njit(**JIT)
def _rows_reduce(x, y, r0, count, w, eps, tmp):
    """tile_reduce for longer rows, without the transpose: each row is reduced on its
    own (row_reduce), only the finish runs across rows (no scalar libm log per row)."""
    none = w[0:0]
    bms = tmp[0, 0:0]  # nothing stored in a forward pass: an empty float64 view
    C = x.shape[1]
    # Rows of one block skip row_reduce's merging (+34% at C = 128 before pipelining).
    # The shortcut sits in each caller (here, row_loss, row_stats), not inside
    # row_reduce: that is a real call per row, and with the shortcut inside it measured
    # 25% slower at C = 128.
    if C <= BLOCK:
        _rows_reduce_short(x, y, r0, count, w, eps, tmp)
        return
    for r in range(TILE):
        i = r0 + r
        yi = y[i] if r < count else -1
        tmp[T_TGT, r] = yi
        if yi < 0:  # padding and rows not counted: a harmless finite lane
            tmp[T_M, r] = 0.0
            tmp[T_S, r] = 1.0
            tmp[T_D, r] = 0.0
            tmp[T_ZY, r] = 0.0
            tmp[T_WY, r] = 0.0
            continue
        row = x[i]
        M, S, D, _, _ = row_reduce(row, w, none, 1.0, 0.0, True, eps != 0.0, False, none, bms)
        tmp[T_M, r] = M
        tmp[T_S, r] = S
        tmp[T_D, r] = D
        tmp[T_ZY, r] = np.float64(widen(row[yi]))
        tmp[T_WY, r] = np.float64(w[yi])


@njit(**JIT)
def rows_loss(x, y, r0, count, w, eps, zeta, W, loss, lse, tmp):
    """Losses of rows r0 .. r0+count of a matrix with rows past TILE_ROW_BYTES."""
    _rows_reduce(x, y, r0, count, w, eps, tmp)
    tile_finish(x.shape[1], eps, zeta, W, tmp)
    tile_store_losses(r0, count, tmp, loss, lse)


SPECIAL = -2  # tmp[T_TGT] of a lane left to the row-by-row path (no finite max)


@njit(inline="always", **JIT)
def _max_and_sumexp_store(nxt, cur, bm, w, dst, masked_tail):
    """max_and_sumexp that also writes each exp(cur - bm) to dst (apart from cur)."""
    m = max_start(nxt, w)
    ones = as_t(0.0, w)
    rest = as_t(0.0, w)
    one = as_t(1.0, w)
    zero = as_t(0.0, w)
    n = cur.shape[0]
    body = n - n % _UNROLL if masked_tail else n
    for j in range(body):
        m = max_step(nxt[j], m)
        e = vexp(widen(cur[j]) - bm)
        narrow(dst, j, e)
        big = e >= one
        ones += one if big else zero
        rest += zero if big else e
    if masked_tail:
        tn = nxt[body:]
        tc = cur[body:]
        td = dst[body:n]
        for k in range(_UNROLL):
            inside = k < tc.shape[0]
            m = max_step(tn[k], m) if inside else m
            e = vexp(widen(tc[k]) - bm) if inside else zero
            if inside:
                narrow(td, k, e)
            big = e >= one
            ones += one if big else zero
            rest += zero if big else e
    return max_end(m, w), ones, rest


@njit(**JIT)
def rows_loss_grad(
    x, y, r0, count, w, eps, zeta, W, scale, zscale, loss, lse, out, ex, ex0, in_out, tmp
):
    """_rows_loss_grad_rows, with the masked tails of max_and_sumexp for 16-bit rows.
    (One call per literal flag; passing the arguments on as a tuple measured 6-18% slower.)"""
    if _masked_tail(x):
        _rows_loss_grad_rows(x, y, r0, count, w, eps, zeta, W, scale, zscale,
                             loss, lse, out, ex, ex0, in_out, tmp, True)  # fmt: skip
    else:
        _rows_loss_grad_rows(x, y, r0, count, w, eps, zeta, W, scale, zscale,
                             loss, lse, out, ex, ex0, in_out, tmp, False)  # fmt: skip


@njit(**JIT)
def _rows_loss_grad_rows(
    x,
    y,
    r0,
    count,
    w,
    eps,
    zeta,
    W,
    scale,
    zscale,
    loss,
    lse,
    out,
    ex,
    ex0,
    in_out,
    tmp,
    masked_tail,
):
    """Loss and gradient of rows r0 .. r0+count of one-block rows (plain logits, class
    targets), as tile_loss_grad without the transpose.

    Row r's exps land in ex[ex0 + r]: ``out`` itself (``in_out``: ex is out, ex0 = r0)
    or a float tile (16-bit or in-place gradients). Rows are pipelined as in _rows_reduce_pipelined,
    the finish and the gradient scales run across the tile, then each gradient row costs
    one multiply per element. Rows without a finite max are marked SPECIAL and left to
    the caller (their logits are untouched).
    """
    C = x.shape[1]
    p = -1  # lane of the pending row: its max is known, its exp sum not yet
    pbm = as_t(-np.inf, w)
    for r in range(TILE + 1):  # one call site per loop, as in _rows_reduce_pipelined
        if r < TILE:
            yi = y[r0 + r] if r < count else -1
            tmp[T_TGT, r] = yi
            tmp[T_M, r] = 0.0  # padding, rows not counted, special rows: a harmless lane
            tmp[T_S, r] = 1.0
            tmp[T_D, r] = 0.0
            tmp[T_ZY, r] = 0.0
            tmp[T_WY, r] = 0.0
            if yi < 0:
                continue
            nxt = r
        elif p < 0:
            break
        else:
            nxt = p  # past the last row: the pending row's own max rides along, unused
        if p >= 0 and pbm > -np.inf:
            bm, ones, rest = _max_and_sumexp_store(
                x[r0 + nxt], x[r0 + p], pbm, w, ex[ex0 + p], masked_tail
            )
            tmp[T_M, p] = np.float64(pbm)
            tmp[T_S, p] = np.float64(ones) + np.float64(rest)
        else:
            if p >= 0:
                tmp[T_TGT, p] = SPECIAL
            bm = block_max(x[r0 + nxt], 0, C, w)
        p = nxt
        pbm = bm
    c1 = 1.0 - eps
    c0 = eps / C
    # the logits are still intact here (nothing is written to out, which may be x, yet);
    # z_y read after the row loop, not before: a load ahead of it would stall on memory
    for r in range(count):
        yi = np.int64(tmp[T_TGT, r])
        if yi >= 0:
            tmp[T_ZY, r] = np.float64(widen(x[r0 + r, yi]))
            tmp[T_WY, r] = np.float64(w[yi])
            if eps != 0.0:  # Σ w·(M - z)
                bm = as_t(tmp[T_M, r], w)
                a, _ = block_deviation(x[r0 + r], 0, C, bm, w, w[0:0], 1.0, 0.0)
                tmp[T_D, r] = np.float64(a)
    tile_finish(C, eps, zeta, W, tmp)
    # per lane: K = (scale·(c1·w_y + c0·W) + 2ζ·zscale·L)/S, and the target entry in
    # float64 from S and the parked e_y (p_y - 1 cancels badly in float32)
    for r in range(TILE):
        yi = np.int64(tmp[T_TGT, r])
        ey = np.float64(widen(ex[ex0 + r, yi])) if yi >= 0 else 0.0
        sc = row_scale(scale, r0 + r) if yi >= 0 else 0.0
        zsc = row_scale(zscale, r0 + r) if yi >= 0 else 0.0
        zterm = zsc * 2.0 * zeta * tmp[T_LSE, r] if zeta != 0.0 else 0.0
        S = tmp[T_S, r]
        wy = tmp[T_WY, r]
        tmp[T_EY, r] = (sc * (c1 * wy + c0 * W) + zterm) / S
        tmp[T_SC, r] = sc * c0
        tmp[T_GY, r] = (
            sc * c1 * wy * (-(S - ey) / S) + (sc * c0 * W + zterm) * (ey / S) - sc * c0 * wy
        )
    for r in range(count):
        yi = np.int64(tmp[T_TGT, r])
        if yi == SPECIAL:
            continue
        orow = out[r0 + r]
        if yi < 0:
            zero_row(orow, w)
            continue
        K = as_t(tmp[T_EY, r], w)
        se = as_t(tmp[T_SC, r], w)
        if in_out:  # one view of the row: two would cost LLVM's alias check
            if eps != 0.0:
                for j in range(C):
                    narrow(orow, j, K * widen(orow[j]) - se * w[j])
            else:
                for j in range(C):
                    narrow(orow, j, K * widen(orow[j]))
        else:
            er = ex[ex0 + r]
            if eps != 0.0:
                for j in range(C):
                    narrow(orow, j, K * er[j] - se * w[j])
            elif masked_tail:
                body = C - C % _UNROLL
                for j in range(body):
                    narrow(orow, j, K * er[j])
                ot = orow[body:]
                et = er[body:]
                for k in range(_UNROLL):
                    if k < ot.shape[0]:
                        narrow(ot, k, K * et[k])
            else:
                for j in range(C):
                    narrow(orow, j, K * er[j])
        narrow(orow, yi, as_t(tmp[T_GY, r], w))
    tile_store_losses(r0, count, tmp, loss, lse)
