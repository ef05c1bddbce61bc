"""Property tests (hypothesis): invariances the math guarantees."""

from __future__ import annotations

import numba
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import engine

shapes = st.tuples(st.integers(1, 40), st.integers(1, 300))


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**31),
    shift=st.floats(-50, 50),
    eps=st.sampled_from([0.0, 0.1]),
)
def test_adding_a_constant_to_a_row_changes_nothing(shape, seed, shift, eps):
    rng = np.random.default_rng(seed)
    rows, classes = shape
    x = rng.standard_normal((rows, classes)) * 4
    y = rng.integers(0, classes, rows)
    shifts = rng.uniform(-abs(shift), abs(shift) + 1e-9, (rows, 1))
    a_loss, a_grad = engine.cross_entropy_grad(x, y, reduction="none", label_smoothing=eps)
    b_loss, b_grad = engine.cross_entropy_grad(x + shifts, y, reduction="none", label_smoothing=eps)
    np.testing.assert_allclose(a_loss, b_loss, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a_grad, b_grad, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31), split=st.integers(0, 40))
def test_results_do_not_depend_on_threads_or_row_splits(shape, seed, split):
    rng = np.random.default_rng(seed)
    rows, classes = shape
    x = (rng.standard_normal((rows, classes)) * 3).astype(np.float32)
    y = rng.integers(0, classes, rows)
    whole_loss, whole_grad = engine.cross_entropy_grad(x, y, reduction="none")
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one_loss, one_grad = engine.cross_entropy_grad(x, y, reduction="none")
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(whole_loss, one_loss)
    np.testing.assert_array_equal(whole_grad, one_grad)
    k = min(split, rows)
    parts = [
        engine.cross_entropy(x[:k], y[:k], reduction="none"),
        engine.cross_entropy(x[k:], y[k:], reduction="none"),
    ]
    forward_loss = engine.cross_entropy(x, y, reduction="none")
    np.testing.assert_array_equal(np.concatenate(parts), forward_loss)
    # forward and forward+grad run different loops (one also stores exp), which LLVM may
    # vectorise with different lane counts: equal to float32 rounding, not bit for bit
    np.testing.assert_allclose(forward_loss, whole_loss, rtol=1e-6, atol=1e-9)
