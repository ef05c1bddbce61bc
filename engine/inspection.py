"""What `xent inspect` finds in a source: its shape, and rows that suggest a mistake.

Also the one test of whether rows "look like probabilities" (every value in [0, 1], each
row summing to 1), which eval's warning and `explain` share: softmax outputs fed to
cross-entropy as logits are the commonest mistake, and every place that warns of it must
agree on what it looks like.
"""

from __future__ import annotations

import math

import numpy as np

from engine import dtypes
from engine.errors import XentInputError

PROBABILITY_SUM_TOLERANCE = 1e-3


def probability_rows(x) -> np.ndarray:
    """Per row of a 2-D array: every value in [0, 1] and the row sums to 1 (within 1e-3).

    A row holding NaN or an infinity is not a probability row.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    with np.errstate(invalid="ignore"):
        in_unit = np.all((x >= 0.0) & (x <= 1.0), axis=1)
        sums = np.sum(np.where(in_unit[:, None], x, 0.0), axis=1)
    return in_unit & (np.abs(sums - 1.0) <= PROBABILITY_SUM_TOLERANCE)


def looks_like_probabilities(x) -> bool:
    """Whether every row of ``x`` (one row, or a 2-D sample) looks like a probability row."""
    rows = probability_rows(x)
    return bool(rows.size and rows.all())


SAMPLE_BYTES = 64 * 2**20


def open_for_inspect(sources, logits, target, logits_dtype, sparse=None):
    """open_source; without --target, a file lacking a 'target' column is fine."""
    from engine.io import open_source  # here: `explain` and eval's warning need no Arrow

    def open_with(target):
        return open_source(
            list(sources), logits=logits, target=target, logits_dtype=logits_dtype, sparse=sparse
        )

    try:
        return open_with(target or "target")
    except XentInputError as e:
        if target is None and e.what.startswith("no target column 'target'"):
            return open_with(None)
        raise


def scan_sparse(source, chunk) -> tuple[dict, list[str]]:
    """Mean tail mass of a sample of sparse rows, and the first malformed row."""
    from engine.kernels.cpu.sparse import (
        BAD_INDEX,
        DUPLICATE_INDEX,
        F_TAIL,
        I_BAD_COLUMN,
        I_STATUS,
        OK,
        sparse_rows,
    )

    sp = source.sparse
    y = np.full(chunk.num_rows, -1, np.int64)
    f, ii = sparse_rows(
        chunk.logits, source.storage, chunk.indices, y, chunk.lse, sp.value_mode, sp.classes
    )
    ok = ii[I_STATUS] == OK
    facts = {"mean_tail_mass": float(np.mean(f[F_TAIL][ok])) if ok.any() else None}
    warnings = []
    broken = np.flatnonzero(np.isin(ii[I_STATUS], (BAD_INDEX, DUPLICATE_INDEX)))
    if broken.size:
        i = int(broken[0])
        cls = int(chunk.indices[i, ii[I_BAD_COLUMN, i]])
        what = "out of range" if ii[I_STATUS, i] == BAD_INDEX else "stored twice"
        warnings.append(
            f"{broken.size:,} of the first {chunk.num_rows:,} rows hold a class {what} "
            f"(first: {chunk.file} row {chunk.file_row + i}, class {cls}): eval stops there"
        )
    return facts, warnings


def scan_logits(x, file: str, file_row: int) -> tuple[dict, list[str]]:
    """Facts and warnings about a sample of logit rows (a float matrix)."""
    n, c = x.shape
    facts: dict = {"rows": int(n), "file": file, "first_row": int(file_row)}
    warnings: list[str] = []
    if n == 0:
        return facts, warnings
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    posinf = np.isposinf(x)
    neginf = np.isneginf(x)
    facts["nan_values"] = int(nan.sum())
    facts["posinf_values"] = int(posinf.sum())
    facts["neginf_values"] = int(neginf.sum())
    bad_rows = np.flatnonzero((nan | posinf).any(axis=1))
    facts["nan_inf_rows"] = int(bad_rows.size)
    if bad_rows.size:
        first = file_row + int(bad_rows[0])
        kinds = []
        if facts["nan_values"]:
            kinds.append(f"{facts['nan_values']:,} NaN")
        if facts["posinf_values"]:
            kinds.append(f"{facts['posinf_values']:,} +inf")
        warnings.append(
            f"{' and '.join(kinds)} values in {bad_rows.size:,} of the first {n:,} rows "
            f"(first: {file} row {first}): eval stops there under --nan-policy error; "
            "--nan-policy skip drops and counts such rows"
        )
    good = ~(nan | posinf).any(axis=1)
    xg = x[good]
    if xg.shape[0]:
        with np.errstate(all="ignore"):
            finite = np.where(np.isfinite(xg), xg, np.nan)
            lo = np.nanmin(np.where(np.isneginf(xg), np.inf, xg), axis=1)
            hi = np.nanmax(finite, axis=1)
            m = np.max(xg, axis=1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
            lse = m[:, 0] + np.log(np.sum(np.exp(xg - m), axis=1))
            logprobs = np.all(xg <= 0, axis=1) & (np.abs(lse) <= 1e-3)
        constant = (hi == lo) & np.isfinite(hi)
        probs = probability_rows(xg)
        facts["probability_rows"] = int(probs.sum())
        facts["log_probability_rows"] = int(logprobs.sum())
        facts["constant_rows"] = int(constant.sum())
        facts["min"] = float(np.nanmin(finite)) if np.isfinite(finite).any() else None
        facts["max"] = float(np.nanmax(finite)) if np.isfinite(finite).any() else None
        k = xg.shape[0]
        if c > 1 and probs.all():
            warnings.append(
                f"all {k:,} sampled rows look like probabilities (values in [0, 1], each row "
                "sums to 1): cross-entropy applies softmax to its input, so these would be "
                "read as logits and the loss would be far too high; if they are softmax "
                "outputs, use --input-kind probs"
            )
        elif c > 1 and probs.mean() > 0.5:
            warnings.append(
                f"{int(probs.sum()):,} of {k:,} sampled rows look like probabilities (values "
                "in [0, 1], summing to 1): if the model ends with softmax, use "
                "--input-kind probs"
            )
        elif c > 1 and logprobs.all():
            warnings.append(
                f"all {k:,} sampled rows look like log-probabilities (all <= 0, "
                "logsumexp = 0): --input-kind log-probs (NLLLoss) reads them as such; as "
                "logits the loss is the same, since log_softmax leaves them unchanged"
            )
        if c > 1 and constant.any():
            warnings.append(
                f"{int(constant.sum()):,} of {k:,} sampled rows are constant (every class "
                f"has the same logit: a uniform prediction, loss log C = {math.log(c):.4f})"
            )
    return facts, warnings


def scan_soft_targets(t, file: str, file_row: int) -> list[str]:
    sums = np.sum(np.asarray(t, dtype=np.float64), axis=1)
    bad = np.flatnonzero(~(np.abs(sums - 1.0) <= 1e-3))
    if not bad.size:
        return []
    return [
        f"{bad.size:,} of the first {len(sums):,} probability-target rows do not sum to 1 "
        f"(first: {file} row {file_row + int(bad[0])}, sum {sums[bad[0]]:.4g})"
    ]


def scan_targets(source, classes: int | None, ignore_index: int) -> tuple[dict, list[str]]:
    """Read only the target column: counts, range, first out-of-range row."""
    facts = {"counted": 0, "ignored": 0, "nulls": 0, "min": None, "max": None}
    out_of_range = 0
    first_bad = None
    lo, hi = None, None
    for chunk in source.iter_chunks(targets_only=True):
        y = chunk.target
        valid = chunk.target_valid
        null = np.zeros(len(y), bool) if valid is None else ~valid
        ignored = (y == ignore_index) | null
        facts["nulls"] += int(null.sum())
        facts["ignored"] += int(ignored.sum())
        counted = ~ignored
        facts["counted"] += int(counted.sum())
        yc = y[counted]
        if yc.size:
            lo = int(yc.min()) if lo is None else min(lo, int(yc.min()))
            hi = int(yc.max()) if hi is None else max(hi, int(yc.max()))
        if classes is not None:
            bad = counted & ((y < 0) | (y >= classes))
            if bad.any():
                i = int(np.argmax(bad))
                out_of_range += int(bad.sum())
                if first_bad is None:
                    first_bad = (chunk.file, chunk.file_row + i, int(y[i]))
    facts["min"], facts["max"] = lo, hi
    facts["out_of_range"] = out_of_range
    warnings = []
    if first_bad is not None:
        f, r, v = first_bad
        warnings.append(
            f"{out_of_range:,} targets are outside [0, {classes}) and not the ignore index "
            f"{ignore_index} (first: {f} row {r}, value {v}): eval stops there"
        )
    total = facts["counted"] + facts["ignored"]
    if total and facts["counted"] == 0:
        warnings.append(
            f"every target is ignored (ignore index {ignore_index} or null): loss is "
            "undefined (NaN, as PyTorch)"
        )
    return facts, warnings


def inspect_source(
    sources, logits, target, logits_dtype, ignore_index, sample_rows, sparse=None
) -> dict:
    source = open_for_inspect(sources, logits, target, logits_dtype, sparse)
    info = source.describe()
    warnings: list[str] = []
    sample: dict = {"rows": 0}
    row_bytes = source.row_bytes
    want = max(1, min(sample_rows, SAMPLE_BYTES // row_bytes))
    chunks = source.iter_chunks(chunk_rows=want, readahead=0)
    try:
        chunk = next(chunks, None)
    finally:
        chunks.close()
    if chunk is not None and chunk.logits is not None:
        kind = "bfloat16" if source.storage == "bfloat16" else None
        x = dtypes.decode(chunk.logits, kind)
        sample, found = scan_logits(x, chunk.file, chunk.file_row)
        warnings += found
        if source.sparse is not None:
            facts, found = scan_sparse(source, chunk)
            sample.update(facts)
            warnings += found
        if source.soft_targets and chunk.target is not None:
            warnings += scan_soft_targets(chunk.target, chunk.file, chunk.file_row)
    info["sample"] = sample
    if source.target_column is not None and not source.soft_targets:
        tfacts, found = scan_targets(source, source.num_classes, ignore_index)
        info["targets"] = tfacts
        warnings += found
    if source.num_rows is None:  # an IPC stream knows its length only once read through
        source.fragments()
    if info.get("rows") is None:
        info["rows"] = source.num_rows
        info["files"] = source.describe()["files"]
    info["warnings"] = warnings
    return info
