"""`compare` on Dask distributed: one task per row range, exact merge on the client.

The base's fragments (`Source.fragments`: a file, or a run of Parquet row groups) set the
row ranges. A task opens its base fragment and the candidate fragments that overlap its
range (the two sides' files and row groups need not line up), trims the candidate's chunks
to the range, and runs the local runner's per-chunk work (`comparison.compare_chunk`)
over the pairs. Tasks return mergeable `CompareState` sums, merged in range order, so the
report equals a local run's (the percentiles exactly, the means up to float64 rounding).
The per-row output (-o) is not written on Dask yet.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field, replace

from engine.compare_metrics import CompareState
from engine.errors import XentInputError, XentUsageError
from engine.io import Fragment, open_fragment
from engine.io.pairs import pair_streams, rows_between
from engine.jobs import sparse_comparison
from engine.jobs.cluster import connect, env_number, host_threads, set_task_threads
from engine.jobs.comparison import CompareSpec, Sides, compare_chunk, open_sides
from engine.jobs.finish import Report
from engine.progress import make_progress

RETRIES = 2
#: Rows per task when not given: about this many bytes of both sides' logits.
TASK_BYTES = 128 * 2**20


@dataclass
class _Task:
    """Everything a task needs (plain data, pickled per task)."""

    spec: CompareSpec
    classes: int
    target: str | None
    candidate_target: bool
    logits: str
    candidate_logits: str
    group_by: str | None
    base: Fragment
    candidates: tuple[Fragment, ...]
    threads: int | None
    host_threads: dict = field(default_factory=dict)  # host -> Dask worker threads there
    sparse: tuple = (None, None)  # the SparseRequest each side was opened with


def _run_task(task: _Task):
    """(CompareState, rows, bytes) of one row range, or an input error as a value."""
    try:
        set_task_threads(task.threads, task.host_threads)
        from engine.kernels import cpu as kernels

        spec = task.spec
        base = open_fragment(
            task.base, logits=task.logits, target=task.target, keep=spec.on,
            group_by=task.group_by, logits_dtype=spec.logits_dtype, sparse=task.sparse[0],
        )  # fmt: skip
        opened = [
            open_fragment(
                f,
                logits=task.candidate_logits,
                target=task.target if task.candidate_target else None,
                keep=spec.on,
                logits_dtype=spec.logits_dtype,
                sparse=task.sparse[1],
            )  # fmt: skip
            for f in task.candidates
        ]
        chunk_rows = spec.chunk_rows or base.default_chunk_rows()
        start, stop = task.base.first_row, task.base.first_row + task.base.rows
        cand_chunks = (c for src in opened for c in src.iter_chunks(chunk_rows=chunk_rows))
        sides = Sides(base, opened[0] if opened else base, task.classes, task.target,
                      task.candidate_target)  # fmt: skip
        state = CompareState(top_k=spec.top_k)
        rows = 0
        pairs = pair_streams(
            base.iter_chunks(chunk_rows=chunk_rows),
            rows_between(cand_chunks, start, stop),
            task.base.path,
            task.candidates[0].path if task.candidates else "(candidate)",
        )
        for a, b in pairs:
            compare_chunk(a, b, sides, spec, kernels, state)
            rows += a.num_rows
        return state, rows, state.logit_bytes, None
    except XentInputError as e:
        return None, 0, 0, (e.what, e.file, e.row)


def _absolute(f: Fragment) -> Fragment:
    return f if "://" in f.path else replace(f, path=os.path.abspath(f.path))


def _overlapping(frags: list[Fragment], start: int, stop: int) -> tuple[Fragment, ...]:
    return tuple(f for f in frags if f.first_row < stop and f.first_row + f.rows > start)


def compare(base, candidate, spec: CompareSpec, *, logits, candidate_logits, target, group_by,
            output, keep, overwrite, address, progress, threads=None) -> Report:  # fmt: skip
    """`engine.compare` on Dask: the same report as a local run."""
    if output is not None:
        raise XentUsageError("compare on Dask does not write -o rows yet: drop -o or --dask")
    sides: Sides = open_sides(
        base, candidate, spec, logits=logits, candidate_logits=candidate_logits,
        target=target, keep=(), group_by=group_by,
    )  # fmt: skip
    row_bytes = sides.classes * (
        sides.base.logits_dtype_numpy.itemsize + sides.candidate.logits_dtype_numpy.itemsize
    )
    per_task = env_number("XENT_DASK_FRAGMENT_ROWS", None, int) or max(1, TASK_BYTES // row_bytes)
    base_frags = [_absolute(f) for f in sides.base.fragments(per_task)]
    cand_frags = [_absolute(f) for f in sides.candidate.fragments(per_task)]
    a_rows = sum(f.rows for f in base_frags)
    b_rows = sum(f.rows for f in cand_frags)
    if a_rows != b_rows:  # (streams: counted by the fragments above)
        raise XentInputError(
            f"the two sources have different row counts: {sides.base.files[0].path} has "
            f"{a_rows}, {sides.candidate.files[0].path} has {b_rows}; compare pairs rows by "
            "position",
            file=sides.candidate.files[0].path,
        )
    tasks = [
        _Task(
            spec,
            sides.classes,
            sides.target,
            sides.candidate_target,
            logits,
            candidate_logits or logits,
            group_by,
            f,
            _overlapping(cand_frags, f.first_row, f.first_row + f.rows),
            threads,
            sparse=(
                spec.sparse if sides.base.sparse is not None else None,
                spec.sparse if sides.candidate.sparse is not None else None,
            ),
        )  # fmt: skip
        for f in base_frags
        if f.rows
    ]
    from distributed import as_completed

    bar = make_progress(progress, sides.base)
    start = time.perf_counter()
    results: dict[int, CompareState] = {}
    with connect(address) as client:
        plan = {} if threads is not None else host_threads(client)
        for t in tasks:
            t.host_threads = plan
        token = secrets.token_hex(4)
        futures = {
            client.submit(
                _run_task, t, key=f"xent-compare-{token}-{i}", retries=RETRIES, priority=-i
            ): i  # fmt: skip
            for i, t in enumerate(tasks)
        }
        try:
            for fut in as_completed(list(futures), loop=client.loop):
                state, rows, nbytes, error = client.gather(fut)
                if error is not None:
                    what, file, row = error
                    raise XentInputError(what, file=file, row=row)
                results[futures[fut]] = state
                bar.update(rows, nbytes)
        except BaseException:
            client.cancel(list(futures))
            raise
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    state = CompareState(top_k=spec.top_k)
    for i in range(len(tasks)):  # range order: the same sums in the same order each run
        state.merge(results[i])
    metrics = state.report(
        classes=sides.classes, temperature=spec.temperature,
        with_target=sides.with_target, seconds=seconds,
    )  # fmt: skip
    warnings = []
    if sides.sparse:
        metrics = sparse_comparison.finish_report(metrics, sides)
        warnings = [sparse_comparison.TARGET_WARNING] if sides.target else []
    return Report(metrics, warnings)
