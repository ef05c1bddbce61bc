"""Percentiles in bounded memory that do not depend on how the rows were split.

`LogHistogram` counts values in buckets whose edges grow geometrically (γ = 1.008), one
set for each sign, plus a bucket for |v| < 1e-9 and one for |v| > 1e9 each side. A
bucket's representative 2γ^i/(1 + γ) is within α = (γ - 1)/(γ + 1) = 0.4% of every value
in it, so every order statistic read back is within 0.4% (or 1e-9 absolute near 0), and a
percentile interpolated between two of them (as numpy.percentile does) is too. The
counts are integers: merging adds them, so the answer is the same whatever the chunking,
thread count or Dask workers (DDSketch's idea with a fixed index range).
"""

from __future__ import annotations

import math

import numpy as np

GAMMA = 1.008
ALPHA = (GAMMA - 1) / (GAMMA + 1)
TINY = 1e-9  # |v| below: the zero bucket
HUGE = 1e9  # |v| above: the overflow buckets (reported from the exact extremes)
_LOG_GAMMA = math.log(GAMMA)
_I_MIN = math.ceil(math.log(TINY) / _LOG_GAMMA)  # bucket i holds (γ^(i-1), γ^i]
_I_MAX = math.ceil(math.log(HUGE) / _LOG_GAMMA)
_NB = _I_MAX - _I_MIN + 1  # buckets per sign
# ordered slots: [neg overflow][neg buckets, largest magnitude first][zero][pos buckets]
# [pos overflow]
_ZERO = _NB + 1
_SLOTS = 2 * _NB + 3


def _representative(i: np.ndarray) -> np.ndarray:
    return 2.0 * np.power(GAMMA, i.astype(np.float64) + _I_MIN) / (1.0 + GAMMA)


class LogHistogram:
    """Mergeable counts of values; NaN is not counted (the caller counts NaN rows)."""

    def __init__(self):
        self.counts = np.zeros(_SLOTS, np.int64)
        self.min = math.inf
        self.max = -math.inf

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        if v.size == 0:
            return
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        self.counts += np.bincount(_slots(v), minlength=_SLOTS)

    def merge(self, other: LogHistogram) -> LogHistogram:
        self.counts += other.counts
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def percentiles(self, qs) -> list[float]:
        """numpy.percentile(values, qs) (linear interpolation), within ALPHA each."""
        n = self.count
        if n == 0:
            return [math.nan for _ in qs]
        cumulative = np.cumsum(self.counts)
        out = []
        for q in qs:
            pos = (n - 1) * float(q) / 100.0
            lo = math.floor(pos)
            hi = min(lo + 1, n - 1)
            a = self._order_statistic(lo, cumulative, n)
            b = self._order_statistic(hi, cumulative, n)
            frac = pos - lo
            out.append(a if frac == 0.0 or a == b else a + frac * (b - a))
        return out

    def _order_statistic(self, k: int, cumulative: np.ndarray, n: int) -> float:
        if k == 0:
            return self.min
        if k == n - 1:
            return self.max
        slot = int(np.searchsorted(cumulative, k + 1))
        if slot == _ZERO:
            value = 0.0
        elif slot in (0, _SLOTS - 1):  # beyond ±1e9: the extreme is the best we know
            value = self.min if slot == 0 else self.max
        elif slot > _ZERO:
            value = float(_representative(np.array([slot - _ZERO - 1]))[0])
        else:
            value = -float(_representative(np.array([_ZERO - 1 - slot]))[0])
        return min(max(value, self.min), self.max)

    def to_dict(self) -> dict:
        nz = np.flatnonzero(self.counts)
        return {
            "slots": nz.tolist(),
            "counts": self.counts[nz].tolist(),
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LogHistogram:
        h = cls()
        h.counts[np.asarray(data["slots"], np.int64)] = np.asarray(data["counts"], np.int64)
        h.min = float(data["min"])
        h.max = float(data["max"])
        return h


def _slots(v: np.ndarray) -> np.ndarray:
    mag = np.abs(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        i = np.ceil(np.log(np.maximum(mag, TINY)) / _LOG_GAMMA).astype(np.int64) - _I_MIN
    i = np.clip(i, 0, _NB - 1)
    pos = _ZERO + 1 + i
    neg = _ZERO - 1 - i
    slots = np.where(v > 0, pos, neg)
    slots = np.where(mag < TINY, _ZERO, slots)
    big = mag > HUGE
    slots = np.where(big & (v > 0), _SLOTS - 1, slots)
    return np.where(big & (v < 0), 0, slots)
