"""Logit storage dtypes: what a buffer holds, and the precision xent computes it in.

bfloat16 has no NumPy or Arrow type; it travels as raw 16-bit integers (uint16/int16)
plus a marker (``logits_dtype="bfloat16"`` or field metadata ``xent.dtype=bfloat16``).
"""

from __future__ import annotations

import numpy as np

from engine.errors import XentTypeError

BF16_METADATA_KEY = b"xent.dtype"
BF16_METADATA_VALUE = b"bfloat16"


def storage_kind(array_dtype: np.dtype, logits_dtype: str | None) -> str:
    """One of float16, float32, float64, bfloat16 for a logits buffer."""
    dt = np.dtype(array_dtype)
    if logits_dtype == "bfloat16":
        if dt not in (np.dtype(np.uint16), np.dtype(np.int16)):
            raise XentTypeError(
                f"bfloat16 logits must be given as uint16/int16 bit patterns, got {dt}"
            )
        return "bfloat16"
    if dt == np.float16:
        return "float16"
    if dt == np.float32:
        return "float32"
    if dt == np.float64:
        return "float64"
    if dt in (np.dtype(np.uint16), np.dtype(np.int16)):
        raise XentTypeError(
            f"logits are {dt}: if they are bfloat16 bit patterns, say so with "
            "logits_dtype='bfloat16' (--logits-dtype bfloat16)"
        )
    raise XentTypeError(f"logits must be float16, float32, float64 or bfloat16 bits; got {dt}")


def compute_dtype(kind: str) -> np.dtype:
    """Arithmetic precision: float64 for float64 input, float32 for every other kind."""
    return np.dtype(np.float64 if kind == "float64" else np.float32)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even bfloat16 bit patterns (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = 0x7FC0
    return out


def decode(logits: np.ndarray, logits_dtype: str | None) -> np.ndarray:
    """The logits as a NumPy float array of their compute dtype (copies; for small data)."""
    kind = storage_kind(logits.dtype, logits_dtype)
    if kind == "bfloat16":
        return bf16_bits_to_float32(logits)
    return np.asarray(logits, dtype=compute_dtype(kind))
