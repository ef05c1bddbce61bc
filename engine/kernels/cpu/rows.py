"""One row at a time: the online merge of a row's blocks, its loss, gradient and stats.

These serve every option (soft targets, softcap, probability inputs, smoothing) and every
row the faster tile and pipelined paths leave alone (no finite max, long rows).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from engine.kernels.cpu.blocks import (
    BLOCK,
    block_deviation,
    block_has_nan,
    block_max,
    block_sumexp,
    block_sumexp_below,
    block_sumexp_entropy,
)
from engine.kernels.cpu.scalars import JIT, as_t, narrow, tiny_of, vexp, widen
from engine.options import KIND_LOG_PROBS, KIND_LOGITS, KIND_PROBS

# -- one row -----------------------------------------------------------------------------


@njit(**JIT)
def row_reduce(row, w, t, c1, c0, want_sum, want_dev, want_entropy, store, bms):
    """Online merge of the blocks of one row, in float64.

    Returns (M, S, D, U, H): max, Σ exp(z-M), Σ u·(M-z), Σ u, Σ exp(z-M)·(M-z).
    With a non-empty ``store``, exp(z - block max) lands there and ``bms`` gets each
    block's max, so the gradient pass can rescale instead of recomputing exp.
    """
    n = row.shape[0]
    keep = store.shape[0] != 0
    M = -np.inf
    S = 0.0
    D = 0.0
    U = 0.0
    H = 0.0
    wsum_bm = 0.0  # Σ_blocks U_b·bm, to move deviations from block max to the row max
    lo = 0
    b = 0
    one_pass = want_sum and not want_dev and not want_entropy
    while lo < n:
        hi = min(lo + BLOCK, n)
        if one_pass and lo >= 2 * BLOCK and M > -np.inf:
            # Shift by the running max and skip the max pass: one read of the block
            # instead of two. Valid only if nothing here reaches M; otherwise fall through
            # and redo it from L1. (From the third block on: a new max is likely in the
            # second, and a redo costs more than the max pass it saves.)
            rest, reached = block_sumexp_below(row, lo, hi, as_t(M, w), w, store)
            if not reached:
                if keep:
                    bms[b] = M
                b += 1
                S += np.float64(rest)
                lo = hi
                continue
        bm = block_max(row, lo, hi, w)
        bm64 = np.float64(bm)
        if keep:
            bms[b] = bm64
        b += 1
        if want_dev:
            # deviations are taken from the block max, or from 0 in an all -inf block
            # (where -inf - -inf would make NaN of the +inf that -log p is there)
            ref = bm if bm64 != -np.inf else as_t(0.0, w)
            a, ub = block_deviation(row, lo, hi, ref, w, t, c1, c0)
            D += np.float64(a)
            U += np.float64(ub)
            wsum_bm += np.float64(ub) * np.float64(ref) if ub != 0 else 0.0
        if want_sum and bm64 != -np.inf:
            if want_entropy:
                ones, rest, h = block_sumexp_entropy(row, lo, hi, bm, w)
                h64 = np.float64(h)
            else:
                ones, rest = block_sumexp(row, lo, hi, bm, w, store)
                h64 = 0.0
            s64 = np.float64(ones) + np.float64(rest)
            if M == -np.inf:  # first block with a finite max
                H = h64
                S = s64
                M = bm64
            elif bm64 > M:
                r = math.exp(M - bm64)
                H = (H + S * (bm64 - M)) * r + h64
                S = S * r + s64
                M = bm64
            else:
                r = math.exp(bm64 - M)
                H += (h64 + s64 * (M - bm64)) * r
                S += s64 * r
        else:
            # nothing finite in this block: NaN must still poison the row, -inf adds 0
            if want_sum and block_has_nan(row, lo, hi):
                S = np.nan
            if keep:
                _fill(store, lo, hi, S if S != S else 0.0, w)
            if bm64 > M:
                M = bm64
        lo = hi
    if want_dev and U != 0.0:
        D += U * M - wsum_bm
    return M, S, D, U, H


@njit(**JIT)
def _fill(out, lo, hi, value, w):
    v = as_t(value, w)
    for j in range(lo, hi):
        out[j] = v


@njit(**JIT)
def transform_row(row, scratch, cap, kind):
    """Softcap (logits) or log-clamp (probs) into the per-thread scratch row."""
    if kind == KIND_PROBS:
        tiny = tiny_of(scratch)
        for j in range(row.shape[0]):
            v = widen(row[j])
            scratch[j] = math.log(v if v > tiny else tiny) if v == v else v
    else:
        for j in range(row.shape[0]):
            scratch[j] = cap * math.tanh(widen(row[j]) / cap)


@njit(**JIT)
def row_loss(z, w, t, yi, eps, zeta, kind, W, want_lse, store, bms):
    """(loss, lse used, M, S, z_y) of one counted row; z is the (transformed) row.

    ``store``/``bms``: see row_reduce. ``store`` must not overlap z: a one-pass block is
    re-read when it holds a new max (and loops over two views of one row run scalar).
    """
    C = z.shape[0]
    soft = t.shape[0] != 0
    c1 = 1.0 - eps
    c0 = eps / C
    want_dev = soft or eps != 0.0
    keep = store.shape[0] != 0
    # z_y is read before the stored exps can overwrite it, otherwise after the row pass:
    # read first, it misses cache and stalls the max loop behind it (~8% at C = 1000)
    zy = np.float64(widen(z[yi])) if keep and not soft else 0.0
    simple = C <= BLOCK and want_lse and not want_dev
    bm = block_max(z, 0, C, w) if simple else as_t(-np.inf, w)
    if bm > -np.inf:  # one block with a finite max: its two loops, nothing to merge
        ones, rest = block_sumexp(z, 0, C, bm, w, store)
        M, S, D, U = np.float64(bm), np.float64(ones) + np.float64(rest), 0.0, 0.0
        if keep:
            bms[0] = M
    else:
        M, S, D, U, _ = row_reduce(z, w, t, c1, c0, want_lse, want_dev, False, store, bms)
    if not keep and not soft:
        zy = np.float64(widen(z[yi]))
    if not want_lse:
        if not want_dev:
            M = 0.0
        elif M == -np.inf or M != M:
            M = 0.0  # no max was needed; keep D's reference point finite
    loss, L = _loss_from(M, S, D, U, zy, w, yi, eps, zeta, W, soft, want_lse)
    return loss, L, M, S, zy


@njit(**JIT)
def _loss_from(M, S, D, U, zy, w, yi, eps, zeta, W, soft, want_lse):
    """(loss, lse) from a row's reductions (see row_reduce); lse is 0 for non-logit kinds."""
    L = M + math.log(S) if want_lse else 0.0
    shift = L - M  # = log S for logits
    if soft:
        loss = D + U * shift
    else:
        loss = (1.0 - eps) * w[yi] * ((M - zy) + shift)
        if eps != 0.0:
            loss += eps / w.shape[0] * (D + W * shift)
    if zeta != 0.0:
        loss += zeta * L * L
    return loss, L


@njit(**JIT)
def _row_grad_stored(exps, out, w, t, yi, eps, zeta, W, L, M, S, zy, scale, zscale, bms):
    """Gradient of a logits row whose exp(z - block max) values sit in ``exps``, or in
    ``out`` itself when ``exps`` is empty (float32/float64 gradients; 16-bit ones keep
    them in a float scratch row). Two views of one row would cost LLVM's alias check.

    g_j = K·e_j·exp(bm_b - M)/S - scale·coef_j: one multiply-add per element.
    """
    C = out.shape[0]
    soft = t.shape[0] != 0
    c1 = 1.0 - eps
    c0 = eps / C
    zterm = zscale * 2.0 * zeta * L
    K64 = (scale * W if soft else scale * (c1 * w[yi] + c0 * W)) + zterm
    invS = 1.0 / S
    se = as_t(scale * c0, w)
    sc1 = as_t(scale * c1, w)
    lo = 0
    b = 0
    while lo < C:
        hi = min(lo + BLOCK, C)
        f = as_t(K64 * math.exp(bms[b] - M) * invS, w)
        ob = out[lo:hi]
        wb = w[lo:hi]
        if exps.shape[0] == 0:  # in place
            if soft:
                tb = t[lo:hi]
                for j in range(ob.shape[0]):
                    narrow(ob, j, f * widen(ob[j]) - wb[j] * (sc1 * tb[j] + se))
            elif eps != 0.0:
                for j in range(ob.shape[0]):
                    narrow(ob, j, f * widen(ob[j]) - se * wb[j])
            else:
                for j in range(ob.shape[0]):
                    narrow(ob, j, f * widen(ob[j]))
            lo = hi
            b += 1
            continue
        eb = exps[lo:hi]
        if soft:
            tb = t[lo:hi]
            for j in range(ob.shape[0]):
                narrow(ob, j, f * eb[j] - wb[j] * (sc1 * tb[j] + se))
        elif eps != 0.0:
            for j in range(ob.shape[0]):
                narrow(ob, j, f * eb[j] - se * wb[j])
        else:
            for j in range(ob.shape[0]):
                narrow(ob, j, f * eb[j])
        lo = hi
        b += 1
    if not soft:
        _write_target_grad(out, w, yi, c1, c0, W, S, M, zy, zterm, scale, 0.0)


@njit(**JIT)
def _write_target_grad(out, w, yi, c1, c0, W, S, M, zy, zterm, scale, cap):
    """The target entry in float64: p_y - 1 = -(S - e_y)/S cancels badly in float32."""
    invS = 1.0 / S
    e_y = math.exp(zy - M)
    p_y = e_y * invS
    wy = np.float64(w[yi])
    gy = scale * c1 * wy * (-(S - e_y) * invS)
    gy += (scale * c0 * W + zterm) * p_y - scale * c0 * wy
    if cap != 0.0:
        c = zy / cap
        gy = gy * (1.0 - c * c)
    narrow(out, yi, as_t(gy, w))


@njit(**JIT)
def _row_grad(z, raw, out, w, t, yi, eps, zeta, kind, W, cap, L, M, S, scale, zscale):
    """Write d loss / d x for one row. z: transformed row, raw: the input row.

    p_j = exp(z_j - M) / S rather than exp(z_j - lse): z - M is exact, while lse rounded
    to float32 would carry an absolute error of ulp(lse) into every p (1e-3 at lse=1e4).
    """
    C = z.shape[0]
    soft = t.shape[0] != 0
    c1 = 1.0 - eps
    c0 = eps / C
    zero = as_t(0.0, w)
    se = as_t(scale * c0, w)
    if soft:
        sc1 = as_t(scale * c1, w)
        sc0 = as_t(scale * c0, w)
    else:
        sc1 = zero
        sc0 = zero
    if kind == KIND_LOGITS:
        zterm = zscale * 2.0 * zeta * L
        if soft:
            K64 = scale * W + zterm  # W holds Σ u = Σ_c w_c·t'_c here
        else:
            K64 = scale * (c1 * w[yi] + c0 * W) + zterm
        invS = 1.0 / S
        K = as_t(K64 * invS, w)  # folds 1/S into the one multiplier
        Mt = as_t(M, w)
        zy = np.float64(widen(z[yi])) if not soft else 0.0
        if cap != 0.0:
            icap = as_t(1.0 / cap, w)
            one = as_t(1.0, w)
            for j in range(C):
                zj = widen(z[j])
                c = zj * icap
                g = K * vexp(zj - Mt) - (w[j] * (sc1 * t[j] + sc0) if soft else se * w[j])
                narrow(out, j, g * (one - c * c))
        elif soft:
            for j in range(C):
                narrow(out, j, K * vexp(widen(z[j]) - Mt) - w[j] * (sc1 * t[j] + sc0))
        elif eps != 0.0:
            for j in range(C):
                narrow(out, j, K * vexp(widen(z[j]) - Mt) - se * w[j])
        else:
            for j in range(C):
                narrow(out, j, K * vexp(widen(z[j]) - Mt))
        if not soft:
            _write_target_grad(out, w, yi, c1, c0, W, S, M, zy, zterm, scale, cap)
    else:
        # NLLLoss-style inputs: d/dlogp = -coef; probs add the chain rule 1/p (0 below tiny).
        tiny = tiny_of(w)
        for j in range(C):
            coef = w[j] * (sc1 * t[j] + sc0) if soft else se * w[j]
            if not soft and j == yi:
                coef += as_t(scale * c1, w) * w[yi]
            if kind == KIND_LOG_PROBS:
                narrow(out, j, -coef)
            else:
                p = widen(raw[j])
                narrow(out, j, -coef / p if p > tiny else zero)


@njit(**JIT)
def zero_row(out, w):
    for j in range(out.shape[0]):
        narrow(out, j, as_t(0.0, w))


@njit(**JIT)
def row_scale(scale, i):
    """scale[i], or scale[0] for a one-entry scale array (constant over the rows)."""
    return scale[i] if scale.shape[0] > 1 else scale[0]


@njit(**JIT)
def loss_grad_row(
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
):
    """Loss, lse and gradient of row i, one row at a time (any options)."""
    C = x.shape[1]
    soft = t.shape[1] != 0
    want_lse = kind == KIND_LOGITS
    yi = 0 if soft else y[i]
    if yi < 0:
        loss[i] = 0.0
        lse[i] = np.nan
        zero_row(out[i], w)
        return
    sc = row_scale(scale, i)
    zsc = row_scale(zscale, i)
    Wg = W
    if soft:
        # Σ u = Σ_c w_c·t'_c is this row's "total coefficient"
        Wg = _soft_total(w, t[i], 1.0 - eps, eps / C)
    # (separate calls per case: the row views differ in type, float16 bits vs float)
    if store_exp:  # the exps wait in out, so each element costs one exp
        li, Li, M, S, zy = row_loss(x[i], w, t[i], yi, eps, zeta, kind, W, want_lse, out[i], bms)
        _row_grad_stored(exps, out[i], w, t[i], yi, eps, zeta, Wg, Li, M, S, zy, sc, zsc, bms)
    elif exps.shape[0] != 0:  # ... or in a float row (16-bit or in-place gradients)
        li, Li, M, S, zy = row_loss(x[i], w, t[i], yi, eps, zeta, kind, W, want_lse, exps, bms)
        _row_grad_stored(exps, out[i], w, t[i], yi, eps, zeta, Wg, Li, M, S, zy, sc, zsc, bms)
    elif scratch.shape[0] != 0:
        transform_row(x[i], scratch, cap, kind)
        li, Li, M, S, _ = row_loss(scratch, w, t[i], yi, eps, zeta, kind, W, want_lse, w[0:0], bms)
        _row_grad(scratch, x[i], out[i], w, t[i], yi, eps, zeta, kind, Wg, cap, Li, M, S, sc, zsc)
    else:
        li, Li, M, S, _ = row_loss(x[i], w, t[i], yi, eps, zeta, kind, W, want_lse, w[0:0], bms)
        _row_grad(x[i], x[i], out[i], w, t[i], yi, eps, zeta, kind, Wg, cap, Li, M, S, sc, zsc)
    loss[i] = li
    lse[i] = Li if want_lse else np.nan


@njit(**JIT)
def _soft_total(w, t, c1, c0):
    total = 0.0
    for j in range(w.shape[0]):
        total += np.float64(w[j]) * (c1 * np.float64(t[j]) + c0)
    return total


@njit(**JIT)
def row_stats(z, w, t, yi, eps, zeta, kind, W, bms):
    """(loss, lse, target_logprob, argmax, max_prob, entropy, target_rank, kl) of one row."""
    C = z.shape[0]
    soft = t.shape[0] != 0
    counted = yi >= 0
    ones = w[0:0]
    # one pass serves the loss and the entropy (the deviation sums only when needed)
    want_dev = soft or eps != 0.0
    bm = block_max(z, 0, C, w) if C <= BLOCK and not want_dev else as_t(-np.inf, w)
    if bm > -np.inf:  # one block with a finite max: its two loops, nothing to merge
        o, rest, h = block_sumexp_entropy(z, 0, C, bm, w)
        M, S, D, U, H = np.float64(bm), np.float64(o) + np.float64(rest), 0.0, 0.0, np.float64(h)
    else:
        M, S, D, U, H = row_reduce(z, w, t, 1.0 - eps, eps / C, True, want_dev, True, ones, bms)
    if counted:
        zy = 0.0 if soft else np.float64(widen(z[yi]))
        li, _ = _loss_from(M, S, D, U, zy, w, yi, eps, zeta, W, soft, kind == KIND_LOGITS)
    else:
        li = 0.0
    L = M + math.log(S) if kind == KIND_LOGITS else 0.0
    r = math.exp(M - L)  # 1/S for logits: the max probability
    entropy = r * (H + S * (L - M))
    am = first_max_index(z, as_t(M, w), S != S)
    kl = np.nan
    if soft:
        # target class for rank/accuracy: argmax of the target distribution
        best = t[0]
        cls = 0
        for j in range(1, C):
            if t[j] > best:
                best = t[j]
                cls = j
        Dt, Ut = _plain_deviation(z, t, M)
        tlogp = -(Dt + Ut * (L - M))
        tlogt = 0.0
        for j in range(C):
            tj = np.float64(t[j])
            if tj > 0.0:
                tlogt += tj * math.log(tj)
        kl = tlogt - tlogp
    else:
        cls = yi
        tlogp = np.float64(widen(z[yi])) - L if counted else np.nan
    rank = -1
    if counted:
        zt = widen(z[cls])
        rank = 0
        for j in range(C):
            rank += 1 if widen(z[j]) > zt else 0
        # ties rank by index, as argmax takes the first maximal class: rank 0 exactly
        # when argmax is the target
        for j in range(cls):
            rank += 1 if widen(z[j]) == zt else 0
    return li, M + math.log(S), tlogp, am, r, entropy, rank, kl


@njit(**JIT)
def first_max_index(z, M, has_nan):
    """First index of the max M (of the first NaN when the row has one, as torch.argmax).

    Scanned in chunks of 64 whose match count vectorises, then the hit chunk element by
    element: 3x faster than one early-exit scalar loop (6x for float16).
    """
    C = z.shape[0]
    if has_nan:  # (or a +inf max, where the exp sum is NaN too): the plain scan
        for j in range(C):
            v = widen(z[j])
            if v != v or v == M:
                return j
        return 0
    for k in range(0, C, 64):
        c = z[k : min(k + 64, C)]
        hits = 0
        for j in range(c.shape[0]):
            hits += 1 if widen(c[j]) == M else 0
        if hits:
            for j in range(c.shape[0]):
                if widen(c[j]) == M:
                    return k + j
    return 0


@njit(**JIT)
def _plain_deviation(z, t, M):
    """Σ t·(M - z) and Σ t (t = 0 terms add 0), in float64; for target_logprob of soft rows."""
    D = 0.0
    U = 0.0
    for j in range(z.shape[0]):
        tj = np.float64(t[j])
        if tj != 0.0:
            D += tj * (M - np.float64(widen(z[j])))
        U += tj
    return D, U
