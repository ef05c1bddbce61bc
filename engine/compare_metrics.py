"""Mergeable float64 sums of a two-model comparison (`xent compare`), and its report.

Like engine.metrics: every quantity is a count, a float64 sum (with its sum of squares, for
standard errors) or a LogHistogram, so chunks, threads and Dask workers merge exactly and
the report never depends on how the rows were split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.metrics import MetricState, json_clean, standard_error
from engine.quantiles import LogHistogram

KL_PERCENTILES = (
    ("max", 100), ("p99_9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("median", 50),
    ("p10", 10), ("p5", 5), ("p1", 1), ("p0_1", 0.1), ("min", 0),
)  # fmt: skip
DELTA_P_PERCENTILES = (
    ("max", 100), ("p99_9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("p75", 75),
    ("median", 50), ("p25", 25), ("p10", 10), ("p5", 5), ("p1", 1), ("p0_1", 0.1), ("min", 0),
)  # fmt: skip
# per-row values whose mean and standard error are reported
_MEANS = ("kl", "kl_reverse", "jsd", "tvd", "top1")
_TARGET_MEANS = ("nll_base", "nll_candidate", "acc_base", "acc_candidate", "log_ratio", "delta_p")


@dataclass
class CompareSums:
    """Sums over the counted rows of one comparison (or one group of it)."""

    top_k: tuple[int, ...] = (5, 10)
    rows: int = 0
    counted: int = 0
    ignored: int = 0
    nan_rows: int = 0
    sums: dict = field(default_factory=dict)  # name -> [Σx, Σx²]
    nll_cross: float = 0.0  # Σ nll_base·nll_candidate (the correlation)
    kl_hist: LogHistogram = field(default_factory=LogHistogram)
    delta_p_hist: LogHistogram = field(default_factory=LogHistogram)

    def _add(self, name: str, x: np.ndarray) -> None:
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] += float(np.sum(x))
        s[1] += float(np.dot(x, x))

    def add(self, rows: dict, counted: np.ndarray, ignored: int, nan_rows: int) -> None:
        """Fold one chunk's per-row values in (``counted``: rows that enter statistics)."""
        self.rows += int(counted.shape[0])
        self.ignored += int(ignored)
        self.nan_rows += int(nan_rows)
        c = int(np.count_nonzero(counted))
        self.counted += c
        if c == 0:
            return
        pick = {k: v[counted] for k, v in rows.items()}
        for name in ("kl", "kl_reverse", "jsd", "tvd"):
            self._add(name, pick[name].astype(np.float64))
        self._add("top1", (pick["base_argmax"] == pick["candidate_argmax"]).astype(np.float64))
        for k in self.top_k:
            self._add(f"top{k}", (pick["candidate_rank"] < k).astype(np.float64))
        self.kl_hist.add(pick["kl"])
        if "nll_base" in pick:
            nb = pick["nll_base"].astype(np.float64)
            nc = pick["nll_candidate"].astype(np.float64)
            self._add("nll_base", nb)
            self._add("nll_candidate", nc)
            self._add("log_ratio", nc - nb)
            self.nll_cross += float(np.dot(nb, nc))
            y = pick["target"]
            self._add("acc_base", (pick["base_argmax"] == y).astype(np.float64))
            self._add("acc_candidate", (pick["candidate_argmax"] == y).astype(np.float64))
            dp = pick["delta_p"].astype(np.float64)
            self._add("delta_p", dp)
            self.delta_p_hist.add(dp)

    def merge(self, other: CompareSums) -> CompareSums:
        self.rows += other.rows
        self.counted += other.counted
        self.ignored += other.ignored
        self.nan_rows += other.nan_rows
        for name, (s, sq) in other.sums.items():
            mine = self.sums.setdefault(name, [0.0, 0.0])
            mine[0] += s
            mine[1] += sq
        self.nll_cross += other.nll_cross
        self.kl_hist.merge(other.kl_hist)
        self.delta_p_hist.merge(other.delta_p_hist)
        return self

    def to_dict(self) -> dict:
        return {
            "top_k": list(self.top_k),
            "rows": self.rows,
            "counted": self.counted,
            "ignored": self.ignored,
            "nan_rows": self.nan_rows,
            "sums": {k: list(v) for k, v in self.sums.items()},
            "nll_cross": self.nll_cross,
            "kl_hist": self.kl_hist.to_dict(),
            "delta_p_hist": self.delta_p_hist.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> CompareSums:
        return cls(
            top_k=tuple(d["top_k"]),
            rows=d["rows"],
            counted=d["counted"],
            ignored=d["ignored"],
            nan_rows=d["nan_rows"],
            sums={k: list(v) for k, v in d["sums"].items()},
            nll_cross=d["nll_cross"],
            kl_hist=LogHistogram.from_dict(d["kl_hist"]),
            delta_p_hist=LogHistogram.from_dict(d["delta_p_hist"]),
        )

    # -- the report ----------------------------------------------------------------------

    def _mean_se(self, name: str) -> dict:
        s, sq = self.sums.get(name, (0.0, 0.0))
        n = self.counted
        return {"mean": s / n if n else math.nan, "se": standard_error(s, sq, n)}

    def finalize(self, *, with_target: bool) -> dict:
        n = self.counted
        out: dict = {
            "rows": self.rows,
            "counted": n,
            "ignored": self.ignored,
            "nan_rows": self.nan_rows,
        }
        kl = self._mean_se("kl")
        for (key, _), v in zip(
            KL_PERCENTILES, self.kl_hist.percentiles([q for _, q in KL_PERCENTILES]), strict=True
        ):
            kl[key] = v
        out["kl"] = kl
        out["kl_reverse"] = self._mean_se("kl_reverse")
        out["jsd"] = self._mean_se("jsd")
        out["tvd"] = self._mean_se("tvd")
        out["top1_agreement"] = self._mean_se("top1")
        out["top_k_agreement"] = {str(k): self._mean_se(f"top{k}") for k in self.top_k}
        if not with_target:
            return out
        for side in ("base", "candidate"):
            m = self._mean_se(f"nll_{side}")
            out[side] = {
                "nll": m["mean"],
                "nll_se": m["se"],
                "perplexity": _exp(m["mean"]),
                "accuracy": self._mean_se(f"acc_{side}")["mean"],
            }
        ratio = self._mean_se("log_ratio")
        out["log_ppl_ratio"] = ratio
        ppl_ratio = _exp(ratio["mean"])
        out["ppl_ratio"] = {"mean": ppl_ratio, "se": ppl_ratio * ratio["se"]}  # delta method
        out["nll_correlation"] = self._correlation()
        dp = self._mean_se("delta_p")
        sq = self.sums.get("delta_p", (0.0, 0.0))[1]
        dp["rms"] = math.sqrt(sq / n) if n else math.nan
        qs = [q for _, q in DELTA_P_PERCENTILES]
        for (key, _), v in zip(DELTA_P_PERCENTILES, self.delta_p_hist.percentiles(qs), strict=True):
            dp[key] = v
        out["delta_p"] = dp
        return out

    def _correlation(self) -> float:
        n = self.counted
        if n < 2:
            return math.nan
        sb, qb = self.sums["nll_base"]
        sc, qc = self.sums["nll_candidate"]
        cov = self.nll_cross - sb * sc / n
        vb = qb - sb * sb / n
        vc = qc - sc * sc / n
        if vb <= 0 or vc <= 0:
            return math.nan
        return max(-1.0, min(1.0, cov / math.sqrt(vb * vc)))


def _exp(x: float) -> float:
    if not math.isfinite(x):
        return x
    return math.exp(x) if x < 709 else math.inf


@dataclass
class CompareState(MetricState):
    """Overall sums plus per-group sums (CompareSums), and the bytes of both inputs."""

    SUMS = CompareSums
    top_k: tuple[int, ...] = (5, 10)

    def report(
        self, *, classes: int, temperature: float, with_target: bool, seconds: float
    ) -> dict:
        out = self.total.finalize(with_target=with_target)
        out = {
            **{k: out[k] for k in ("rows", "counted", "ignored", "nan_rows")},
            "classes": classes,
            "temperature": temperature,
            **{k: v for k, v in out.items() if k not in ("rows", "counted", "ignored", "nan_rows")},
        }
        out["seconds"] = seconds
        out["rows_per_second"] = out["rows"] / seconds if seconds > 0 else None
        out["gb_per_second"] = self.logit_bytes / seconds / 1e9 if seconds > 0 else None
        if self.groups:
            out["groups"] = {
                k: self.groups[k].finalize(with_target=with_target) for k in sorted(self.groups)
            }
        return json_clean(out)
