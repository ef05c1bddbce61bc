"""In-memory public API: cross_entropy, cross_entropy_grad, row_stats.

Validation happens here, once; kernels receive a Problem of flat arrays. Reductions are
applied here in float64 (the kernels return per-row values only).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from engine import dtypes, scratch
from engine.errors import TargetOutOfRange, XentTypeError, XentUsageError
from engine.kernels import (
    STORAGE_BF16_BITS,
    STORAGE_F16_BITS,
    STORAGE_NATIVE,
    Problem,
    sum_blocks,
)
from engine.metrics import reduce_loss
from engine.options import LossOptions, make_options

_STORAGE_CODES = {
    "float16": STORAGE_F16_BITS,
    "bfloat16": STORAGE_BF16_BITS,
    "float32": STORAGE_NATIVE,
    "float64": STORAGE_NATIVE,
}


@dataclass
class RowStats:
    """Per-row statistics; one array per field, one entry per row."""

    loss: np.ndarray
    lse: np.ndarray
    target_logprob: np.ndarray
    argmax: np.ndarray
    max_prob: np.ndarray
    entropy: np.ndarray
    target_rank: np.ndarray
    kl: np.ndarray | None = None

    def as_dict(self) -> dict:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


def resolve_device(device: str) -> str:
    """'cpu' | 'cuda' | 'auto' -> the backend name to use."""
    if device not in ("cpu", "cuda", "auto"):
        raise XentUsageError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "cpu":
        return "cpu"
    from engine.kernels import cuda as cuda_backend

    if cuda_backend.is_available():
        return "cuda"
    if device == "cuda":
        raise RuntimeError("CUDA requested but no CUDA device/driver was found")
    return "cpu"


def backend(device: str):
    """The kernel module for a device name (after resolve_device)."""
    if resolve_device(device) == "cuda":
        from engine.kernels import cuda as module
    else:
        from engine.kernels import cpu as module
    return module


@dataclass
class Targets:
    """Validated targets of one batch of rows."""

    y: np.ndarray | None  # int64 class per row, -1 where not counted
    t: np.ndarray | None  # soft targets, compute dtype
    counted: np.ndarray  # bool per row
    weight_sum: float  # Σ m_i·w[y_i]  (soft: number of rows)
    counted_rows: int  # Σ m_i          (soft: number of rows)


def prepare_targets(
    target, n: int, c: int, opts: LossOptions, compute, valid=None, *, reuse: bool = False
) -> Targets:
    """Check targets against PyTorch's rules and compute the mean denominators.

    ``valid`` (optional bool mask) marks null targets from Arrow as not counted.
    ``reuse``: y and counted live in per-thread scratch buffers (engine/scratch.py), for
    callers whose Targets do not outlive the call.
    """
    target = np.asarray(target)
    w = opts.weight_for(c)
    if target.ndim == 2:
        if target.shape != (n, c):
            raise XentUsageError(f"Expected target size {tuple((n, c))}, got {tuple(target.shape)}")
        if not np.issubdtype(target.dtype, np.floating):
            raise XentTypeError("probability targets must be floating point")
        t = np.ascontiguousarray(target, dtype=compute)
        return Targets(None, t, np.ones(n, dtype=bool), float(n), n)
    if target.ndim != 1:
        raise XentUsageError(
            f"target must be 1-D (class indices) or 2-D (probabilities), got {target.ndim}-D"
        )
    if target.shape[0] != n:
        raise XentUsageError(
            f"Expected input batch_size ({n}) to match target batch_size ({target.shape[0]})."
        )
    if not (np.issubdtype(target.dtype, np.integer) or target.dtype == bool):
        raise XentTypeError(
            f"class-index targets must be integers, got {target.dtype} "
            "(2-D float targets are read as probabilities)"
        )
    from engine.kernels.targets import class_targets  # numba: imported on first use

    if target.dtype == bool:
        target = target.view(np.uint8)
    mask = np.zeros(0, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    # int64 targets whose uncounted rows are all negative already serve as the kernels' y
    # (rows with y < 0 are not counted): 20 MB less to write per 2.5M rows
    alias = (
        reuse
        and target.dtype == np.int64
        and target.flags.c_contiguous
        and opts.ignore_index < 0
        and valid is None
    )
    if reuse:
        # an empty y is not written (see class_targets)
        y = np.zeros(0, dtype=np.int64) if alias else scratch.buffer("targets.y", n, np.int64)
        counted = scratch.buffer("targets.counted", n, bool)
    else:
        y = np.empty(n, dtype=np.int64)
        counted = np.empty(n, dtype=bool)
    weights = np.zeros(0) if opts.weight is None else np.asarray(w, dtype=np.float64)  # empty: 1s
    weight_sum, rows, bad = class_targets(
        target, c, int(opts.ignore_index), mask, weights, y, counted
    )
    if alias:
        y = target
    if bad >= 0:
        raise TargetOutOfRange(int(target[bad]), bad, c)
    return Targets(y, None, counted, weight_sum, rows)


def make_problem(logits, targets: Targets, opts: LossOptions) -> Problem:
    x = np.asarray(logits)
    if x.ndim != 2:
        raise XentUsageError(f"logits must be 2-D (rows x classes), got {x.ndim}-D")
    kind = dtypes.storage_kind(x.dtype, opts.logits_dtype)
    compute = dtypes.compute_dtype(kind)
    if x.shape[1] == 0:
        raise XentUsageError("logits must have at least one class")
    return Problem(
        x=x,
        storage=_STORAGE_CODES[kind],
        compute=compute,
        y=targets.y,
        t=targets.t,
        w=opts.weight_for(x.shape[1]).astype(compute),
        eps=opts.label_smoothing,
        zeta=opts.z_loss,
        cap=opts.softcap_value,
        kind=opts.kind_code,
    )


def logits_problem(logits, opts: LossOptions) -> Problem:
    """A Problem of logits alone (no targets), for kernels that read only the rows."""
    none = Targets(np.zeros(0, np.int64), None, np.zeros(0, bool), 0.0, 0)
    return make_problem(logits, none, opts)


def _compute_dtype(logits, opts):
    return dtypes.compute_dtype(dtypes.storage_kind(np.asarray(logits).dtype, opts.logits_dtype))


def _setup(logits, target, options):
    opts = make_options(**options)
    x = np.asarray(logits)
    if x.ndim != 2:
        raise XentUsageError(f"logits must be 2-D (rows x classes), got {x.ndim}-D")
    compute = _compute_dtype(x, opts)
    # the Targets of an API call never leave it: their arrays can be reused buffers
    targets = prepare_targets(target, x.shape[0], x.shape[1], opts, compute, reuse=True)
    return opts, x, targets, make_problem(x, targets, opts)


def split_z(loss_rows, lse, targets, opts):
    """Per-row totals -> (cross-entropy sum, z-loss sum) in float64."""
    total = float(np.sum(loss_rows, dtype=np.float64))
    if opts.z_loss == 0.0:
        return total, 0.0
    lse64 = lse.astype(np.float64)[targets.counted]
    z_sum = float(opts.z_loss * np.sum(lse64 * lse64))
    return total - z_sum, z_sum


def _finish(loss_rows, lse, targets, opts, bufs):
    if opts.reduction == "none":
        return loss_rows
    if "sums" in bufs:  # the backend summed each block of rows: 1/64 of the rows to read
        ce_sum, z_sum = float(np.sum(bufs["sums"])), 0.0
    else:
        ce_sum, z_sum = split_z(loss_rows, lse, targets, opts)
    return reduce_loss(ce_sum, z_sum, targets.weight_sum, targets.counted_rows, opts.reduction)


def cross_entropy(logits, target, *, device: str = "cpu", **options):
    """Cross-entropy of 2-D logits against class indices or probabilities (as PyTorch).

    Returns a float (reduction mean/sum) or a per-row array (reduction none).
    """
    opts, _, targets, problem = _setup(logits, target, options)
    bufs = _row_buffers(problem, opts)
    loss_rows, lse = backend(device).forward(problem, **bufs)
    return _finish(loss_rows, lse, targets, opts, bufs)


def _row_buffers(problem: Problem, opts: LossOptions) -> dict:
    """Reused per-row output buffers, except a loss that reduction='none' returns."""
    n = problem.rows
    bufs = {"lse": scratch.buffer("rows.lse", n, problem.compute)}
    if opts.reduction != "none":
        bufs["loss"] = scratch.buffer("rows.loss", n, problem.compute)
        if opts.z_loss == 0.0:  # (with z-loss, the host splits the sum by lse)
            bufs["sums"] = scratch.buffer("rows.sums", sum_blocks(n), np.float64)
    return bufs


def row_scales(
    targets: Targets,
    opts: LossOptions,
    grad_output,
    n: int,
    *,
    weight_sum=None,
    counted_rows=None,
):
    """Gradient scales (cross-entropy, z-loss) for a reduction: one entry per row, or
    a single entry for every row (see engine.kernels).

    ``weight_sum``/``counted_rows`` override the denominators (streams know them globally).
    """
    g = np.asarray(grad_output, dtype=np.float64)
    if opts.reduction == "none":
        if g.ndim == 0:
            return np.full(1, float(g)), np.full(1, float(g))
        if g.shape != (n,):
            raise XentUsageError(
                f"grad_output must be a scalar or have {n} entries for reduction='none'"
            )
        return np.ascontiguousarray(g), np.ascontiguousarray(g)
    if g.ndim != 0:
        raise XentUsageError(f"grad_output must be a scalar for reduction='{opts.reduction}'")
    g = float(g)
    if opts.reduction == "sum":
        s = zs = g
    else:
        wsum = targets.weight_sum if weight_sum is None else weight_sum
        counted = targets.counted_rows if counted_rows is None else counted_rows
        s = g / wsum if wsum != 0 else 0.0
        zs = g / counted if counted and wsum != 0 else 0.0
    # one entry each: backends apply it to every row (2 ms saved per 2.5M rows)
    return np.full(1, s), np.full(1, zs)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """The same memory, element for element (an in-place gradient)."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.dtype.itemsize == b.dtype.itemsize
    )


def cross_entropy_grad(
    logits, target, *, grad_output=1.0, out=None, device: str = "cpu", **options
):
    """(loss, d loss / d logits). ``out=logits`` computes the gradient in place."""
    opts, x, targets, problem = _setup(logits, target, options)
    if out is None:
        out = np.empty(x.shape, dtype=problem.compute)
    elif out.shape != x.shape:
        raise XentUsageError(f"out has shape {out.shape}, expected {x.shape}")
    elif not out.flags.writeable:
        raise XentUsageError("out is read-only")
    elif np.may_share_memory(out, x) and not _same_array(out, x):
        # rows are computed in parallel: a shifted overlap would overwrite unread logits
        raise XentUsageError("out overlaps the logits: pass out=logits (in place) or another array")
    scale, zscale = row_scales(targets, opts, grad_output, x.shape[0])
    bufs = _row_buffers(problem, opts)
    loss_rows, lse = backend(device).forward_grad(problem, scale, zscale, out, **bufs)
    return _finish(loss_rows, lse, targets, opts, bufs), out


def row_stats(logits, target, *, device: str = "cpu", **options) -> RowStats:
    """Per-row loss, lse, target log-prob, argmax, max prob, entropy, target rank (, kl)."""
    opts, _, _, problem = _setup(logits, target, options)
    res = backend(device).stats(problem)
    return RowStats(**res)


def topk_logprobs(logits, k: int, *, device: str = "cpu", **options):
    """Each row's k most probable classes: (indices, logprobs, lse).

    ``indices`` (int32, rows x k) descend by probability, the smaller index first on ties
    (so indices[:, 0] is the argmax); ``logprobs`` (float32, rows x k) are normalised over
    all C classes; ``lse`` is each row's log-sum-exp (compute dtype). One read of each row
    yields both. Options: input_kind, softcap, logits_dtype (the loss options that change
    what the log-probs are); for log-prob and probability inputs the values are the
    log-probs (log(max(p, tiny)) for probabilities) and lse is that of those values.
    """
    opts = make_options(**options)
    x = np.asarray(logits)
    if x.ndim != 2:
        raise XentUsageError(f"logits must be 2-D (rows x classes), got {x.ndim}-D")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise XentTypeError(f"k must be an integer, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= x.shape[1]:
        raise XentUsageError(
            f"k must be between 1 and the number of classes ({x.shape[1]}), got {k}"
        )
    return backend(device).topk(logits_problem(x, opts), k)
