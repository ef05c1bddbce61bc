"""Streaming jobs over datasets: evaluate (metrics), score (per-row file), gradients.

Data flows one way: Source chunks -> kernels -> MetricState / output sink. Chunks are
decoded ahead on reader threads while the (GIL-free) kernels run on this one, so both
cores stay busy; memory is bounded by chunk size times read-ahead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numba
import numpy as np
import pyarrow as pa

from engine import api, dtypes
from engine.errors import XentInputError
from engine.io import sinks
from engine.io.sources import Chunk, Source, open_source
from engine.metrics import MetricState, json_clean
from engine.options import LossOptions, make_options
from engine.progress import make_progress

NAN_POLICIES = ("error", "skip", "propagate")


@dataclass
class Report:
    """The outcome of a job: SPEC §5 metrics, warnings, and where output went."""

    metrics: dict
    warnings: list[str] = field(default_factory=list)
    output: str | None = None

    def to_dict(self) -> dict:
        return json_clean(self.metrics)

    def __getitem__(self, key):
        return self.to_dict()[key]


@dataclass
class JobSpec:
    """Everything a job needs besides the source: plain data, so Dask can ship it."""

    opts: LossOptions
    top_k: tuple[int, ...] = (1, 5)
    chunk_rows: int | None = None
    device: str = "auto"
    nan_policy: str = "error"

    def __post_init__(self):
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}")
        self.top_k = tuple(sorted({int(k) for k in self.top_k} | {1}))
        if any(k < 1 for k in self.top_k):
            raise ValueError("top_k values must be >= 1")


# -- one chunk --------------------------------------------------------------------------------


def chunk_problem(chunk: Chunk, spec: JobSpec, classes: int):
    """Validate a chunk's targets and build the kernel Problem (errors name file and row)."""
    x = chunk.logits
    kind = dtypes.storage_kind(x.dtype, spec.opts.logits_dtype)
    compute = dtypes.compute_dtype(kind)
    if chunk.target is None:
        raise XentInputError("no target column", file=chunk.file)
    try:
        targets = api.prepare_targets(
            chunk.target, x.shape[0], classes, spec.opts, compute, valid=chunk.target_valid
        )
    except api.TargetOutOfRange as err:
        raise XentInputError(
            f"target {err.value} is out of range for {classes} classes",
            file=chunk.file,
            row=chunk.file_row + err.row,
        ) from None
    return targets, api.make_problem(x, targets, spec.opts)


def _nan_mask(chunk: Chunk, lse: np.ndarray, spec: JobSpec) -> np.ndarray:
    """Rows whose logits hold NaN or +inf (their lse is NaN); raise under policy 'error'."""
    bad = np.isnan(lse)
    if spec.nan_policy == "error" and bad.any():
        row = int(np.argmax(bad))
        raise XentInputError(
            "NaN or +inf in logits (use --nan-policy skip or propagate)",
            file=chunk.file,
            row=chunk.file_row + row,
        )
    return bad if spec.nan_policy == "skip" else np.zeros_like(bad)


def _row_weights(targets: api.Targets, spec: JobSpec, classes: int) -> np.ndarray:
    if targets.y is None:
        return np.ones(targets.counted.shape[0])
    w = spec.opts.weight_for(classes)
    return np.where(targets.counted, w[np.maximum(targets.y, 0)], 0.0)


def _group_masks(group: pa.Array | None):
    """(key, row mask) per distinct value of the group column in this chunk."""
    if group is None:
        return []
    if isinstance(group, pa.ChunkedArray):
        group = group.combine_chunks()
    encoded = group.dictionary_encode()
    idx = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    keys = encoded.dictionary.to_pylist()
    out = [(str(k), idx == i) for i, k in enumerate(keys)]
    if (idx < 0).any():
        out.append(("null", idx < 0))
    return out


def eval_chunk(chunk: Chunk, spec: JobSpec, classes: int, state: MetricState, kernels):
    """Row stats of one chunk folded into ``state``; returns the stats (score writes them)."""
    targets, problem = chunk_problem(chunk, spec, classes)
    stats = kernels.stats(problem)
    bad = _nan_mask(chunk, stats["lse"], spec)
    counted = targets.counted & ~bad
    weights = _row_weights(targets, spec, classes)
    soft = targets.t is not None
    z = spec.opts.z_loss
    state.total.add(stats, counted, weights, z, soft, nan_rows=int(bad.sum()))
    for key, mask in _group_masks(chunk.group):
        sub = {k: v[mask] for k, v in stats.items()}
        state.group(key).add(sub, counted[mask], weights[mask], z, soft, int(bad[mask].sum()))
    state.logit_bytes += chunk.logits.nbytes
    return stats


# -- helpers shared by the public jobs -------------------------------------------------------


def _spec(top_k, chunk_rows, device, nan_policy, loss_options) -> JobSpec:
    opts = loss_options.pop("options", None)
    opts = make_options(opts, **loss_options)
    return JobSpec(
        opts=opts, top_k=tuple(top_k), chunk_rows=chunk_rows, device=device, nan_policy=nan_policy
    )


def _open(source, logits, target, keep=(), group_by=None, opts: LossOptions | None = None):
    return open_source(
        source,
        logits=logits,
        target=target,
        keep=keep,
        group_by=group_by,
        logits_dtype=None if opts is None else opts.logits_dtype,
    )


def _check_classes(src: Source, spec: JobSpec) -> int:
    classes = src.num_classes
    if classes is None:
        raise XentInputError("cannot tell the number of classes (no rows?)", file=src.files[0].path)
    spec.opts.check_classes(classes)
    if src.storage == "bfloat16" and spec.opts.logits_dtype != "bfloat16":
        spec.opts = spec.opts.with_(logits_dtype="bfloat16")  # marked in the file's metadata
    return classes


def _probability_warning(chunk: Chunk, spec: JobSpec) -> str | None:
    """Rows that look like softmax outputs while treated as logits (the seeds' mistake)."""
    if spec.opts.input_kind != "logits" or chunk.num_rows == 0:
        return None
    sample = dtypes.decode(np.asarray(chunk.logits[:256]), spec.opts.logits_dtype)
    sample = sample.astype(np.float64)
    if not np.all(np.isfinite(sample)):
        return None
    if sample.min() >= 0.0 and sample.max() <= 1.0 and np.allclose(sample.sum(1), 1.0, atol=1e-3):
        return (
            f"{chunk.file}: the logits look like probabilities (each row in [0, 1], summing "
            "to 1). Cross-entropy applies softmax to its input; if these are softmax "
            "outputs, use --input-kind probs (input_kind='probs')."
        )
    return None


def _local_job(source, spec: JobSpec, threads, logits, target, progress, keep=(), group_by=None):
    """The single-machine set-up every job shares: threads, kernels, source, progress."""
    if threads:
        numba.set_num_threads(int(threads))
    kernels = api.backend(spec.device)
    src = _open(source, logits, target, keep=keep, group_by=group_by, opts=spec.opts)
    classes = _check_classes(src, spec)
    return kernels, src, classes, make_progress(progress, src)


def _finish_metrics(state: MetricState, spec: JobSpec, classes: int, soft: bool, seconds: float):
    opts = spec.opts
    m = state.total.finalize(
        classes=classes, reduction=_metric_reduction(opts), z_loss=opts.z_loss, soft=soft
    )
    m["seconds"] = seconds
    m["rows_per_second"] = m["rows"] / seconds if seconds > 0 else None
    m["gb_per_second"] = state.logit_bytes / seconds / 1e9 if seconds > 0 else None
    if state.groups:
        m["groups"] = {
            key: sums.finalize(
                classes=classes, reduction=_metric_reduction(opts), z_loss=opts.z_loss, soft=soft
            )
            for key, sums in sorted(state.groups.items())
        }
    return m


def _metric_reduction(opts: LossOptions) -> str:
    return "sum" if opts.reduction == "sum" else "mean"


# -- public jobs ----------------------------------------------------------------------------


def evaluate(
    source,
    *,
    logits="logits",
    target="target",
    group_by=None,
    top_k=(1, 5),
    chunk_rows=None,
    device="auto",
    progress=False,
    nan_policy="error",
    threads=None,
    dask=None,
    **loss_options,
) -> Report:
    """Exact streaming metrics of SPEC §5 over a dataset of any size."""
    spec = _spec(top_k, chunk_rows, device, nan_policy, loss_options)
    if dask:
        from engine import distributed

        return distributed.evaluate(
            source,
            spec,
            logits=logits,
            target=target,
            group_by=group_by,
            address=dask,
            progress=progress,
        )
    kernels, src, classes, bar = _local_job(
        source, spec, threads, logits, target, progress, group_by=group_by
    )
    state = MetricState(top_k=spec.top_k)
    warnings: list[str] = []
    start = time.perf_counter()
    try:
        for chunk in src.iter_chunks(chunk_rows=spec.chunk_rows):
            if not warnings and state.total.rows == 0:
                w = _probability_warning(chunk, spec)
                if w:
                    warnings.append(w)
            eval_chunk(chunk, spec, classes, state, kernels)
            bar.update(chunk.num_rows, chunk.logits.nbytes)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return Report(_finish_metrics(state, spec, classes, src.soft_targets, seconds), warnings)


def score(
    source,
    output,
    *,
    keep=(),
    overwrite=False,
    resume=False,
    logits="logits",
    target="target",
    top_k=(1, 5),
    chunk_rows=None,
    device="auto",
    progress=False,
    nan_policy="error",
    threads=None,
    dask=None,
    **loss_options,
) -> Report:
    """One output row per input row (SPEC §4 columns + keep columns); metrics as evaluate.

    ``output`` ending in .parquet/.arrow is one file written under a temporary name and
    renamed when complete. A directory output (or ``resume=True``) is written as parts with
    a manifest, and a resumed job skips the parts already written.
    """
    spec = _spec(top_k, chunk_rows, device, nan_policy, loss_options)
    keep = _as_tuple(keep)
    if dask:
        from engine import distributed

        return distributed.score(
            source,
            output,
            spec,
            keep=keep,
            overwrite=overwrite,
            resume=resume,
            logits=logits,
            target=target,
            address=dask,
            progress=progress,
        )
    kernels, src, classes, bar = _local_job(source, spec, threads, logits, target, progress, keep)
    state = MetricState(top_k=spec.top_k)
    start = time.perf_counter()
    parts = resume or _is_directory_output(output)
    try:
        if parts:
            writer = sinks.PartsWriter(str(output), overwrite=overwrite, resume=resume)
            done = writer.completed()
            for index, chunk in enumerate(src.iter_chunks(chunk_rows=spec.chunk_rows)):
                if index not in done:
                    stats = eval_chunk(chunk, spec, classes, state, kernels)
                    table = sinks.score_table(stats, chunk.keep, src.soft_targets)
                    writer.write_part(index, table, first_row=chunk.row)
                bar.update(chunk.num_rows, chunk.logits.nbytes)
            writer.finalize(src.num_rows if src.num_rows is not None else state.total.rows)
        else:
            with sinks.open_sink(output, overwrite=overwrite) as sink:
                for chunk in src.iter_chunks(chunk_rows=spec.chunk_rows):
                    stats = eval_chunk(chunk, spec, classes, state, kernels)
                    sink.write(sinks.score_table(stats, chunk.keep, src.soft_targets))
                    bar.update(chunk.num_rows, chunk.logits.nbytes)
                if state.total.rows == 0:
                    sink.write(
                        sinks.score_table(_empty_stats(src.soft_targets), None, src.soft_targets)
                    )
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return Report(
        _finish_metrics(state, spec, classes, src.soft_targets, seconds), output=str(output)
    )


def global_denominators(src: Source, spec: JobSpec, classes: int, chunk_rows=None):
    """(Σ m·w[y], Σ m) over the whole source from the target column alone (mean gradients)."""
    weight_sum = 0.0
    counted = 0
    w = spec.opts.weight_for(classes)
    for target, valid in src.iter_targets(chunk_rows=chunk_rows):
        if target is None:
            continue
        if target.ndim == 2:
            weight_sum += target.shape[0]
            counted += target.shape[0]
            continue
        m = target != spec.opts.ignore_index
        if valid is not None:
            m &= valid
        ok = m & (target >= 0) & (target < classes)  # out-of-range rows fail in the main pass
        weight_sum += float(np.sum(w[target[ok]]))
        counted += int(m.sum())
    return weight_sum, counted


def grad_chunk(
    chunk: Chunk, spec: JobSpec, classes: int, kernels, denominators, grad_output, buffer=None
):
    """(targets, loss rows, lse, gradient) for one chunk.

    NaN rows raise (policy error) or, under skip, get a zero gradient and leave the counted
    rows (the mean denominator stays the global one from the targets pass). ``buffer``
    (rows x C, compute dtype) is reused when large enough: fresh chunk-sized allocations
    cost page faults on every chunk.
    """
    targets, problem = chunk_problem(chunk, spec, classes)
    weight_sum, counted = denominators
    scale, zscale = api.row_scales(
        targets, spec.opts, grad_output, problem.rows, weight_sum=weight_sum, counted_rows=counted
    )
    shape = problem.x.shape
    if buffer is not None and buffer.shape[0] >= shape[0] and buffer.shape[1:] == shape[1:]:
        out = buffer[: shape[0]]
    else:
        out = np.empty(shape, dtype=problem.compute)
    loss, lse = kernels.forward_grad(problem, scale, zscale, out)
    bad = np.isnan(loss) & targets.counted
    if bad.any():
        if spec.nan_policy == "error":
            _nan_mask(chunk, np.where(bad, np.nan, 0.0), spec)
        elif spec.nan_policy == "skip":
            out[bad] = 0.0
            loss[bad] = 0.0
            targets.counted &= ~bad
            targets.counted_rows -= int(bad.sum())
    return targets, loss, lse, out


@dataclass
class GradSums:
    """What a gradients job (or one Dask fragment of it) adds up besides its output."""

    ce_sum: float = 0.0
    z_sum: float = 0.0
    rows: int = 0
    counted: int = 0
    nbytes: int = 0


def write_gradients(
    chunks,
    sink,
    spec: JobSpec,
    classes: int,
    kernels,
    denominators,
    grad_output,
    grad_dtype,
    empty_keep=None,
    on_chunk=None,
) -> GradSums:
    """The per-chunk loop shared by local and Dask gradients: compute, write, add up."""
    sums = GradSums()
    buffer = None
    for chunk in chunks:
        targets, loss, lse, grad = grad_chunk(
            chunk, spec, classes, kernels, denominators, grad_output, buffer
        )
        buffer = grad if buffer is None or grad.shape[0] > buffer.shape[0] else buffer
        sink.write(sinks.grad_table(grad, chunk.keep, grad_dtype))  # serialised: reusable
        part_ce, part_z = api._split_z(loss, lse, targets, spec.opts)
        sums.ce_sum += part_ce
        sums.z_sum += part_z
        sums.rows += chunk.num_rows
        sums.counted += targets.counted_rows
        sums.nbytes += chunk.logits.nbytes
        if on_chunk is not None:
            on_chunk(chunk.num_rows, chunk.logits.nbytes)
    if sums.rows == 0:
        sink.write(sinks.grad_table(np.zeros((0, classes), np.float32), empty_keep, grad_dtype))
    return sums


def gradients(
    source,
    output,
    *,
    keep=(),
    overwrite=False,
    grad_dtype="float32",
    grad_output=1.0,
    logits="logits",
    target="target",
    chunk_rows=None,
    device="auto",
    progress=False,
    nan_policy="error",
    threads=None,
    dask=None,
    **loss_options,
) -> Report:
    """d loss / d logits for every row, written as a ``grad`` fixed_size_list column.

    Under ``mean`` the denominator is global: one cheap pass over the target column first.
    """
    if grad_dtype not in ("float32", "float16"):
        raise ValueError("grad_dtype must be float32 or float16")
    spec = _spec((1,), chunk_rows, device, nan_policy, loss_options)
    keep = _as_tuple(keep)
    if dask:
        from engine import distributed

        return distributed.gradients(
            source,
            output,
            spec,
            keep=keep,
            overwrite=overwrite,
            grad_dtype=grad_dtype,
            grad_output=grad_output,
            logits=logits,
            target=target,
            address=dask,
            progress=progress,
        )
    kernels, src, classes, bar = _local_job(source, spec, threads, logits, target, progress, keep)
    denominators = (None, None)
    if spec.opts.reduction == "mean":
        denominators = global_denominators(src, spec, classes, spec.chunk_rows)
    start = time.perf_counter()
    try:
        with sinks.open_sink(output, overwrite=overwrite) as sink:
            sums = write_gradients(
                src.iter_chunks(chunk_rows=spec.chunk_rows),
                sink,
                spec,
                classes,
                kernels,
                denominators,
                grad_output,
                grad_dtype,
                on_chunk=bar.update,
            )
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    wsum = denominators[0] if denominators[0] is not None else 0.0
    loss = api.reduce_loss(
        sums.ce_sum, sums.z_sum, wsum, sums.counted, _metric_reduction(spec.opts)
    )
    metrics = {
        "rows": sums.rows,
        "counted": sums.counted,
        "ignored": sums.rows - sums.counted,
        "classes": classes,
        "loss": loss,
        "seconds": seconds,
        "rows_per_second": sums.rows / seconds if seconds > 0 else None,
        "gb_per_second": sums.nbytes / seconds / 1e9 if seconds > 0 else None,
    }
    return Report(metrics, output=str(output))


def _as_tuple(keep) -> tuple[str, ...]:
    if isinstance(keep, str):
        return tuple(k for k in keep.split(",") if k)
    return tuple(keep or ())


def _is_directory_output(output) -> bool:
    text = str(output)
    return text.endswith(("/", "\\")) or "." not in text.rsplit("/", 1)[-1]


def _empty_stats(soft: bool) -> dict:
    stats = {
        k: np.zeros(0, np.float32) for k in ("loss", "target_logprob", "lse", "max_prob", "entropy")
    }
    stats["argmax"] = np.zeros(0, np.int64)
    stats["target_rank"] = np.zeros(0, np.int64)
    if soft:
        stats["kl"] = np.zeros(0, np.float32)
    return stats
