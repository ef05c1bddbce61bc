"""`compare`: two models' logits over the same rows, read in lockstep (SPEC §7).

Per chunk pair: check the pairing (--on keys, targets), run the fused compare kernel, fold
the per-row values into mergeable sums (engine.compare_metrics), and optionally write
them out. The per-chunk work (`compare_chunk`) is shared with the Dask runner.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import api, dtypes
from engine.compare_metrics import CompareState
from engine.errors import XentInputError, XentUsageError
from engine.io import Chunk, Source, open_sink, open_source
from engine.io.formats import open_reader
from engine.io.layouts import SparseRequest
from engine.io.pairs import paired_chunks
from engine.io.paths import expand_paths
from engine.io.records import DEFAULT_CHUNK_BYTES
from engine.jobs import sparse_comparison
from engine.jobs.chunks import group_masks
from engine.jobs.finish import Report
from engine.jobs.spec import NAN_POLICIES, keep_tuple
from engine.progress import make_progress
from engine.threads import set_threads

IGNORE_INDEX = -100  # as eval's default: such rows (and null targets) are ignored


@dataclass(frozen=True)
class CompareSpec:
    """The validated options of a comparison (plain data: shipped to Dask workers)."""

    temperature: float = 1.0
    top_k: tuple[int, ...] = (5, 10)
    vocab: int | None = None
    on: tuple[str, ...] = ()
    nan_policy: str = "error"
    logits_dtype: str | None = None
    chunk_rows: int | None = None
    sparse: SparseRequest | None = None  # how a side without the logits column stores top-k

    def __post_init__(self):
        t = float(self.temperature)
        if not (math.isfinite(t) and t > 0):
            raise XentUsageError(f"temperature must be a positive number, got {self.temperature}")
        object.__setattr__(self, "temperature", t)
        top_k = tuple(sorted({int(k) for k in self.top_k}))
        if any(k < 1 for k in top_k):
            raise XentUsageError("top_k values must be >= 1")
        object.__setattr__(self, "top_k", top_k)
        if self.vocab is not None and int(self.vocab) < 1:
            raise XentUsageError(f"vocab must be >= 1, got {self.vocab}")
        if self.nan_policy not in NAN_POLICIES:
            raise XentUsageError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}")


@dataclass
class Sides:
    """The two opened sources and what was learned from them."""

    base: Source
    candidate: Source
    classes: int
    target: str | None  # the target column (read from the base), or None
    candidate_target: bool  # the candidate holds the same column: checked equal

    @property
    def sparse(self) -> bool:
        """A side holds top-k rows (SPEC §8): engine.jobs.sparse_comparison does the rows."""
        return self.base.sparse is not None or self.candidate.sparse is not None

    @property
    def with_target(self) -> bool:
        """Per-target statistics: a target column, and every class on both sides."""
        return self.target is not None and not self.sparse


def open_sides(base, candidate, spec: CompareSpec, *, logits, candidate_logits, target,
               keep, group_by) -> Sides:  # fmt: skip
    """Open both sides, find the target and check classes and row counts."""
    cand_logits = candidate_logits or logits
    base_sparse = _sparse_request(base, logits, spec.sparse)
    cand_sparse = _sparse_request(candidate, cand_logits, spec.sparse)
    probe = open_source(
        base, logits=logits, target=None, logits_dtype=spec.logits_dtype, sparse=base_sparse
    )
    if target is not None and target not in probe.schema.names:
        if target != "target":  # asked for by name: it must be there
            raise XentInputError(
                f"no target column {target!r} (columns: {', '.join(probe.schema.names)})",
                file=probe.files[0].path,
            )
        target = None  # the default name, absent: a comparison without targets
    base_src = open_source(
        base,
        logits=logits,
        target=target,
        keep=tuple(dict.fromkeys(keep + spec.on)),
        group_by=group_by,
        logits_dtype=spec.logits_dtype,
        sparse=base_sparse,
    )
    if base_src.soft_targets:
        raise XentInputError(
            "compare takes class-index targets; this target column holds probabilities",
            file=base_src.files[0].path,
        )
    probe = open_source(
        candidate, logits=cand_logits, target=None, logits_dtype=spec.logits_dtype,
        sparse=cand_sparse,
    )  # fmt: skip
    cand_target = target is not None and target in probe.schema.names
    cand_src = open_source(
        candidate,
        logits=cand_logits,
        target=target if cand_target else None,
        keep=spec.on,
        logits_dtype=spec.logits_dtype,
        sparse=cand_sparse,
    )
    classes = _classes(base_src, cand_src, spec.vocab)
    a, b = base_src.num_rows, cand_src.num_rows
    if a is not None and b is not None and a != b:
        raise XentInputError(
            f"the two sources have different row counts: {base_src.files[0].path} has {a}, "
            f"{cand_src.files[0].path} has {b}; compare pairs rows by position",
            file=cand_src.files[0].path,
        )
    sides = Sides(base_src, cand_src, classes, target, cand_target)
    if sides.sparse:
        sparse_comparison.check_spec(spec, sides)
    return sides


def _sparse_request(paths, logits: str, request: SparseRequest | None):
    """The sparse request for a side whose files lack the logits column (else None: dense,
    or sparse by the default top-k columns)."""
    if request is None:
        return None
    try:
        schema = open_reader(expand_paths(paths)[0]).schema
    except XentInputError:
        return None  # opening the side says what is wrong
    return request if logits not in schema.names else None


def _classes(base: Source, cand: Source, vocab: int | None) -> int:
    a, b = base.num_classes, cand.num_classes
    for src, c in ((base, a), (cand, b)):
        if c is None:
            raise XentInputError(
                "cannot tell the number of classes (no rows?)", file=src.files[0].path
            )
    if vocab is not None:
        for src, c in ((base, a), (cand, b)):
            if vocab > c:
                raise XentUsageError(
                    f"--vocab {vocab} is more than the {c} classes of {src.files[0].path}"
                )
        return int(vocab)
    if a != b:
        raise XentInputError(
            f"the two sources have different class counts: {base.files[0].path} has {a}, "
            f"{cand.files[0].path} has {b} (padded vocabularies? --vocab {min(a, b)} keeps "
            "the first classes of each)",
            file=cand.files[0].path,
        )
    return int(a)


def default_chunk_rows(sides: Sides, spec: CompareSpec) -> int:
    if spec.chunk_rows is not None:
        if int(spec.chunk_rows) < 1:
            raise XentUsageError(f"chunk_rows must be >= 1, got {spec.chunk_rows}")
        return int(spec.chunk_rows)
    row_bytes = sides.classes * (
        sides.base.logits_dtype_numpy.itemsize + sides.candidate.logits_dtype_numpy.itemsize
    )
    return max(1, DEFAULT_CHUNK_BYTES // row_bytes)


# -- one chunk pair ----------------------------------------------------------------------


def _matrix(chunk: Chunk, src: Source, spec: CompareSpec, vocab: int | None):
    x = chunk.logits
    marked = "bfloat16" if src.storage == "bfloat16" else spec.logits_dtype
    kind = dtypes.storage_kind(x.dtype, marked if x.dtype.kind in "ui" else None)
    if vocab is not None and vocab < x.shape[1]:
        x = x[:, :vocab]
    return np.ascontiguousarray(x), kind


def check_keys(a: Chunk, b: Chunk, sides: Sides, on) -> None:
    for name in on:
        ka = a.keep.column(name)
        kb = b.keep.column(name)
        same = pc.equal(ka, kb)
        # nulls match nulls only
        same = pc.if_else(pc.is_null(ka), pc.is_null(kb), pc.fill_null(same, False))
        if not pc.all(same).as_py():
            r = int(np.argmin(same.to_numpy(zero_copy_only=False)))
            raise XentInputError(
                f"key {name!r} differs at row {a.row + r}: {a.file} row {a.file_row + r} has "
                f"{ka[r].as_py()!r}, {b.file} row {b.file_row + r} has {kb[r].as_py()!r}",
                file=a.file,
                row=a.file_row + r,
            )


def chunk_targets(a: Chunk, b: Chunk, sides: Sides, classes: int):
    """(y with -1 where ignored, ignored mask), checked against the candidate's column."""
    if sides.target is None:
        return None, np.zeros(a.num_rows, bool)
    y = np.asarray(a.target, dtype=np.int64)
    ignored = y == IGNORE_INDEX
    if a.target_valid is not None:
        ignored |= ~a.target_valid
    bad = ~ignored & ((y < 0) | (y >= classes))
    if bad.any():
        r = int(np.argmax(bad))
        raise XentInputError(
            f"target {int(y[r])} is out of range for {classes} classes",
            file=a.file,
            row=a.file_row + r,
        )
    if sides.candidate_target:
        yb = np.asarray(b.target, dtype=np.int64)
        ign_b = yb == IGNORE_INDEX
        if b.target_valid is not None:
            ign_b |= ~b.target_valid
        differ = (ign_b != ignored) | (~ignored & (yb != y))
        if differ.any():
            r = int(np.argmax(differ))
            shown = [None if i else int(v) for v, i in ((y[r], ignored[r]), (yb[r], ign_b[r]))]
            raise XentInputError(
                f"the targets differ at row {a.row + r}: {a.file} row {a.file_row + r} has "
                f"{shown[0]}, {b.file} row {b.file_row + r} has {shown[1]}",
                file=b.file,
                row=b.file_row + r,
            )
    return np.where(ignored, -1, y), ignored


def _nan_rows(values: dict, a: Chunk, b: Chunk, xa, xb, policy: str) -> np.ndarray:
    """Rows whose values are NaN (NaN/+inf logits, or no finite logit on a side)."""
    bad = np.isnan(values["kl"])
    if policy == "error" and bad.any():
        r = int(np.argmax(bad))
        for side, chunk, x, kind in (("base", a, xa[0], xa[1]), ("candidate", b, xb[0], xb[1])):
            row = dtypes.decode(x[r : r + 1], "bfloat16" if kind == "bfloat16" else None)[0]
            if np.isnan(row).any() or np.isposinf(row).any():
                what = "NaN or +inf in logits (use --nan-policy skip or propagate)"
            elif not np.isfinite(row).any():
                what = "no finite logit in the row (use --nan-policy skip or propagate)"
            else:
                continue
            raise XentInputError(f"{side}: {what}", file=chunk.file, row=chunk.file_row + r)
        raise XentInputError(  # pragma: no cover - the kernel gave NaN for finite rows
            "NaN comparison values", file=a.file, row=a.file_row + r
        )
    return bad


def compare_chunk(
    a: Chunk, b: Chunk, sides: Sides, spec: CompareSpec, kernels, state: CompareState
):
    """Per-row values of one chunk pair, folded into ``state``; returns them (for -o)."""
    if spec.on:
        check_keys(a, b, sides, spec.on)
    y, ignored = chunk_targets(a, b, sides, sides.classes)
    if sides.sparse:
        values, bad = sparse_comparison.values(a, b, sides, spec, kernels, ignored)
        y = None
    else:
        xa = _matrix(a, sides.base, spec, spec.vocab)
        xb = _matrix(b, sides.candidate, spec, spec.vocab)
        values = kernels.compare(xa[0], xa[1], xb[0], xb[1], y, spec.temperature)
        bad = _nan_rows(values, a, b, xa, xb, spec.nan_policy)
    # nan_rows counts the rows skip drops (as eval); propagate keeps them, NaN and all
    skip = spec.nan_policy == "skip"
    counted = ~ignored & ~bad if skip else ~ignored
    dropped = bad & ~ignored if skip else np.zeros_like(bad)
    nan_count = int(np.count_nonzero(dropped))
    rows = dict(values)
    if y is not None:
        rows["target"] = y
        rows["nll_base"] = -values["logp_base"]
        rows["nll_candidate"] = -values["logp_candidate"]
        with np.errstate(invalid="ignore"):
            rows["delta_p"] = np.exp(values["logp_candidate"]) - np.exp(values["logp_base"])
    state.total.add(rows, counted, int(ignored.sum()), nan_count)
    if a.group is not None:
        for key, mask in group_masks(a.group):
            state.group(key).add(
                {k: v[mask] for k, v in rows.items()},
                counted[mask],
                int(ignored[mask].sum()),
                int(np.count_nonzero(dropped[mask])),
            )
    state.logit_bytes += sum(
        x.nbytes for c in (a, b) for x in (c.logits, c.indices) if x is not None
    )
    return rows


OUTPUT_SCHEMA = [
    ("kl", pa.float32()), ("kl_reverse", pa.float32()), ("jsd", pa.float32()),
    ("tvd", pa.float32()), ("base_argmax", pa.int32()), ("candidate_argmax", pa.int32()),
    ("top1_same", pa.bool_()),
]  # fmt: skip
TARGET_OUTPUT_SCHEMA = [
    ("nll_base", pa.float32()), ("nll_candidate", pa.float32()), ("delta_p", pa.float32()),
]  # fmt: skip


def output_schema(with_target: bool, keep_fields) -> pa.Schema:
    fields = OUTPUT_SCHEMA + (TARGET_OUTPUT_SCHEMA if with_target else [])
    return pa.schema([pa.field(n, t) for n, t in fields] + list(keep_fields))


def rows_table(rows: dict, keep: pa.Table | None, with_target: bool, keep_names) -> pa.Table:
    """The -o output of one chunk pair: the per-row values, then the --keep columns."""
    cols = {}
    for name, typ in OUTPUT_SCHEMA + (TARGET_OUTPUT_SCHEMA if with_target else []):
        if name == "top1_same":
            v = rows["base_argmax"] == rows["candidate_argmax"]
        else:
            v = rows[name]
        cols[name] = pa.array(np.asarray(v).astype(typ.to_pandas_dtype()), type=typ)
    table = pa.table(cols)
    for name in keep_names:
        table = table.append_column(keep.schema.field(name), keep.column(name))
    return table


# -- the local runner ----------------------------------------------------------------------


def run(base, candidate, spec: CompareSpec, *, logits, candidate_logits, target, group_by,
        output, keep, overwrite, device, progress, threads) -> Report:  # fmt: skip
    set_threads(threads or None)
    kernels = api.backend(device)  # CPU, or the CUDA twin (engine/kernels/cuda/divergence.py)

    keep = keep_tuple(keep)
    sides = open_sides(
        base, candidate, spec, logits=logits, candidate_logits=candidate_logits,
        target=target, keep=keep, group_by=group_by,
    )  # fmt: skip
    chunk_rows = default_chunk_rows(sides, spec)
    state = CompareState(top_k=spec.top_k)
    with_target = sides.with_target
    warnings = [sparse_comparison.TARGET_WARNING] if sides.sparse and sides.target else []
    bar = make_progress(progress, sides.base)
    start = time.perf_counter()
    sink = contextlib.nullcontext()
    if output is not None:
        schema = output_schema(with_target, [sides.base.schema.field(n) for n in keep])
        sink = open_sink(output, overwrite=overwrite, schema=schema)
    try:
        with sink:
            for a, b in paired_chunks(sides.base, sides.candidate, chunk_rows):
                rows = compare_chunk(a, b, sides, spec, kernels, state)
                if output is not None:
                    sink.write(rows_table(rows, a.keep, with_target, keep))
                bar.update(a.num_rows, a.logits.nbytes + b.logits.nbytes)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    metrics = state.report(
        classes=sides.classes, temperature=spec.temperature, with_target=with_target,
        seconds=seconds,
    )  # fmt: skip
    if sides.sparse:
        metrics = sparse_comparison.finish_report(metrics, sides)
    return Report(metrics, warnings, output=None if output is None else str(output))
