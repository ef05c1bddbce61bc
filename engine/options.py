"""LossOptions: every knob of the loss, validated once.

CLI, API, benchmarks and Dask tasks all build one of these; kernels receive the flat scalars
it exposes. Messages follow PyTorch's wording where PyTorch has a check of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from engine.errors import XentTypeError, XentUsageError

REDUCTIONS = ("none", "mean", "sum")
INPUT_KINDS = ("logits", "log_probs", "probs")
LOGITS_DTYPES = (None, "float16", "float32", "float64", "bfloat16")

# Kernel codes for input_kind (kept as runtime integers: one compiled kernel serves all).
KIND_LOGITS, KIND_LOG_PROBS, KIND_PROBS = 0, 1, 2


def _normalise_kind(kind: str) -> str:
    k = str(kind).strip().lower().replace("-", "_")
    aliases = {"logprobs": "log_probs", "log_softmax": "log_probs", "softmax": "probs"}
    return aliases.get(k, k)


@dataclass(frozen=True, eq=False)
class LossOptions:
    """The loss options: PyTorch's CrossEntropyLoss, plus z-loss and softcap.

    ``weight`` is stored as a read-only float64 vector (or None).
    """

    weight: np.ndarray | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    input_kind: str = "logits"
    logits_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise XentUsageError(f"{self.reduction} is not a valid value for reduction")
        kind = _normalise_kind(self.input_kind)
        if kind not in INPUT_KINDS:
            raise XentUsageError(
                f"input_kind must be one of logits, log_probs, probs; got {self.input_kind!r}"
            )
        object.__setattr__(self, "input_kind", kind)
        eps = float(self.label_smoothing)
        if not (0.0 <= eps <= 1.0):
            raise XentUsageError(f"label_smoothing must be between 0.0 and 1.0. Got: {eps}")
        object.__setattr__(self, "label_smoothing", eps)
        zeta = float(self.z_loss)
        if not (zeta >= 0.0 and np.isfinite(zeta)):
            raise XentUsageError(f"z_loss must be a finite number >= 0. Got: {self.z_loss}")
        object.__setattr__(self, "z_loss", zeta)
        if self.softcap is not None:
            cap = float(self.softcap)
            if not (cap > 0.0 and np.isfinite(cap)):
                raise XentUsageError(f"softcap must be a finite number > 0. Got: {self.softcap}")
            object.__setattr__(self, "softcap", cap)
        if kind != "logits" and (self.z_loss > 0.0 or self.softcap is not None):
            raise XentUsageError(
                "z_loss and softcap act on raw logits; they need input_kind='logits'"
            )
        if isinstance(self.ignore_index, bool) or not isinstance(
            self.ignore_index, (int, np.integer)
        ):
            raise XentTypeError(f"ignore_index must be an integer, got {self.ignore_index!r}")
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        if self.logits_dtype not in LOGITS_DTYPES:
            raise XentUsageError(
                f"logits_dtype must be one of float16, float32, float64, bfloat16; "
                f"got {self.logits_dtype!r}"
            )
        if self.weight is not None:
            w = np.array(self.weight, dtype=np.float64).reshape(-1)
            if w.ndim != 1:
                raise XentUsageError("weight must be a 1-D vector of class weights")
            if not np.all(np.isfinite(w)):
                raise XentUsageError("weight must hold finite numbers")
            w.setflags(write=False)
            object.__setattr__(self, "weight", w)

    # -- derived values --------------------------------------------------------------

    @property
    def kind_code(self) -> int:
        return INPUT_KINDS.index(self.input_kind)

    @property
    def softcap_value(self) -> float:
        """0.0 means no softcap (kernels take a plain float)."""
        return 0.0 if self.softcap is None else self.softcap

    def weight_for(self, classes: int) -> np.ndarray:
        """Class weights as a length-C float64 vector (ones when none were given)."""
        self.check_classes(classes)
        if self.weight is None:
            return np.ones(classes, dtype=np.float64)
        return self.weight

    def check_classes(self, classes: int) -> None:
        if self.weight is not None and self.weight.shape[0] != classes:
            raise XentUsageError(
                f"weight tensor should be defined either for all {classes} classes or no "
                f"classes but got weight tensor of shape: [{self.weight.shape[0]}]"
            )

    def with_(self, **changes) -> LossOptions:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-Python form (JSON, Dask task arguments)."""
        return {
            "weight": None if self.weight is None else self.weight.tolist(),
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "softcap": self.softcap,
            "input_kind": self.input_kind,
            "logits_dtype": self.logits_dtype,
        }


OPTION_NAMES = (
    "weight",
    "ignore_index",
    "reduction",
    "label_smoothing",
    "z_loss",
    "softcap",
    "input_kind",
    "logits_dtype",
)


def make_options(options: LossOptions | None = None, **kwargs) -> LossOptions:
    """Build LossOptions from keyword arguments (API style), or refine given ones."""
    unknown = set(kwargs) - set(OPTION_NAMES)
    if unknown:
        raise XentTypeError(f"unexpected loss option(s): {', '.join(sorted(unknown))}")
    if options is None:
        return LossOptions(**kwargs)
    return replace(options, **kwargs) if kwargs else options
