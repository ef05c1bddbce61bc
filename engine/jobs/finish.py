"""A job's report: merged sums turned into the metrics users read (`Report.to_dict()`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.jobs.chunks import GradSums
from engine.jobs.spec import JobSpec
from engine.metrics import MetricState, json_clean, reduce_loss


@dataclass
class Report:
    """The outcome of a job: its metrics, warnings, and where output went."""

    metrics: dict
    warnings: list[str] = field(default_factory=list)
    output: str | None = None

    def to_dict(self) -> dict:
        return json_clean(self.metrics)

    def __getitem__(self, key):
        return self.to_dict()[key]


def _rates(metrics: dict, rows: int, nbytes: int, seconds: float) -> dict:
    metrics["seconds"] = seconds
    metrics["rows_per_second"] = rows / seconds if seconds > 0 else None
    metrics["gb_per_second"] = nbytes / seconds / 1e9 if seconds > 0 else None
    return metrics


def metrics_report(state: MetricState, spec: JobSpec, classes: int, soft: bool, seconds: float):
    """The evaluation metrics (eval, score) of merged sums, per group too."""
    opts = spec.opts

    def finalize(sums):
        return sums.finalize(
            classes=classes, reduction=spec.metric_reduction, z_loss=opts.z_loss, soft=soft
        )

    m = _rates(finalize(state.total), state.total.rows, state.logit_bytes, seconds)
    if state.groups:
        m["groups"] = {key: finalize(sums) for key, sums in sorted(state.groups.items())}
    return m


def gradients_report(
    sums: GradSums, spec: JobSpec, classes: int, denominators, seconds: float
) -> dict:
    """The metrics of a gradients job: rows, counted, the reduced loss, rates."""
    weight_sum = denominators[0] if denominators[0] is not None else 0.0
    loss = reduce_loss(sums.ce_sum, sums.z_sum, weight_sum, sums.counted, spec.metric_reduction)
    metrics = {
        "rows": sums.rows,
        "counted": sums.counted,
        "ignored": sums.rows - sums.counted,
        "classes": classes,
        "loss": loss,
    }
    return _rates(metrics, sums.rows, sums.nbytes, seconds)
