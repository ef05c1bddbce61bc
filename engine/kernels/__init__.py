"""Row kernels and the one contract every backend honours.

The host (engine/api.py, engine/jobs/chunks.py) turns user input into a :class:`Problem`:
flat arrays and scalars, targets already validated, ignored rows marked with class -1.
A backend module (``cpu``, ``cuda``) exposes three functions over a Problem:

- ``forward(p, loss=None, lse=None, sums=None) -> (loss, lse)``: per-row loss (0 for
  ignored rows; z-loss term included) and log-sum-exp, arrays of the compute dtype; a
  backend may fill the given host buffers instead of allocating (the CPU one does, CUDA
  ignores them). Every backend fills ``sums`` when given (float64, sum_blocks(rows)
  entries): sums[b] = Σ loss[i] over rows b·SUM_ROWS .. (b+1)·SUM_ROWS - 1, in float64
  and in an order that depends on nothing but b, so a mean/sum reads 1/64 of the rows
  (the CPU kernels add them while the losses are in cache: one pass over the rows less).
- ``forward_grad(p, scale, zscale, out, loss=None, lse=None, sums=None) -> (loss, lse)``:
  as forward, and writes d loss / d logits into ``out`` (same shape as the logits; may
  *be* the logits buffer).
  ``scale[i]`` multiplies row i's cross-entropy gradient, ``zscale[i]`` its z-loss term
  (they differ under ``mean``: weighted vs counted-row denominators). Arrays of one entry
  apply to every row (mean/sum scales are constant: no per-row array to fill and read).
- ``stats(p) -> dict``: RowStats arrays (loss, lse, target_logprob, argmax, max_prob,
  entropy, target_rank, and kl for soft targets).

Kernels know nothing of reductions (quack's split): the host reduces in float64, at most
from the per-block partial sums above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.kernels.cache_guard import ensure_fresh

# Before any kernel of this package loads from Numba's cache: drop machine code built from
# other sources (Numba itself only checks the file that defines each kernel).
ensure_fresh()

# How the logits buffer stores numbers. Numba's CPU target has no float16, so float16
# and bfloat16 both reach kernels as uint16 bit patterns and are widened in registers.
STORAGE_NATIVE, STORAGE_F16_BITS, STORAGE_BF16_BITS = 0, 1, 2

SUM_ROWS = 64  # rows per partial loss sum (see forward)


def sum_blocks(rows: int) -> int:
    return -(-rows // SUM_ROWS)


def block_sums_on_host(loss: np.ndarray, sums: np.ndarray) -> None:
    """``sums`` of the contract from finished loss rows (backends that do not fuse them)."""
    padded = np.zeros(sums.shape[0] * SUM_ROWS)
    padded[: loss.shape[0]] = loss
    sums[:] = padded.reshape(-1, SUM_ROWS).sum(axis=1)


@dataclass
class Problem:
    x: np.ndarray  # 2-D logits: float32/float64, or uint16 bits (see storage)
    storage: int  # STORAGE_* code
    compute: np.dtype  # float32 or float64: the arithmetic precision
    y: np.ndarray | None  # int64 class per row, -1 = not counted (ignored / null)
    t: np.ndarray | None  # 2-D soft targets in the compute dtype (rows x classes)
    w: np.ndarray  # class weights, compute dtype, length C
    eps: float  # label smoothing
    zeta: float  # z-loss scale
    cap: float  # softcap (0 = none)
    kind: int  # options.KIND_* (logits, log_probs, probs)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def classes(self) -> int:
        return self.x.shape[1]

    @property
    def soft(self) -> bool:
        return self.t is not None

    @property
    def itemsize(self) -> int:
        return self.x.dtype.itemsize
