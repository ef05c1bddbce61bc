"""The vectorisable math, tested under the exact fast-math flags the kernels compile with."""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.kernels.cpu.scalars import FASTMATH
from engine.kernels.cpu.vecmath import (
    exp_f32,
    exp_nonpos_f32,
    f16_bits_as_i16,
    f16_bits_to_f32,
    f16_max_from_int_extremes,
    f32_to_bf16_bits,
    f32_to_f16_bits,
    log_pos_f64,
    max_i16,
    min_i16,
)


@njit(fastmath=FASTMATH)
def _map_exp(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_f32(x[i])


@njit(fastmath=FASTMATH)
def _map_exp_nonpos(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_nonpos_f32(x[i])


@njit(fastmath=FASTMATH)
def _sum_exp(x):
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += exp_f32(x[i])
    return s


def test_exp_is_accurate_to_a_few_ulp():
    x = np.linspace(-87.3, 87.9, 1_000_001).astype(np.float32)
    out = np.empty_like(x)
    _map_exp(x, out)
    ref = np.exp(x.astype(np.float64))
    ulps = np.abs(out - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 5.0
    near = np.abs(x) < 20  # where the kernels live: exp(z - max) of realistic rows
    assert ulps[near].max() <= 1.5


def test_exp_special_values():
    x = np.array([-np.inf, np.nan, 0.0, -0.0, -88.5, -1000.0, 89.0, np.inf], np.float32)
    out = np.empty_like(x)
    _map_exp(x, out)
    assert out[0] == 0.0 and np.isnan(out[1]) and out[2] == 1.0 and out[3] == 1.0
    assert out[4] == 0.0 and out[5] == 0.0  # flushed below the normal range
    assert np.isinf(out[6]) and np.isinf(out[7])


def test_exp_sum_survives_reassoc():
    x = np.random.default_rng(0).standard_normal(100_003).astype(np.float32) - 3
    assert (
        _sum_exp(x) == np.float32(np.exp(x.astype(np.float64)).sum())
        or abs(_sum_exp(x) / np.exp(x.astype(np.float64)).sum() - 1) < 1e-6
    )


@njit
def _widen_all(h, out):
    for i in range(h.shape[0]):
        out[i] = f16_bits_to_f32(h[i])


@njit
def _narrow_all(x, out, bf):
    for i in range(x.shape[0]):
        out[i] = f32_to_bf16_bits(x[i]) if bf else f32_to_f16_bits(x[i])


def test_float16_round_trips_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, np.float32)
    _widen_all(bits, out)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(out[~nan], ref[~nan]) and np.isnan(out[nan]).all()


def test_float32_to_float16_and_bfloat16_round_to_nearest_even():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32)
    x = np.concatenate([x, np.array([np.inf, -np.inf, 65504, 65520, 7e4, 6e-8, 1e-9], np.float32)])
    out = np.empty(x.shape, np.uint16)
    _narrow_all(x, out, False)
    with np.errstate(over="ignore"):
        assert np.array_equal(out, x.astype(np.float16).view(np.uint16))
    from engine.dtypes import float32_to_bf16_bits

    _narrow_all(x, out, True)
    assert np.array_equal(out, float32_to_bf16_bits(x))


def test_non_positive_exp_matches_the_general_one():
    """The kernels' exp (arguments z - max <= 0) under the kernels' flags."""
    x = np.concatenate([np.linspace(-100.0, 0.0, 1_000_001), [-np.inf, np.nan, -0.0]])
    x = x.astype(np.float32)
    got = np.empty_like(x)
    _map_exp_nonpos(x, got)
    ref = np.exp(x.astype(np.float64))
    normal = ref > 1.2e-38
    ulps = np.abs(got - ref)[normal] / np.spacing(ref[normal].astype(np.float32))
    assert ulps.max() <= 5.0 and ulps[x[normal] > -20].max() <= 1.5
    assert np.all(got[(x < -88) & np.isfinite(x)] == 0.0)
    assert got[-3] == 0.0 and np.isnan(got[-2]) and got[-1] == 1.0


@njit(fastmath=FASTMATH)
def _map_log(x, out):
    for i in range(x.shape[0]):
        out[i] = log_pos_f64(x[i])


def test_log_is_accurate_including_just_above_one():
    # just above 1 is the confident row: log S = log(1 + 1e-12) must keep its digits
    x = np.concatenate(
        [
            1 + np.logspace(-16, 0, 100_000),
            np.linspace(1, 3e5, 100_001),
            np.logspace(-300, 300, 10_001),
        ]
    )
    out = np.empty_like(x)
    _map_log(x, out)
    ref = np.log(x)
    rel = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-300)
    assert rel.max() < 1e-13
    special = np.array([np.nan, 1.0])
    out = np.empty_like(special)
    _map_log(special, out)
    assert np.isnan(out[0]) and out[1] == 0.0


@njit
def _f16_row_max(bits):
    """A float16 row's max the way the kernels take it (see scalars.max_step)."""
    hi = np.int16(-32768)
    lo = np.int16(32767)
    for i in range(bits.shape[0]):
        k = f16_bits_as_i16(bits[i])
        hi = max_i16(k, hi)
        lo = min_i16(k, lo)
    return f16_max_from_int_extremes(hi, lo)


def _expected_f16_max(values):
    # a positive NaN decides the row; negative NaNs lose to any number
    if (np.isnan(values) & ~np.signbit(values)).any():
        return np.nan
    finite = values[~np.isnan(values)]
    return finite.max() if finite.size else np.nan


def test_float16_row_max_from_int_extremes():
    """float16 rows take their max from the int16 max and min of their bit patterns.
    Every bit pattern alone, then random rows drawn from all 65536 patterns (NaN, +-0,
    +-inf, subnormals), all-negative rows and rows of one sign of zero."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(np.float16).astype(np.float32)
    for b, v in zip(bits, values, strict=True):
        got = _f16_row_max(np.array([b]))
        assert (np.isnan(got) and np.isnan(v)) or got == v, hex(b)
    rng = np.random.default_rng(0)
    negative = bits[(bits >= 0x8000) & ~np.isnan(values)]
    rows = [rng.choice(bits, n) for n in (2, 3, 17, 64, 100) for _ in range(300)]
    rows += [rng.choice(negative, n) for n in (1, 5, 64) for _ in range(300)]
    zeros_and_minus_one = ([0x8000, 0x0000], [0x8000, 0xBC00], [0x0000, 0xBC00])
    rows += [np.array(r, np.uint16) for r in zeros_and_minus_one]
    for row in rows:
        expected = _expected_f16_max(row.view(np.float16).astype(np.float32))
        got = _f16_row_max(row)
        assert (np.isnan(got) and np.isnan(expected)) or got == expected, row
