"""Reused per-thread buffers must never leak into what a call returns."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest

import engine
from engine import scratch


def _inputs(seed, rows=300, classes=10):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, classes)) * 3).astype(np.float32)
    y = rng.integers(0, classes, rows)
    y[::7] = -100
    return x, y


def test_returned_rows_survive_later_calls():
    x, y = _inputs(0)
    rows = engine.cross_entropy(x, y, reduction="none")
    loss_g, grad = engine.cross_entropy_grad(x, y, reduction="none")
    stats = engine.row_stats(x, y).as_dict()
    kept = (rows.copy(), loss_g.copy(), grad.copy(), {k: v.copy() for k, v in stats.items()})
    for seed in (1, 2):  # same shapes, other data: every scratch buffer is rewritten
        x2, y2 = _inputs(seed)
        engine.cross_entropy(x2, y2, reduction="none")
        engine.cross_entropy(x2, y2)
        engine.cross_entropy_grad(x2, y2, reduction="none")
        engine.row_stats(x2, y2)
    np.testing.assert_array_equal(rows, kept[0])
    np.testing.assert_array_equal(loss_g, kept[1])
    np.testing.assert_array_equal(grad, kept[2])
    for key, value in stats.items():
        np.testing.assert_array_equal(value, kept[3][key])


def test_threads_do_not_share_buffers():
    cases = [_inputs(seed, rows=20_000) for seed in range(8)]
    expected = [engine.cross_entropy(x, y) for x, y in cases]
    if numba.threading_layer() == "workqueue":
        pytest.skip("Numba's workqueue layer cannot run kernels from several threads")
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda c: engine.cross_entropy(*c), cases))
            assert got == expected


def test_large_buffers_are_not_kept():
    small = scratch.buffer("test.small", 10, np.float64)
    assert scratch.buffer("test.small", 5, np.float64).base is small.base
    big = scratch._MAX_BYTES // 8 + 1
    assert scratch.buffer("test.big", big, np.float64).base is None  # a fresh array
