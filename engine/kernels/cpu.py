"""Numba CPU kernels: fused row-wise log-sum-exp cross-entropy, its gradient, row stats.

Shape of the work (one row at a time, rows split statically over threads):

- The row is walked in L1-sized blocks. Per block: a vectorised max, then one vectorised
  sum of exp(z - block_max) (plus, when an option needs it, a weighted sum of
  (block_max - z)). Blocks are merged online in float64, so a 256k-class row costs one
  read from memory and one from L1; no softmax/log-softmax row is ever materialised.
- Losses are formed from max-relative quantities: loss = (M - z_y) + log S, which keeps
  float32 accurate for logits of 1e4 where lse - z_y would cancel.
- The gradient pass re-reads the row once (from cache for rows that fit) and writes
  d loss / d logits, possibly over the logits themselves.
- Softcap and probability inputs first transform the row into a per-thread scratch row,
  then reuse the same fast loops.

Dtype handling: float16 reaches the kernels as uint16 bits and bfloat16 as int16 bits (a
type each, so Numba compiles one specialisation per storage and caches it); they are
widened to float32 in registers. Arithmetic is float32 except for float64 input.

Fast-math: ``reassoc`` (and contract/nsz/arcp) so sums vectorise; never nnan/ninf, so
-inf masks and NaN rows behave exactly as in PyTorch.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from engine.kernels import STORAGE_BF16_BITS, STORAGE_F16_BITS, SUM_ROWS, Problem
from engine.kernels._transpose import LANES, STORAGE, transpose16
from engine.kernels._vecmath import (
    bf16_bits_to_f32,
    exp_nonpos_f32,
    f16_bits_as_i16,
    f16_bits_to_f32,
    f16_max_from_int_extremes,
    f32_to_bf16_bits,
    f32_to_f16_bits,
    log_pos_f64,
    max_i16,
    max_nan_unspecified,
    max_skip_nan,
    min_i16,
)
from engine.options import KIND_LOG_PROBS, KIND_LOGITS, KIND_PROBS

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
BLOCK = 2048  # elements per block: 8 KiB of float32, stays in L1 between the two reads
# (2048 measured best of 512..8192: short enough that memory reads keep flowing while
# the previous block's exps are computed)

_JIT = dict(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
_PAR = dict(fastmath=FASTMATH, cache=True, nogil=True, parallel=True, error_model="numpy")

# -- type-dispatched scalar helpers (resolved at compile time by argument type) ----------


def widen(v):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(widen)
def _widen(v):
    if v == types.uint16:
        return lambda v: f16_bits_to_f32(v)
    if v == types.int16:
        return lambda v: bf16_bits_to_f32(v)
    if v in (types.float32, types.float64):
        return lambda v: v
    return None


def narrow(arr, j, value):  # pragma: no cover
    raise NotImplementedError


@overload(narrow)
def _narrow(arr, j, value):
    dt = arr.dtype
    if dt == types.uint16:

        def store_f16(arr, j, value):
            arr[j] = f32_to_f16_bits(value)

        return store_f16
    if dt == types.int16:

        def store_bf16(arr, j, value):
            arr[j] = np.int16(f32_to_bf16_bits(value))

        return store_bf16

    def store(arr, j, value):
        arr[j] = value

    return store


def max_start(row, w):  # pragma: no cover
    raise NotImplementedError


def max_step(v, m):  # pragma: no cover
    raise NotImplementedError


def max_end(m, w):  # pragma: no cover
    raise NotImplementedError


# A row's max beside another loop's work (see _max_and_sumexp): float16 rows keep the
# largest and smallest of their bit patterns read as int16 (32 lanes a vector, no
# conversion; f16_max_from_int_extremes turns the two into the max). That is 2 integer
# operations per 32 logits instead of 4 for sign-flipped order keys, and LLVM then
# interleaves the row loop 2x instead of 4x without spilling: forward C = 64 +46%,
# C = 128 +30%. Other storages widen and use max_nan_unspecified.
@overload(max_start)
def _max_start(row, w):
    if row.dtype == types.uint16:
        return lambda row, w: (np.int16(-32768), np.int16(32767))
    return lambda row, w: as_t(-np.inf, w)


@overload(max_step)
def _max_step(v, m):
    if v == types.uint16:

        def step(v, m):
            k = f16_bits_as_i16(v)
            return max_i16(k, m[0]), min_i16(k, m[1])

        return step
    return lambda v, m: max_nan_unspecified(widen(v), m)


@overload(max_end)
def _max_end(m, w):
    if isinstance(m, types.UniTuple):
        return lambda m, w: f16_max_from_int_extremes(m[0], m[1])
    return lambda m, w: m


def vexp(v):  # pragma: no cover
    raise NotImplementedError


@overload(vexp)
def _vexp(v):
    # every kernel argument is z - max <= 0 (or NaN): the cheaper non-positive exp
    if v == types.float32:
        return lambda v: exp_nonpos_f32(v)
    return lambda v: math.exp(v)


def as_t(value, like):  # pragma: no cover
    raise NotImplementedError


@overload(as_t)
def _as_t(value, like):
    """Cast a scalar to the compute dtype, given an array of that dtype."""
    if like.dtype == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


def tiny_of(like):  # pragma: no cover
    raise NotImplementedError


@overload(tiny_of)
def _tiny_of(like):
    if like.dtype == types.float32:
        return lambda like: np.float32(1.1754943508222875e-38)
    return lambda like: np.float64(2.2250738585072014e-308)


# -- block loops (the hot code) -----------------------------------------------------------


@njit(**_JIT)
def _block_max(row, lo, hi, w):
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
# array (LLVM inlined _block_max on its own, not this); +15-19% forward at C = 128-256
@njit(inline="always", **_JIT)
def _block_sumexp(row, lo, hi, bm, w, store):
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
    row = row[lo:hi]  # see _block_max: sliced loops vectorise, offset ones do not
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


@njit(**_JIT)
def _block_sumexp_below(row, lo, hi, M, w, store):
    """Σ exp(z - M) for a shift M that is not the block's max (the row's running max), and
    whether some z >= M: then the caller redoes the block.

    No exact-1 split here: a block with nothing reaching M holds no max term, so a plain
    sum loses nothing; the loop is 2 operations shorter than _block_sumexp's (measured
    +20% forward at C = 32000, +30% at 262144 over the split version). Whether z reaches
    M comes from the block's max (one operation per vector, where counting z >= M took
    two: forward float16 C = 32000-262144 +8-12%, float32 +3-6%). That max may drop a
    NaN, but a NaN already makes the sum NaN.
    """
    rest = as_t(0.0, w)
    top = as_t(-np.inf, w)
    row = row[lo:hi]  # see _block_max: sliced loops vectorise, offset ones do not
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


@njit(**_JIT)
def _block_has_nan(row, lo, hi):
    for j in range(lo, hi):
        v = widen(row[j])
        if v != v:
            return True
    return False


@njit(**_JIT)
def _block_sumexp_entropy(row, lo, hi, bm, w):
    """_block_sumexp plus Σ e·(bm - z); e = 0 terms add 0 even where z = -inf."""
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


@njit(**_JIT)
def _block_deviation(row, lo, hi, bm, w, t, c1, c0):
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


# -- one row -----------------------------------------------------------------------------


@njit(**_JIT)
def _row_reduce(row, w, t, c1, c0, want_sum, want_dev, want_entropy, store, bms):
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
            rest, reached = _block_sumexp_below(row, lo, hi, as_t(M, w), w, store)
            if not reached:
                if keep:
                    bms[b] = M
                b += 1
                S += np.float64(rest)
                lo = hi
                continue
        bm = _block_max(row, lo, hi, w)
        bm64 = np.float64(bm)
        if keep:
            bms[b] = bm64
        b += 1
        if want_dev:
            # deviations are taken from the block max, or from 0 in an all -inf block
            # (where -inf - -inf would make NaN of the +inf that -log p is there)
            ref = bm if bm64 != -np.inf else as_t(0.0, w)
            a, ub = _block_deviation(row, lo, hi, ref, w, t, c1, c0)
            D += np.float64(a)
            U += np.float64(ub)
            wsum_bm += np.float64(ub) * np.float64(ref) if ub != 0 else 0.0
        if want_sum and bm64 != -np.inf:
            if want_entropy:
                ones, rest, h = _block_sumexp_entropy(row, lo, hi, bm, w)
                h64 = np.float64(h)
            else:
                ones, rest = _block_sumexp(row, lo, hi, bm, w, store)
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
            if want_sum and _block_has_nan(row, lo, hi):
                S = np.nan
            if keep:
                _fill(store, lo, hi, S if S != S else 0.0, w)
            if bm64 > M:
                M = bm64
        lo = hi
    if want_dev and U != 0.0:
        D += U * M - wsum_bm
    return M, S, D, U, H


@njit(**_JIT)
def _fill(out, lo, hi, value, w):
    v = as_t(value, w)
    for j in range(lo, hi):
        out[j] = v


@njit(**_JIT)
def _transform_row(row, scratch, cap, kind):
    """Softcap (logits) or log-clamp (probs) into the per-thread scratch row."""
    if kind == KIND_PROBS:
        tiny = tiny_of(scratch)
        for j in range(row.shape[0]):
            v = widen(row[j])
            scratch[j] = math.log(v if v > tiny else tiny) if v == v else v
    else:
        for j in range(row.shape[0]):
            scratch[j] = cap * math.tanh(widen(row[j]) / cap)


@njit(**_JIT)
def _row_loss(z, w, t, yi, eps, zeta, kind, W, want_lse, store, bms):
    """(loss, lse used, M, S, z_y) of one counted row; z is the (transformed) row.

    ``store``/``bms``: see _row_reduce. ``store`` must not overlap z: a one-pass block is
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
    bm = _block_max(z, 0, C, w) if simple else as_t(-np.inf, w)
    if bm > -np.inf:  # one block with a finite max: its two loops, nothing to merge
        ones, rest = _block_sumexp(z, 0, C, bm, w, store)
        M, S, D, U = np.float64(bm), np.float64(ones) + np.float64(rest), 0.0, 0.0
        if keep:
            bms[0] = M
    else:
        M, S, D, U, _ = _row_reduce(z, w, t, c1, c0, want_lse, want_dev, False, store, bms)
    if not keep and not soft:
        zy = np.float64(widen(z[yi]))
    if not want_lse:
        if not want_dev:
            M = 0.0
        elif M == -np.inf or M != M:
            M = 0.0  # no max was needed; keep D's reference point finite
    loss, L = _loss_from(M, S, D, U, zy, w, yi, eps, zeta, W, soft, want_lse)
    return loss, L, M, S, zy


@njit(**_JIT)
def _loss_from(M, S, D, U, zy, w, yi, eps, zeta, W, soft, want_lse):
    """(loss, lse) from a row's reductions (see _row_reduce); lse is 0 for non-logit kinds."""
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


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(**_JIT)
def _zero_row(out, w):
    for j in range(out.shape[0]):
        narrow(out, j, as_t(0.0, w))


# -- parallel kernels over rows ------------------------------------------------------------


@njit(**_JIT)
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


@njit(**_PAR)
def _sum_blocks_after(loss, sums):
    """_block_sums over all rows, for paths whose threads split rows off block bounds."""
    n = loss.shape[0]
    for b in prange(sums.shape[0]):
        _block_sums(loss, b * TILE, min(n, (b + 1) * TILE), sums)


# Rows with few classes are processed in transposed tiles (see _tile_reduce); longer
# ones up to BLOCK row by row, pipelined, with the finish across a tile (_rows_loss).
TILE = SUM_ROWS  # rows per tile: 4 float32 vectors across rows (64: best of 16..256 at C = 10)
# Where the transposed tiles stop is set in bytes per row: the row loops' cost is their
# scalar remainder, which float16 pays per element converted. Measured (GB/s, 2 threads)
# transposed tile / pipelined rows, float32: forward C=10 6.6/3.1, 24 6.2/6.5, 32 6.5/8.5,
# 64 6.7/9.7; forward+grad C=10 6.7/5.7, 16 7.4/9.9, 64 8.4/14.6, 127 9.1/17.3.
# float16: forward C=32 3.7/3.0, 48 3.7/3.7, 64 3.9/5.7; forward+grad C=28 4.2/3.1,
# 40 4.7/5.8, 100 5.4/6.5.
TILE_ROW_BYTES = 96  # forward: transposed tiles for rows up to here (float32: C <= 24)
TILE_GRAD_ROW_BYTES = 63  # forward+grad: ... (float32: C <= 15, float16: C <= 31)
TILE_STATS_C = 128  # row stats: tiles up to here (C = 128: +30% float32, +46% float16;
# at 192 the rows are faster)


# float64 scratch rows of a tile (tmp[k] has TILE lanes)
_T_TGT, _T_ZY, _T_WY, _T_LOSS, _T_LSE, _T_S, _T_EY, _T_GY, _T_SC, _T_ZS, _T_M, _T_D = range(12)
# compute-dtype rows (acc[k])
_A_MAX, _A_ONES, _A_REST, _A_DEV, _A_K, _A_SE, _A_SH, _A_H, _A_ZYT, _A_RANK, _A_AM = range(11)


@njit(**_JIT)
def _row_scale(scale, i):
    """scale[i], or scale[0] for a one-entry scale array (constant over the rows)."""
    return scale[i] if scale.shape[0] > 1 else scale[0]


@njit(**_JIT)
def _tile_scratch(C, w):
    return (
        np.empty((C, TILE), dtype=w.dtype),
        np.empty((11, TILE), dtype=w.dtype),
        np.empty((12, TILE)),
    )


def transpose_tile(x, r0, count, buf):  # pragma: no cover
    raise NotImplementedError


@overload(transpose_tile)
def _transpose_tile(x, r0, count, buf):
    """buf[:C, :TILE] = x[r0 : r0 + TILE].T in registers (engine/kernels/_transpose.py);
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


@njit(**_JIT)
def _tile_reduce(x, y, r0, count, w, eps, buf, acc, tmp, keep_exp, entropy):
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
    tgt = tmp[_T_TGT]
    zy = tmp[_T_ZY]
    wy = tmp[_T_WY]
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
        tmp[_T_M, r] = np.float64(m[r])
        tmp[_T_S, r] = np.float64(ones[r]) + np.float64(rest[r])
        tmp[_T_D, r] = np.float64(dev[r])


@njit(**_JIT)
def _tile_finish(C, eps, zeta, W, tmp):
    """Per-row loss and lse of a reduced tile (M, S, D in tmp), branch-free with a
    polynomial log (libm's log is scalar), so this too runs across the tile."""
    c1 = 1.0 - eps
    ce = eps / C
    for r in range(TILE):
        M = tmp[_T_M, r]
        S = tmp[_T_S, r]
        log_s = log_pos_f64(S)
        L = M + log_s
        li = c1 * tmp[_T_WY, r] * ((M - tmp[_T_ZY, r]) + log_s)
        li = li + ce * (tmp[_T_D, r] + W * log_s) if eps != 0.0 else li
        li = li + zeta * L * L if zeta != 0.0 else li
        finite = M > -np.inf  # False for NaN and all -inf rows: loss NaN
        tmp[_T_LOSS, r] = li if finite else np.nan
        # lse: -inf for an all -inf row, NaN where a NaN is in it
        tmp[_T_LSE, r] = L if finite else (np.nan if M != M or S != 0.0 else -np.inf)


@njit(**_JIT)
def _tile_store_losses(r0, count, tmp, loss, lse):
    for r in range(count):
        i = r0 + r
        counted = tmp[_T_TGT, r] >= 0
        loss[i] = tmp[_T_LOSS, r] if counted else 0.0
        lse[i] = tmp[_T_LSE, r] if counted else np.nan


_UNROLL = 4 * LANES  # elements per iteration of LLVM's vectorised row loops (16 x 4)


@njit(inline="always", **_JIT)
def _masked_tail(x):
    """Whether one-block rows of x run their last C % 64 elements as one masked vector
    (see _max_and_sumexp): 16-bit rows with such a remainder. Callers pass the answer on
    as a literal True / False, so each case compiles without the other's code."""
    return x.itemsize == 2 and x.shape[1] % _UNROLL != 0


@njit(inline="always", **_JIT)
def _max_and_sumexp(nxt, cur, bm, w, masked_tail):
    """max(nxt) and _block_sumexp(cur, bm), in one loop over two rows of equal length.

    ``masked_tail`` (a compile-time constant): the last n % 64 elements, past what LLVM's
    16 x 4 unrolled vector loop covers, run as one masked 64-lane pass. LLVM leaves that
    remainder scalar, which for 16-bit rows (a conversion and an exp per element) made
    C = 127 take 3x as long as C = 128. Only there: float32 rows measured 26% slower with
    it at C = 129, and tail code in the same function slowed rows without a tail 8-25%.

    The exact-1 split of _block_sumexp takes one operation fewer per vector here: the
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


@njit(**_JIT)
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
            tmp[_T_TGT, r] = yi
            tmp[_T_M, r] = 0.0  # padding and rows not counted: a harmless finite lane
            tmp[_T_S, r] = 1.0
            tmp[_T_D, r] = 0.0
            tmp[_T_ZY, r] = 0.0
            tmp[_T_WY, r] = 0.0
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
            bm, ones, rest = _max_and_sumexp(x[r0 + nxt], x[r0 + p], pbm, w, masked_tail)
            if pbm > -np.inf:
                tmp[_T_M, p] = np.float64(pbm)
                tmp[_T_S, p] = np.float64(ones) + np.float64(rest)
            else:
                tmp[_T_M, p] = np.nan  # no finite max (all -inf, or NaN): see below
                special = True
        else:
            bm = _block_max(x[r0 + nxt], 0, C, w)
        p = nxt
        pbm = bm
    for r in range(count):
        yi = np.int64(tmp[_T_TGT, r])
        if yi < 0:
            continue
        row = x[r0 + r]
        if special and tmp[_T_M, r] != tmp[_T_M, r]:  # the general path sorts these out
            none = w[0:0]
            M, S, _, _, _ = _row_reduce(
                row, w, none, 1.0, 0.0, True, False, False, none, tmp[0, 0:0]
            )
            tmp[_T_M, r] = M
            tmp[_T_S, r] = S
        tmp[_T_ZY, r] = np.float64(widen(row[yi]))
        tmp[_T_WY, r] = np.float64(w[yi])


@njit(**_JIT)
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
            if tmp[_T_TGT, r] >= 0:  # (rows without a finite max score NaN anyway)
                bm = as_t(tmp[_T_M, r], w)
                a, _ = _block_deviation(x[r0 + r], 0, C, bm, w, none, 1.0, 0.0)
                tmp[_T_D, r] = np.float64(a)


@njit(**_JIT)
def _rows_reduce(x, y, r0, count, w, eps, tmp):
    """_tile_reduce for longer rows, without the transpose: each row is reduced on its
    own (_row_reduce), only the finish runs across rows (no scalar libm log per row)."""
    none = w[0:0]
    bms = tmp[0, 0:0]  # nothing stored in a forward pass: an empty float64 view
    C = x.shape[1]
    # Rows of one block skip _row_reduce's merging (+34% at C = 128 before pipelining).
    # The shortcut sits in each caller (here, _row_loss, _row_stats), not inside
    # _row_reduce: that is a real call per row, and with the shortcut inside it measured
    # 25% slower at C = 128.
    if C <= BLOCK:
        _rows_reduce_short(x, y, r0, count, w, eps, tmp)
        return
    for r in range(TILE):
        i = r0 + r
        yi = y[i] if r < count else -1
        tmp[_T_TGT, r] = yi
        if yi < 0:  # padding and rows not counted: a harmless finite lane
            tmp[_T_M, r] = 0.0
            tmp[_T_S, r] = 1.0
            tmp[_T_D, r] = 0.0
            tmp[_T_ZY, r] = 0.0
            tmp[_T_WY, r] = 0.0
            continue
        row = x[i]
        M, S, D, _, _ = _row_reduce(row, w, none, 1.0, 0.0, True, eps != 0.0, False, none, bms)
        tmp[_T_M, r] = M
        tmp[_T_S, r] = S
        tmp[_T_D, r] = D
        tmp[_T_ZY, r] = np.float64(widen(row[yi]))
        tmp[_T_WY, r] = np.float64(w[yi])


@njit(**_JIT)
def _rows_loss(x, y, r0, count, w, eps, zeta, W, loss, lse, tmp):
    """Losses of rows r0 .. r0+count of a matrix with rows past TILE_ROW_BYTES."""
    _rows_reduce(x, y, r0, count, w, eps, tmp)
    _tile_finish(x.shape[1], eps, zeta, W, tmp)
    _tile_store_losses(r0, count, tmp, loss, lse)


@njit(**_JIT)
def _tile_loss(x, y, r0, count, w, eps, zeta, W, loss, lse, buf, acc, tmp):
    """Losses of rows r0 .. r0+count of a short-row (up to TILE_ROW_BYTES) matrix."""
    _tile_reduce(x, y, r0, count, w, eps, buf, acc, tmp, False, False)
    _tile_finish(x.shape[1], eps, zeta, W, tmp)
    _tile_store_losses(r0, count, tmp, loss, lse)


@njit(**_JIT)
def _tile_loss_grad(x, y, r0, count, w, eps, zeta, W, scale, zscale, loss, lse, out, buf, acc, tmp):
    """_tile_loss plus the gradient rows into ``out`` (any storage dtype, may alias x).

    g = K·e - scale·c0·w with K = (scale·(c1·w_y + c0·W) + 2ζ·zscale·L)/S; the target
    entry in float64 from S and the stored e_y (p_y - 1 cancels badly in float32).
    """
    C = x.shape[1]
    _tile_reduce(x, y, r0, count, w, eps, buf, acc, tmp, True, False)
    _tile_finish(C, eps, zeta, W, tmp)
    c1 = 1.0 - eps
    c0 = eps / C
    for r in range(TILE):
        yi = np.int64(tmp[_T_TGT, r])
        tmp[_T_EY, r] = np.float64(buf[yi, r]) if yi >= 0 else 0.0
        tmp[_T_SC, r] = _row_scale(scale, r0 + r) if r < count else 0.0
        tmp[_T_ZS, r] = _row_scale(zscale, r0 + r) if r < count else 0.0
    for r in range(TILE):
        sc = tmp[_T_SC, r]
        zterm = tmp[_T_ZS, r] * 2.0 * zeta * tmp[_T_LSE, r] if zeta != 0.0 else 0.0
        S = tmp[_T_S, r]
        wy = tmp[_T_WY, r]
        ey = tmp[_T_EY, r]
        acc[_A_K, r] = as_t((sc * (c1 * wy + c0 * W) + zterm) / S, w)
        acc[_A_SE, r] = as_t(sc * c0, w)
        gy = sc * c1 * wy * (-(S - ey) / S) + (sc * c0 * W + zterm) * (ey / S) - sc * c0 * wy
        tmp[_T_GY, r] = gy
    K = acc[_A_K]
    se = acc[_A_SE]
    for j in range(C):
        col = buf[j]
        wj = w[j]
        for r in range(TILE):
            col[r] = K[r] * col[r] - se[r] * wj
    for r in range(count):
        orow = out[r0 + r]
        yi = np.int64(tmp[_T_TGT, r])
        if yi < 0:  # not counted: a zero row
            for j in range(C):
                narrow(orow, j, as_t(0.0, w))
        elif tmp[_T_LSE, r] == -np.inf:  # all -inf row: NaN everywhere, as the general path
            for j in range(C):
                narrow(orow, j, as_t(np.nan, w))
        else:
            for j in range(C):
                narrow(orow, j, buf[j, r])
            narrow(orow, yi, as_t(tmp[_T_GY, r], w))
    _tile_store_losses(r0, count, tmp, loss, lse)


_SPECIAL = -2  # tmp[_T_TGT] of a lane left to the row-by-row path (no finite max)


@njit(inline="always", **_JIT)
def _max_and_sumexp_store(nxt, cur, bm, w, dst, masked_tail):
    """_max_and_sumexp that also writes each exp(cur - bm) to dst (apart from cur)."""
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


@njit(**_JIT)
def _rows_loss_grad(
    x, y, r0, count, w, eps, zeta, W, scale, zscale, loss, lse, out, ex, ex0, in_out, tmp
):
    """_rows_loss_grad_rows, with the masked tails of _max_and_sumexp for 16-bit rows.
    (One call per literal flag; passing the arguments on as a tuple measured 6-18% slower.)"""
    if _masked_tail(x):
        _rows_loss_grad_rows(x, y, r0, count, w, eps, zeta, W, scale, zscale,
                             loss, lse, out, ex, ex0, in_out, tmp, True)  # fmt: skip
    else:
        _rows_loss_grad_rows(x, y, r0, count, w, eps, zeta, W, scale, zscale,
                             loss, lse, out, ex, ex0, in_out, tmp, False)  # fmt: skip


@njit(**_JIT)
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
    targets), as _tile_loss_grad without the transpose.

    Row r's exps land in ex[ex0 + r]: ``out`` itself (``in_out``: ex is out, ex0 = r0)
    or a float tile (16-bit or in-place gradients). Rows are pipelined as in _rows_reduce_pipelined,
    the finish and the gradient scales run across the tile, then each gradient row costs
    one multiply per element. Rows without a finite max are marked _SPECIAL and left to
    the caller (their logits are untouched).
    """
    C = x.shape[1]
    p = -1  # lane of the pending row: its max is known, its exp sum not yet
    pbm = as_t(-np.inf, w)
    for r in range(TILE + 1):  # one call site per loop, as in _rows_reduce_pipelined
        if r < TILE:
            yi = y[r0 + r] if r < count else -1
            tmp[_T_TGT, r] = yi
            tmp[_T_M, r] = 0.0  # padding, rows not counted, special rows: a harmless lane
            tmp[_T_S, r] = 1.0
            tmp[_T_D, r] = 0.0
            tmp[_T_ZY, r] = 0.0
            tmp[_T_WY, r] = 0.0
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
            tmp[_T_M, p] = np.float64(pbm)
            tmp[_T_S, p] = np.float64(ones) + np.float64(rest)
        else:
            if p >= 0:
                tmp[_T_TGT, p] = _SPECIAL
            bm = _block_max(x[r0 + nxt], 0, C, w)
        p = nxt
        pbm = bm
    c1 = 1.0 - eps
    c0 = eps / C
    # the logits are still intact here (nothing is written to out, which may be x, yet);
    # z_y read after the row loop, not before: a load ahead of it would stall on memory
    for r in range(count):
        yi = np.int64(tmp[_T_TGT, r])
        if yi >= 0:
            tmp[_T_ZY, r] = np.float64(widen(x[r0 + r, yi]))
            tmp[_T_WY, r] = np.float64(w[yi])
            if eps != 0.0:  # Σ w·(M - z)
                bm = as_t(tmp[_T_M, r], w)
                a, _ = _block_deviation(x[r0 + r], 0, C, bm, w, w[0:0], 1.0, 0.0)
                tmp[_T_D, r] = np.float64(a)
    _tile_finish(C, eps, zeta, W, tmp)
    # per lane: K = (scale·(c1·w_y + c0·W) + 2ζ·zscale·L)/S, and the target entry in
    # float64 from S and the parked e_y (p_y - 1 cancels badly in float32)
    for r in range(TILE):
        yi = np.int64(tmp[_T_TGT, r])
        ey = np.float64(widen(ex[ex0 + r, yi])) if yi >= 0 else 0.0
        sc = _row_scale(scale, r0 + r) if yi >= 0 else 0.0
        zsc = _row_scale(zscale, r0 + r) if yi >= 0 else 0.0
        zterm = zsc * 2.0 * zeta * tmp[_T_LSE, r] if zeta != 0.0 else 0.0
        S = tmp[_T_S, r]
        wy = tmp[_T_WY, r]
        tmp[_T_EY, r] = (sc * (c1 * wy + c0 * W) + zterm) / S
        tmp[_T_SC, r] = sc * c0
        tmp[_T_GY, r] = (
            sc * c1 * wy * (-(S - ey) / S) + (sc * c0 * W + zterm) * (ey / S) - sc * c0 * wy
        )
    for r in range(count):
        yi = np.int64(tmp[_T_TGT, r])
        if yi == _SPECIAL:
            continue
        orow = out[r0 + r]
        if yi < 0:
            _zero_row(orow, w)
            continue
        K = as_t(tmp[_T_EY, r], w)
        se = as_t(tmp[_T_SC, r], w)
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
        narrow(orow, yi, as_t(tmp[_T_GY, r], w))
    _tile_store_losses(r0, count, tmp, loss, lse)


@njit(**_JIT)
def _tile_stats(x, y, r0, count, w, eps, zeta, W, buf, acc, tmp, res):
    """Row stats of rows r0 .. r0+count of a short-row matrix (see _row_stats), across
    the tile like _tile_loss. ``res`` = (loss, lse, tlogp, amax, maxp, ent, rank)."""
    loss, lse, tlogp, amax, maxp, ent, rank = res
    C = x.shape[1]
    _tile_reduce(x, y, r0, count, w, eps, buf, acc, tmp, False, True)
    _tile_finish(C, eps, zeta, W, tmp)
    m = acc[_A_MAX]
    zyt = acc[_A_ZYT]
    rk = acc[_A_RANK]
    am = acc[_A_AM]
    zero = as_t(0.0, w)
    one = as_t(1.0, w)
    for r in range(TILE):
        yi = np.int64(tmp[_T_TGT, r])
        zyt[r] = buf[yi, r] if yi >= 0 else zero
        rk[r] = zero
        am[r] = as_t(-1.0, w)
    # first index of the max (a NaN first, as torch.argmax) and the target's rank
    for j in range(C):
        col = buf[j]
        jt = as_t(j, w)
        for r in range(TILE):
            v = col[r]
            hit = am[r] < zero and (v != v or v == m[r])
            am[r] = jt if hit else am[r]
            rk[r] += one if v > zyt[r] else zero
    for r in range(count):
        i = r0 + r
        M = tmp[_T_M, r]
        S = tmp[_T_S, r]
        L = tmp[_T_LSE, r]
        finite = M > -np.inf
        counted = tmp[_T_TGT, r] >= 0
        loss[i] = tmp[_T_LOSS, r] if counted else 0.0
        lse[i] = L
        tlogp[i] = tmp[_T_ZY, r] - L if counted else np.nan
        amax[i] = np.int64(am[r])
        inv_s = 1.0 / S if finite else np.nan  # max prob = exp(M - L) = 1/S
        maxp[i] = inv_s
        ent[i] = (np.float64(acc[_A_H, r]) * inv_s + (L - M)) if finite else np.nan
        rank[i] = np.int64(rk[r]) if counted else -1


@njit(**_PAR)
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
            buf, acc, tmp = _tile_scratch(C if transposed else 0, w)
            while lo < hi:
                k = min(TILE, hi - lo)
                if transposed:
                    _tile_loss(x, y, lo, k, w, eps, zeta, W, loss, lse, buf, acc, tmp)
                else:
                    _rows_loss(x, y, lo, k, w, eps, zeta, W, loss, lse, tmp)
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
                _transform_row(x[i], scratch, cap, kind)
                li, Li, _, _, _ = _row_loss(
                    scratch, w, t[i], yi, eps, zeta, kind, Wi, want_lse, none, bms
                )
            else:
                li, Li, _, _, _ = _row_loss(
                    x[i], w, t[i], yi, eps, zeta, kind, Wi, want_lse, none, bms
                )
            loss[i] = li
            lse[i] = Li if want_lse else np.nan
    if not aligned and sums.shape[0] != 0:
        _sum_blocks_after(loss, sums)


@njit(**_JIT)
def _loss_grad_row(
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
        _zero_row(out[i], w)
        return
    sc = _row_scale(scale, i)
    zsc = _row_scale(zscale, i)
    Wg = W
    if soft:
        # Σ u = Σ_c w_c·t'_c is this row's "total coefficient"
        Wg = _soft_total(w, t[i], 1.0 - eps, eps / C)
    # (separate calls per case: the row views differ in type, float16 bits vs float)
    if store_exp:  # the exps wait in out, so each element costs one exp
        li, Li, M, S, zy = _row_loss(x[i], w, t[i], yi, eps, zeta, kind, W, want_lse, out[i], bms)
        _row_grad_stored(exps, out[i], w, t[i], yi, eps, zeta, Wg, Li, M, S, zy, sc, zsc, bms)
    elif exps.shape[0] != 0:  # ... or in a float row (16-bit or in-place gradients)
        li, Li, M, S, zy = _row_loss(x[i], w, t[i], yi, eps, zeta, kind, W, want_lse, exps, bms)
        _row_grad_stored(exps, out[i], w, t[i], yi, eps, zeta, Wg, Li, M, S, zy, sc, zsc, bms)
    elif scratch.shape[0] != 0:
        _transform_row(x[i], scratch, cap, kind)
        li, Li, M, S, _ = _row_loss(scratch, w, t[i], yi, eps, zeta, kind, W, want_lse, w[0:0], bms)
        _row_grad(scratch, x[i], out[i], w, t[i], yi, eps, zeta, kind, Wg, cap, Li, M, S, sc, zsc)
    else:
        li, Li, M, S, _ = _row_loss(x[i], w, t[i], yi, eps, zeta, kind, W, want_lse, w[0:0], bms)
        _row_grad(x[i], x[i], out[i], w, t[i], yi, eps, zeta, kind, Wg, cap, Li, M, S, sc, zsc)
    loss[i] = li
    lse[i] = Li if want_lse else np.nan


@njit(**_PAR)
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
            buf, acc, tmp = _tile_scratch(C, w)
            while lo < hi:
                k = min(TILE, hi - lo)
                _tile_loss_grad(
                    x, y, lo, k, w, eps, zeta, W, scale, zscale, loss, lse, out, buf, acc, tmp
                )
                _block_sums(loss, lo, lo + k, tile_sums)
                lo += k
        elif rows_tiled:
            _, _, tmp = _tile_scratch(0, w)
            park_tile = np.empty((TILE if park else 0, C), dtype=w.dtype)
            while lo < hi:
                k = min(TILE, hi - lo)
                # (two calls: out and the float tile differ in type for 16-bit gradients)
                if store_exp:
                    _rows_loss_grad(
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
                    _rows_loss_grad(
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
                    if tmp[_T_TGT, r] == _SPECIAL:
                        _loss_grad_row(
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
            _loss_grad_row(
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


@njit(**_JIT)
def _soft_total(w, t, c1, c0):
    total = 0.0
    for j in range(w.shape[0]):
        total += np.float64(w[j]) * (c1 * np.float64(t[j]) + c0)
    return total


@njit(**_JIT)
def _row_stats(z, w, t, yi, eps, zeta, kind, W, bms):
    """(loss, lse, target_logprob, argmax, max_prob, entropy, target_rank, kl) of one row."""
    C = z.shape[0]
    soft = t.shape[0] != 0
    counted = yi >= 0
    ones = w[0:0]
    # one pass serves the loss and the entropy (the deviation sums only when needed)
    want_dev = soft or eps != 0.0
    bm = _block_max(z, 0, C, w) if C <= BLOCK and not want_dev else as_t(-np.inf, w)
    if bm > -np.inf:  # one block with a finite max: its two loops, nothing to merge
        o, rest, h = _block_sumexp_entropy(z, 0, C, bm, w)
        M, S, D, U, H = np.float64(bm), np.float64(o) + np.float64(rest), 0.0, 0.0, np.float64(h)
    else:
        M, S, D, U, H = _row_reduce(z, w, t, 1.0 - eps, eps / C, True, want_dev, True, ones, bms)
    if counted:
        zy = 0.0 if soft else np.float64(widen(z[yi]))
        li, _ = _loss_from(M, S, D, U, zy, w, yi, eps, zeta, W, soft, kind == KIND_LOGITS)
    else:
        li = 0.0
    L = M + math.log(S) if kind == KIND_LOGITS else 0.0
    r = math.exp(M - L)  # 1/S for logits: the max probability
    entropy = r * (H + S * (L - M))
    am = _first_max_index(z, as_t(M, w), S != S)
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
    return li, M + math.log(S), tlogp, am, r, entropy, rank, kl


@njit(**_JIT)
def _first_max_index(z, M, has_nan):
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


@njit(**_JIT)
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


@njit(**_PAR)
def stats_kernel(
    x, y, t, w, W, eps, zeta, cap, kind, nthreads, loss, lse, tlogp, amax, maxp, ent, rank, kl
):
    n, C = x.shape
    nb = max(1, min(nthreads, n))
    scratch_len = C if (cap != 0.0 or kind == KIND_PROBS) else 0
    soft = t.shape[1] != 0
    tiled = kind == KIND_LOGITS and not soft and not scratch_len and C <= 512
    for b in prange(nb):
        lo, hi = _thread_span(b, nb, n, 1)
        scratch = np.empty(scratch_len, dtype=w.dtype)
        bms = np.empty(0)  # per thread: no allocation per row
        if tiled:
            buf, acc, tmp = _tile_scratch(C, w)
            res = (loss, lse, tlogp, amax, maxp, ent, rank)
            while lo < hi:
                k = min(TILE, hi - lo)
                _tile_stats(x, y, lo, k, w, eps, zeta, W, buf, acc, tmp, res)
                lo += k
        for i in range(lo, hi):
            yi = 0 if soft else y[i]
            if scratch_len:
                _transform_row(x[i], scratch, cap, kind)
                row = _row_stats(scratch, w, t[i], yi, eps, zeta, kind, W, bms)
            else:
                row = _row_stats(x[i], w, t[i], yi, eps, zeta, kind, W, bms)
            loss[i], lse[i], tlogp[i], amax[i], maxp[i], ent[i], rank[i], kli = row
            if soft:
                kl[i] = kli


# -- host side: Problem -> kernel arguments -------------------------------------------------


def _kernel_view(a: np.ndarray, storage: int) -> np.ndarray:
    """float16 as uint16 bits, bfloat16 as int16 bits: the type picks the decoder."""
    if storage == STORAGE_F16_BITS:
        return a.view(np.uint16)
    if storage == STORAGE_BF16_BITS:
        return a.view(np.int16)
    return a


def _args(p: Problem):
    x = _kernel_view(p.x, p.storage)
    n, c = x.shape
    w = np.ascontiguousarray(p.w, dtype=p.compute)
    if p.t is not None:
        t = np.ascontiguousarray(p.t, dtype=p.compute)
        y = np.zeros(0, dtype=np.int64)
    else:
        t = np.empty((n, 0), dtype=p.compute)
        y = np.ascontiguousarray(p.y, dtype=np.int64)
    W = float(np.sum(w, dtype=np.float64))
    threads = numba.get_num_threads()
    return x, y, t, w, W, float(p.eps), float(p.zeta), float(p.cap), int(p.kind), threads


def _out_view(out: np.ndarray, p: Problem) -> np.ndarray:
    if out.dtype == np.float16:
        return out.view(np.uint16)
    if out.dtype in (np.uint16, np.int16):
        return _kernel_view(out, p.storage)  # in place over bf16/f16 bit buffers
    return out


def _rows_out(p: Problem, loss, lse):
    n = p.rows
    loss = np.empty(n, dtype=p.compute) if loss is None else loss
    lse = np.empty(n, dtype=p.compute) if lse is None else lse
    return loss, lse


def _sums_arg(sums):
    return np.empty(0) if sums is None else sums


def forward(p: Problem, loss=None, lse=None, sums=None):
    loss, lse = _rows_out(p, loss, lse)
    n = p.rows
    if n:
        forward_kernel(*_args(p), loss, lse, _sums_arg(sums))
    return loss, lse


def forward_grad(
    p: Problem,
    scale: np.ndarray,
    zscale: np.ndarray,
    out: np.ndarray,
    loss=None,
    lse=None,
    sums=None,
):
    loss, lse = _rows_out(p, loss, lse)
    n = p.rows
    if n:
        forward_grad_kernel(
            *_args(p),
            np.ascontiguousarray(scale, dtype=np.float64),
            np.ascontiguousarray(zscale, dtype=np.float64),
            bool(
                p.kind == KIND_LOGITS
                and p.cap == 0.0
                and out.dtype.kind == "f"
                and out.dtype != np.float16
                # in place: the exps go to a scratch row, as the logits must stay readable
                and not np.may_share_memory(out, p.x)
            ),
            loss,
            lse,
            _out_view(out, p),
            _sums_arg(sums),
        )
    return loss, lse


def stats(p: Problem) -> dict:
    n = p.rows
    f = p.compute
    res = {
        "loss": np.empty(n, dtype=f),
        "lse": np.empty(n, dtype=f),
        "target_logprob": np.empty(n, dtype=f),
        "argmax": np.empty(n, dtype=np.int64),
        "max_prob": np.empty(n, dtype=f),
        "entropy": np.empty(n, dtype=f),
        "target_rank": np.empty(n, dtype=np.int64),
        "kl": np.empty(n if p.soft else 0, dtype=f),
    }
    if n:
        stats_kernel(*_args(p), *res.values())
    if not p.soft:
        del res["kl"]
    return res
