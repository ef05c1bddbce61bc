"""The work on one chunk, shared by the local and the Dask runners.

A chunk's targets are validated (errors name the file and row), the kernels run on it,
and its rows are folded into mergeable sums (`MetricState`, `GradSums`) or written out.
Nothing here knows whether it runs in the user's process or on a Dask worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine import api, dtypes
from engine.errors import TargetOutOfRange, XentInputError
from engine.inspection import looks_like_probabilities
from engine.io import Chunk, Source, sinks
from engine.jobs.spec import JobSpec
from engine.metrics import MetricState


def chunk_targets(chunk: Chunk, spec: JobSpec, classes: int, compute) -> api.Targets:
    """A chunk's validated targets (errors name file and row)."""
    if chunk.target is None:
        raise XentInputError("no target column", file=chunk.file)
    try:
        return api.prepare_targets(
            chunk.target, chunk.num_rows, classes, spec.opts, compute, valid=chunk.target_valid
        )
    except TargetOutOfRange as err:
        raise XentInputError(
            f"target {err.value} is out of range for {classes} classes",
            file=chunk.file,
            row=chunk.file_row + err.row,
        ) from None


def chunk_problem(chunk: Chunk, spec: JobSpec, classes: int):
    """Validate a chunk's targets and build the kernel Problem (errors name file and row)."""
    x = chunk.logits
    compute = dtypes.compute_dtype(dtypes.storage_kind(x.dtype, spec.opts.logits_dtype))
    targets = chunk_targets(chunk, spec, classes, compute)
    return targets, api.make_problem(x, targets, spec.opts)


def nan_rows(chunk: Chunk, lse: np.ndarray, spec: JobSpec) -> np.ndarray:
    """Rows to drop for NaN or +inf logits (their lse is NaN); raise under policy 'error'."""
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


def group_masks(group: pa.Array | None):
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
    bad = nan_rows(chunk, stats["lse"], spec)
    counted = targets.counted & ~bad
    weights = _row_weights(targets, spec, classes)
    soft = targets.t is not None
    z = spec.opts.z_loss
    state.total.add(stats, counted, weights, z, soft, nan_rows=int(bad.sum()))
    for key, mask in group_masks(chunk.group):
        sub = {k: v[mask] for k, v in stats.items()}
        state.group(key).add(sub, counted[mask], weights[mask], z, soft, int(bad[mask].sum()))
    state.logit_bytes += chunk.logits.nbytes
    return stats


def topk_of(chunk: Chunk, spec: JobSpec, classes: int, kernels):
    """``--emit-topk``: the chunk's topk columns for sinks.score_table, or None."""
    if not spec.emit_topk:
        return None
    problem = api.logits_problem(chunk.logits, spec.opts)
    indices, logprobs, _ = kernels.topk(problem, spec.emit_topk)
    return sinks.topk_columns(indices, logprobs, classes)


def empty_topk(spec: JobSpec, classes: int):
    """The topk columns of no rows (an empty input still gets every output column)."""
    if not spec.emit_topk:
        return None
    k = spec.emit_topk
    return sinks.topk_columns(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), classes)


def probability_warning(chunk: Chunk, spec: JobSpec) -> str | None:
    """Rows that look like softmax outputs while treated as logits (the seeds' mistake)."""
    if spec.opts.input_kind != "logits" or chunk.num_rows == 0:
        return None
    sample = dtypes.decode(np.asarray(chunk.logits[:256]), spec.opts.logits_dtype)
    if looks_like_probabilities(sample):
        return (
            f"{chunk.file}: the logits look like probabilities (each row in [0, 1], summing "
            "to 1). Cross-entropy applies softmax to its input; if these are softmax "
            "outputs, use --input-kind probs (input_kind='probs')."
        )
    return None


# -- gradients ----------------------------------------------------------------------------


def global_denominators(src: Source, spec: JobSpec, classes: int):
    """(Σ m·w[y], Σ m) over the whole source from the target column alone (mean gradients)."""
    weight_sum = 0.0
    counted = 0
    w = spec.opts.weight_for(classes)
    for target, valid in src.iter_targets(chunk_rows=spec.chunk_rows):
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
            nan_rows(chunk, np.where(bad, np.nan, 0.0), spec)
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

    def merge(self, other: GradSums) -> GradSums:
        self.ce_sum += other.ce_sum
        self.z_sum += other.z_sum
        self.rows += other.rows
        self.counted += other.counted
        self.nbytes += other.nbytes
        return self


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
    """The per-chunk loop of a gradients job: compute, write, add up."""
    sums = GradSums()
    buffer = None
    for chunk in chunks:
        targets, loss, lse, grad = grad_chunk(
            chunk, spec, classes, kernels, denominators, grad_output, buffer
        )
        buffer = grad if buffer is None or grad.shape[0] > buffer.shape[0] else buffer
        sink.write(sinks.grad_table(grad, chunk.keep, grad_dtype))  # serialised: reusable
        part_ce, part_z = api.split_z(loss, lse, targets, spec.opts)
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
