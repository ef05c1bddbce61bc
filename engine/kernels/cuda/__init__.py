"""Numba CUDA twins of the row kernels (the contract of ``engine/kernels/__init__.py``).

Three layers (stumpy's habit): plain ``@cuda.jit`` kernels (:mod:`.device`, with the
simulator's warp reductions in :mod:`.sim`), a host driver that moves data and launches
(:mod:`.driver`), and this front door: :func:`forward`, :func:`forward_grad`, :func:`stats`
(and :func:`compare`, :func:`topk`).
The public API elsewhere validates. Importing this package does not import numba.cuda;
the first kernel call does.

To override the platform's launch configuration (tests, benchmarks), set
``engine.kernels.cuda.driver.LAUNCH`` to a :class:`LaunchConfig`.
"""

from __future__ import annotations

import numpy as np

import engine.kernels.cuda.driver as driver
from engine.kernels import Problem, block_sums_on_host
from engine.kernels.cuda.driver import (
    NO_CUDA_MESSAGE,
    LaunchConfig,
    is_available,
    launch_shape,
    release_buffers,
)
from engine.kernels.cuda.sim import simulated

__all__ = [
    "NO_CUDA_MESSAGE",
    "LaunchConfig",
    "compare",
    "forward",
    "forward_grad",
    "is_available",
    "launch_shape",
    "release_buffers",
    "simulated",
    "stats",
    "topk",
]


def forward(p: Problem, loss=None, lse=None, sums=None):
    """(loss, lse) per row, arrays of the compute dtype (see engine/kernels/__init__.py).

    ``loss``/``lse`` (host buffers the CPU backend may fill) are not used here; ``sums``
    is filled on the host from the loss rows."""
    res = driver.run(p, "forward")
    if sums is not None:
        block_sums_on_host(res["loss"], sums)
    return res["loss"], res["lse"]


def forward_grad(p: Problem, scale, zscale, out: np.ndarray, loss=None, lse=None, sums=None):
    """As :func:`forward`, and writes d loss / d logits into ``out`` (may be ``p.x``)."""
    res = driver.run(p, "grad", scale, zscale, out)
    if sums is not None:
        block_sums_on_host(res["loss"], sums)
    return res["loss"], res["lse"]


def stats(p: Problem) -> dict:
    """RowStats arrays: loss, lse, target_logprob, argmax, max_prob, entropy, target_rank
    (and kl for soft targets); floats in the compute dtype, argmax / target_rank int64."""
    return driver.run(p, "stats")


def compare(a, kind_a: str, b, kind_b: str, y, temperature: float) -> dict:
    """Per-row values of two models' logits (see engine.kernels.cpu.compare)."""
    return driver.run_compare(a, kind_a, b, kind_b, y, temperature)


def topk(p: Problem, k: int):
    """(indices int32 rows x k, log-probs float32 rows x k, lse of the compute dtype) of the
    rows of ``p``, as engine.kernels.cpu.topk: indices by descending value, the smaller
    index first on ties (NaN ranks last); 1 <= k <= C."""
    return driver.run_topk(p, k)
