"""The host driver: launch configuration, staging buffers, streams, and one run of a kernel.

Launch shapes (see :mod:`.device` for what the kernels do with them):

- small C (``C <= LaunchConfig.warp_max_classes``, 1024): a warp per row (``T = 32``),
  ``rows_per_block`` (8) rows per 256-thread block, grid = ceil(rows / 8).
- large C: one block per row, ``T`` = 128..1024 threads (at least ~16 classes per thread),
  grid = rows.

The driver moves NumPy arrays over PCIe (~25-50 GB/s), an order of magnitude below HBM: end
to end, a host-resident Problem is transfer-bound. It therefore splits the rows into chunks
(device memory bounded by ``LaunchConfig.chunk_bytes`` per slot), keeps two pinned host
staging slots and two streams, and enqueues chunk k+1's host→device copy while chunk k's
kernel runs; only per-row results (and the gradient when asked) come back. Gradients are
computed and copied back in the compute dtype and narrowed on the host for
float16/bfloat16 ``out`` buffers.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np

import engine.kernels.cuda.device as device
from engine import dtypes
from engine.kernels import (
    STORAGE_BF16_BITS,
    STORAGE_F16_BITS,
    STORAGE_NATIVE,
    Problem,
)
from engine.kernels.cuda.sim import simulated

# Imported here, before the package's ``topk`` function is defined: importing the submodule
# later (inside run_topk) would rebind ``engine.kernels.cuda.topk`` to the module.
from engine.kernels.cuda.topk import index_digits, threads_per_row, topk_kernel

NO_CUDA_MESSAGE = "CUDA requested but no CUDA device/driver was found"

__all__ = [
    "LAUNCH",
    "NO_CUDA_MESSAGE",
    "LaunchConfig",
    "is_available",
    "launch_shape",
    "release_buffers",
    "run",
    "run_topk",
]


@dataclass
class LaunchConfig:
    """Tunables of the launch shape and of the host pipeline."""

    warp_max_classes: int = 1024  # C at or below this: a warp per row
    rows_per_block: int = 8  # warps (rows) per block in the warp-per-row shape
    max_block_threads: int = 1024  # threads per row in the block-per-row shape
    chunk_bytes: int = 128 << 20  # device bytes per pipeline slot (two slots)


# Python threads are expensive in the simulator: smaller blocks, same code paths.
_SIM_LAUNCH = LaunchConfig(rows_per_block=2, max_block_threads=64, chunk_bytes=64 << 20)
_GPU_LAUNCH = LaunchConfig()

# Set this (tests, benchmarks) to override the platform default.
LAUNCH: LaunchConfig | None = None

_RUN_LOCK = threading.Lock()


def is_available() -> bool:
    """True when a CUDA device and driver (or the simulator) can run these kernels."""
    try:
        from numba import cuda as _cuda
    except Exception:
        return False
    try:
        return bool(_cuda.is_available())
    except Exception:
        return False


def _require() -> None:
    if not is_available():
        raise RuntimeError(NO_CUDA_MESSAGE)
    device.build()


def _launch_config() -> LaunchConfig:
    if LAUNCH is not None:
        return LAUNCH
    return _SIM_LAUNCH if simulated() else _GPU_LAUNCH


def _row_threads(classes: int, cfg: LaunchConfig) -> int:
    limit = max(32, min(1024, cfg.max_block_threads) // 32 * 32)
    t = min(128, limit)
    while t < limit and t * 16 < classes:
        t *= 2
    return min(t, limit)


def launch_shape(rows: int, classes: int, cfg: LaunchConfig | None = None):
    """(grid, block, threads per row) for a chunk of ``rows`` rows of ``classes`` classes."""
    cfg = cfg or _launch_config()
    if classes <= cfg.warp_max_classes:
        per_block = max(1, cfg.rows_per_block)
        return (rows + per_block - 1) // per_block, 32 * per_block, 32
    t = _row_threads(classes, cfg)
    return rows, t, t


class _Pool:
    """Pinned host and device buffers kept between calls (allocating pinned memory is slow).

    A buffer is reused when its dtype and trailing shape match and it has enough rows;
    the pool holds at most one buffer per (name, slot), so memory stays bounded by the
    largest chunk seen. :func:`release_buffers` frees everything.
    """

    def __init__(self):
        self._bufs: dict = {}

    def get(self, name, slot, shape, dtype, pinned):
        from numba import cuda

        dtype = np.dtype(dtype)
        key = (name, slot, pinned)
        buf = self._bufs.get(key)
        if (
            buf is None
            or buf.dtype != dtype
            or tuple(buf.shape[1:]) != tuple(shape[1:])
            or buf.shape[0] < shape[0]
        ):
            self._bufs.pop(key, None)
            alloc = cuda.pinned_array if pinned else cuda.device_array
            buf = alloc(shape, dtype=dtype)
            self._bufs[key] = buf
        return buf

    def clear(self):
        self._bufs.clear()


_POOL = _Pool()


def release_buffers() -> None:
    """Free the pinned host and device staging buffers kept between calls."""
    with _RUN_LOCK:
        _POOL.clear()


def _grad_writer(out: np.ndarray, p: Problem):
    """A function storing a compute-dtype gradient chunk into rows of ``out``."""
    dt = out.dtype
    if dt in (np.float16, np.float32, np.float64):
        return lambda dst, g: np.copyto(dst, g, casting="unsafe")
    if dt in (np.uint16, np.int16):
        if p.storage == STORAGE_F16_BITS:
            return lambda dst, g: np.copyto(dst.view(np.float16), g, casting="unsafe")
        if p.storage == STORAGE_BF16_BITS:

            def write_bf16(dst, g):
                dst[...] = dtypes.float32_to_bf16_bits(g.astype(np.float32)).view(dt)

            return write_bf16
    raise TypeError(
        f"out must be float16/float32/float64 (or 16-bit storage of the logits' own "
        f"16-bit encoding); got {dt} for storage {p.storage}"
    )


def _device_logits(p: Problem) -> np.ndarray:
    x = p.x
    if x.ndim != 2:
        raise ValueError("logits must be 2-D (rows x classes)")
    if p.storage == STORAGE_F16_BITS:
        return x.view(np.float16)  # the hardware converts float16 on load
    if p.storage == STORAGE_BF16_BITS:
        return x.view(np.uint16)
    if p.storage != STORAGE_NATIVE:
        raise ValueError(f"unknown storage code {p.storage}")
    return x


def _quiet_launch_warnings() -> None:
    """Small chunks are legitimate here: no 'grid size will under-utilize' warnings."""
    try:
        from numba.core.errors import NumbaPerformanceWarning
    except Exception:  # pragma: no cover
        return
    warnings.simplefilter("ignore", NumbaPerformanceWarning)


def _scalar(compute: np.dtype, v) -> np.generic:
    return compute.type(v)


def run(p: Problem, mode: str, scale=None, zscale=None, out=None) -> dict:
    """Streams ``p`` through the kernel of ``mode`` ("forward", "grad" or "stats") in
    chunks; returns the per-row result arrays by name (and fills ``out`` for "grad")."""
    _require()
    from numba import cuda

    compute = np.dtype(p.compute)
    xin = _device_logits(p)
    n, C = xin.shape
    soft = p.t is not None
    grad = mode == "grad"
    writer = _grad_writer(out, p) if grad else None
    if grad and out.shape != p.x.shape:
        raise ValueError(f"out has shape {out.shape}, logits {p.x.shape}")

    int_fields = ("argmax", "target_rank") if mode == "stats" else ()
    if mode == "stats":
        fields = ["loss", "lse", "target_logprob", "argmax", "max_prob", "entropy"]
        fields += ["target_rank"] + (["kl"] if soft else [])
    else:
        fields = ["loss", "lse"]
    results = {f: np.zeros(n, dtype=np.int64 if f in int_fields else compute) for f in fields}
    if n == 0:
        return results
    if C == 0:  # nothing to read: lse of an empty row is -inf, every target is invalid
        results["lse"][:] = -np.inf
        if mode == "stats":
            results["target_logprob"][:] = np.nan
            results["target_rank"][:] = -1
        return results

    if grad:
        scale = np.broadcast_to(np.asarray(scale, dtype=compute), (n,))
        zscale = np.broadcast_to(np.asarray(zscale, dtype=compute), (n,))
    cfg = _launch_config()
    per_row = C * (xin.itemsize + (compute.itemsize if soft else 0))
    per_row += C * compute.itemsize if grad else 0
    per_row += 16 * 8
    R = int(max(1, min(n, cfg.chunk_bytes // per_row)))

    loss_k, stats_k = device.kernels(p.storage == STORAGE_BF16_BITS, compute)
    eps = _scalar(compute, p.eps)
    zeta = _scalar(compute, p.zeta)
    cap = _scalar(compute, p.cap)
    tiny = _scalar(compute, np.finfo(compute).tiny)

    with _RUN_LOCK:
        w_dev = cuda.to_device(np.ascontiguousarray(p.w, dtype=compute))
        streams = (cuda.stream(), cuda.stream())
        dummy_y = _POOL.get("dummy_y", 0, (1,), np.int64, False)
        dummy_2d = _POOL.get("dummy_2d", 0, (1, 1), compute, False)
        dummy_1d = _POOL.get("dummy_1d", 0, (1,), compute, False)
        pending: list = [None, None]

        def finish(slot):
            job = pending[slot]
            if job is None:
                return
            pending[slot] = None
            r0, r1, host_out = job
            streams[slot].synchronize()
            k = r1 - r0
            for f in fields:
                results[f][r0:r1] = host_out[f][:k]
            if grad:
                writer(out[r0:r1], host_out["grad"][:k])

        nchunks = (n + R - 1) // R
        with warnings.catch_warnings():
            _quiet_launch_warnings()
            try:
                for ci, r0 in enumerate(range(0, n, R)):
                    slot = ci & 1
                    st = streams[slot]
                    finish(slot)  # the slot's buffers are free again once its last chunk is in
                    r1 = min(n, r0 + R)
                    k = r1 - r0
                    hx = _POOL.get("x", slot, (R, C), xin.dtype, True)[:k]
                    dx = _POOL.get("x", slot, (R, C), xin.dtype, False)[:k]
                    np.copyto(hx, xin[r0:r1])
                    dx.copy_to_device(hx, stream=st)
                    if soft:
                        ht = _POOL.get("t", slot, (R, C), compute, True)[:k]
                        dt = _POOL.get("t", slot, (R, C), compute, False)[:k]
                        np.copyto(ht, p.t[r0:r1], casting="same_kind")
                        dt.copy_to_device(ht, stream=st)
                        dy = dummy_y
                    else:
                        hy = _POOL.get("y", slot, (R,), np.int64, True)[:k]
                        dy = _POOL.get("y", slot, (R,), np.int64, False)[:k]
                        np.copyto(hy, p.y[r0:r1], casting="same_kind")
                        dy.copy_to_device(hy, stream=st)
                        dt = dummy_2d
                    host_out = {}
                    dev_out = {}
                    for f in fields:
                        dtp = np.int64 if f in int_fields else compute
                        host_out[f] = _POOL.get("o_" + f, slot, (R,), dtp, True)[:k]
                        dev_out[f] = _POOL.get("o_" + f, slot, (R,), dtp, False)[:k]
                    grid, block, T = launch_shape(k, C, cfg)
                    common = (k, C, T, p.kind, int(soft), eps, zeta, cap, tiny)
                    if mode == "stats":
                        stats_k[grid, block, st](
                            dx, dy, dt, w_dev,
                            *(dev_out[f] for f in fields[:7]),
                            dev_out["kl"] if soft else dummy_1d,
                            *common,
                        )  # fmt: skip
                    else:
                        if grad:
                            hs = _POOL.get("scale", slot, (R,), compute, True)[:k]
                            hz = _POOL.get("zscale", slot, (R,), compute, True)[:k]
                            ds = _POOL.get("scale", slot, (R,), compute, False)[:k]
                            dz = _POOL.get("zscale", slot, (R,), compute, False)[:k]
                            # (one-entry scales apply to every row: broadcast)
                            np.copyto(hs, scale[r0:r1] if scale.shape[0] > 1 else scale)
                            np.copyto(hz, zscale[r0:r1] if zscale.shape[0] > 1 else zscale)
                            ds.copy_to_device(hs, stream=st)
                            dz.copy_to_device(hz, stream=st)
                            dg = _POOL.get("g", slot, (R, C), compute, False)[:k]
                            host_out["grad"] = _POOL.get("g", slot, (R, C), compute, True)[:k]
                        else:
                            ds = dz = dummy_1d
                            dg = dummy_2d
                        loss_k[grid, block, st](
                            dx, dy, dt, w_dev, ds, dz, dg, dev_out["loss"], dev_out["lse"],
                            *common, int(grad),
                        )  # fmt: skip
                        if grad:
                            dg.copy_to_host(host_out["grad"], stream=st)
                    for f in fields:
                        dev_out[f].copy_to_host(host_out[f], stream=st)
                    pending[slot] = (r0, r1, host_out)
                last = (nchunks - 1) & 1  # drain in chunk order
                finish(last ^ 1)
                finish(last)
            finally:  # never leave copies in flight into buffers the pool hands out again
                for st in streams:
                    st.synchronize()
    return results


def run_compare(a, kind_a: str, b, kind_b: str, y, temperature: float) -> dict:
    """The compare kernel over one chunk pair (rows x C each, kinds from engine.dtypes):
    the per-row values by name, as engine.kernels.cpu.compare returns them. The job layer
    hands chunks of bounded size, so one transfer each way per call."""
    _require()
    from numba import cuda

    from engine.kernels.cuda.divergence import compare_kernel

    compute = np.dtype(np.float64 if "float64" in (kind_a, kind_b) else np.float32)
    n, C = a.shape
    vals = np.full((6, n), np.nan, dtype=compute)
    idx = np.zeros((3, n), dtype=np.int64)
    if n and C:
        views = {"bfloat16": np.uint16}
        ha = np.ascontiguousarray(a.view(views[kind_a]) if kind_a in views else a)
        hb = np.ascontiguousarray(b.view(views[kind_b]) if kind_b in views else b)
        hy = np.zeros(0, np.int64) if y is None else np.ascontiguousarray(y, dtype=np.int64)
        kernel = compare_kernel(kind_a == "bfloat16", kind_b == "bfloat16", compute)
        grid, block, T = launch_shape(n, C, _launch_config())
        with _RUN_LOCK, warnings.catch_warnings():
            _quiet_launch_warnings()
            dv = cuda.to_device(vals)
            di = cuda.to_device(idx)
            dy = cuda.to_device(hy if hy.size else np.zeros(0, np.int64))
            kernel[grid, block](
                cuda.to_device(ha), cuda.to_device(hb), dy, _scalar(compute, 1.0 / temperature),
                dv, di, n, C, T,
            )  # fmt: skip
            vals = dv.copy_to_host()
            idx = di.copy_to_host()
    names = ("kl", "kl_reverse", "jsd", "tvd", "logp_base", "logp_candidate")
    out = {k: vals[i].astype(np.float64) for i, k in enumerate(names)}
    for i, k in enumerate(("base_argmax", "candidate_argmax", "candidate_rank")):
        out[k] = idx[i]
    return out


def run_topk(p: Problem, k: int):
    """The top-K kernel over the rows of ``p``: (indices int32 rows x k, log-probs float32
    rows x k, lse of the compute dtype), the contract of engine.kernels.cpu.topk. Rows go
    in chunks of at most ``chunk_bytes`` of logits, one transfer each way per chunk."""
    _require()
    from numba import cuda

    compute = np.dtype(p.compute)
    xin = _device_logits(p)
    n, C = xin.shape
    idx = np.empty((n, k), np.int32)
    logp = np.empty((n, k), np.float32)
    lse = np.empty(n, compute)
    if n == 0:
        return idx, logp, lse
    if not 1 <= k <= C:
        raise ValueError(f"k must be between 1 and the number of classes ({C}), got {k}")
    cfg = _launch_config()
    kernel = topk_kernel(p.storage == STORAGE_BF16_BITS, compute)
    T = threads_per_row(C, cfg.max_block_threads)
    idig = index_digits(C)
    cap = np.float64(p.cap)  # the transforms run in float64, as on the CPU
    tiny = np.float64(np.finfo(compute).tiny)
    R = int(max(1, min(n, cfg.chunk_bytes // (C * xin.itemsize))))
    with _RUN_LOCK, warnings.catch_warnings():
        _quiet_launch_warnings()
        for r0 in range(0, n, R):
            r1 = min(n, r0 + R)
            dx = cuda.to_device(np.ascontiguousarray(xin[r0:r1]))
            di = cuda.device_array((r1 - r0, k), np.int32)
            dl = cuda.device_array((r1 - r0, k), np.float32)
            ds = cuda.device_array(r1 - r0, compute)
            kernel[r1 - r0, T](dx, k, cap, int(p.kind), tiny, di, dl, ds, C, T, idig)
            di.copy_to_host(idx[r0:r1])
            dl.copy_to_host(logp[r0:r1])
            ds.copy_to_host(lse[r0:r1])
    return idx, logp, lse
