"""What a job is, before any data is read: the validated options, and the opened source.

A `JobSpec` is plain frozen data, so the Dask runner ships it to workers as it is; facts
learned from the data (a file marked bfloat16) give a new spec, never an edited one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.errors import XentInputError, XentUsageError
from engine.io import Source, open_source
from engine.io.layouts import SparseRequest
from engine.options import LossOptions, make_options

NAN_POLICIES = ("error", "skip", "propagate")


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs besides the source."""

    opts: LossOptions
    top_k: tuple[int, ...] = (1, 5)
    chunk_rows: int | None = None
    device: str = "auto"
    nan_policy: str = "error"
    sparse: SparseRequest | None = None  # read top-k rows (SPEC §8), as the user described
    emit_topk: int = 0  # score: also write each row's top K classes and log-probs

    def __post_init__(self):
        if self.nan_policy not in NAN_POLICIES:
            raise XentUsageError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}")
        top_k = tuple(sorted({int(k) for k in self.top_k} | {1}))
        if any(k < 1 for k in top_k):
            raise XentUsageError("top_k values must be >= 1")
        object.__setattr__(self, "top_k", top_k)  # normalised once, at construction
        if isinstance(self.emit_topk, bool) or int(self.emit_topk) < 0:
            raise XentUsageError(f"emit_topk must be an integer >= 1, got {self.emit_topk!r}")

    @property
    def metric_reduction(self) -> str:
        """How reports reduce the loss: 'sum' under reduction sum, else 'mean'."""
        return "sum" if self.opts.reduction == "sum" else "mean"


def make_spec(top_k, chunk_rows, device, nan_policy, loss_options: dict) -> JobSpec:
    """A spec from the public functions' keyword arguments (``options=`` or loose ones)."""
    loss_options = dict(loss_options)
    sparse = sparse_request(loss_options)
    opts = make_options(loss_options.pop("options", None), **loss_options)
    return JobSpec(
        opts=opts,
        top_k=tuple(top_k),
        chunk_rows=chunk_rows,
        device=device,
        nan_policy=nan_policy,
        sparse=sparse,
    )


SPARSE_ARGUMENTS = {  # keyword -> SparseRequest field
    "topk_indices": "indices",
    "topk_values": "values",
    "classes": "classes",
    "topk_kind": "kind",
    "lse": "lse",
}


def sparse_request(kwargs: dict) -> SparseRequest | None:
    """Pop the sparse-row keywords; a request when any was given (not None)."""
    given = {
        SPARSE_ARGUMENTS[k]: kwargs.pop(k)
        for k in list(kwargs)
        if k in SPARSE_ARGUMENTS and kwargs[k] is not None
    }
    for k in SPARSE_ARGUMENTS:
        kwargs.pop(k, None)
    if not given:
        return None
    if "classes" in given:
        given["classes"] = int(given["classes"])
    return SparseRequest(**given)


def open_job_source(source, spec: JobSpec, logits, target, keep=(), group_by=None) -> Source:
    return open_source(
        source,
        logits=logits,
        target=target,
        keep=keep,
        group_by=group_by,
        logits_dtype=spec.opts.logits_dtype,
        sparse=spec.sparse,
    )


def for_source(src: Source, spec: JobSpec) -> tuple[JobSpec, int]:
    """(the spec as this source needs it, the number of classes), checked against options."""
    classes = src.num_classes
    if classes is None:
        raise XentInputError("cannot tell the number of classes (no rows?)", file=src.files[0].path)
    spec.opts.check_classes(classes)
    if spec.emit_topk > classes:
        raise XentUsageError(
            f"--emit-topk {spec.emit_topk} is more than the {classes} classes of the logits"
        )
    if spec.emit_topk and src.sparse is not None:
        raise XentUsageError("--emit-topk needs dense logits; these rows are already top-k")
    if src.storage == "bfloat16" and spec.opts.logits_dtype != "bfloat16":
        # marked in the file's metadata: the logits are bfloat16 bits whatever was asked
        spec = dataclasses.replace(spec, opts=spec.opts.with_(logits_dtype="bfloat16"))
    return spec, classes


def require_dense(src: Source, command: str) -> None:
    """score and grad write one value per class or per row from every class's logit."""
    if src.sparse is not None:
        raise XentInputError(
            f"{command} needs every class's logit; these are sparse top-k rows "
            "(eval and compare read them)",
            file=src.files[0].path,
        )


def keep_tuple(keep) -> tuple[str, ...]:
    """``keep`` as given to the API: a comma-separated string or a sequence of names."""
    if isinstance(keep, str):
        return tuple(k for k in keep.split(",") if k)
    return tuple(keep or ())


def is_directory_output(output) -> bool:
    """A score output written as parts: a trailing slash, or a last name without a suffix."""
    text = str(output)
    return text.endswith(("/", "\\")) or "." not in text.rsplit("/", 1)[-1]
