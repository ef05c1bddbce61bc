"""Compile options of the CPU kernels and their type-dispatched scalar helpers.

widen/narrow (storage <-> compute dtype), max_start/max_step/max_end (a row's max beside
other work), vexp, as_t and tiny_of resolve at compile time by argument type, so one kernel
body serves float32, float64, float16 bits (uint16) and bfloat16 bits (int16).

Fast-math: ``reassoc`` (and contract/nsz/arcp) so sums vectorise; never nnan/ninf, so
-inf masks and NaN rows behave exactly as in PyTorch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import overload

from engine.kernels.cpu.vecmath import (
    bf16_bits_to_f32,
    exp_nonpos_f32,
    f16_bits_as_i16,
    f16_bits_to_f32,
    f16_max_from_int_extremes,
    f32_to_bf16_bits,
    f32_to_f16_bits,
    max_i16,
    max_nan_unspecified,
    min_i16,
)

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


JIT = dict(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
PAR = dict(fastmath=FASTMATH, cache=True, nogil=True, parallel=True, error_model="numpy")


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


# A row's max beside another loop's work (see max_and_sumexp): float16 rows keep the
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
