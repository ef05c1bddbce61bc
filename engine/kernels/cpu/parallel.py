"""The parallel entry kernels (forward_kernel, forward_grad_kernel, stats_kernel): rows
split statically over threads, each thread's rows routed to the tile, pipelined or
row-by-row path; and the per-block loss sums of the backend contract."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from engine.kernels.cpu.blocks import BLOCK
from engine.kernels.cpu.pipelined import SPECIAL, rows_loss, rows_loss_grad
from engine.kernels.cpu.rows import loss_grad_row, row_loss, row_stats, transform_row
from engine.kernels.cpu.scalars import JIT, PAR
from engine.kernels.cpu.tiles import (
    T_TGT,
    TILE,
    TILE_GRAD_ROW_BYTES,
    TILE_ROW_BYTES,
    TILE_STATS_C,
    tile_loss,
    tile_loss_grad,
    tile_scratch,
    tile_stats,
)
from engine.options import KIND_LOGITS, KIND_PROBS

# -- parallel kernels over rows ------------------------------------------------------------


@njit(**JIT)
def _thread_span(b, nb, n, align):
    """Thread b's rows, cut at multiples of ``align``. Paths whose tiles add the loss
    sums (cheap rows, many of them) align to TILE, so a block of the sums never straddles
    two threads; the others split evenly (95 rows of 262144 classes cut at 64 would leave
    one of two threads idle) and sum afterwards (_sum_blocks_after)."""
    lo = (b * n // nb) // align * align
    hi = n if b == nb - 1 else ((b + 1) * n // nb) // align * align
    return lo, hi


# no fastmath: four fixed chains, the same order wherever it is inlined
@njit(cache=True, nogil=True)
def _block_sums(loss, lo, hi, sums):
    """sums[b] = Σ loss over the TILE-row blocks b in [lo, hi) (lo a multiple of TILE);
    nothing when ``sums`` is empty. See the backend contract (engine/kernels)."""
    if sums.shape[0] == 0:
        return
    i = lo
    while i < hi:
        end = min(i + TILE, hi)
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        j = i
        while j + 4 <= end:
            a0 += np.float64(loss[j])
            a1 += np.float64(loss[j + 1])
            a2 += np.float64(loss[j + 2])
            a3 += np.float64(loss[j + 3])
            j += 4
        while j < end:
            a0 += np.float64(loss[j])
            j += 1
        sums[i // TILE] = (a0 + a1) + (a2 + a3)
        i = end


@njit(**PAR)
def _sum_blocks_after(loss, sums):
    """_block_sums over all rows, for paths whose threads split rows off block bounds."""
    n = loss.shape[0]
    for b in prange(sums.shape[0]):
        _block_sums(loss, b * TILE, min(n, (b + 1) * TILE), sums)


@njit(**PAR)
def forward_kernel(x, y, t, w, W, eps, zeta, cap, kind, nthreads, loss, lse, sums):
    """Per-row loss and lse. t is (rows x C) soft targets or (rows x 0) for class targets.
    ``sums``: the loss sum of each TILE-row block, or empty (see _block_sums)."""
    n, C = x.shape
    nb = max(1, min(nthreads, n))
    scratch_len = C if (cap != 0.0 or kind == KIND_PROBS) else 0
    soft = t.shape[1] != 0
    want_lse = kind == KIND_LOGITS
    plain = want_lse and not soft and not scratch_len
    aligned = plain and C <= BLOCK  # the tiles add the loss sums (see _thread_span)
    tile_sums = sums if aligned else sums[0:0]
    for b in prange(nb):
        lo, hi = _thread_span(b, nb, n, TILE if aligned else 1)
        scratch = np.empty(scratch_len, dtype=w.dtype)
        none = w[0:0]  # no stored exps in a forward pass
        bms = np.empty(0)
        if plain:
            transposed = C * x.itemsize <= TILE_ROW_BYTES
            buf, acc, tmp = tile_scratch(C if transposed else 0, w)
            while lo < hi:
                k = min(TILE, hi - lo)
                if transposed:
                    tile_loss(x, y, lo, k, w, eps, zeta, W, loss, lse, buf, acc, tmp)
                else:
                    rows_loss(x, y, lo, k, w, eps, zeta, W, loss, lse, tmp)
                _block_sums(loss, lo, lo + k, tile_sums)
                lo += k
        for i in range(lo, hi):
            yi = 0 if soft else y[i]
            if yi < 0:  # not counted: skipped entirely
                loss[i] = 0.0
                lse[i] = np.nan
                continue
            Wi = W
            if soft:
                Wi = 0.0  # unused: soft losses use Σ u from the row pass
            if scratch_len:
                transform_row(x[i], scratch, cap, kind)
                li, Li, _, _, _ = row_loss(
                    scratch, w, t[i], yi, eps, zeta, kind, Wi, want_lse, none, bms
                )
            else:
                li, Li, _, _, _ = row_loss(
                    x[i], w, t[i], yi, eps, zeta, kind, Wi, want_lse, none, bms
                )
            loss[i] = li
            lse[i] = Li if want_lse else np.nan
    if not aligned and sums.shape[0] != 0:
        _sum_blocks_after(loss, sums)


@njit(**PAR)
def forward_grad_kernel(
    x, y, t, w, W, eps, zeta, cap, kind, nthreads, scale, zscale, store_exp, loss, lse, out, sums
):
    """forward_kernel, then the gradient of each row into out (which may alias x).

    ``store_exp`` (plain logits, a float ``out`` apart from x): the forward pass parks
    exp(z - block max) in ``out`` and the gradient pass only rescales it, so each element
    costs one exp. Other plain-logit rows (16-bit or in-place gradients) park their exps
    in a per-thread float row instead.
    """
    n, C = x.shape
    nb = max(1, min(nthreads, n))
    scratch_len = C if (cap != 0.0 or kind == KIND_PROBS) else 0
    soft = t.shape[1] != 0
    plain = kind == KIND_LOGITS and cap == 0.0 and not soft
    park = kind == KIND_LOGITS and cap == 0.0 and not store_exp
    # tiles keep their exps in a float scratch, so any out dtype (float16 too) can use them
    tiled = plain and C * x.itemsize <= TILE_GRAD_ROW_BYTES
    # one-block rows: pipelined like the forward's, exps parked in out or a float tile
    rows_tiled = plain and not tiled and C <= BLOCK
    aligned = tiled or rows_tiled  # the tiles add the loss sums (see _thread_span)
    tile_sums = sums if aligned else sums[0:0]
    for b in prange(nb):
        lo, hi = _thread_span(b, nb, n, TILE if aligned else 1)
        scratch = np.empty(scratch_len, dtype=w.dtype)
        exps = np.empty(C if park else 0, dtype=w.dtype)
        bms = np.empty((C + BLOCK - 1) // BLOCK)
        if tiled:
            buf, acc, tmp = tile_scratch(C, w)
            while lo < hi:
                k = min(TILE, hi - lo)
                tile_loss_grad(
                    x, y, lo, k, w, eps, zeta, W, scale, zscale, loss, lse, out, buf, acc, tmp
                )
                _block_sums(loss, lo, lo + k, tile_sums)
                lo += k
        elif rows_tiled:
            _, _, tmp = tile_scratch(0, w)
            park_tile = np.empty((TILE if park else 0, C), dtype=w.dtype)
            while lo < hi:
                k = min(TILE, hi - lo)
                # (two calls: out and the float tile differ in type for 16-bit gradients)
                if store_exp:
                    rows_loss_grad(
                        x,
                        y,
                        lo,
                        k,
                        w,
                        eps,
                        zeta,
                        W,
                        scale,
                        zscale,
                        loss,
                        lse,
                        out,
                        out,
                        lo,
                        True,
                        tmp,
                    )
                else:
                    rows_loss_grad(
                        x,
                        y,
                        lo,
                        k,
                        w,
                        eps,
                        zeta,
                        W,
                        scale,
                        zscale,
                        loss,
                        lse,
                        out,
                        park_tile,
                        0,
                        False,
                        tmp,
                    )
                for r in range(k):  # rows the pipeline left alone: no finite max
                    if tmp[T_TGT, r] == SPECIAL:
                        loss_grad_row(
                            x,
                            y,
                            t,
                            w,
                            W,
                            eps,
                            zeta,
                            cap,
                            kind,
                            scale,
                            zscale,
                            store_exp,
                            lo + r,
                            scratch,
                            exps,
                            bms,
                            loss,
                            lse,
                            out,
                        )
                _block_sums(loss, lo, lo + k, tile_sums)
                lo += k
        for i in range(lo, hi):
            loss_grad_row(
                x,
                y,
                t,
                w,
                W,
                eps,
                zeta,
                cap,
                kind,
                scale,
                zscale,
                store_exp,
                i,
                scratch,
                exps,
                bms,
                loss,
                lse,
                out,
            )
    if not aligned and sums.shape[0] != 0:
        _sum_blocks_after(loss, sums)


@njit(**PAR)
def stats_kernel(
    x, y, t, w, W, eps, zeta, cap, kind, nthreads, loss, lse, tlogp, amax, maxp, ent, rank, kl
):
    n, C = x.shape
    nb = max(1, min(nthreads, n))
    scratch_len = C if (cap != 0.0 or kind == KIND_PROBS) else 0
    soft = t.shape[1] != 0
    tiled = kind == KIND_LOGITS and not soft and not scratch_len and C <= TILE_STATS_C
    for b in prange(nb):
        lo, hi = _thread_span(b, nb, n, 1)
        scratch = np.empty(scratch_len, dtype=w.dtype)
        bms = np.empty(0)  # per thread: no allocation per row
        if tiled:
            buf, acc, tmp = tile_scratch(C, w)
            res = (loss, lse, tlogp, amax, maxp, ent, rank)
            while lo < hi:
                k = min(TILE, hi - lo)
                tile_stats(x, y, lo, k, w, eps, zeta, W, buf, acc, tmp, res)
                lo += k
        for i in range(lo, hi):
            yi = 0 if soft else y[i]
            if scratch_len:
                transform_row(x[i], scratch, cap, kind)
                row = row_stats(scratch, w, t[i], yi, eps, zeta, kind, W, bms)
            else:
                row = row_stats(x[i], w, t[i], yi, eps, zeta, kind, W, bms)
            loss[i], lse[i], tlogp[i], amax[i], maxp[i], ent[i], rank[i], kli = row
            if soft:
                kl[i] = kli
