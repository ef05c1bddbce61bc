"""The one place that reads and sets the number of kernel threads (Numba's thread pool)."""

from __future__ import annotations

import os

from engine.errors import XentUsageError


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask; containers often restrict it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_limit() -> int:
    """The most threads Numba's pool was started with (NUMBA_NUM_THREADS)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


def set_threads(threads: int | None, *, clamp: bool = False) -> int:
    """Use ``threads`` kernel threads from now on and return the number in use.

    ``None`` keeps the current setting. A number above Numba's limit is a usage error
    (the user asked for it: ``--threads``), or is lowered to the limit with ``clamp=True``
    (a number the program worked out itself, as the Dask runner and the benchmarks do).
    """
    import numba

    if threads is None:
        return numba.get_num_threads()
    threads = int(threads)
    limit = thread_limit()
    if threads < 1:
        raise XentUsageError(f"--threads {threads}: must be at least 1")
    if threads > limit:
        if not clamp:
            raise XentUsageError(
                f"--threads {threads}: Numba was started with {limit} threads at most "
                "(set NUMBA_NUM_THREADS to allow more)"
            )
        threads = limit
    numba.set_num_threads(threads)
    return threads
