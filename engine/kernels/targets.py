"""One pass over class-index targets: validate, mark counted rows, sum their weights.

NumPy needs six passes and a fancy-index gather for the same job, which at C = 10 cost more
than the loss kernel itself (20 ms vs 14 ms for 2.5M rows).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_BLOCK = 1 << 16  # rows per partial sum: fixed, so the total never depends on thread count


@njit(cache=True, nogil=True, parallel=True)
def class_targets(target, c, ignore_index, valid, w, y, counted):
    """Fill y (int64, -1 where not counted) and counted (bool) from ``target``.

    An empty ``y`` is not written: the caller passes the int64 target itself as y, where
    every row not counted is already negative (ignore_index < 0, no null mask).

    ``valid`` is empty or a per-row bool mask (null targets from Arrow are not counted).
    An empty ``w`` means unit class weights: the weight sum is the row count, with no
    gather and no float64 add chain (that chain alone was ~4 cycles a row).
    Returns (weight_sum, counted_rows, first_bad_row); first_bad_row is -1 when every
    counted target is in [0, c).
    """
    n = target.shape[0]
    use_valid = valid.shape[0] != 0
    write_y = y.shape[0] != 0
    unit = w.shape[0] == 0
    nblk = (n + _BLOCK - 1) // _BLOCK
    wsum = np.zeros(nblk)
    rows = np.zeros(nblk, dtype=np.int64)
    bad = np.full(nblk, -1, dtype=np.int64)
    for b in prange(nblk):
        s = 0.0
        k = 0
        for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            v = np.int64(target[i])
            ok = v != ignore_index and (not use_valid or valid[i])
            counted[i] = ok
            if not ok:
                if write_y:
                    y[i] = -1
                continue
            if v < 0 or v >= c:
                if bad[b] < 0:
                    bad[b] = i
                if write_y:
                    y[i] = -1
                continue
            if write_y:
                y[i] = v
            if not unit:
                s += np.float64(w[v])
            k += 1
        wsum[b] = np.float64(k) if unit else s
        rows[b] = k
    first_bad = -1
    total = 0.0
    count = 0
    for b in range(nblk):
        if first_bad < 0 and bad[b] >= 0:
            first_bad = bad[b]
        total += wsum[b]
        count += rows[b]
    return total, count, first_bad
