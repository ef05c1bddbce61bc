"""Vectorisable math for the CPU kernels.

llvmlite from PyPI has no SVML, so ``math.exp`` in a loop stays a scalar libm call. The exp
below is plain arithmetic (range reduction + a degree-6 polynomial) and an
integer bit-cast for 2^n, which LLVM turns into SIMD. Rounding uses the ``(x + M) - M``
trick, but through intrinsics (llvm.fma and a flag-free fsub): Numba inlines these helpers
into kernels compiled with ``reassoc`` (needed for vector sums), which would otherwise fold
the trick away or distribute (t - M) * ln2 into a cancellation.

float16 / bfloat16 arrive as uint16 bit patterns (Numba's CPU target has no float16) and
are widened to float32 in registers.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_STRICT = dict(inline="always", cache=True)


@intrinsic
def _bits_to_f32(typingctx, bits):
    # Numba widens int32 arithmetic to int64; accept any integer and keep the low 32 bits.
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        value = args[0]
        if bits.bitwidth != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_to_bits(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


@njit(**_STRICT)
def f32_from_bits(bits):
    return _bits_to_f32(np.int32(bits))


@njit(**_STRICT)
def bits_from_f32(x):
    return _f32_to_bits(np.float32(x))


@intrinsic
def _fma(typingctx, a, b, c):
    """a*b + c, rounded once (llvm.fma: vectorises, and fast-math cannot rewrite it)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3)
        fn = builder.module.declare_intrinsic("llvm.fma", [ir.FloatType()], fnty)
        return builder.call(fn, args)

    return types.float32(a, b, c), codegen


def _maxnum(a, b, flags):
    """Typing and codegen of llvm.maxnum for two floats of one type, with fast-math flags."""
    if not (a == b and a in (types.float32, types.float64)):
        return None
    llty = ir.FloatType() if a == types.float32 else ir.DoubleType()

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(llty, [llty, llty])
        fn = builder.module.declare_intrinsic("llvm.maxnum", [llty], fnty)
        return builder.call(fn, args, fastmath=flags)

    return a(a, b), codegen


@intrinsic
def max_skip_nan(typingctx, a, b):
    """max(a, b) where a NaN operand never wins (llvm.maxnum).

    Unlike ``a if a > m else m``, LLVM recognises a loop of these as a max reduction and
    vectorises it (measured 2.3x faster for float32 rows, 5x for float16 ones).
    """
    return _maxnum(a, b, ())


@intrinsic
def max_nan_unspecified(typingctx, a, b):
    """max(a, b) that LLVM may assume NaN-free (llvm.maxnum with the nnan flag).

    max_skip_nan vectorises only as a loop's sole reduction; this one vectorises beside
    others (a row's max in the same loop as another row's exp sum). With a NaN operand
    the result is NaN or the max of the rest, so a caller must detect NaN elsewhere:
    the kernels' exp sums turn any NaN logit into a NaN sum, whatever the shift.
    (In LLVM's terms that result is poison; passing it through ``freeze`` would make the
    branches on it well defined, but the freeze stopped the loop vectorising, 8x slower.
    The NaN-row tests in tests/test_cpu_kernels.py guard what this compiles to.)
    """
    return _maxnum(a, b, ("nnan",))


@intrinsic
def _sub_exact(typingctx, a, b):
    """a - b emitted without fast-math flags, so ``reassoc`` cannot fold (t + M) - M."""
    if not (a == b == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fsub(args[0], args[1])

    return types.float32(a, b), codegen


@intrinsic
def sub_strict(typingctx, a, b):
    """a - b (float32 or float64) without fast-math flags: ``reassoc`` may not move it, so
    (zb - za) + K stays a difference of two nearby logits plus K, never zb - (za - K)."""
    if not (a == b and a in (types.float32, types.float64)):
        return None

    def codegen(context, builder, sig, args):
        return builder.fsub(args[0], args[1])

    return a(a, b), codegen


_LOG2E = np.float32(1.4426950408889634)
# 1.5 * 2^23 + 127: t = x*log2e + _MAGIC rounds x*log2e to an integer n in the adder and
# leaves n + 127 (the biased exponent of 2^n) in t's low mantissa bits.
_MAGIC = np.float32(12582912.0 + 127.0)
_LN2 = np.float32(0.6931471805599453)
# degree-6 fit of e^r on [-ln2/2, ln2/2] (relative error 2e-9, below float32 rounding)
_R2 = np.float32(0.4999999403953552)
_R3 = np.float32(0.16666431725025177)
_R4 = np.float32(0.04166799783706665)
_R5 = np.float32(0.008374152705073357)
_R6 = np.float32(0.0013843872584402561)
_F32_LO = np.float32(-88.0)  # below: result flushes to 0 (exp(-88) ~ 6e-39, past normals)
_F32_HI = np.float32(88.0)  # above: +inf (true exp overflows at 88.72; 2^n needs n <= 127)


@njit(**_STRICT)
def _exp_core(xc):
    """exp(xc) for xc in [-88, 88], ~1 ulp: range reduction, polynomial, 2^n by bits.

    12 vector operations. Every step whose rounding matters is an intrinsic (Numba inlines
    helpers into the kernels, whose ``reassoc`` would otherwise distribute (t - M) * ln2
    into a cancellation). n = -127 encodes 2^n as +0.0, so xc = -88 flushes to 0; NaN
    flows through.

    r = xc - n·ln2 in one fma with ln2 rounded to float32 (n·ln2_f32 is exact inside the
    fma; the dropped n·(ln2 - ln2_f32) term is 2e-7 relative at |n| = 127, under 0.5 ulp
    for |xc| < 20). The polynomial is evaluated in Estrin form: one operation more than
    Horner's, half its dependency chain, 7% faster in the exp-sum loops.
    """
    t = _fma(xc, _LOG2E, _MAGIC)
    fn = _sub_exact(t, _MAGIC)
    r = _fma(fn, -_LN2, xc)
    r2 = r * r
    lo = r + np.float32(1.0)
    a = _fma(r, _R3, _R2)
    b = _fma(r, _R5, _R4)
    b = _fma(r2, _R6, b)
    p = _fma(b, r2, a)
    p = _fma(p, r2, lo)
    return p * _bits_to_f32(_f32_to_bits(t) << np.int32(23))


@njit(**_STRICT)
def exp_f32(x):
    """exp(x) in float32, ~1 ulp; -inf -> 0, NaN -> NaN, x > 88 -> inf, x < -88 -> 0.

    Comparisons are written so NaN falls through every clamp and reaches the polynomial.
    """
    x = np.float32(x)
    xc = _F32_LO if x < _F32_LO else x
    xc = _F32_HI if xc > _F32_HI else xc
    y = _exp_core(xc)
    y = np.float32(0.0) if x < _F32_LO else y
    return np.float32(np.inf) if x > _F32_HI else y


@njit(**_STRICT)
def exp_nonpos_f32(x):
    """exp(x) for x <= 0 (or NaN), the only arguments the kernels form (z - max).

    exp_f32 without the upper clamp and the special-case selects: the lower clamp alone
    sends -inf to exactly 0, and NaN still flows through the polynomial.
    """
    x = np.float32(x)
    return _exp_core(_F32_LO if x < _F32_LO else x)


@intrinsic
def _f64_to_bits(typingctx, x):
    if x != types.float64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(x), codegen


@intrinsic
def _bits_to_f64(typingctx, bits):
    if bits != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(bits), codegen


_SQRT2 = 1.4142135623730951
_LN2_HI64 = 6.93147180369123816490e-01  # fdlibm's split: k * _LN2_HI64 is exact
_LN2_LO64 = 1.90821492927058770002e-10


@njit(**_STRICT)
def log_pos_f64(x):
    """log(x) for a positive normal float64, branch-free so loops over it vectorise.

    x = 2^k·m with m in [sqrt(1/2), sqrt(2)); log m = 2·atanh(s), s = (m-1)/(m+1), by its
    series to s^15 (|s| <= 0.172: truncation ~3e-14 relative). Near 1 the result keeps
    full relative accuracy (log(1 + 1e-9) = 1e-9 to ~1 ulp), which the confident-row
    losses need. NaN in, NaN out; zero, negative, inf and subnormal inputs are not handled.
    """
    bits = _f64_to_bits(x)
    k = ((bits >> np.int64(52)) & np.int64(0x7FF)) - np.int64(1023)
    m = _bits_to_f64((bits & np.int64(0x000FFFFFFFFFFFFF)) | np.int64(0x3FF0000000000000))
    big = m > _SQRT2
    m = m * 0.5 if big else m
    k = k + np.int64(1) if big else k
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    p = 1.0 / 15.0
    p = p * z + 1.0 / 13.0
    p = p * z + 1.0 / 11.0
    p = p * z + 1.0 / 9.0
    p = p * z + 1.0 / 7.0
    p = p * z + 1.0 / 5.0
    p = p * z + 1.0 / 3.0
    p = p * z + 1.0
    fk = np.float64(k)
    r = fk * _LN2_HI64 + (fk * _LN2_LO64 + 2.0 * s * p)
    return r if x == x else x


@intrinsic
def _half_bits_to_f32(typingctx, h):
    """IEEE half bits -> float32 as LLVM's fpext: one vcvtph2ps per 16 values (F16C),
    exact for every bit pattern (a libcall on CPUs without a conversion instruction)."""
    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def _f32_to_half_bits(typingctx, x):
    """float32 -> IEEE half bits as LLVM's fptrunc (vcvtps2ph): round to nearest even."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.uint16(x), codegen


_I16 = ir.IntType(16)


@intrinsic
def f16_bits_as_i16(typingctx, h):
    """IEEE half bits reinterpreted as int16 (no instruction): non-negative values order
    like their values; negative ones in reverse (their magnitude grows with the int)."""
    if not (isinstance(h, types.Integer) and h.bitwidth == 16):
        return None

    def codegen(context, builder, sig, args):
        return args[0]

    return types.int16(h), codegen


def _i16_minmax(a, b, name):
    if not (a == b == types.int16):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_I16, [_I16, _I16])
        fn = builder.module.declare_intrinsic(name, [_I16], fnty)
        return builder.call(fn, args)

    return types.int16(a, b), codegen


@intrinsic
def max_i16(typingctx, a, b):
    """max of two int16, kept in 16 bits (Numba widens int16 arithmetic to int64)."""
    return _i16_minmax(a, b, "llvm.smax")


@intrinsic
def min_i16(typingctx, a, b):
    """min of two int16, kept in 16 bits."""
    return _i16_minmax(a, b, "llvm.smin")


@njit(**_STRICT)
def f16_max_from_int_extremes(hi, lo):
    """The max of a float16 row, from the largest (hi) and smallest (lo) of its bit
    patterns read as int16 (f16_bits_as_i16), so the row's max costs one integer max
    and one min per 32 lanes and no conversion.

    hi >= 0: some value is non-negative, and hi is the largest of those. Otherwise every
    value is negative, and the smallest int (least magnitude) is the largest value.
    A positive NaN wins as hi (the row is special); a negative one never does unless the
    whole row is NaN, and the row's exp sum still turns NaN.
    """
    k = hi if hi >= np.int16(0) else lo
    return _half_bits_to_f32(np.uint16(np.int64(k) & 0xFFFF))


@njit(**_STRICT)
def f16_bits_to_f32(h):
    """IEEE half (as uint16 bits) -> float32, exact (a hardware conversion that vectorises)."""
    return _half_bits_to_f32(np.uint16(h))


@njit(**_STRICT)
def bf16_bits_to_f32(h):
    return _bits_to_f32((np.int32(h) & np.int32(0xFFFF)) << np.int32(16))


@njit(**_STRICT)
def f32_to_f16_bits(x):
    """float32 -> IEEE half bits, round to nearest even (a hardware conversion)."""
    return _f32_to_half_bits(np.float32(x))


@njit(cache=True)
def f32_to_bf16_bits(x):
    f = _f32_to_bits(np.float32(x))
    if (f & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000):
        return np.uint16(0x7FC0 | ((f >> np.int32(16)) & np.int32(0x8000)))
    f = f + np.int32(0x7FFF) + ((f >> np.int32(16)) & np.int32(1))
    return np.uint16((f >> np.int32(16)) & np.int32(0xFFFF))
