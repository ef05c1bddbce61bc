"""Write llama.cpp KL-divergence base files (test helper), as perplexity.cpp does.

`write_kld` quantises each row's log-softmax exactly as llama.cpp's
``log_softmax(int, const float *, uint16_t *, int)`` does in float32 (docs/llama-kld-format.md)
and returns what a faithful reader must give back: the dequantised log-probs and targets.
"""

from __future__ import annotations

import numpy as np


def quantise(logits: np.ndarray):
    """(scale, min_log_prob, q) per row, float32 arithmetic as in llama.cpp."""
    x = np.asarray(logits, np.float32)
    mx = x.max(axis=1)
    mn = np.maximum(x.min(axis=1), mx - np.float32(16))
    sum_exp = np.exp((x - mx[:, None]).astype(np.float32)).astype(np.float64).sum(axis=1)
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    min_log_prob = (mn - mx - log_sum_exp).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    q = np.zeros(x.shape, np.uint16)
    ok = scale > 0
    inv = np.float32(1) / np.where(ok, scale, np.float32(1))
    vals = np.rint((inv[:, None] * (x - mn[:, None])).astype(np.float32))
    q[ok] = np.where(x[ok] > mn[ok, None], vals[ok], 0).astype(np.uint16)
    return scale, min_log_prob, q


def write_kld(path, logits: np.ndarray, tokens: np.ndarray, n_ctx: int):
    """Write a base file whose rows are ``logits`` (n_chunk·R rows, R = n_ctx - 1 - n_ctx/2).

    Returns (dequantised log-probs as llama.cpp reads them, the target of each row)."""
    n_vocab = logits.shape[1]
    R = n_ctx - 1 - n_ctx // 2
    n_chunk = len(tokens) // n_ctx
    assert logits.shape[0] == n_chunk * R and len(tokens) == n_chunk * n_ctx
    scale, mlp, q = quantise(logits)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.zeros((logits.shape[0], nv), np.uint16)
    rows[:, 0:2] = scale.astype("<f4").view("<u2").reshape(-1, 2)
    rows[:, 2:4] = mlp.astype("<f4").view("<u2").reshape(-1, 2)
    rows[:, 4 : 4 + n_vocab] = q
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(np.array([n_ctx, n_vocab, n_chunk], "<i4").tobytes())
        f.write(np.asarray(tokens, "<i4").tobytes())
        f.write(rows.astype("<u2").tobytes())
    deq = (q.astype(np.float32) * scale[:, None]).astype(np.float32) + mlp[:, None]
    idx = (np.arange(n_chunk)[:, None] * n_ctx + n_ctx // 2 + np.arange(R)[None, :]).reshape(-1)
    return deq.astype(np.float32), np.asarray(tokens)[idx + 1].astype(np.int64)
