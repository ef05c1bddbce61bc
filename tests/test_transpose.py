"""The register transpose of the row tiles (engine/kernels/cpu/transpose.py), against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from engine.kernels.cpu.scalars import FASTMATH
from engine.kernels.cpu.tiles import TILE, transpose_tile

STORAGES = {
    "float32": (np.float32, lambda a: a, lambda a: a),
    "float16": (np.float16, lambda a: a.view(np.uint16), lambda a: a.astype(np.float32)),
    # bfloat16 bits: the high half of each float32 (the low half zeroed, so exact)
    "bfloat16": (
        np.float32,
        lambda a: (a.view(np.uint32) >> 16).astype(np.uint16).view(np.int16),
        lambda a: ((a.view(np.uint32) >> 16) << 16).view(np.float32),
    ),
}


@njit(fastmath=FASTMATH)
def _tile(x, r0, count, buf):
    return transpose_tile(x, r0, count, buf)


@pytest.mark.parametrize("storage", sorted(STORAGES))
@pytest.mark.parametrize("classes", [1, 2, 3, 10, 15, 16, 17, 24, 31, 32, 33, 48])
def test_tile_transpose_matches_numpy(storage, classes):
    dtype, to_kernel, to_f32 = STORAGES[storage]
    rows = 3 * TILE + 5
    x = np.random.default_rng(classes).standard_normal((rows, classes)).astype(dtype)
    x[7, 0] = np.nan
    x[70, classes - 1] = -np.inf
    kernel_x = to_kernel(x)
    expected = to_f32(x)
    for r0 in (0, TILE, 100):
        buf = np.full((classes, TILE), 7.0, dtype=np.float32)
        assert _tile(kernel_x, r0, TILE, buf)
        np.testing.assert_array_equal(buf, expected[r0 : r0 + TILE].T)


def test_tile_transpose_reads_strided_rows():
    parent = np.random.default_rng(0).standard_normal((200, 40)).astype(np.float32)
    x = parent[:, 3:13]  # rows 40 elements apart, 10 classes each
    buf = np.zeros((10, TILE), dtype=np.float32)
    assert _tile(x, 50, TILE, buf)
    np.testing.assert_array_equal(buf, x[50 : 50 + TILE].T)


def test_tile_transpose_declines_what_it_cannot_read_safely():
    x = np.ones((2 * TILE, 10), dtype=np.float32)
    buf = np.zeros((10, TILE), dtype=np.float32)
    assert not _tile(x, TILE, TILE, buf)  # the last row's 16-wide read would pass the end
    assert not _tile(x, 0, TILE - 1, buf)  # a short tile
    assert not _tile(np.ones((3 * TILE, 10)), 0, TILE, np.zeros((10, TILE)))  # float64
    assert not _tile(np.ones((10, 3 * TILE), dtype=np.float32).T, 0, TILE, buf)  # strided classes
    assert _tile(x, 0, TILE, buf)  # the next tile's rows are there to read into
