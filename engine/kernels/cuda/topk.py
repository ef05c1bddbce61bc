"""The CUDA twin of the top-K kernel (engine/kernels/cpu/topk.py): per row, the K best
classes (descending value, the smaller index first on equal values), their log-probs and
the row's log-sum-exp. One thread block per row.

The CPU kernel keeps a heap per thread; a heap per CUDA thread would not fit (K up to 256
entries of 12-16 bytes times up to 512 threads), so the block selects instead (the radix
select of PyTorch's ``topk``):

1. lse: online max and Σ exp(u - max) per thread, one arg-max and one sum reduction (the
   loss kernels' scheme: the row max's own term, exactly 1, is kept out of the sum so that
   lse = M + log1p(S) keeps its accuracy on confident rows); sums in float64.
2. selection of the Q best: every element gets a unique *rank key*, the digits of an
   integer that orders like its value (NaN lowest, -0 = +0) followed by the digits of
   ``imax - j`` (equal values: the smaller index ranks higher). Digit by digit (8 bits, a
   histogram of 256 shared-memory counters), the bin where the count from the top reaches
   Q becomes the next digit of the prefix. The first digits' histogram comes with the lse
   pass (it is the same for every selection); each later digit takes a pass over the row
   counting the elements that share the prefix chosen so far. Keys are unique, so this
   ends with exactly Q elements at or above the prefix, usually well before the last
   digit (as soon as the bin holds just the number still wanted).
3. gather: a pass writes the (at most 256) selected elements to shared memory in any order
   (an atomic slot counter); a bitonic sort by rank key orders them.

K above 256 takes rounds of 256: round i selects the 256·(i+1) best and gathers those not
among the 256·i best of the round before, so shared memory stays fixed.

Cost: one read of the row for the lse, one per further digit, one to gather (in L2 for
the rows in flight). Gaussian-like float32 logits usually take two or three digits; ties
at the K-th value take the index digits too. Every thread of the block runs every loop
and barrier the same number of times (the simulator's warp reductions rely on it).
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

KMAX = 256  # entries gathered and sorted on chip per round
RADIX_BITS = 8  # bits per digit: 256 shared counters per histogram
MAX_THREADS = 512  # per block: a 1024-thread block would cap registers at 64 per thread


def index_digits(classes: int) -> int:
    """Digits (of RADIX_BITS) that hold every ``imax - j`` of a row of ``classes``."""
    bits = max(1, (max(classes, 1) - 1).bit_length())
    return -(-bits // RADIX_BITS)


def threads_per_row(classes: int, max_threads: int) -> int:
    """A warp for short rows, doubling up to ``max_threads`` (at most MAX_THREADS) while
    each thread would read more than 16 classes."""
    limit = max(32, min(MAX_THREADS, max_threads) // 32 * 32)
    t = 32
    while t < limit and t * 16 < classes:
        t *= 2
    return t


def topk_kernel(bf16: bool, compute: np.dtype):
    """The kernel for one logits encoding (bfloat16 bits or not) and compute dtype."""
    key = (bool(bf16), np.dtype(compute).name)
    with _LOCK:
        if key not in _KERNELS:
            _KERNELS[key] = _make(*key)
    return _KERNELS[key]


def _make(bf16: bool, compute: str):
    global cuda
    from numba import cuda as _cuda
    from numba import types

    cuda = _cuda
    helpers = device.helpers()
    rsum3, rargmax = helpers["rsum3"], helpers["rargmax"]
    F = types.float32 if compute == "float32" else types.float64
    D = types.float64
    I64 = types.int64
    I32 = types.int32
    F32 = types.float32
    NEG_INF = F(-math.inf)
    ZERO = F(0.0)
    DZERO = D(0.0)
    DONE = D(1.0)
    VD = 4 if compute == "float32" else 8  # digits of the value part of a rank key
    BITS_AS_INT = np.int32 if compute == "float32" else np.int64
    MAG = (1 << (8 * VD - 1)) - 1  # the magnitude bits of a value's bit pattern
    NAN_KEY = -(1 << (8 * VD - 1))  # below every other value key (-inf's included)
    LOWEST = -(1 << 63)  # the key of padding entries: below NaN's (float64: equal, and
    # the padding's index, >= C, then ranks it last)
    load = device.make_load(bf16, F)

    @cuda.jit(device=True)
    def value(x, r, j, kind, cap, tiny):
        """Element (r, j) as the kernels of the loss see it: softcapped logits, log of
        clamped probabilities, or as stored; both transforms in float64, as on the CPU."""
        v = load(x, r, j)
        if kind == 0:
            if cap > DZERO:
                return F(cap * math.tanh(D(v) / cap))
            return v
        if kind == 2 and v == v:
            q = D(v)
            return F(math.log(q if q > tiny else tiny))
        return v

    @cuda.jit(device=True)
    def value_key(u):
        """An int64 that orders like u: NaN lowest, -0 equal to +0 (the IEEE pattern
        with the magnitude bits of negative numbers flipped)."""
        if u != u:
            return I64(NAN_KEY)
        if u == ZERO:
            u = ZERO  # -0 -> +0: equal values, equal keys
        b = I64(u.view(BITS_AS_INT))
        if b < 0:
            b = b ^ MAG
        return b

    @cuda.jit(device=True)
    def digit(vk, ik, d, ndig):
        """Digit d (0 = most significant) of the rank key (vk digits, then ik digits)."""
        if d < VD:
            s = RADIX_BITS * (VD - 1 - d)
            if d == 0:
                return I32((vk >> s) + 128)  # the signed top digit, biased to 0..255
            return I32((vk >> s) & 255)
        return I32((ik >> (RADIX_BITS * (ndig - 1 - d))) & 255)

    @cuda.jit(device=True)
    def in_prefix(vk, ik, vpre, ipre, nd, ndig):
        """The key's first nd digits are those of the prefix."""
        if nd == 0:
            return True
        if nd <= VD:
            s = RADIX_BITS * (VD - nd)
            return (vk >> s) == (vpre >> s)
        s = RADIX_BITS * (ndig - nd)
        return vk == vpre and (ik >> s) == (ipre >> s)

    @cuda.jit(device=True)
    def at_or_above(vk, ik, vpre, ipre, nd, ndig):
        """The key's first nd digits are at or above the prefix (nd >= 1)."""
        if nd <= VD:
            s = RADIX_BITS * (VD - nd)
            return (vk >> s) >= (vpre >> s)  # arithmetic shifts keep the order
        if vk != vpre:
            return vk > vpre
        s = RADIX_BITS * (ndig - nd)
        return (ik >> s) >= (ipre >> s)

    @cuda.jit(device=True)
    def select(x, r, C, q, kind, cap, tiny, ndig, imax, hist0, hist, ctl, T):
        """(vpre, ipre, nd): the q best of row r are the elements whose key's first nd
        digits are at or above this prefix. Every thread returns the same values.
        ``hist0``: the row's histogram of first digits (the lse pass counts it)."""
        tid = cuda.threadIdx.x
        vpre = I64(0)
        ipre = I64(0)
        nd = 0
        want = q  # how many of the elements sharing the prefix are still to take
        while True:
            h = hist0
            if nd > 0:
                h = hist
                for b in range(tid, 256, T):
                    h[b] = 0
                cuda.syncthreads()
                for j in range(tid, C, T):
                    vk = value_key(value(x, r, j, kind, cap, tiny))
                    ik = imax - j
                    if in_prefix(vk, ik, vpre, ipre, nd, ndig):
                        cuda.atomic.add(h, digit(vk, ik, nd, ndig), 1)
                cuda.syncthreads()
            if tid == 0:
                # from the top bin down, until the count reaches what is wanted (the
                # prefix's elements number at least ``want``, so b stays >= 0)
                above = 0
                b = 255
                while above + h[b] < want:
                    above += h[b]
                    b -= 1
                ctl[0] = b
                ctl[1] = want - above
                ctl[2] = h[b]
            cuda.syncthreads()
            # (thread 0 writes ctl again only barriers later, after every thread read it)
            b = ctl[0]
            want = ctl[1]
            done = ctl[2] == want  # every element of the new prefix is taken
            if nd < VD:
                s = RADIX_BITS * (VD - 1 - nd)
                vpre = vpre | (I64(b - 128 if nd == 0 else b) << s)
            else:
                ipre = ipre | (I64(b) << (RADIX_BITS * (ndig - 1 - nd)))
            nd += 1
            if done or nd == ndig:  # keys are unique: the last digit always ends it
                break
        return vpre, ipre, nd

    @cuda.jit(device=True)
    def ranks_before(ka, ja, kb, jb):
        return ka > kb or (ka == kb and ja < jb)

    @cuda.jit(device=True)
    def bitonic(skey, sidx, sval, n, T):
        """Sorts the n (a power of two) entries best first; the caller syncs before."""
        tid = cuda.threadIdx.x
        size = 2
        while size <= n:
            stride = size // 2
            while stride > 0:
                for i in range(tid, n, T):
                    p = i ^ stride
                    if p > i:
                        # blocks with (i & size) == 0 sort best first, the others best
                        # last; the last stage (size == n) has only the former
                        if (i & size) == 0:
                            swap = ranks_before(skey[p], sidx[p], skey[i], sidx[i])
                        else:
                            swap = ranks_before(skey[i], sidx[i], skey[p], sidx[p])
                        if swap:
                            tk = skey[i]
                            skey[i] = skey[p]
                            skey[p] = tk
                            ti = sidx[i]
                            sidx[i] = sidx[p]
                            sidx[p] = ti
                            tv = sval[i]
                            sval[i] = sval[p]
                            sval[p] = tv
                cuda.syncthreads()
                stride //= 2
            size *= 2

    @cuda.jit
    def kernel(x, k, cap, kind, tiny, out_idx, out_logp, out_lse, C, T, idig):  # fmt: skip
        sh = cuda.shared.array(32, F)
        shi = cuda.shared.array(32, I64)
        sh3 = cuda.shared.array((3, 32), D)
        hist0 = cuda.shared.array(256, I32)
        hist = cuda.shared.array(256, I32)
        ctl = cuda.shared.array(4, I32)
        skey = cuda.shared.array(KMAX, I64)
        sidx = cuda.shared.array(KMAX, I32)
        sval = cuda.shared.array(KMAX, F)
        tid = cuda.threadIdx.x
        r = cuda.blockIdx.x
        ndig = VD + idig  # digits of a rank key
        imax = (I64(1) << (RADIX_BITS * idig)) - 1

        # 1. lse: online max m and s = Σ exp(u - m) less one maximal element's 1; and the
        # histogram of first digits, the same for every selection
        for b in range(tid, 256, T):
            hist0[b] = 0
        cuda.syncthreads()
        m = NEG_INF
        s = DZERO
        for j in range(tid, C, T):
            u = value(x, r, j, kind, cap, tiny)
            cuda.atomic.add(hist0, digit(value_key(u), 0, 0, ndig), 1)
            if u > m:
                if m != NEG_INF:
                    s = (s + DONE) * math.exp(D(m) - D(u))
                s = s + (D(math.exp(u - u)) - DONE)  # 0, or NaN for u = +inf
                m = u
            elif u != NEG_INF:
                s = s + D(F(math.exp(u - m)))  # NaN for u = NaN
        M, owner = rargmax(m, I64(tid), sh, shi, T)
        if m != NEG_INF and tid != owner:
            s = (s + DONE) * math.exp(D(m) - D(M))
        S, _, _ = rsum3(s, DZERO, DZERO, sh3, T)
        lnS = math.log1p(S)  # lse - M
        if tid == 0:
            out_lse[r] = F(D(M) + lnS)
        shift = lnS if kind == 0 else DZERO
        base = D(M) if kind == 0 else DZERO
        cuda.syncthreads()  # hist0 complete (a one-warp row's reductions have no barrier)

        # 2-3. rounds of at most KMAX: select the q best, gather those not among the a best
        a = 0
        avpre = I64(0)
        aipre = I64(0)
        prev_nd = 0  # digits of the previous round's prefix; 0: no previous round
        while a < k:
            q = min(k, a + KMAX)
            nq = q - a
            vpre, ipre, nd = select(x, r, C, q, kind, cap, tiny, ndig, imax, hist0, hist, ctl, T)
            npad = 1
            while npad < nq:
                npad *= 2
            for i in range(tid, npad, T):
                skey[i] = LOWEST
                sidx[i] = C + i
            if tid == 0:
                ctl[3] = 0
            cuda.syncthreads()
            for j in range(tid, C, T):
                u = value(x, r, j, kind, cap, tiny)
                vk = value_key(u)
                ik = imax - j
                if at_or_above(vk, ik, vpre, ipre, nd, ndig):
                    if prev_nd == 0 or not at_or_above(vk, ik, avpre, aipre, prev_nd, ndig):
                        slot = cuda.atomic.add(ctl, 3, 1)
                        skey[slot] = vk
                        sidx[slot] = j
                        sval[slot] = u
            cuda.syncthreads()
            bitonic(skey, sidx, sval, npad, T)
            for i in range(tid, nq, T):
                out_idx[r, a + i] = sidx[i]
                out_logp[r, a + i] = F32((D(sval[i]) - base) - shift)
            cuda.syncthreads()  # the next round refills skey/sidx/sval
            avpre = vpre
            aipre = ipre
            prev_nd = nd
            a = q

    return kernel
