"""This machine's memory roofline, measured the way the engine's CPU kernels touch memory.

Two numbers, both from Numba ``prange`` loops over a large float32 array (default ~400 MB,
far beyond any cache), with the same thread count as the benchmark:

- ``read_gb_s``: a row-sum (every element read once, one float per row written):
  bytes = array size. The ceiling for ``forward`` and ``row_stats``, which must read the
  logits once.
- ``copy_gb_s``: ``dst[i, :] = src[i, :]``: bytes = 2 x array size (read + write; the
  write-allocate read of ``dst`` is not counted, exactly as in the kernel byte counts).
  The ceiling for ``forward_grad``, which reads the logits and writes a gradient of the
  same size.

Each figure is the median over ``repeats`` runs after one warm-up run (the best run is
reported too, as ``*_max_gb_s``).
Run it alone with ``python -m bench.roofline [--threads 2] [--mb 400]``.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

_COLS = 4096  # 16 KiB rows: long enough to vectorise, short enough to split evenly


@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)
def _row_sum(a, out, nthreads):
    n = a.shape[0]
    for b in prange(nthreads):
        lo = b * n // nthreads
        hi = (b + 1) * n // nthreads
        for i in range(lo, hi):
            s = np.float32(0.0)
            for j in range(a.shape[1]):
                s += a[i, j]
            out[i] = s


@njit(parallel=True, cache=True, nogil=True)
def _copy(src, dst, nthreads):
    n = src.shape[0]
    for b in prange(nthreads):
        lo = b * n // nthreads
        hi = (b + 1) * n // nthreads
        for i in range(lo, hi):
            for j in range(src.shape[1]):
                dst[i, j] = src[i, j]


def _times(fn, repeats: int) -> np.ndarray:
    fn()  # warm-up (compile / cache load, first-touch page faults)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def measure(threads: int | None = None, nbytes: float = 400e6, repeats: int = 5) -> dict:
    """Median read and copy bandwidth (GB/s, 1 GB = 1e9 bytes) of this machine.

    ``threads`` defaults to Numba's current thread count; the previous count is restored.
    """
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    nthreads = numba.get_num_threads()
    try:
        rows = max(nthreads, int(nbytes // (_COLS * 4)))
        src = np.ones((rows, _COLS), dtype=np.float32)
        size = src.nbytes
        sums = np.empty(rows, dtype=np.float32)
        read_s = _times(lambda: _row_sum(src, sums, nthreads), repeats)
        dst = np.empty_like(src)
        copy_s = _times(lambda: _copy(src, dst, nthreads), repeats)
    finally:
        numba.set_num_threads(previous)
    return {
        "read_gb_s": size / float(np.median(read_s)) / 1e9,
        "copy_gb_s": 2 * size / float(np.median(copy_s)) / 1e9,
        # best run: on a shared machine the median drifts with the neighbours' load
        "read_max_gb_s": size / float(read_s.min()) / 1e9,
        "copy_max_gb_s": 2 * size / float(copy_s.min()) / 1e9,
        "bytes": int(size),
        "threads": nthreads,
        "repeats": repeats,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mb", type=float, default=400.0, help="array size in MB (1e6 bytes)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    r = measure(args.threads, args.mb * 1e6, args.repeats)
    print(
        f"read {r['read_gb_s']:.2f} GB/s (best {r['read_max_gb_s']:.2f}), "
        f"copy {r['copy_gb_s']:.2f} GB/s (best {r['copy_max_gb_s']:.2f}) "
        f"({r['bytes'] / 1e6:.0f} MB, {r['threads']} threads, median of {r['repeats']})"
    )


if __name__ == "__main__":
    main()
