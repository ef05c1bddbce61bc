"""The jobs over datasets: evaluate (metrics), score (a row per row), gradients, and
compare (two models over the same rows).

The front door builds one validated `JobSpec` from the keyword arguments and hands it to a
runner: `local` (this process) or `dask` (one task per fragment on Dask distributed). Both
runners share the per-chunk work (`chunks`) and the reports (`finish`), so a job gives the
same numbers wherever it runs.
"""

from __future__ import annotations

import dataclasses

from engine.errors import XentUsageError
from engine.io.sinks import GRAD_DTYPES
from engine.jobs import local
from engine.jobs.finish import Report
from engine.jobs.spec import JobSpec, keep_tuple, make_spec

__all__ = ["JobSpec", "Report", "compare", "evaluate", "gradients", "score"]


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
    """Exact streaming metrics (loss, nll, perplexity, accuracy, ...) over any size of data."""
    spec = make_spec(top_k, chunk_rows, device, nan_policy, loss_options)
    if dask:
        from engine.jobs import dask as runner

        return runner.evaluate(
            source,
            spec,
            logits=logits,
            target=target,
            group_by=group_by,
            address=dask,
            progress=progress,
        )
    return local.evaluate(
        source,
        spec,
        logits=logits,
        target=target,
        group_by=group_by,
        progress=progress,
        threads=threads,
    )


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
    emit_topk=None,
    **loss_options,
) -> Report:
    """One output row per input row (the per-row stats plus keep columns); metrics as
    `evaluate`.

    ``output`` ending in .parquet/.arrow is one file written under a temporary name and
    renamed when complete. A directory output (or ``resume=True``) is written as parts with
    a manifest, and a resumed job skips the parts already written.
    ``emit_topk=K`` adds each row's top K classes and their log-probs (topk_indices,
    topk_logprobs: a sparse top-k file that eval and compare read, SPEC §8).
    """
    spec = make_spec(top_k, chunk_rows, device, nan_policy, loss_options)
    if emit_topk:
        spec = dataclasses.replace(spec, emit_topk=int(emit_topk))
    keep = keep_tuple(keep)
    if dask:
        from engine.jobs import dask as runner

        return runner.score(
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
    return local.score(
        source,
        output,
        spec,
        keep=keep,
        overwrite=overwrite,
        resume=resume,
        logits=logits,
        target=target,
        progress=progress,
        threads=threads,
    )


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
    if grad_dtype not in GRAD_DTYPES:
        raise XentUsageError("grad_dtype must be float32 or float16")
    spec = make_spec((1,), chunk_rows, device, nan_policy, loss_options)
    keep = keep_tuple(keep)
    runner_kwargs = dict(
        keep=keep,
        overwrite=overwrite,
        grad_dtype=grad_dtype,
        grad_output=grad_output,
        logits=logits,
        target=target,
        progress=progress,
    )
    if dask:
        from engine.jobs import dask as runner

        return runner.gradients(source, output, spec, address=dask, **runner_kwargs)
    return local.gradients(source, output, spec, threads=threads, **runner_kwargs)


def compare(
    base,
    candidate,
    *,
    logits="logits",
    candidate_logits=None,
    target="target",
    on=None,
    vocab=None,
    temperature=1.0,
    top_k=(5, 10),
    group_by=None,
    output=None,
    keep=(),
    overwrite=False,
    nan_policy="error",
    logits_dtype=None,
    chunk_rows=None,
    device="auto",
    dask=None,
    progress=False,
    threads=None,
    **sparse,
) -> Report:
    """Two models' logits over the same rows: KL both ways, JSD, TVD, top-k agreement and,
    with a target, each model's NLL and their ratio (SPEC §7). ``output`` writes the
    per-row values (one row per input row, ``keep`` columns from ``base``).
    ``topk_indices``, ``topk_values``, ``classes``, ``topk_kind``, ``lse``: how a side
    without the logits column stores sparse top-k rows (SPEC §8)."""
    from engine.jobs import comparison as job
    from engine.jobs.spec import SPARSE_ARGUMENTS, sparse_request

    unknown = set(sparse) - set(SPARSE_ARGUMENTS)
    if unknown:
        raise TypeError(f"compare() got an unexpected keyword argument {sorted(unknown)[0]!r}")

    spec = job.CompareSpec(
        temperature=temperature,
        top_k=tuple(top_k),
        vocab=vocab,
        on=keep_tuple(on),
        nan_policy=nan_policy,
        logits_dtype=logits_dtype,
        chunk_rows=chunk_rows,
        sparse=sparse_request(dict(sparse)),
    )
    if dask:
        from engine.jobs import dask_comparison as runner

        return runner.compare(
            base, candidate, spec, logits=logits, candidate_logits=candidate_logits,
            target=target, group_by=group_by, output=output, keep=keep, overwrite=overwrite,
            address=dask, progress=progress, threads=threads,
        )  # fmt: skip
    return job.run(
        base, candidate, spec, logits=logits, candidate_logits=candidate_logits, target=target,
        group_by=group_by, output=output, keep=keep, overwrite=overwrite, device=device,
        progress=progress, threads=threads,
    )  # fmt: skip
