"""The Dask distributed runner: one task per fragment, exact merge on the client.

`engine.evaluate/score/gradients` come here when given ``dask=ADDRESS``. The client
opens the source (footers only), splits it into fragments (a file, or a run of Parquet
row groups of bounded size, `Source.fragments`) and submits one task per fragment. A task
runs the same per-chunk code as the local runner (`engine.jobs.chunks`) over
`open_fragment(...).iter_chunks()` and returns its partial sums (`MetricState`,
`GradSums`); the client merges them in fragment order, so the report equals a local run's
up to float64 rounding, whatever the number of workers.

`score` and `gradients` write one part per task, ``part-<fragment>.parquet``, through a
temporary name (a retried task replaces its part, never duplicates it); the client
records each finished part, with its metric sums, in ``_manifest.json``
(`sinks.PartsWriter`), so a resumed score job skips the fragments already done and still
reports the whole output.

Addresses: ``local:N`` starts a LocalCluster of N worker processes for the job;
``tcp://HOST:PORT`` (any Dask scheme, or a bare ``HOST:PORT``) connects to a running
scheduler. Data and output paths must be readable (writable) by every worker.

Environment: XENT_DASK_THREADS (threads per local worker, default 1), XENT_DASK_TIMEOUT
(seconds to reach a scheduler, default 10), XENT_DASK_FRAGMENT_ROWS (rows per fragment,
default: sized from the data and the cluster).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass, field, replace

import pyarrow as pa

from engine import api
from engine.atomic import is_temp_name
from engine.errors import XentInputError, XentUsageError
from engine.io import Fragment, Source, open_fragment, sinks
from engine.jobs.chunks import (
    GradSums,
    empty_topk,
    eval_chunk,
    global_denominators,
    probability_warning,
    topk_of,
    write_gradients,
)
from engine.jobs.cluster import (
    connect,
    env_number,
    host_threads,
    parse_address,
    set_task_threads,
)
from engine.jobs.finish import (
    Report,
    gradients_report,
    merge_parts,
    metrics_report,
    recorded_metrics,
)
from engine.jobs.sparse_eval import check_options, eval_sparse_chunk
from engine.jobs.spec import JobSpec, for_source, open_job_source, require_dense
from engine.metrics import MetricState
from engine.progress import make_progress
from engine.schema import empty_row_stats
from engine.sparse_metrics import SparseState

#: Extra attempts of a task that raised (a worker that dies is handled by the scheduler,
#: which reschedules its tasks on the others).
RETRIES = 2
#: Fragment sizing when not given: about this many tasks per worker thread, each between
#: MIN and MAX bytes of logits (a Parquet row group is never split).
TASKS_PER_THREAD = 4
MIN_FRAGMENT_BYTES = 16 * 2**20
MAX_FRAGMENT_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------
# What travels to the workers
# --------------------------------------------------------------------------------------


@dataclass
class _Job:
    """Everything a task needs besides its fragment (plain data, pickled per task)."""

    kind: str  # "eval" | "score" | "grad"
    spec: JobSpec
    classes: int
    soft: bool
    logits: str
    target: str | None
    keep: tuple[str, ...] = ()
    group_by: str | None = None
    read_dtype: str | None = None  # logits_dtype the source was opened with
    keep_schema: pa.Schema | None = None  # for an empty part's columns
    grad_dtype: str = "float32"
    grad_output: float = 1.0
    denominators: tuple = (None, None)
    warn_index: int | None = None  # the fragment with the first rows: checks for probs
    threads: int | None = None  # Numba threads per task; None: cores / busy threads
    host_threads: dict = field(default_factory=dict)  # host -> worker threads there


@dataclass
class _Result:
    """What a task returns: partial sums, never rows."""

    index: int
    rows: int = 0
    nbytes: int = 0
    state: MetricState | None = None  # eval, score
    warning: str | None = None
    grad: GradSums | None = None  # grad
    error: tuple | None = None  # (what, file, row) of an XentInputError


def _task(job: _Job, index: int, fragment: Fragment, part_path: str | None) -> _Result:
    """One fragment on a worker. Input errors come back as values: retrying cannot help."""
    try:
        _set_task_threads(job)
        kernels = api.backend(job.spec.device)
        src = open_fragment(
            fragment,
            logits=job.logits,
            target=job.target,
            keep=job.keep,
            group_by=job.group_by,
            logits_dtype=job.read_dtype,
            sparse=job.spec.sparse,
        )
        if job.kind == "grad":
            return _grad_fragment(job, index, src, kernels, part_path, fragment)
        return _eval_fragment(job, index, src, kernels, part_path, fragment)
    except XentInputError as e:
        return _Result(index, error=(e.what, e.file, e.row))


def _sparse_eval_fragment(job: _Job, index: int, src: Source, fragment) -> _Result:
    """eval over sparse top-k rows (engine.jobs.sparse_eval), one fragment."""
    state = SparseState(top_k=job.spec.top_k)
    for chunk in _chunks(src, job.spec, fragment):
        eval_sparse_chunk(chunk, src, job.spec, state)
    return _Result(index, rows=state.total.rows, nbytes=state.logit_bytes, state=state)


def _chunks(src: Source, spec: JobSpec, fragment: Fragment):
    """The fragment's chunks; read on this thread when it is one chunk (nothing to overlap,
    and starting reader threads would cost more than the read of a small fragment)."""
    chunk_rows = spec.chunk_rows or src.default_chunk_rows()
    readahead = 0 if fragment.rows <= chunk_rows else 2
    return src.iter_chunks(chunk_rows=chunk_rows, readahead=readahead)


def _eval_fragment(job: _Job, index: int, src: Source, kernels, part_path, fragment) -> _Result:
    spec = job.spec
    if src.sparse is not None:
        return _sparse_eval_fragment(job, index, src, fragment)
    state = MetricState(top_k=spec.top_k)
    warning = None
    sink = sinks.Sink(part_path, overwrite=True) if part_path else None
    try:
        for chunk in _chunks(src, spec, fragment):
            if index == job.warn_index and warning is None and state.total.rows == 0:
                warning = probability_warning(chunk, spec)  # as the local runner
            stats = eval_chunk(chunk, spec, job.classes, state, kernels)
            if sink is not None:
                topk = topk_of(chunk, spec, job.classes, kernels)
                sink.write(sinks.score_table(stats, chunk.keep, job.soft, topk))
        if sink is not None:
            if sink.rows == 0:
                topk = empty_topk(spec, job.classes)
                stats = empty_row_stats(job.soft)
                sink.write(sinks.score_table(stats, _empty_keep(job), job.soft, topk))
            sink.commit()
    finally:
        if sink is not None:
            sink.abort()  # no-op after commit
    return _Result(
        index, rows=state.total.rows, nbytes=state.logit_bytes, state=state, warning=warning
    )


def _grad_fragment(job: _Job, index: int, src: Source, kernels, part_path, fragment) -> _Result:
    with sinks.Sink(part_path, overwrite=True) as sink:
        sums = write_gradients(
            _chunks(src, job.spec, fragment),
            sink,
            job.spec,
            job.classes,
            kernels,
            job.denominators,
            job.grad_output,
            job.grad_dtype,
            empty_keep=_empty_keep(job),
        )
    return _Result(index, rows=sums.rows, nbytes=sums.nbytes, grad=sums)


def _empty_keep(job: _Job) -> pa.Table | None:
    if not job.keep or job.keep_schema is None:
        return None
    return job.keep_schema.empty_table()


def _set_task_threads(job: _Job) -> None:
    set_task_threads(job.threads, job.host_threads)


# --------------------------------------------------------------------------------------
# Splitting and running
# --------------------------------------------------------------------------------------


def fragment_rows(src: Source, total_threads: int, override=None) -> int:
    """Rows per fragment: given, from XENT_DASK_FRAGMENT_ROWS, or ~TASKS_PER_THREAD tasks per
    worker thread of MIN..MAX_FRAGMENT_BYTES logits each."""
    if override is None:
        override = env_number("XENT_DASK_FRAGMENT_ROWS", None, int)
    if override is not None:
        if int(override) < 1:
            raise XentUsageError("fragment_rows must be >= 1")
        return int(override)
    row_bytes = src.row_bytes
    rows = src.num_rows
    total = rows * row_bytes if rows is not None else src.bytes
    target = total / (TASKS_PER_THREAD * max(1, total_threads))
    target = min(max(target, MIN_FRAGMENT_BYTES), MAX_FRAGMENT_BYTES)
    return max(1, int(target // row_bytes))


def _absolute(fragments: list[Fragment]) -> tuple[list[Fragment], dict]:
    """Fragments with absolute paths (workers may run elsewhere), and abs -> given path."""
    names = {}
    out = []
    for f in fragments:
        path = f.path if "://" in f.path else os.path.abspath(f.path)  # URIs are global
        names[path] = f.path
        out.append(replace(f, path=path))
    return out, names


def _run(client, job: _Job, items, names: dict, on_done) -> dict[int, _Result]:
    """Submit (index, fragment, part path) items; call on_done(result) as each finishes."""
    from distributed import as_completed

    token = secrets.token_hex(4)
    futures = [
        client.submit(
            _task,
            job,
            index,
            fragment,
            part,
            key=f"xent-{job.kind}-{token}-{index}",
            retries=RETRIES,
            priority=-index,  # input order, roughly: the first parts finish first
        )
        for index, fragment, part in items
    ]
    results: dict[int, _Result] = {}
    try:
        # Results of the tasks that finished together come in one round trip.
        for batch in as_completed(futures, loop=client.loop).batches():
            for result in client.gather(batch):
                if result.error is not None:
                    what, file, row = result.error
                    raise XentInputError(what, file=names.get(file, file), row=row)
                results[result.index] = result
                on_done(result)
    except BaseException:
        client.cancel(futures)
        raise
    return results


def _total_threads(client) -> int:
    return sum(client.nthreads().values()) or 1


def _thread_plan(client, threads) -> dict:
    return {} if threads is not None else host_threads(client)


# --------------------------------------------------------------------------------------
# The jobs (called from engine.jobs with dask=ADDRESS)
# --------------------------------------------------------------------------------------


def evaluate(
    source,
    spec: JobSpec,
    *,
    logits="logits",
    target="target",
    group_by=None,
    address,
    progress=False,
    fragment_rows: int | None = None,
    threads: int | None = None,
) -> Report:
    """`engine.evaluate` on Dask: the same Report (metrics merged exactly)."""
    src = open_job_source(source, spec, logits, target, group_by=group_by)
    read_dtype = spec.opts.logits_dtype
    spec, classes = for_source(src, spec)
    if src.sparse is not None:
        check_options(spec)
    with connect(address) as client:
        frags = src.fragments(_fragment_rows(src, client, fragment_rows))
        frags, names = _absolute(frags)
        job = _Job(
            "eval",
            spec,
            classes,
            src.soft_targets,
            logits,
            target,
            group_by=group_by,
            read_dtype=read_dtype,
            warn_index=next((i for i, f in enumerate(frags) if f.rows), None),
            threads=threads,
            host_threads=_thread_plan(client, threads),
        )
        bar = make_progress(progress, src)
        start = time.perf_counter()
        try:
            results = _run(
                client,
                job,
                [(i, f, None) for i, f in enumerate(frags)],
                names,
                lambda r: bar.update(r.rows, r.nbytes),
            )
        finally:
            bar.close()
        seconds = time.perf_counter() - start
    state = (SparseState if src.sparse is not None else MetricState)(top_k=spec.top_k)
    for i in range(len(frags)):  # fragment order: the same sums in the same order each run
        state.merge(results[i].state)
    first = results.get(job.warn_index)  # only the first rows are checked, as locally
    warnings = [first.warning] if first is not None and first.warning else []
    metrics = metrics_report(state, spec, classes, src.soft_targets, seconds)
    if src.sparse is not None:
        metrics["topk"] = src.row_width
        metrics["normalised_over"] = src.sparse.normalised_over
    return Report(metrics, warnings)


def score(
    source,
    output,
    spec: JobSpec,
    *,
    keep=(),
    overwrite=False,
    resume=False,
    logits="logits",
    target="target",
    address,
    progress=False,
    fragment_rows: int | None = None,
    threads: int | None = None,
) -> Report:
    """`engine.score` on Dask: `output` is a directory of parts plus ``_manifest.json``."""
    src, job = _output_job("score", source, spec, logits, target, keep, threads)
    spec, classes = job.spec, job.classes
    parts: dict[int, _Result] = {}
    seconds, _, recorded = _write_parts(
        src, output, job, address, overwrite, resume, progress, fragment_rows, parts
    )
    states = {i: r.state for i, r in parts.items()} | recorded
    state, warning = merge_parts(states, spec, directory=str(output))
    metrics = metrics_report(state, spec, classes, src.soft_targets, seconds)
    return Report(metrics, [warning] if warning else [], output=str(output))


def gradients(
    source,
    output,
    spec: JobSpec,
    *,
    keep=(),
    overwrite=False,
    grad_dtype="float32",
    grad_output=1.0,
    logits="logits",
    target="target",
    address,
    progress=False,
    fragment_rows: int | None = None,
    threads: int | None = None,
) -> Report:
    """`engine.gradients` on Dask: `output` is a directory of ``grad`` parts."""
    src, job = _output_job("grad", source, spec, logits, target, keep, threads)
    spec, classes = job.spec, job.classes
    denominators = (None, None)
    if spec.opts.reduction == "mean":  # global: one pass over the target column, here
        denominators = global_denominators(src, spec, classes)
    job = replace(job, grad_dtype=grad_dtype, grad_output=grad_output, denominators=denominators)
    parts: dict[int, _Result] = {}
    seconds, _, _ = _write_parts(
        src, output, job, address, overwrite, False, progress, fragment_rows, parts
    )
    sums = GradSums()
    for i in sorted(parts):  # fragment order
        sums.merge(parts[i].grad)
    metrics = gradients_report(sums, spec, classes, denominators, seconds)
    return Report(metrics, output=str(output))


def _output_job(kind, source, spec: JobSpec, logits, target, keep, threads):
    """(source, job) of a score or grad job: the source opened on the client (footers
    only), the spec as the source needs it, the keep columns' schema for empty parts."""
    src = open_job_source(source, spec, logits, target, keep=keep)
    require_dense(src, kind)
    read_dtype = spec.opts.logits_dtype  # as asked: workers open their fragments the same way
    spec, classes = for_source(src, spec)
    job = _Job(
        kind,
        spec,
        classes,
        src.soft_targets,
        logits,
        target,
        keep=keep,
        read_dtype=read_dtype,
        keep_schema=_keep_schema(src, keep),
        threads=threads,
    )
    return src, job


def _keep_schema(src: Source, keep) -> pa.Schema | None:
    if not keep:
        return None
    return pa.schema([src.schema.field(k) for k in keep])


def _fragment_rows(src: Source, client, override) -> int:
    return fragment_rows(src, _total_threads(client), override)


def _write_parts(src, output, job, address, overwrite, resume, progress, frag_rows, results):
    """Run `job` writing one part per fragment into directory `output`, collecting each
    task's result in `results` (index -> _Result); returns (seconds, total rows, the
    metric sums recorded with the parts a resumed job skipped)."""
    directory = os.path.abspath(os.fspath(output))
    suffix = ".arrow" if sinks.output_format(directory) == "arrow" else ".parquet"
    created = not os.path.exists(directory)
    # Refuse an existing output (or a file in the way) before reaching for a cluster.
    writer = sinks.PartsWriter(directory, overwrite=overwrite, resume=resume, suffix=suffix)
    started = False
    try:
        with connect(address) as client:
            job.host_threads = _thread_plan(client, job.threads)
            recorded = writer.manifest.get("fragment_rows") if resume else None
            rows = recorded if isinstance(recorded, int) and recorded > 0 else None
            if rows is None:
                rows = _fragment_rows(src, client, frag_rows)
            frags, names = _absolute(src.fragments(rows))
            writer.manifest["fragment_rows"] = rows  # a resume must split the same way
            done = _check_resumable(writer, frags, directory) if resume else {}
            recorded = {i: recorded_metrics(writer, i) for i in done}
            bar = make_progress(progress, src)
            for i in sorted(done):
                bar.update(frags[i].rows, 0)
            items = [(i, f, writer.part_path(i)) for i, f in enumerate(frags) if i not in done]

            def finished(r: _Result) -> None:
                metrics = r.state.to_dict() if r.state is not None else None
                writer.record(r.index, r.rows, frags[r.index].first_row, metrics=metrics)
                results[r.index] = r
                bar.update(r.rows, r.nbytes)

            start = time.perf_counter()
            started = True
            try:
                _run(client, job, items, names, finished)
            finally:
                bar.close()
            seconds = time.perf_counter() - start
    except BaseException:
        if created and not started:
            _remove_if_empty(directory)
        raise
    _remove_stale_temps(directory)
    total = sum(f.rows for f in frags)
    writer.finalize(src.num_rows if src.num_rows is not None else total)
    return seconds, total, recorded


def _check_resumable(writer: sinks.PartsWriter, frags: list[Fragment], directory: str) -> dict:
    """The finished parts, after checking they cover the same rows as these fragments."""
    done = writer.completed()
    listed = writer.manifest["parts"]
    for i, rows in done.items():
        first = listed[str(i)].get("first_row")
        if i >= len(frags) or rows != frags[i].rows or first != frags[i].first_row:
            raise XentInputError(
                "cannot resume: its parts split the input differently (written by another "
                "job or another --dask fragment size); use --overwrite",
                file=directory,
            )
    return done


def _remove_stale_temps(directory: str) -> None:
    """Temporary part files of attempts that died with their worker (every part is done)."""
    for name in os.listdir(directory):
        if name.startswith(".part-") and is_temp_name(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _remove_if_empty(directory: str) -> None:
    try:
        names = os.listdir(directory)
        if all(n == sinks.MANIFEST for n in names):
            for n in names:
                os.unlink(os.path.join(directory, n))
            os.rmdir(directory)
    except OSError:
        pass


__all__ = ["connect", "evaluate", "fragment_rows", "gradients", "parse_address", "score"]
