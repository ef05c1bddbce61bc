"""Numba's CUDA simulator: whether it is on, and the warp reductions it lacks.

Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) the kernels run as Python threads, and
there are no warp shuffles. Each warp reduction therefore gathers the 32 lane values
through the block (one barrier) and replays the same xor butterfly, so results have the
bits the shuffles give. This is valid because every kernel keeps block-uniform control flow
around its reductions (padding rows of the last block take part with no data and return
only after the last barrier).
"""

from __future__ import annotations

import threading

__all__ = ["argmax", "butterfly", "simulated", "sum3"]


def simulated() -> bool:
    """True when Numba's CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM=1)."""
    try:
        from numba.cuda.core import config
    except Exception:  # pragma: no cover - older numba-cuda layouts
        try:
            from numba import config
        except Exception:
            return False
    return bool(getattr(config, "ENABLE_CUDASIM", 0))


def _warp_values(value):
    """Simulator: the values of the 32 lanes of the calling thread's warp (one barrier).

    The simulator has no warp shuffles. Two mailboxes are used alternately: a thread writes
    the next exchange's box only after passing this exchange's barrier, which every thread
    passes only after the previous exchange's reads are done. Every thread of the block must
    call it the same number of times (the kernels keep block-uniform control flow around
    reductions for this reason).
    """
    th = threading.current_thread()
    turn = getattr(th, "_xent_turn", 0)
    th._xent_turn = turn ^ 1
    boxes = th._manager.__dict__.setdefault("_xent_lanes", ({}, {}))
    box = boxes[turn]
    box[th.thread_id] = value
    th.syncthreads()
    base = th.thread_id - th.thread_id % 32
    return [box[base + lane] for lane in range(32)], th.thread_id % 32


def butterfly(value, op):
    """Replays the five shfl_xor steps of the GPU code on the gathered lane values, so
    the result has the same bits as the shuffles would give (op(own, partner) order)."""
    cur, lane = _warp_values(value)
    for k in (16, 8, 4, 2, 1):
        cur = [op(cur[i], cur[i ^ k]) for i in range(32)]
    return cur[lane]


def sum3(a, b):
    """The butterfly step of three sums."""
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def argmax(a, b):
    """The butterfly step of (value, index): the larger value, the lower index on a tie."""
    return b if (b[0] > a[0] or (b[0] == a[0] and b[1] < a[1])) else a
