"""The single-machine runner: chunks decoded ahead on reader threads while the GIL-free
kernels run on this one, so both stay busy; memory is bounded by chunk size times
read-ahead."""

from __future__ import annotations

import time

from engine import api
from engine.io import Source, sinks
from engine.jobs.chunks import (
    empty_topk,
    eval_chunk,
    global_denominators,
    probability_warning,
    topk_of,
    write_gradients,
)
from engine.jobs.finish import (
    Report,
    gradients_report,
    merge_parts,
    metrics_report,
    recorded_metrics,
)
from engine.jobs.spec import (
    JobSpec,
    for_source,
    is_directory_output,
    open_job_source,
    require_dense,
)
from engine.metrics import MetricState
from engine.progress import make_progress
from engine.schema import empty_row_stats
from engine.threads import set_threads


def _setup(source, spec: JobSpec, n_threads, logits, target, keep=(), group_by=None):
    """What every local job does first: threads, kernels, the source and its classes."""
    set_threads(n_threads or None)  # 0 / None: keep the current setting
    kernels = api.backend(spec.device)
    src = open_job_source(source, spec, logits, target, keep=keep, group_by=group_by)
    spec, classes = for_source(src, spec)
    return spec, kernels, src, classes


def evaluate(source, spec: JobSpec, *, logits, target, group_by, progress, threads) -> Report:
    spec, kernels, src, classes = _setup(source, spec, threads, logits, target, group_by=group_by)
    if src.sparse is not None:
        from engine.jobs import sparse_eval

        return sparse_eval.evaluate(src, spec, progress)
    bar = make_progress(progress, src)
    state = MetricState(top_k=spec.top_k)
    warnings: list[str] = []
    start = time.perf_counter()
    try:
        for chunk in src.iter_chunks(chunk_rows=spec.chunk_rows):
            if not warnings and state.total.rows == 0:
                w = probability_warning(chunk, spec)
                if w:
                    warnings.append(w)
            eval_chunk(chunk, spec, classes, state, kernels)
            bar.update(chunk.num_rows, chunk.logits.nbytes)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return Report(metrics_report(state, spec, classes, src.soft_targets, seconds), warnings)


def score(
    source, output, spec: JobSpec, *, keep, overwrite, resume, logits, target, progress, threads
) -> Report:
    spec, kernels, src, classes = _setup(source, spec, threads, logits, target, keep)
    require_dense(src, "score")
    bar = make_progress(progress, src)
    start = time.perf_counter()
    warnings: list[str] = []
    try:
        if resume or is_directory_output(output):
            state, warning = _score_parts(
                src, output, spec, classes, kernels, bar, overwrite, resume
            )
            warnings += [warning] if warning else []
        else:
            state = _score_file(src, output, spec, classes, kernels, bar, overwrite)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    metrics = metrics_report(state, spec, classes, src.soft_targets, seconds)
    return Report(metrics, warnings, output=str(output))


def _score_file(src: Source, output, spec, classes, kernels, bar, overwrite) -> MetricState:
    state = MetricState(top_k=spec.top_k)
    soft = src.soft_targets
    with sinks.open_sink(output, overwrite=overwrite) as sink:
        for chunk in src.iter_chunks(chunk_rows=spec.chunk_rows):
            stats = eval_chunk(chunk, spec, classes, state, kernels)
            topk = topk_of(chunk, spec, classes, kernels)
            sink.write(sinks.score_table(stats, chunk.keep, soft, topk))
            bar.update(chunk.num_rows, chunk.logits.nbytes)
        if state.total.rows == 0:
            empty = empty_topk(spec, classes)
            sink.write(sinks.score_table(empty_row_stats(soft), None, soft, empty))
    return state


def _score_parts(src: Source, output, spec, classes, kernels, bar, overwrite, resume):
    """A directory of parts, one per chunk; each part's metric sums go into the manifest
    with it, so a resumed job reports the whole output, not just the parts it computed."""
    soft = src.soft_targets
    writer = sinks.PartsWriter(str(output), overwrite=overwrite, resume=resume)
    done = writer.completed()
    parts: dict[int, MetricState] = {}
    rows = 0
    for index, chunk in enumerate(src.iter_chunks(chunk_rows=spec.chunk_rows)):
        rows += chunk.num_rows
        if index in done:
            parts[index] = recorded_metrics(writer, index)
        else:
            part = MetricState(top_k=spec.top_k)
            stats = eval_chunk(chunk, spec, classes, part, kernels)
            topk = topk_of(chunk, spec, classes, kernels)
            table = sinks.score_table(stats, chunk.keep, soft, topk)
            writer.write_part(index, table, first_row=chunk.row, metrics=part.to_dict())
            parts[index] = part
        bar.update(chunk.num_rows, chunk.logits.nbytes)
    writer.finalize(src.num_rows if src.num_rows is not None else rows)
    return merge_parts(parts, spec, directory=str(output))


def gradients(
    source, output, spec: JobSpec, *, keep, overwrite, grad_dtype, grad_output, logits, target,
    progress, threads,
) -> Report:  # fmt: skip
    spec, kernels, src, classes = _setup(source, spec, threads, logits, target, keep)
    require_dense(src, "grad")
    bar = make_progress(progress, src)
    denominators = (None, None)
    if spec.opts.reduction == "mean":  # global: one cheap pass over the target column first
        denominators = global_denominators(src, spec, classes)
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
    return Report(gradients_report(sums, spec, classes, denominators, seconds), output=str(output))
