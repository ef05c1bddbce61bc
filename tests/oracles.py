"""Independent oracles: torch (float64, autograd) for everything PyTorch can express."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine import dtypes


def torch_loss_and_grad(
    logits,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    input_kind="logits",
    logits_dtype=None,
    grad_output=1.0,
):
    """Loss and d loss / d logits by torch autograd in float64 (Liger's z-loss/softcap)."""
    x = torch.tensor(dtypes.decode(np.asarray(logits), logits_dtype).astype(np.float64))
    x.requires_grad_(True)
    z = x
    if softcap is not None:
        z = softcap * torch.tanh(x / softcap)
    w = None if weight is None else torch.tensor(np.asarray(weight, dtype=np.float64))
    target = np.asarray(target)
    tgt = torch.tensor(target.astype(np.float64) if target.ndim == 2 else target.astype(np.int64))
    if input_kind == "logits":
        inp = z
        loss = F.cross_entropy(
            inp,
            tgt,
            weight=w,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    else:
        if input_kind == "log_probs":
            logp = z
        else:
            logp = torch.log(torch.clamp(z, min=np.finfo(np.float32).tiny))
        if target.ndim == 2:
            raise NotImplementedError
        # NLL with smoothing written out (torch's nll_loss has no label_smoothing)
        n, c = logp.shape
        y = tgt
        counted = y != ignore_index
        ys = torch.where(counted, y, torch.zeros_like(y))
        wv = torch.ones(c, dtype=torch.float64) if w is None else w
        nll = -logp.gather(1, ys[:, None])[:, 0] * wv[ys]
        smooth = -(logp * wv[None, :]).sum(1)
        rows = (1 - label_smoothing) * nll + label_smoothing / c * smooth
        rows = torch.where(counted, rows, torch.zeros_like(rows))
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / (wv[ys] * counted).sum()
    if z_loss:
        lse = torch.logsumexp(z, dim=1)
        if target.ndim == 2:
            counted = torch.ones(len(lse), dtype=torch.bool)
        else:
            counted = tgt != ignore_index
        zl = torch.where(counted, z_loss * lse * lse, torch.zeros_like(lse))
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            loss = loss + zl.sum() / counted.sum()
    g = torch.as_tensor(np.asarray(grad_output, dtype=np.float64))
    if loss.ndim == 0:
        loss.backward(g)
    else:
        loss.backward(torch.broadcast_to(g, loss.shape))
    grad = x.grad.numpy() if x.grad is not None else np.zeros(x.shape)
    return loss.detach().numpy(), grad
