"""`xent explain`: the cross-entropy of one row, step by step, with the numbers filled in.

Built for the question people ask most about PyTorch's CrossEntropyLoss: "my prediction is
the one-hot [0, 0, 0, 1] and the target is 3, why is the loss 0.7437 and not 0?" The
answer is in the steps: CrossEntropyLoss applies softmax to its input (it expects logits),
so the same numbers read as probabilities (NLLLoss of log p) give 0.

Every number comes from the float64 reference (engine.reference), the oracle of the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine import reference
from engine.errors import XentUsageError
from engine.inspection import looks_like_probabilities
from engine.options import make_options

KIND_TITLES = {
    "logits": "logits (CrossEntropyLoss)",
    "probs": "probabilities (NLLLoss of log p)",
    "log_probs": "log-probabilities (NLLLoss)",
}
KIND_FLAGS = {"logits": "logits", "probs": "probs", "log_probs": "log-probs"}
_MAX_SHOWN = 10  # longer vectors are shown as head … tail


# --------------------------------------------------------------------------------------
# Number formatting: 4 decimals like PyTorch's tensor printing, integers as integers
# --------------------------------------------------------------------------------------


def fmt(v: float, digits: int = 4) -> str:
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    if abs(v) < 0.5 * 10**-digits:
        return f"{v:.3g}"
    return f"{v:.{digits}f}"


def fmt_vec(values, digits: int = 4) -> str:
    vals = [fmt(v, digits) for v in values]
    if len(vals) > _MAX_SHOWN:
        vals = vals[: _MAX_SHOWN - 2] + ["…"] + vals[-1:]
    return "[" + ", ".join(vals) + "]"


def gfmt(v: float) -> str:
    """A parameter (ε, a weight) as typed: 0.1, not 0.1000."""
    return f"{float(v):g}"


def _exp_term(v: float) -> str:
    s = fmt(v)
    return f"e^({s})" if s.startswith("-") else f"e^{s}"


def _neg(v: float) -> str:
    """'-v' as it would be written when substituting v into '-x[class]'."""
    s = fmt(v)
    return f"-({s})" if s.startswith("-") else f"-{s}"


def _sum_terms(terms: list[str]) -> str:
    if len(terms) > _MAX_SHOWN:
        terms = terms[:3] + [f"… ({len(terms)} terms) …"] + terms[-1:]
    return " + ".join(terms)


# --------------------------------------------------------------------------------------
# The explanation
# --------------------------------------------------------------------------------------


@dataclass
class Explanation:
    """Numbers (float64) and the text lines of `xent explain`."""

    x: list[float]
    input_kind: str
    target: int | None
    target_probs: list[float] | None
    weight: list[float] | None
    label_smoothing: float
    softmax: list[float]  # the distribution the loss uses (p)
    log_softmax: list[float]  # log p
    lse: float | None  # log Σ exp(x) (logits only)
    loss: float  # what nn.CrossEntropyLoss / NLLLoss (mean) returns for this row
    loss_row: float  # the row's loss before the mean's division (reduction='none')
    alternatives: dict[str, float] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> int:
        return len(self.x)

    @property
    def loss_bits(self) -> float:
        return self.loss / math.log(2.0)

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float):
                return v if math.isfinite(v) else None
            if isinstance(v, list):
                return [clean(u) for u in v]
            if isinstance(v, dict):
                return {k: clean(u) for k, u in v.items()}
            return v

        return clean(
            {
                "input_kind": self.input_kind,
                "logits": self.x,
                "target": self.target,
                "target_probs": self.target_probs,
                "weight": self.weight,
                "label_smoothing": self.label_smoothing,
                "classes": self.classes,
                "softmax": self.softmax,
                "log_softmax": self.log_softmax,
                "lse": self.lse,
                "loss": self.loss,
                "loss_bits": self.loss_bits,
                "loss_row": self.loss_row,
                "as_input_kind": dict(self.alternatives),
                "steps": list(self.steps),
                "notes": list(self.notes),
            }
        )

    def render(self) -> str:
        """The explanation as text for a terminal."""
        out: list[str] = []
        title = KIND_TITLES[self.input_kind].split(" (")[1].rstrip(")")
        if self.target is not None:
            what = f"target class {self.target} of {self.classes}"
        else:
            what = f"probability target over {self.classes} classes"
        out.append(f"{title}, one row, {what} (natural log: nats)")
        out.append("")
        out.extend(("  " + s).rstrip() for s in self.steps)
        out.append("")
        out.append(f"The same {self.classes} numbers read as:")
        width = max(len(KIND_TITLES[k]) for k in KIND_TITLES)
        for kind, value in self.alternatives.items():
            mark = "  <- --input-kind " + KIND_FLAGS[kind] if kind == self.input_kind else ""
            out.append(f"  {KIND_TITLES[kind]:<{width}}  {fmt(value):>8}{mark}")
        if self.notes:
            out.append("")
            for note in self.notes:
                out.extend(_wrap(note, 88))
        return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, break_on_hyphens=False) or [""]


def _parse_kind(kind: str) -> str:
    return make_options(input_kind=kind).input_kind


def explain(
    logits,
    target: int | None = None,
    *,
    target_probs=None,
    input_kind: str = "logits",
    weight=None,
    label_smoothing: float = 0.0,
) -> Explanation:
    """Explain the loss of one row `logits` against a class `target` or `target_probs`."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    c = x.shape[0]
    if c == 0:
        raise XentUsageError("logits must hold at least one number")
    if (target is None) == (target_probs is None):
        raise XentUsageError("give a target class (--target) or probabilities (--target-probs)")
    kind = _parse_kind(input_kind)
    opts = {"input_kind": kind, "label_smoothing": float(label_smoothing)}
    w = None
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64).reshape(-1)
        if w.shape[0] != c:
            raise XentUsageError(f"weight has {w.shape[0]} numbers, but there are {c} classes")
        opts["weight"] = w
    make_options(**opts).check_classes(c)  # validates every option once
    if target is not None:
        target = int(target)
        if not 0 <= target < c:
            raise XentUsageError(f"target {target} is out of range for {c} classes (0..{c - 1})")
        tgt = np.array([target], dtype=np.int64)
        t = None
    else:
        t = np.asarray(target_probs, dtype=np.float64).reshape(-1)
        if t.shape[0] != c:
            raise XentUsageError(f"target probabilities have {t.shape[0]} numbers, expected {c}")
        if np.any(t < 0) or not np.all(np.isfinite(t)):
            raise XentUsageError("target probabilities must be finite numbers >= 0")
        tgt = t[None, :]

    rows = x[None, :]
    loss = reference.cross_entropy(rows, tgt, **opts)
    loss_row = float(reference.cross_entropy(rows, tgt, reduction="none", **opts)[0])
    logp = _log_probs(x, kind)
    with np.errstate(all="ignore"):
        p = np.exp(logp)
    lse = None
    if kind == "logits":
        lse = float(reference.row_stats(rows, tgt, **opts)["lse"][0])

    alternatives = {}
    for other in ("logits", "probs", "log_probs"):
        alternatives[other] = reference.cross_entropy(rows, tgt, **{**opts, "input_kind": other})

    ex = Explanation(
        x=x.tolist(),
        input_kind=kind,
        target=target,
        target_probs=None if t is None else t.tolist(),
        weight=None if w is None else w.tolist(),
        label_smoothing=float(label_smoothing),
        softmax=p.tolist(),
        log_softmax=logp.tolist(),
        lse=lse,
        loss=float(loss),
        loss_row=loss_row,
        alternatives=alternatives,
    )
    ex.steps = _steps(ex, x, p, logp, t, w)
    ex.notes = _notes(ex, x, p)
    return ex


def _log_probs(x: np.ndarray, kind: str) -> np.ndarray:
    """log p as the reference computes it (lse via reference.row_stats for logits)."""
    if kind == "logits":
        stats = reference.row_stats(x[None, :], np.zeros(1, dtype=np.int64))
        return x - float(stats["lse"][0])
    if kind == "log_probs":
        return x.copy()
    return np.log(np.maximum(x, np.finfo(np.float64).tiny))


def _steps(ex: Explanation, x, p, logp, t, w) -> list[str]:
    kind, y, eps = ex.input_kind, ex.target, ex.label_smoothing
    s: list[str] = []
    label = {"logits": "x (logits)", "probs": "p (probabilities)", "log_probs": "x (log-probs)"}
    s.append(f"{label[kind]:<18} = {fmt_vec(x)}")
    if y is not None:
        s.append(f"{'target':<18} = {y}")
    else:
        s.append(f"{'target probs t':<18} = {fmt_vec(t)}")
    if w is not None:
        s.append(f"{'class weights w':<18} = {fmt_vec(w)}")
    if kind == "logits":
        s.append(f"{'softmax(x)':<18} = {fmt_vec(p)}    p_j = e^x_j / Σ_k e^x_k")
        s.append(f"{'log_softmax(x)':<18} = {fmt_vec(logp)}    log p_j = x_j - log Σ_k e^x_k")
        s.append(f"{'log Σ_j e^x_j':<18} = {fmt(ex.lse)}")
    elif kind == "probs":
        s.append(f"{'log p':<18} = {fmt_vec(logp)}    (no softmax: the rows already are p)")
    else:
        s.append(f"{'p = e^x':<18} = {fmt_vec(p)}    (no softmax: the rows already are log p)")
    s.append("")

    if y is not None and eps == 0.0:
        s.extend(_hard_steps(ex, x, p, logp, w))
    else:
        s.extend(_general_steps(ex, p, logp, t, w))
    bits = f"{fmt(ex.loss)} nats = {fmt(ex.loss_bits)} bits"
    s.append("")
    s.append(f"loss = {bits}")
    if y is not None and eps == 0.0 and ex.input_kind == "logits":
        s.append(f"     = -log p[{y}] = -log({fmt(p[y])})")
    return s


def _hard_steps(ex: Explanation, x, p, logp, w) -> list[str]:
    y = ex.target
    s: list[str] = []
    if ex.input_kind == "logits":
        s.append("loss = -x[class] + log Σ_j exp(x_j)")
        terms = _sum_terms([_exp_term(v) for v in x])
        s.append(f"     = {_neg(x[y])} + log({terms})")
        s.append(f"     = {fmt(-x[y])} + {fmt(ex.lse)}")
        s.append(f"     = {fmt(-x[y] + ex.lse)}")
    elif ex.input_kind == "probs":
        s.append("loss = -log p[class]")
        s.append(f"     = -log({fmt(x[y])})")
        s.append(f"     = {fmt(-logp[y])}")
    else:
        s.append("loss = -x[class]")
        if _neg(x[y]) != fmt(-x[y]):
            s.append(f"     = {_neg(x[y])}")
        s.append(f"     = {fmt(-x[y])}")
    if w is not None:
        s.append(
            f"weighted row loss w[{y}]·({fmt(-logp[y])}) = {fmt(w[y])}·{fmt(-logp[y])} = "
            f"{fmt(ex.loss_row)}; reduction='mean' divides by Σ w[target] = {fmt(w[y])}"
        )
    return s


def _general_steps(ex: Explanation, p, logp, t, w) -> list[str]:
    """Label smoothing and/or probability targets: loss = -Σ_c coef_c · log p_c."""
    c, eps, y = ex.classes, ex.label_smoothing, ex.target
    wv = np.ones(c) if w is None else w
    s: list[str] = []
    if y is not None:
        wy = "" if w is None else "w[y]·"
        wc = "" if w is None else "w_c·"
        s.append(f"loss = (1-ε)·{wy}(-log p[y]) + (ε/C)·Σ_c {wc}(-log p_c)    ε = {gfmt(eps)}")
        smooth = float(np.sum(wv * -logp))
        first = (1 - eps) * wv[y] * -logp[y]
        second = eps / c * smooth
        wtxt = "" if w is None else f"{gfmt(wv[y])}·"
        s.append(f"     = {gfmt(1 - eps)}·{wtxt}{fmt(-logp[y])} + ({gfmt(eps)}/{c})·{fmt(smooth)}")
        s.append(f"     = {fmt(first)} + {fmt(second)}")
        s.append(f"     = {fmt(ex.loss_row)}")
        if w is not None:
            s.append(f"reduction='mean' divides by Σ w[target] = {fmt(wv[y])}")
        return s
    tp = t if eps == 0.0 else (1 - eps) * t + eps / c
    if eps:
        s.append(f"t' = (1-ε)·t + ε/C = {fmt_vec(tp)}    ε = {gfmt(eps)}")
    tname = "t'" if eps else "t"
    wc = "" if w is None else "w_c·"
    s.append(f"loss = -Σ_c {wc}{tname}_c·log p_c")
    coef = wv * tp
    terms = [f"{fmt(a)}·({fmt(b)})" for a, b in zip(coef, logp, strict=True) if a != 0]
    s.append(f"     = -({_sum_terms(terms) or '0'})")
    s.append(f"     = {fmt(ex.loss_row)}")
    total = float(np.sum(t))
    if abs(total - 1.0) > 1e-6:
        s.append(f"(the target probabilities sum to {fmt(total)}, not 1)")
    return s


def _notes(ex: Explanation, x, p) -> list[str]:
    notes: list[str] = []
    y = ex.target
    if ex.input_kind == "logits":
        if looks_like_probabilities(x) and y is not None and ex.label_smoothing == 0.0:
            probs_loss = float(-np.log(max(x[y], np.finfo(np.float64).tiny)))
            notes.append(
                f"Why is this not {fmt(probs_loss)}? CrossEntropyLoss applies softmax to its "
                "input: it expects logits (unbounded scores), not probabilities. Read as "
                f"logits, {fmt_vec(x)} becomes softmax = {fmt_vec(p)}, so the target gets "
                f"p = {fmt(p[y])} and the loss is -log({fmt(p[y])}) = {fmt(-math.log(p[y]))}. "
                f"Read as probabilities, -log p[{y}] = -log({fmt(x[y])}) = {fmt(probs_loss)}."
            )
            notes.append(
                "If your model already ends with a softmax layer, use --input-kind probs "
                "(in PyTorch: nn.NLLLoss()(torch.log(p), y)); better, drop the softmax layer "
                "and keep CrossEntropyLoss, which is numerically more stable."
            )
        notes.append(
            "CrossEntropyLoss(x, y) = NLLLoss(log_softmax(x), y): softmax and log are "
            "fused, and the log is natural (divide by ln 2 = 0.6931 for bits)."
        )
    elif ex.input_kind == "probs":
        total = float(np.sum(x))
        if np.any(x < 0) or abs(total - 1.0) > 1e-3:
            notes.append(
                f"These numbers are not a probability distribution (sum = {fmt(total)}): "
                "if they are raw scores, use --input-kind logits."
            )
        if y is not None and x[y] <= 0:
            notes.append(
                f"p[{y}] = 0 would give an infinite loss; xent clamps p to the smallest "
                "normal float of the data's precision: 708.40 here (float64), 87.34 for "
                "float32 data."
            )
    else:
        lse = float(np.log(np.sum(np.exp(x - np.max(x)))) + np.max(x))
        if abs(lse) > 1e-3:
            notes.append(
                f"These numbers are not log-probabilities: log Σ_j e^x_j = {fmt(lse)}, not 0. "
                "NLLLoss takes log_softmax outputs; raw scores need --input-kind logits."
            )
    return notes


__all__ = ["Explanation", "explain", "fmt", "fmt_vec"]
