"""Mergeable float64 accumulators of evaluation metrics (create / add / merge / finalize).

Every quantity is a sum or a count, so partial results from chunks, threads, files or Dask
workers merge exactly (up to float64 rounding) and the result never depends on chunking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

ECE_BINS = 15


@dataclass
class MetricSums:
    """Sums over rows. ``counted`` rows are those with a target (not ignored/null/skipped)."""

    top_k: tuple[int, ...] = (1, 5)
    rows: int = 0
    counted: int = 0
    ignored: int = 0
    nan_rows: int = 0
    ce_sum: float = 0.0  # Σ cross-entropy part of the per-row loss (weights, smoothing)
    z_sum: float = 0.0  # Σ ζ·lse² over counted rows
    weight_sum: float = 0.0  # Σ w[y] over counted rows (mean denominator); soft: rows
    nll_sum: float = 0.0  # Σ -log p(target), no smoothing, no weights
    entropy_sum: float = 0.0
    kl_sum: float = 0.0
    # Σ x² of the same per-row values: standard errors of the means (sample variance)
    nll_sq_sum: float = 0.0
    entropy_sq_sum: float = 0.0
    kl_sq_sum: float = 0.0
    hits: dict = field(default_factory=dict)  # k -> rows whose target ranks < k
    ece_count: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.int64))
    ece_conf: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))
    ece_correct: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))

    def add(
        self,
        stats: dict,
        counted: np.ndarray,
        row_weight: np.ndarray,
        z_loss: float,
        soft: bool,
        nan_rows: int = 0,
    ) -> None:
        """Fold one chunk's RowStats in. ``row_weight`` is w[y_i] (soft targets: 1)."""
        n = int(counted.shape[0])
        c = int(np.count_nonzero(counted))
        self.rows += n
        self.counted += c
        self.ignored += n - c
        self.nan_rows += int(nan_rows)
        if c == 0:
            return
        loss = stats["loss"][counted].astype(np.float64)
        lse = stats["lse"][counted].astype(np.float64)
        z = z_loss * float(np.sum(lse * lse)) if z_loss else 0.0
        self.ce_sum += float(np.sum(loss)) - z
        self.z_sum += z
        self.weight_sum += float(np.sum(row_weight[counted], dtype=np.float64))
        nll = -stats["target_logprob"][counted].astype(np.float64)
        entropy = stats["entropy"][counted].astype(np.float64)
        self.nll_sum += float(np.sum(nll))
        self.nll_sq_sum += float(np.dot(nll, nll))
        self.entropy_sum += float(np.sum(entropy))
        self.entropy_sq_sum += float(np.dot(entropy, entropy))
        if soft:
            kl = stats["kl"][counted].astype(np.float64)
            self.kl_sum += float(np.sum(kl))
            self.kl_sq_sum += float(np.dot(kl, kl))
        rank = stats["target_rank"][counted]
        for k in set(self.top_k) | {1}:
            self.hits[k] = self.hits.get(k, 0) + int(np.count_nonzero(rank < k))
        conf = stats["max_prob"][counted].astype(np.float64)
        correct = (rank == 0).astype(np.float64)
        bins = np.clip((conf * ECE_BINS).astype(np.int64), 0, ECE_BINS - 1)
        ok = np.isfinite(conf)
        self.ece_count += np.bincount(bins[ok], minlength=ECE_BINS)
        self.ece_conf += np.bincount(bins[ok], weights=conf[ok], minlength=ECE_BINS)
        self.ece_correct += np.bincount(bins[ok], weights=correct[ok], minlength=ECE_BINS)

    def merge(self, other: MetricSums) -> MetricSums:
        for name in (
            "rows",
            "counted",
            "ignored",
            "nan_rows",
            "ce_sum",
            "z_sum",
            "weight_sum",
            "nll_sum",
            "entropy_sum",
            "kl_sum",
            "nll_sq_sum",
            "entropy_sq_sum",
            "kl_sq_sum",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.hits.items():
            self.hits[k] = self.hits.get(k, 0) + v
        self.ece_count = self.ece_count + other.ece_count
        self.ece_conf = self.ece_conf + other.ece_conf
        self.ece_correct = self.ece_correct + other.ece_correct
        return self

    def finalize(self, *, classes: int, reduction: str, z_loss: float, soft: bool) -> dict:
        """The report keys of `xent eval --json` (undefined values are NaN here; reports
        turn them into null)."""
        c = self.counted
        loss = reduce_loss(self.ce_sum, self.z_sum, self.weight_sum, c, reduction)
        nll = self.nll_sum / c if c else math.nan
        se_nll = standard_error(self.nll_sum, self.nll_sq_sum, c)
        top_k = sorted(k for k in set(self.top_k) if k > 1)
        se = {
            "nll": se_nll,
            "accuracy": _bernoulli_se(self.hits.get(1, 0), c),
            "top_k_accuracy": {str(k): _bernoulli_se(self.hits.get(k, 0), c) for k in top_k},
            "entropy": standard_error(self.entropy_sum, self.entropy_sq_sum, c),
        }
        if soft:
            se["kl"] = standard_error(self.kl_sum, self.kl_sq_sum, c)
        out = {
            "rows": self.rows,
            "counted": c,
            "ignored": self.ignored,
            "nan_rows": self.nan_rows,
            "classes": classes,
            "loss": loss,
            "nll": nll,
            "perplexity": _safe_exp(nll),
            "bits_per_token": nll / math.log(2) if c else math.nan,
            "accuracy": self.hits.get(1, 0) / c if c else math.nan,
            "top_k_accuracy": {
                str(k): (self.hits.get(k, 0) / c if c else math.nan)
                for k in sorted(set(self.top_k))
                if k > 1
            },
            "entropy": self.entropy_sum / c if c else math.nan,
            "ece": self.ece(),
            "se": se,
            "perplexity_ci95": (
                [_safe_exp(nll - 1.96 * se_nll), _safe_exp(nll + 1.96 * se_nll)]
                if math.isfinite(se_nll) and math.isfinite(nll)
                else None
            ),
        }
        if soft:
            out["kl"] = self.kl_sum / c if c else math.nan
        if z_loss:
            out["z_loss"] = self.z_sum / c if c else math.nan
        return out

    def to_dict(self) -> dict:
        """Plain JSON data (exact: floats as Python floats), for `from_dict`."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif f.name == "hits":
                v = {str(k): int(n) for k, n in v.items()}
            elif f.name == "top_k":
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MetricSums:
        sums = cls(top_k=tuple(data["top_k"]))
        for f in fields(cls):
            if f.name == "top_k" or f.name not in data:
                continue
            v = data[f.name]
            if f.name == "hits":
                v = {int(k): int(n) for k, n in v.items()}
            elif f.name == "ece_count":
                v = np.asarray(v, np.int64)
            elif f.name.startswith("ece_"):
                v = np.asarray(v, np.float64)
            setattr(sums, f.name, v)
        return sums

    def ece(self) -> float:
        total = int(self.ece_count.sum())
        if total == 0:
            return math.nan
        nonempty = self.ece_count > 0
        gap = np.abs(self.ece_correct[nonempty] - self.ece_conf[nonempty])
        return float(np.sum(gap) / total)


def reduce_loss(ce_sum: float, z_sum: float, weight_sum: float, counted: int, reduction: str):
    """The loss as PyTorch reduces it, from float64 sums: ``sum``, or ``mean`` = Σ loss over
    Σ w[y] (NaN when nothing is counted), the z-loss term over the counted rows."""
    if reduction == "sum":
        return ce_sum + z_sum
    with np.errstate(all="ignore"):  # NumPy scalars may come in: inf, never a warning
        value = ce_sum / weight_sum if weight_sum != 0 else math.nan
        if z_sum != 0.0:
            value += z_sum / counted if counted else math.nan
    return float(value)


def standard_error(total: float, squares: float, n: int) -> float:
    """Standard error of a mean from Σx and Σx² (sample variance, n - 1); NaN below 2."""
    if n < 2:
        return math.nan
    variance = max(0.0, (squares - total * total / n) / (n - 1))
    return math.sqrt(variance / n)


def _bernoulli_se(hits: int, n: int) -> float:
    """`standard_error` of a 0/1 value (Σx² = Σx = hits)."""
    return standard_error(float(hits), float(hits), n)


def _safe_exp(x: float) -> float:
    if not math.isfinite(x):
        return x
    return math.exp(x) if x < 709 else math.inf


def json_clean(value):
    """NaN/inf -> None recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class MetricState:
    """Overall sums plus per-group sums: what a job (or a Dask task) returns.

    ``SUMS`` is the class of the sums (MetricSums here; compare_metrics.CompareState
    reuses everything else with its own)."""

    SUMS = MetricSums
    top_k: tuple[int, ...] = (1, 5)
    total: MetricSums = None  # type: ignore[assignment]
    groups: dict = field(default_factory=dict)
    logit_bytes: int = 0

    def __post_init__(self):
        if self.total is None:
            self.total = self.SUMS(top_k=self.top_k)

    def group(self, key) -> MetricSums:
        if key not in self.groups:
            self.groups[key] = self.SUMS(top_k=self.top_k)
        return self.groups[key]

    def to_dict(self) -> dict:
        return {
            "top_k": list(self.top_k),
            "total": self.total.to_dict(),
            "groups": {str(k): v.to_dict() for k, v in self.groups.items()},
            "logit_bytes": int(self.logit_bytes),
        }

    @classmethod
    def from_dict(cls, data: dict) -> MetricState:
        state = cls(top_k=tuple(data["top_k"]), total=cls.SUMS.from_dict(data["total"]))
        state.groups = {k: cls.SUMS.from_dict(v) for k, v in data["groups"].items()}
        state.logit_bytes = int(data["logit_bytes"])
        return state

    def merge(self, other: MetricState) -> MetricState:
        self.total.merge(other.total)
        for key, sums in other.groups.items():
            self.group(key).merge(sums)
        self.logit_bytes += other.logit_bytes
        return self
