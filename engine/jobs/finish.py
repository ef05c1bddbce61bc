"""A job's report: merged sums turned into the metrics users read (`Report.to_dict()`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.io import sinks
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


def recorded_metrics(writer: sinks.PartsWriter, index: int) -> MetricState | None:
    """A finished part's metric sums from the manifest (None: written without them).

    Bytes are not carried over: rates describe the work of this run."""
    data = writer.part_metrics(index)
    if data is None:
        return None
    state = MetricState.from_dict(data)
    state.logit_bytes = 0
    return state


def merge_parts(parts: dict, spec: JobSpec, directory: str) -> tuple[MetricState, str | None]:
    """Part states merged in part order (the same sums in the same order on every run),
    and a warning when some finished parts carry no sums (an older xent wrote them)."""
    state = MetricState(top_k=spec.top_k)
    missing = 0
    for index in sorted(parts):
        if parts[index] is None:
            missing += 1
        else:
            state.merge(parts[index])
    warning = None
    if missing:
        warning = (
            f"{directory}: {missing} resumed part(s) were written without their metric sums; "
            "the metrics cover only the other parts"
        )
    return state, warning
