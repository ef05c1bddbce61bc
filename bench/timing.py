"""How the kernel benchmark times a call, fairly, on a shared machine.

Warm-up calls come first (compilation excluded for every provider; the engine's very
first call of a case is timed separately as ``first_call_s``: Numba compile or cache load
when it is the first call of its kernel and dtype in the process), then ``repeats`` timed
calls, round-robin over the providers in a rotating order, each after 20 ms of
busy-waiting (``settle``) and one untimed lead-in call (``time_call(..., lead_in=True)``):
median, p20 and p80 seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# Providers are timed round-robin in one process. OpenMP worker threads (torch's, and
# Numba's when its threading layer is OpenMP) spin for a while after each parallel region
# by default, stealing the 2 cores from whichever provider runs next. Passive waiting makes
# the comparison fair; it must be set before torch or numba start their thread pools.
# bench.kernels imports this module before anything that loads torch or numba.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SETTLE_S = 0.02  # busy-wait before each provider's lead-in call (see time_call)


def settle(seconds: float = SETTLE_S) -> None:
    """Busy-wait ``seconds`` (keeps the core awake; a sleep would let it idle)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def time_call(call: Callable[[], object], lead_in: bool = False) -> tuple[float, object]:
    """Seconds of one ``call()`` and what it returned; ``lead_in``: settle and call once first."""
    if lead_in:
        # JAX/XLA and OpenMP pools spin after a call, so round-robin timing would charge
        # that spinning to whichever provider runs next, and with a rotating order the
        # same provider always follows jax. Measured at C=32000 forward, engine alone
        # 24-27 GB/s; right after jax 12-15; after jax and one untimed lead-in call 16-17;
        # after jax, 20 ms of busy-waiting and the lead-in call ~22. So: busy-wait, then
        # one untimed call. Sleeping instead is worse: after 0.05-0.15 s idle every
        # provider's next call is slow (engine 17 GB/s back to back vs 9 after a sleep),
        # while a streaming job calls its kernel back to back.
        settle()
        call()
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def set_threads(threads: int | None) -> int:
    """Numba's and torch's CPU threads (lowered to Numba's limit); None leaves them as they are.

    Returns the number of Numba threads in use.
    """
    from engine.threads import set_threads as set_kernel_threads

    n = set_kernel_threads(threads, clamp=True)
    if threads is not None:
        try:
            import torch

            torch.set_num_threads(n)
        except Exception:
            pass
    return n
