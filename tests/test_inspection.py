"""The one test of "rows look like probabilities", shared by inspect, eval and explain."""

from __future__ import annotations

import numpy as np

from engine.inspection import looks_like_probabilities, probability_rows


def test_probability_rows():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 5))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    x = p.copy()
    x[1] = z[1]  # logits: negative values
    x[2] = p[2] * 0.5  # in [0, 1] but sums to 0.5
    x[3, 0] = np.nan
    x[4, 0] = np.inf
    x[5] = p[5] + 2e-4  # within the tolerance of a sum of rounded values
    assert probability_rows(x).tolist() == [True, False, False, False, False, True]
    assert probability_rows(p.astype(np.float16)).all()


def test_looks_like_probabilities():
    assert looks_like_probabilities([0.0, 0.0, 0.0, 1.0])
    assert looks_like_probabilities([[0.25, 0.75], [1.0, 0.0]])
    assert not looks_like_probabilities([[0.25, 0.75], [1.0, 1.0]])  # every row must
    assert not looks_like_probabilities([0.0, 0.0, 0.0, 2.0])
    assert not looks_like_probabilities(np.empty((0, 3)))
