"""`eval` over sparse top-k rows (SPEC §8): per chunk, the rows' checks (errors name file,
row and class) and the exact values and bounds folded into SparseState."""

from __future__ import annotations

import time

import numpy as np

from engine.errors import XentInputError, XentUsageError
from engine.io import Chunk, Source
from engine.jobs.chunks import chunk_targets, group_masks
from engine.jobs.finish import Report, metrics_report
from engine.jobs.spec import JobSpec
from engine.kernels.cpu.sparse import (
    BAD_INDEX,
    BAD_VALUE,
    DUPLICATE_INDEX,
    I_BAD_COLUMN,
    I_STATUS,
    sparse_rows,
)
from engine.progress import make_progress
from engine.sparse_metrics import SparseState


def check_options(spec: JobSpec) -> None:
    """Loss options that need every class's value have no meaning for top-k rows."""
    o = spec.opts
    refused = [
        name
        for name, on in (
            ("--label-smoothing", o.label_smoothing != 0.0),
            ("--z-loss", o.z_loss != 0.0),
            ("--softcap", o.softcap is not None),
            ("--weight", o.weight is not None),
            ("--input-kind", o.input_kind != "logits"),
        )
        if on
    ]
    if refused:
        raise XentUsageError(
            f"{', '.join(refused)} cannot apply to sparse top-k rows (they need every "
            "class's value); the values' meaning is set by --topk-kind"
        )


def sparse_values(chunk: Chunk, src: Source, nan_policy: str, y: np.ndarray, side: str = ""):
    """(f, ii, bad): the kernel's per-row values and the rows to drop for NaN values;
    malformed rows (class out of range, a class twice) are always errors."""
    sp = src.sparse
    f, ii = sparse_rows(
        chunk.logits, src.storage, chunk.indices, y, chunk.lse, sp.value_mode, sp.classes
    )
    status = ii[I_STATUS]
    broken = np.flatnonzero((status == BAD_INDEX) | (status == DUPLICATE_INDEX))
    if broken.size:
        i = int(broken[0])
        j = int(ii[I_BAD_COLUMN, i])
        cls = int(chunk.indices[i, j])
        what = (
            f"class {cls} in '{sp.indices}' is out of range for {sp.classes} classes"
            if status[i] == BAD_INDEX
            else f"class {cls} appears twice in '{sp.indices}'"
        )
        raise XentInputError(side + what, file=chunk.file, row=chunk.file_row + i)
    bad = status == BAD_VALUE
    if nan_policy == "error" and bad.any():
        i = int(np.argmax(bad))
        raise XentInputError(
            f"{side}NaN or +inf in '{sp.values}'{' or ' + repr(sp.lse) if sp.lse else ''} "
            "(use --nan-policy skip or propagate)",
            file=chunk.file,
            row=chunk.file_row + i,
        )
    return f, ii, (bad if nan_policy == "skip" else np.zeros_like(bad))


def eval_sparse_chunk(chunk: Chunk, src: Source, spec: JobSpec, state: SparseState):
    classes = src.sparse.classes
    targets = chunk_targets(chunk, spec, classes, np.float64)
    f, ii, bad = sparse_values(chunk, src, spec.nan_policy, targets.y)  # y: -1 where not counted
    counted = targets.counted & ~bad
    k = chunk.logits.shape[1]
    state.total.add_rows(f, ii, counted, int(bad.sum()), k)
    for key, mask in group_masks(chunk.group):
        state.group(key).add_rows(f[:, mask], ii[:, mask], counted[mask], int(bad[mask].sum()), k)
    state.logit_bytes += chunk.logits.nbytes + chunk.indices.nbytes
    return f, ii


def evaluate(src: Source, spec: JobSpec, progress) -> Report:
    """The eval job of a sparse source (engine.jobs.local.evaluate hands it over)."""
    check_options(spec)
    bar = make_progress(progress, src)
    state = SparseState(top_k=spec.top_k)
    start = time.perf_counter()
    try:
        for chunk in src.iter_chunks(chunk_rows=spec.chunk_rows):
            eval_sparse_chunk(chunk, src, spec, state)
            bar.update(chunk.num_rows, chunk.logits.nbytes + chunk.indices.nbytes)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    metrics = metrics_report(state, spec, src.sparse.classes, False, seconds)
    metrics["topk"] = src.row_width
    metrics["normalised_over"] = src.sparse.normalised_over
    return Report(metrics)
