"""Float64 NumPy reference of every loss formula: slow, obvious, and the oracle.

Used by the tests, ``xent explain`` and the benchmarks' accuracy check. It materialises
log-softmax on purpose; the kernels never do.
"""

from __future__ import annotations

import numpy as np

from engine import dtypes
from engine.options import LossOptions, make_options


def _prepare(logits, target, opts: LossOptions):
    """Decode logits, apply softcap / input kind; return everything the formulas need."""
    logits = np.asarray(logits)
    kind = dtypes.storage_kind(logits.dtype, opts.logits_dtype)
    x = dtypes.decode(logits, opts.logits_dtype).astype(np.float64)
    if x.ndim != 2:
        raise ValueError("logits must be 2-D (rows x classes)")
    n, c = x.shape
    target = np.asarray(target)
    w = opts.weight_for(c)
    tiny = np.finfo(dtypes.compute_dtype(kind)).tiny
    cap_grad = np.ones_like(x)
    if opts.softcap is not None:
        th = np.tanh(x / opts.softcap)
        x = opts.softcap * th
        cap_grad = 1.0 - th * th
    with np.errstate(all="ignore"):
        if opts.input_kind == "logits":
            # no sanitising of the max: +inf, NaN and all -inf rows give NaN, as in torch
            m = np.max(x, axis=1, keepdims=True) if c else np.zeros((n, 1))
            lse = (m + np.log(np.sum(np.exp(x - m), axis=1, keepdims=True)))[:, 0]
            logp = x - lse[:, None]
        elif opts.input_kind == "log_probs":
            logp = x
            lse = np.zeros(n)
        else:  # probs
            logp = np.log(np.maximum(x, tiny))
            lse = np.zeros(n)
    return x, logp, lse, w, target, cap_grad, tiny


def _class_coefficients(target, n, c, w, opts: LossOptions):
    """coef[i, j] with loss_i = -Σ_j coef_ij·logp_ij, the counted mask and mean denominator."""
    eps = opts.label_smoothing
    if target.ndim == 2:  # probability targets
        t = (1.0 - eps) * target.astype(np.float64) + eps / c
        coef = w[None, :] * t
        counted = np.ones(n, dtype=bool)
        denom = float(n)
        return coef, counted, denom, float(n)
    y = target.astype(np.int64)
    counted = y != opts.ignore_index
    if np.any((y[counted] < 0) | (y[counted] >= c)):
        bad = int(y[counted][(y[counted] < 0) | (y[counted] >= c)][0])
        raise IndexError(f"Target {bad} is out of bounds.")
    ys = np.where(counted, y, 0)
    coef = np.zeros((n, c))
    coef[np.arange(n), ys] = (1.0 - eps) * w[ys]
    coef += (eps / c) * w[None, :] if c else 0.0
    coef[~counted] = 0.0
    denom = float(np.sum(w[ys][counted]))
    return coef, counted, denom, float(np.sum(counted))


def _row_terms(logits, target, opts):
    x, logp, lse, w, target, cap_grad, tiny = _prepare(logits, target, opts)
    n, c = x.shape
    coef, counted, denom, n_counted = _class_coefficients(target, n, c, w, opts)
    with np.errstate(all="ignore"):
        prod = np.where(coef == 0.0, 0.0, coef * logp)  # 0·(-inf) counts as 0
        ce = -np.sum(prod, axis=1)
        zl = np.where(counted, opts.z_loss * lse * lse, 0.0) if opts.z_loss else np.zeros(n)
    ce = np.where(counted, ce, 0.0)
    return x, logp, lse, coef, counted, denom, n_counted, ce, zl, cap_grad, tiny


def _reduce(ce, zl, denom, n_counted, reduction):
    if reduction == "none":
        return ce + zl
    if reduction == "sum":
        return float(np.sum(ce) + np.sum(zl))
    with np.errstate(all="ignore"):
        value = np.sum(ce) / denom if denom != 0 else np.nan
        if np.any(zl != 0):
            value = value + np.sum(zl) / n_counted
    return float(value)


def cross_entropy(logits, target, **options):
    opts = make_options(**options)
    _, _, _, _, _, denom, n_counted, ce, zl, _, _ = _row_terms(logits, target, opts)
    return _reduce(ce, zl, denom, n_counted, opts.reduction)


def cross_entropy_grad(logits, target, *, grad_output=1.0, **options):
    """(loss, d loss / d logits) in float64, by the closed form of the loss."""
    opts = make_options(**options)
    x, logp, lse, coef, counted, denom, n_counted, ce, zl, cap_grad, tiny = _row_terms(
        logits, target, opts
    )
    n, c = x.shape
    loss = _reduce(ce, zl, denom, n_counted, opts.reduction)
    g = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), (n,)) if n else np.zeros(0)
    if opts.reduction == "mean":
        scale = g / denom if denom != 0 else np.zeros(n)
        zscale = g / n_counted if n_counted else np.zeros(n)
        if denom == 0:
            return loss, np.zeros((n, c))
    else:
        scale = zscale = g
    with np.errstate(all="ignore"):
        if opts.input_kind == "logits":
            p = np.exp(logp)
            total = coef.sum(axis=1)
            grad = scale[:, None] * (p * total[:, None] - coef)
            if opts.z_loss:
                zterm = 2.0 * opts.z_loss * lse * np.where(counted, 1.0, 0.0)
                grad = grad + (zscale * zterm)[:, None] * p
            grad = grad * cap_grad
        elif opts.input_kind == "log_probs":
            grad = -scale[:, None] * coef
        else:
            grad = np.where(x > tiny, -scale[:, None] * coef / np.where(x > tiny, x, 1.0), 0.0)
    grad = np.where(counted[:, None], grad, 0.0)
    return loss, grad


def row_stats(logits, target, **options) -> dict:
    """Per-row statistics, as engine.row_stats returns them (dict of float64/int64 arrays)."""
    opts = make_options(**options)
    x, logp, lse, coef, counted, _, _, ce, zl, _, _ = _row_terms(logits, target, opts)
    n, c = x.shape
    target = np.asarray(target)
    with np.errstate(all="ignore"):
        p = np.exp(logp)
        entropy = -np.sum(np.where(p > 0, p * logp, 0.0), axis=1)
        argmax = np.argmax(x, axis=1) if c else np.zeros(n, dtype=np.int64)
        max_prob = np.max(p, axis=1) if c else np.zeros(n)
        if target.ndim == 2:
            t = target.astype(np.float64)
            cls = np.argmax(t, axis=1)
            target_logprob = np.sum(np.where(t > 0, t * logp, 0.0), axis=1)
            kl = np.sum(np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0), axis=1)
            kl = kl - target_logprob
        else:
            cls = np.where(counted, target.astype(np.int64), 0)
            target_logprob = np.where(counted, logp[np.arange(n), cls], np.nan)
            kl = None
        target_logit = x[np.arange(n), cls]
        # ties rank by index, as argmax takes the first maximal class: rank 0 exactly
        # when argmax is the target
        tied_before = (x == target_logit[:, None]) & (np.arange(c) < cls[:, None])
        rank = np.sum(x > target_logit[:, None], axis=1) + np.sum(tied_before, axis=1)
        rank = rank.astype(np.int64)
    rank = np.where(counted, rank, -1)
    out = {
        "loss": ce + zl,
        "lse": lse,
        "target_logprob": target_logprob,
        "argmax": argmax.astype(np.int64),
        "max_prob": max_prob,
        "entropy": entropy,
        "target_rank": rank,
    }
    if kl is not None:
        out["kl"] = kl
    return out


def compare_rows(base, candidate, target=None, *, temperature=1.0, logits_dtype=None) -> dict:
    """Per-row values of `xent compare` in float64, the obvious way (SPEC §7):
    kl = Σ p·(log p − log q), kl_reverse, jsd, tvd, both first argmaxes, the candidate's
    rank of the base's argmax (ties by index), and with targets both log-probs."""

    def log_softmax(x):
        x = dtypes.decode(np.asarray(x), logits_dtype).astype(np.float64) / temperature
        with np.errstate(all="ignore"):
            m = np.max(x, axis=1, keepdims=True)
            return x - (m + np.log(np.sum(np.exp(x - m), axis=1, keepdims=True))), x

    la, za = log_softmax(base)
    lb, zb = log_softmax(candidate)
    p, q = np.exp(la), np.exp(lb)
    with np.errstate(all="ignore"):
        m = 0.5 * (p + q)
        lm = np.log(m)
        kl = np.sum(np.where(p > 0, p * (la - lb), 0.0), axis=1)
        kl_reverse = np.sum(np.where(q > 0, q * (lb - la), 0.0), axis=1)
        jsd = 0.5 * np.sum(np.where(p > 0, p * (la - lm), 0.0), axis=1) + 0.5 * np.sum(
            np.where(q > 0, q * (lb - lm), 0.0), axis=1
        )
    tvd = 0.5 * np.sum(np.abs(p - q), axis=1)
    bad = np.isnan(la).any(axis=1) | np.isnan(lb).any(axis=1)
    for v in (kl, kl_reverse, jsd, tvd):
        v[bad] = np.nan
    ia = np.argmax(za, axis=1)
    ib = np.argmax(zb, axis=1)
    n, c = za.shape
    star = zb[np.arange(n), ia][:, None]
    before = np.arange(c)[None, :] < ia[:, None]
    rank = np.sum((zb > star) | ((zb == star) & before), axis=1)
    out = {
        "kl": kl, "kl_reverse": kl_reverse, "jsd": jsd, "tvd": tvd,
        "base_argmax": ia, "candidate_argmax": ib, "candidate_rank": rank,
    }  # fmt: skip
    if target is not None:
        y = np.asarray(target, dtype=np.int64)
        ok = y >= 0
        yy = np.where(ok, y, 0)
        out["logp_base"] = np.where(ok, la[np.arange(n), yy], np.nan)
        out["logp_candidate"] = np.where(ok, lb[np.arange(n), yy], np.nan)
    return out
