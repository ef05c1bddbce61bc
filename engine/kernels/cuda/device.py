"""The CUDA kernels: type-generic device helpers and the factory of the row kernels.

``T`` threads cooperate on one row; lane ``l`` reads classes ``l, l+T, l+2T, ...`` so a warp's
32 loads of one step are 32 consecutive elements (coalesced, 64/128/256-byte transactions).
The driver picks the shape (``driver.launch_shape``):

- small C: a warp per row (``T = 32``), several rows per block. Reductions are five
  ``shfl_xor`` steps, no shared memory and no block barrier.
- large C: one block per row, ``T`` = 128..1024 threads. Reductions: ``shfl_xor`` butterfly
  inside each warp, then one shared-memory slot per warp and a barrier; every thread folds
  the (at most 32) warp partials in the same order, so every thread of the row holds
  bit-identical row results (pass 2 needs them).

Pass 1 is one read of the row with an *online* max/sum per thread (Milakov & Gimelshein):
``m`` the running max and ``s = Σ exp(u - m)`` over the thread's elements *except one
maximal one* (whose term is exactly 1), rescaled when ``m`` grows, plus the linear sums the
loss needs (``a = Σ c_j (u_j - m)``, ``b = Σ c_j`` for smoothing / soft targets). The row
max and the lowest lane holding it come from one arg-max reduction; the other lanes fold
their own max element back in and align on the row max, then ``S, A, B`` are plain sums.
So ``lse = M + log1p(S)`` and ``Σ c_j (lse - u_j) = B·log1p(S) - A`` keep float32's relative
accuracy on confident rows (no ``log(1 + tiny)``, no cancellation), and the target's
gradient uses ``expm1`` for ``p_y - 1``. Pass 2 (gradient only) re-reads the row and writes
``d loss / d x`` reusing the row's lse: no second reduction. 2-D indexing ``x[r, j]`` is
computed in 64-bit (Numba's intp), so rows × classes may exceed 2**31.

Memory traffic per row (s = logit bytes: 2 for float16/bfloat16, 4 float32, 8 float64;
F = compute bytes, 4 or 8):

=============  ====================================  ==========================
kernel         reads                                 writes
=============  ====================================  ==========================
forward        C·s + 8 (target) [+ C·F soft targets]  2·F (loss, lse)
forward_grad   2·C·s (pass 2 mostly hits L2) + 8      C·F (gradient) + 2·F
stats          C·s [+ 2·C·F soft targets] + 8         6·F + 2·8
=============  ====================================  ==========================

Expected on an H100 (3.35 TB/s HBM3 peak; quack sustains ~3 TB/s above 4k classes, these
kernels have the same shape): forward over float32 logits with C = 32768 moves 128 KiB per
row, about 23 M rows/s at 3 TB/s (46 M rows/s for bfloat16); forward_grad moves
C·(s + F) from HBM when pass 2 hits L2, about 11 M rows/s for float32. Small C (< 1k) is
latency- rather than bandwidth-bound. These are estimates from the byte count, not
measurements; ``bench/`` measures.

Under the simulator the same kernels run, with the warp reductions of :mod:`.sim`.
"""

from __future__ import annotations

import math
import threading

import numpy as np

import engine.kernels.cuda.sim as sim

__all__ = ["build", "helpers", "kernels", "make_load"]

# numba.cuda, bound on first use: importing it costs ~0.5 s and must not happen on import.
cuda = None
_BUILD_LOCK = threading.Lock()
_DEV: dict | None = None
_KERNELS: dict = {}


def build() -> None:
    """Import numba.cuda and define the type-generic device helpers (once)."""
    global cuda, _DEV
    if _DEV is not None:
        return
    with _BUILD_LOCK:
        if _DEV is not None:
            return
        from numba import cuda as _cuda

        cuda = _cuda
        dev = {}

        if sim.simulated():

            def wsum3(a, b, c):
                return sim.butterfly((a, b, c), sim.sum3)

            def wargmax(v, i):
                return sim.butterfly((v, i), sim.argmax)

        else:

            @cuda.jit(device=True)
            def wsum3(a, b, c):
                # x + y == y + x bitwise: both lanes of a pair get the same sum
                for k in (16, 8, 4, 2, 1):
                    a = a + cuda.shfl_xor_sync(0xFFFFFFFF, a, k)
                    b = b + cuda.shfl_xor_sync(0xFFFFFFFF, b, k)
                    c = c + cuda.shfl_xor_sync(0xFFFFFFFF, c, k)
                return a, b, c

            @cuda.jit(device=True)
            def wargmax(v, i):
                for k in (16, 8, 4, 2, 1):
                    ov = cuda.shfl_xor_sync(0xFFFFFFFF, v, k)
                    oi = cuda.shfl_xor_sync(0xFFFFFFFF, i, k)
                    if ov > v or (ov == v and oi < i):
                        v = ov
                        i = oi
                return v, i

        @cuda.jit(device=True)
        def rsum3(a, b, c, sh3, T):
            """Three sums over the T threads of a row; every thread gets the same bits.
            sh3: shared (3, 32) scratch, used only when the row spans several warps."""
            a, b, c = wsum3(a, b, c)
            if T > 32:
                tid = cuda.threadIdx.x
                if tid % 32 == 0:
                    wi = tid // 32
                    sh3[0, wi] = a
                    sh3[1, wi] = b
                    sh3[2, wi] = c
                cuda.syncthreads()
                a = sh3[0, 0]
                b = sh3[1, 0]
                c = sh3[2, 0]
                for i in range(1, T // 32):  # the same order in every thread
                    a = a + sh3[0, i]
                    b = b + sh3[1, i]
                    c = c + sh3[2, i]
                cuda.syncthreads()
            return a, b, c

        @cuda.jit(device=True)
        def rargmax(v, i, shv, shi, T):
            """(max, first index of max) over the T threads of a row."""
            v, i = wargmax(v, i)
            if T > 32:
                tid = cuda.threadIdx.x
                if tid % 32 == 0:
                    shv[tid // 32] = v
                    shi[tid // 32] = i
                cuda.syncthreads()
                v = shv[0]
                i = shi[0]
                for k in range(1, T // 32):
                    ov = shv[k]
                    oi = shi[k]
                    if ov > v or (ov == v and oi < i):
                        v = ov
                        i = oi
                cuda.syncthreads()
            return v, i

        @cuda.jit(device=True)
        def bf16_value(bits):
            """bfloat16 bit pattern -> float32, exactly (no bit casts: works in the simulator)."""
            b = np.int32(bits)
            e = (b >> 7) & 0xFF
            mant = b & 0x7F
            if e == 0xFF:
                v = np.float32(math.inf) if mant == 0 else np.float32(math.nan)
            elif e == 0:
                v = np.float32(math.ldexp(np.float32(mant), -133))
            else:
                v = np.float32(math.ldexp(np.float32(mant | 0x80), int(e - 134)))
            if b & 0x8000:
                v = -v
            return v

        dev.update(rsum3=rsum3, rargmax=rargmax, bf16_value=bf16_value)
        _DEV = dev


def helpers() -> dict:
    """The type-generic device helpers (rsum3, rargmax, bf16_value), built on first use."""
    build()
    return _DEV


def make_load(bf16: bool, F):
    """A device function ``load(x, r, j)``: element (r, j) of a logits array as the compute
    type F (bfloat16 bit patterns decoded exactly, other storages converted)."""
    bf16_value = helpers()["bf16_value"]
    if bf16:

        @cuda.jit(device=True)
        def load(x, r, j):
            return F(bf16_value(x[r, j]))

    else:

        @cuda.jit(device=True)
        def load(x, r, j):
            return F(x[r, j])

    return load


def kernels(bf16: bool, compute: np.dtype):
    """(loss_kernel, stats_kernel) for one logits encoding and compute precision."""
    key = (bool(bf16), np.dtype(compute).name)
    if key in _KERNELS:
        return _KERNELS[key]
    with _BUILD_LOCK:
        if key not in _KERNELS:
            _KERNELS[key] = _make_kernels(bool(bf16), np.dtype(compute))
    return _KERNELS[key]


def _make_kernels(bf16: bool, compute: np.dtype):
    from numba import types

    F = types.float32 if compute == np.float32 else types.float64
    I64 = types.int64
    NEG_INF = F(-math.inf)
    INF = F(math.inf)
    ZERO = F(0.0)
    ONE = F(1.0)
    TWO = F(2.0)
    rsum3, rargmax = _DEV["rsum3"], _DEV["rargmax"]
    load = make_load(bf16, F)

    @cuda.jit(device=True)
    def transform(v, kind, cap, tiny):
        """(u, xv): u plays the logit in logp = u - lse (lse = 0 unless kind 0); xv orders
        classes for argmax / rank (the capped logit, or the raw input)."""
        if kind == 0:
            if cap > ZERO:
                u = F(cap * math.tanh(v / cap))
                return u, u
            return v, v
        if kind == 1:
            return v, v
        q = tiny if v < tiny else v  # log(max(p, tiny)); NaN stays NaN
        return F(math.log(q)), v

    @cuda.jit(device=True)
    def exp_any(v):
        if v > F(709.0):  # the simulator's math.exp raises beyond this
            return INF
        return F(math.exp(v))

    @cuda.jit(device=True)
    def push_lse(m, s, u):
        """Online max m and s = Σ exp(u - m) over the elements *other than one maximal
        one*, whose term is exactly 1: lse = m + log1p(s) then keeps full float32 accuracy
        for confident rows. u = +inf or NaN makes s NaN (as PyTorch)."""
        if u > m:
            if m != NEG_INF:
                s = (s + ONE) * F(math.exp(m - u))
            s = s + (F(math.exp(u - u)) - ONE)  # 0, or NaN for u = +inf
            m = u
        elif u != NEG_INF:
            s = s + F(math.exp(u - m))
        return m, s

    @cuda.jit(device=True)
    def push_lin(a, b, c, u, m0, m):
        """a = Σ c (u - m), b = Σ c, kept relative to the running max m (was m0)."""
        if m != m0 and m0 != NEG_INF and b != ZERO:
            a = a + (m0 - m) * b
        if c != ZERO:
            if u == NEG_INF:
                a = a + c * NEG_INF
            else:
                a = a + c * (u - m)
            b = b + c
        return a, b

    @cuda.jit(device=True)
    def row_loss(M, lnS, A, B, cy, uy, zeta, kind):
        """(loss, lse) of a row from its reduced terms (loss without the ignore mask)."""
        if kind == 0:
            # Σ_j c_j (lse - u_j) with lse = M + lnS and A = Σ c_j (u_j - M)
            L = M + lnS
            ce = ZERO
            if B != ZERO:
                ce = B * lnS - A
            if cy != ZERO:
                ce = ce + cy * ((M - uy) + lnS)
            if zeta > ZERO:
                ce = ce + zeta * L * L
            if M == NEG_INF:  # every logit -inf: lse and log-softmax are NaN (as torch)
                ce = F(math.nan)
                L = ce
            return ce, L
        # log_probs / probs: logp = u, lse = 0
        ce = ZERO
        if B != ZERO:
            ce = -(B * M) - A
        if cy != ZERO:
            ce = ce - cy * uy
        return ce, ZERO

    @cuda.jit
    def loss_kernel(
        x, y, t, w, scale, zscale, g, loss_out, lse_out,
        n, C, T, kind, soft, eps, zeta, cap, tiny, want_grad,
    ):  # fmt: skip
        sh = cuda.shared.array(32, F)
        shi = cuda.shared.array(32, I64)
        sh3 = cuda.shared.array((3, 32), F)
        tid = cuda.threadIdx.x
        rpb = cuda.blockDim.x // T
        r = cuda.blockIdx.x * rpb + tid // T
        lane = tid % T
        valid = r < n
        stop = C if valid else 0
        is_soft = soft != 0
        yi = -1
        if valid and not is_soft:
            yi = y[r]
        counted = valid and (is_soft or yi >= 0)
        keep = ONE - eps
        epc = eps / F(C)
        smooth = eps > ZERO
        # the target's term: its logit is read once, by every lane of the row (a broadcast)
        cy = ZERO
        uy = ZERO
        if counted and not is_soft:
            cy = keep * w[yi]
            uy = transform(load(x, r, yi), kind, cap, tiny)[0]

        # pass 1: online max / sum / linear terms, thread-local
        m = NEG_INF
        s = ZERO
        a = ZERO
        b = ZERO
        for j in range(lane, stop, T):
            u = transform(load(x, r, j), kind, cap, tiny)[0]
            c = ZERO
            if is_soft:
                c = w[j] * (keep * t[r, j] + epc)
            elif smooth:
                c = epc * w[j]
            m0 = m
            m, s = push_lse(m, s, u)
            a, b = push_lin(a, b, c, u, m0, m)

        # row reduction: the row max and the lowest lane holding it (which keeps its max
        # element out of s); the others fold their own max back in and align on M
        M, owner = rargmax(m, lane, sh, shi, T)
        if m != NEG_INF and lane != owner:
            d = m - M
            s = (s + ONE) * F(math.exp(d))
            if b != ZERO:
                a = a + d * b
        S, A, B = rsum3(s, a, b, sh3, T)
        lnS = F(math.log1p(S))  # lse - M
        ce, L = row_loss(M, lnS, A, B, cy, uy, zeta, kind)
        if valid and lane == 0:
            loss_out[r] = ce if counted else ZERO
            lse_out[r] = L

        if want_grad != 0 and valid:
            if counted:
                sc = scale[r]
                zs = ZERO
                if zeta > ZERO:
                    zs = TWO * zeta * L * zscale[r]
                btot = B + cy
                for j in range(lane, C, T):
                    v = load(x, r, j)
                    c = ZERO  # smoothing / soft-target coefficient of class j
                    if is_soft:
                        c = w[j] * (keep * t[r, j] + epc)
                    elif smooth:
                        c = epc * w[j]
                    if kind == 0:
                        # d/dx_j = s (p_j Σc - c_j) + 2ζ lse p_j, times tanh' under softcap
                        dcap = ONE
                        u = v
                        if cap > ZERO:
                            th = F(math.tanh(v / cap))
                            u = cap * th
                            dcap = ONE - th * th
                        z = (u - M) - lnS  # log p_j
                        if j == yi:
                            # p_y - 1 by expm1: a confident row's target gradient keeps
                            # its relative accuracy instead of cancelling in 1 - p_y
                            pm1 = F(math.expm1(z))
                            p = pm1 + ONE
                            gv = sc * (p * B + cy * pm1 - c) + zs * p
                        else:
                            p = F(math.exp(z))
                            gv = sc * (p * btot - c) + zs * p
                        gv = gv * dcap
                    elif kind == 1:
                        if j == yi:
                            c = c + cy
                        gv = -(sc * c)
                    else:
                        if j == yi:
                            c = c + cy
                        gv = ZERO
                        if v > tiny:
                            gv = -(sc * c) / v  # d(-c log p)/dp
                    g[r, j] = gv
            else:
                for j in range(lane, C, T):
                    g[r, j] = ZERO

    @cuda.jit
    def stats_kernel(
        x, y, t, w, loss_out, lse_out, tlp_out, argmax_out, maxp_out, ent_out, rank_out,
        kl_out, n, C, T, kind, soft, eps, zeta, cap, tiny,
    ):  # fmt: skip
        sh = cuda.shared.array(32, F)
        shi = cuda.shared.array(32, I64)
        sh3 = cuda.shared.array((3, 32), F)
        tid = cuda.threadIdx.x
        rpb = cuda.blockDim.x // T
        r = cuda.blockIdx.x * rpb + tid // T
        lane = tid % T
        valid = r < n
        stop = C if valid else 0
        is_soft = soft != 0
        yi = -1
        if valid and not is_soft:
            yi = y[r]
        counted = valid and (is_soft or yi >= 0)
        keep = ONE - eps
        epc = eps / F(C)
        smooth = eps > ZERO

        # the class whose rank is reported: the target, or argmax of the soft target row
        cls = 0
        if is_soft:
            tv = NEG_INF
            ti = 0
            for j in range(lane, stop, T):
                tj = t[r, j]
                if tj > tv:
                    tv = tj
                    ti = j
            tv, ti = rargmax(tv, ti, sh, shi, T)
            cls = ti
        elif counted:
            cls = yi
        ucls = ZERO
        xcls = ZERO
        if valid:
            ucls, xcls = transform(load(x, r, cls), kind, cap, tiny)
        cy = ZERO
        if counted and not is_soft:
            cy = keep * w[yi]

        m = NEG_INF
        s = ZERO
        h = ZERO  # Σ exp(u - m) (u - m): entropy
        a = ZERO
        b = ZERO
        at = ZERO  # Σ_{t>0} t (u - m): soft target log-prob
        bt = ZERO
        kls = ZERO  # Σ_{t>0} t log t
        cnt = ZERO  # classes ranked before the target: greater, or equal at a lower index
        av = NEG_INF
        ai = 0
        for j in range(lane, stop, T):
            u, xv = transform(load(x, r, j), kind, cap, tiny)
            c = ZERO
            tj = ZERO
            if is_soft:
                tj = t[r, j]
                c = w[j] * (keep * tj + epc)
            elif smooth:
                c = epc * w[j]
            m0 = m
            s0 = s
            m, s = push_lse(m, s, u)
            if m != m0 and m0 != NEG_INF:
                d = m0 - m
                h = (h + d * (s0 + ONE)) * F(math.exp(d))
            if u != NEG_INF:
                h = h + F(math.exp(u - m)) * (u - m)
            a, b = push_lin(a, b, c, u, m0, m)
            if is_soft:
                at, bt = push_lin(at, bt, tj if tj > ZERO else ZERO, u, m0, m)
                if tj > ZERO:
                    kls = kls + tj * F(math.log(tj))
            if xv > av:
                av = xv
                ai = j
            if xv > xcls or (xv == xcls and j < cls):
                cnt = cnt + ONE

        M, owner = rargmax(m, lane, sh, shi, T)
        if m != NEG_INF and lane != owner:
            d = m - M
            f = F(math.exp(d))
            h = (h + d * (s + ONE)) * f
            s = (s + ONE) * f
            if b != ZERO:
                a = a + d * b
            if bt != ZERO:
                at = at + d * bt
        S, H, CNT = rsum3(s, h, cnt, sh3, T)  # S: Σ exp(u - M) less the max element's 1
        A, B, _ = rsum3(a, b, ZERO, sh3, T)
        av, ai = rargmax(av, ai, sh, shi, T)
        AT = ZERO
        BT = ZERO
        KLS = ZERO
        if is_soft:
            AT, BT, KLS = rsum3(at, bt, kls, sh3, T)

        if not valid:
            return  # after the last barrier: padding rows stop here
        lnS = F(math.log1p(S))
        ce, L = row_loss(M, lnS, A, B, cy, ucls, zeta, kind)
        # target log-prob: Σ_{t>0} t (u - lse) (soft) or u_y - lse; lse - M = lnS (kind 0)
        shift = -lnS if kind == 0 else M
        if is_soft:
            tlp = ZERO
            if BT != ZERO:
                tlp = AT + shift * BT
        elif counted:
            tlp = -((M - ucls) + lnS) if kind == 0 else ucls
        else:
            tlp = F(math.nan)
        if kind == 0:
            # p_j = exp(u_j - M) / (1 + S); entropy = lse - Σ p u = lnS - H / (1 + S)
            maxp = ONE / (ONE + S) if M != NEG_INF else F(math.nan)
            ent = lnS - H / (ONE + S)
        else:
            # p_j = exp(u_j); entropy = -Σ p u = -exp(M) (H + M (1 + S))
            em = exp_any(M)
            maxp = em
            ent = -(em * (H + M * (ONE + S)))
        if lane == 0:
            loss_out[r] = ce if counted else ZERO
            lse_out[r] = L
            tlp_out[r] = tlp
            argmax_out[r] = ai
            maxp_out[r] = maxp
            ent_out[r] = ent
            rank_out[r] = np.int64(CNT) if counted else -1
            if is_soft:
                kl_out[r] = KLS - tlp

    return loss_kernel, stats_kernel
