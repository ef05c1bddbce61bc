"""LogHistogram: percentiles within 0.4% (or 1e-9 near 0), independent of the split."""

from __future__ import annotations

import numpy as np
import pytest

from engine.quantiles import ALPHA, LogHistogram

QS = [100, 99.9, 99, 95, 90, 75, 50, 25, 10, 5, 1, 0.1, 0]


@pytest.mark.parametrize(
    "make",
    [
        lambda r: r.lognormal(-12, 4, 20001),  # KL-like: many decades
        lambda r: r.normal(0, 1e-3, 5000),  # Δp-like: both signs
        lambda r: np.concatenate([np.zeros(300), r.exponential(1e-8, 700)]),  # near 0
        lambda r: np.array([3.0]),
        lambda r: np.array([-1.0, 2.0]),
        lambda r: np.concatenate([r.normal(0, 1, 100), [1e12, -1e12, np.inf]]),
    ],
)
def test_within_alpha_of_numpy(rng, make):
    v = make(rng)
    h = LogHistogram()
    h.add(np.concatenate([v, [np.nan]]))  # NaN is not counted
    got = np.array(h.percentiles(QS))
    want = np.percentile(v, QS)
    finite = np.isfinite(want) & (np.abs(want) < 1e9)
    err = np.abs(got - want)[finite]
    assert (err <= ALPHA * np.abs(want[finite]) + 1e-9).all(), (got, want)
    assert got[0] == v.max() and got[-1] == v.min()


def test_merge_equals_whole_and_round_trips(rng):
    v = rng.lognormal(-5, 3, 3000)
    whole = LogHistogram()
    whole.add(v)
    parts = LogHistogram()
    for piece in np.array_split(v, 13):
        h = LogHistogram()
        h.add(piece)
        parts.merge(LogHistogram.from_dict(h.to_dict()))
    assert parts.percentiles(QS) == whole.percentiles(QS)


def test_empty():
    assert all(np.isnan(LogHistogram().percentiles([50, 0])))
