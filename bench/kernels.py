"""In-memory kernel benchmark: the engine's fused cross-entropy against its peers.

Usage (from the repository root)::

    python -m bench.kernels [--quick] [--classes 10,1000] [--dtypes float32,float16]
        [--modes forward,forward_grad,row_stats] [--providers engine-cpu,torch-eager]
        [--repeats 7] [--threads 2] [--rows N] [--device cpu|cuda|all] [--json] [--no-save]
    python -m bench.kernels --cold-start

Importable: ``run(...)`` returns one dict per (provider, mode, dtype, classes) and
``format_table(results)`` renders them as a markdown table (``xent bench`` prints it).

Providers (each skips itself, with a reason, when it cannot run here):

- ``engine-cpu``: ``engine.cross_entropy`` / ``engine.cross_entropy_grad`` /
  ``engine.row_stats`` with ``device="cpu"`` (Numba, ``--threads`` threads).
- ``torch-eager``: ``torch.nn.functional.cross_entropy``; forward+grad is the forward plus
  ``torch.autograd.grad`` of the loss w.r.t. a leaf tensor (``torch.set_num_threads``).
- ``torch-compile``: ``torch.compile(dynamic=False)`` of the same forward; forward+grad is
  ``torch.compile`` of ``torch.func.grad_and_value`` (falls back to a compiled forward plus
  autograd when that does not compile). Compilation is excluded (warm-up calls).
- ``jax-cpu``: ``jax.jit`` of ``-take_along_axis(jax.nn.log_softmax(x), y)``, and of its
  ``jax.value_and_grad``; results are ``block_until_ready``-ed. XLA picks its own CPU
  thread pool (all cores of the machine).
- ``engine-cuda`` / ``torch-cuda``: the same on a GPU, when one is present. Both take host
  arrays and return host results (the engine's CUDA API takes NumPy arrays and streams them
  through pinned buffers), so their timings include the PCIe transfers.

Modes: ``forward`` (reduction ``mean``: one float), ``forward_grad`` (reduction ``sum``:
the loss and d loss / d logits; ``sum`` so that float16 gradients stay O(1) and do not
underflow, the cost is the same as ``mean``), ``row_stats`` (engine only; peers have no
single equivalent call and are reported as skipped).

Byte counts (1 GB = 1e9 bytes), the *compulsory* memory traffic of the logits, quack
style; targets (8 bytes/row) and per-row outputs are left out::

    forward      bytes = rows * C * itemsize        (logits read once)
    row_stats    bytes = rows * C * itemsize        (logits read once)
    forward_grad bytes = 2 * rows * C * itemsize    (logits read once + gradient written
                                                     once, in the logits dtype)

Every provider gets the same byte count for a shape, so GB/s ratios are time ratios. A
kernel that reads a row twice (the engine's second read comes from L1/L2; torch's eager
backward re-reads from memory) is not credited for the second read. The gradient has the
logits dtype for every provider. The engine writes it into a buffer allocated once
(``out=``, which its API offers and the peers' do not); the peers allocate theirs per
call. On this VM first-touch page faults of a fresh 100 MB buffer cost anywhere from 10 to
200 ms at random (measured: the engine's forward_grad at C=1000 swung 1.0-9.6 GB/s with a
fresh ``np.empty_like`` per call), so a per-call allocation measures the VM, not a kernel.

Timing: warm-up calls first (compilation excluded for every provider; the engine's very
first call of a case is timed separately as ``first_call_s``: Numba compile or cache load
when it is the first call of its kernel and dtype in the process), then ``repeats`` timed
calls, round-robin over the providers in a rotating order, each after 20 ms of
busy-waiting and one untimed lead-in call: median, p20 and p80 seconds.
``ratio_to_best_peer`` = engine GB/s / best peer GB/s for the same shape, measured in the
same process (CPU engine vs CPU peers, CUDA vs CUDA).
``roofline_share`` = GB/s / this machine's read bandwidth (forward, row_stats) or copy
bandwidth (forward_grad), measured by bench/roofline.py in the same run.

Correctness: each peer's loss (and gradient) from its warm-up call is compared with the
engine's; ``check`` holds the relative loss difference and the gradient's max abs
difference relative to max |grad|; disagreements beyond 1e-5 (float32) / 2e-3 (float16)
are printed as warnings.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json as _json
import os
import socket
import subprocess
import sys
import tempfile

# Providers are timed round-robin in one process. OpenMP worker threads (torch's, and
# Numba's when its threading layer is OpenMP) spin for a while after each parallel region
# by default, stealing the 2 cores from whichever provider runs next. Passive waiting makes
# the comparison fair; it must be set before torch or numba start their thread pools.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CLASSES = (10, 128, 1000, 32000, 128256, 262144)
QUICK_CLASSES = (10, 1000, 32000, 128256)
DEFAULT_MODES = ("forward", "forward_grad")
ALL_MODES = ("forward", "forward_grad", "row_stats")
TARGET_BYTES = 100e6  # logits per case: ~100 MB
QUICK_BYTES = 16e6
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS_DIR / "kernels.csv"
CSV_COLUMNS = (
    "timestamp",
    "host",
    "provider",
    "mode",
    "dtype",
    "rows",
    "classes",
    "bytes",
    "median_s",
    "p20_s",
    "p80_s",
    "gb_s",
    "ratio_to_best_peer",
    "roofline_share",
    "threads",
)
CPU_PROVIDERS = ("engine-cpu", "torch-eager", "torch-compile", "jax-cpu")
CUDA_PROVIDERS = ("engine-cuda", "torch-cuda")
ENGINE_PROVIDERS = ("engine-cpu", "engine-cuda")
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


class Skip(Exception):
    """A provider cannot run this case (or at all) here; the message says why."""


# -- byte counts ---------------------------------------------------------------------------


def rows_for(classes: int, itemsize: int, target_bytes: float = TARGET_BYTES) -> int:
    """Rows so that the logits are ~``target_bytes``: max(1, target_bytes // (C*itemsize))."""
    return max(1, int(target_bytes // (classes * itemsize)))


def byte_count(mode: str, rows: int, classes: int, itemsize: int) -> int:
    """Compulsory bytes of one call (see the module docstring)."""
    logits = rows * classes * itemsize
    return 2 * logits if mode == "forward_grad" else logits


# -- one benchmark case ---------------------------------------------------------------------


@dataclass
class Case:
    mode: str
    dtype: str
    x: np.ndarray  # rows x C logits (float32 / float16), C-contiguous
    y: np.ndarray  # int64 targets

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def classes(self) -> int:
        return self.x.shape[1]


@dataclass
class Output:
    """What a call returned, as NumPy, for the correctness check."""

    loss: float
    grad: np.ndarray | None = None


class Provider:
    """A way to compute the loss. ``prepare`` returns a zero-argument timed call."""

    name = ""
    device = "cpu"
    compiles = False  # needs more than one warm-up call
    note = ""  # how the last prepared call works, when that is worth saying

    def available(self) -> None:
        """Raise Skip when this provider cannot run at all here."""

    def prepare(self, case: Case) -> Callable[[], object]:
        raise NotImplementedError

    def output(self, result) -> Output:
        raise NotImplementedError

    def release(self) -> None:
        """Drop per-case state (device copies, compiled graphs)."""


# -- engine ------------------------------------------------------------------------------


class EngineProvider(Provider):
    def __init__(self, device: str = "cpu"):
        self.device = device
        self.name = f"engine-{device}"

    def available(self) -> None:
        try:
            import engine  # noqa: F401
            from engine.api import resolve_device
        except Exception as exc:  # pragma: no cover - import failure of the package itself
            raise Skip(f"engine not importable: {exc}") from exc
        if self.device == "cuda":
            try:
                if resolve_device("cuda") != "cuda":
                    raise Skip("no CUDA device")
            except Skip:
                raise
            except Exception as exc:
                raise Skip(f"no CUDA backend: {type(exc).__name__}: {exc}") from exc

    def prepare(self, case: Case):
        import engine

        x, y, dev = case.x, case.y, self.device
        if dev == "cuda":
            # the engine's CUDA API takes host arrays: timings include the transfers
            self.note = "host arrays in, host results out (includes PCIe transfers)"
        if case.mode == "forward":
            return lambda: engine.cross_entropy(x, y, reduction="mean", device=dev)
        if case.mode == "forward_grad":
            # gradient in the logits dtype into a caller's buffer (the API's out=, which
            # peers lack): fresh 100 MB allocations on this VM cost 1-10 GB/s of page
            # faults at random, which would swamp the kernel being measured
            out = np.empty_like(x)
            return lambda: engine.cross_entropy_grad(x, y, reduction="sum", out=out, device=dev)
        if case.mode == "row_stats":
            return lambda: engine.row_stats(x, y, device=dev)
        raise Skip(f"unknown mode {case.mode}")

    def output(self, result) -> Output:
        if isinstance(result, tuple):
            loss, grad = result
            grad = np.asarray(grad)
            return Output(float(loss), grad)
        if hasattr(result, "loss"):  # RowStats
            return Output(float(np.sum(np.asarray(result.loss), dtype=np.float64)))
        return Output(float(result))


# -- torch -------------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except Exception as exc:
        raise Skip(f"torch not importable: {exc}") from exc
    return torch


class TorchProvider(Provider):
    def __init__(self, name: str, device: str, compiled: bool):
        self.name = name
        self.device = device
        self.compiles = compiled
        self.compiled = compiled
        self.note = ""

    def available(self) -> None:
        torch = _torch()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise Skip("torch has no CUDA device")
        if self.compiled:
            try:
                import torch._dynamo  # noqa: F401
            except Exception as exc:
                raise Skip(f"torch.compile unavailable: {exc}") from exc

    def prepare(self, case: Case):
        torch = _torch()
        import torch.nn.functional as F

        if case.mode == "row_stats":
            raise Skip("no row_stats equivalent")
        if self.device == "cuda":
            return self._prepare_cuda(case)
        x = torch.from_numpy(case.x)
        y = torch.from_numpy(case.y)
        if self.compiled:
            torch._dynamo.reset()  # fresh graphs per case: no recompile-limit surprises
        if case.mode == "forward":

            def fwd(x, y):
                return F.cross_entropy(x, y, reduction="mean")

            f = torch.compile(fwd, dynamic=False) if self.compiled else fwd

            def call():
                return f(x, y)

            return call

        if case.mode != "forward_grad":
            raise Skip(f"unknown mode {case.mode}")
        if self.compiled:
            from torch import func

            def loss_and_grad(x, y):
                grad, loss = func.grad_and_value(lambda z: F.cross_entropy(z, y, reduction="sum"))(
                    x
                )
                return loss, grad

            f = torch.compile(loss_and_grad, dynamic=False)
            try:
                f(x, y)  # compiles here, or fails: then fall back below
                self.note = "torch.func.grad_and_value"

                def call():
                    return f(x, y)

                return call
            except Exception:
                torch._dynamo.reset()
                self.note = "compiled forward + autograd"
                fwd = torch.compile(
                    lambda x, y: F.cross_entropy(x, y, reduction="sum"), dynamic=False
                )
        else:

            def fwd(x, y):
                return F.cross_entropy(x, y, reduction="sum")

        leaf = x.detach().requires_grad_(True)

        def call():
            loss = fwd(leaf, y)
            (grad,) = torch.autograd.grad(loss, leaf)
            return loss.detach(), grad

        return call

    def _prepare_cuda(self, case: Case):
        """Host tensors in, host results out: the same job as the engine's CUDA API."""
        torch = _torch()
        import torch.nn.functional as F

        self.note = "host tensors in, host results out (includes PCIe transfers)"
        x = torch.from_numpy(case.x)
        y = torch.from_numpy(case.y)
        if case.mode == "forward":
            return lambda: F.cross_entropy(x.cuda(), y.cuda(), reduction="mean").item()
        if case.mode != "forward_grad":
            raise Skip(f"unknown mode {case.mode}")

        def call():
            xd = x.cuda().requires_grad_(True)
            loss = F.cross_entropy(xd, y.cuda(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xd)
            return loss.item(), grad.cpu()

        return call

    def output(self, result) -> Output:
        if isinstance(result, tuple):
            loss, grad = result
            return Output(float(loss), grad.detach().cpu().numpy())
        return Output(float(result))

    def release(self) -> None:
        if self.compiled:
            _torch()._dynamo.reset()
        if self.device == "cuda":
            _torch().cuda.empty_cache()


# -- jax ---------------------------------------------------------------------------------


class JaxProvider(Provider):
    name = "jax-cpu"
    compiles = True

    def available(self) -> None:
        try:
            import jax
        except Exception as exc:
            raise Skip(f"jax not importable: {exc}") from exc
        try:
            jax.devices("cpu")
        except Exception as exc:
            raise Skip(f"jax has no CPU backend: {exc}") from exc

    def prepare(self, case: Case):
        import jax
        import jax.numpy as jnp

        if case.mode == "row_stats":
            raise Skip("no row_stats equivalent")
        cpu = jax.devices("cpu")[0]
        x = jax.device_put(case.x, cpu)
        y = jax.device_put(case.y.astype(np.int32), cpu)

        def nll(x, y):
            logp = jax.nn.log_softmax(x, axis=-1)
            return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

        if case.mode == "forward":
            f = jax.jit(lambda x, y: jnp.mean(nll(x, y)))
        elif case.mode == "forward_grad":
            f = jax.jit(jax.value_and_grad(lambda x, y: jnp.sum(nll(x, y))))
        else:
            raise Skip(f"unknown mode {case.mode}")
        return lambda: jax.block_until_ready(f(x, y))

    def output(self, result) -> Output:
        if isinstance(result, tuple):
            loss, grad = result
            return Output(float(loss), np.asarray(grad))
        return Output(float(result))


def make_providers(names: Sequence[str] | None, device: str) -> list[Provider]:
    """Providers by name; None = every provider of ``device`` (cpu, cuda, all/auto)."""
    if names is None:
        if device == "cpu":
            names = CPU_PROVIDERS
        elif device == "cuda":
            names = CUDA_PROVIDERS
        elif device in ("all", "auto"):
            names = CPU_PROVIDERS + CUDA_PROVIDERS
        else:
            raise ValueError(f"device must be cpu, cuda, all or auto; got {device!r}")
    table = {
        "engine-cpu": lambda: EngineProvider("cpu"),
        "engine-cuda": lambda: EngineProvider("cuda"),
        "torch-eager": lambda: TorchProvider("torch-eager", "cpu", False),
        "torch-compile": lambda: TorchProvider("torch-compile", "cpu", True),
        "torch-cuda": lambda: TorchProvider("torch-cuda", "cuda", False),
        "jax-cpu": JaxProvider,
    }
    out = []
    for n in names:
        if n not in table:
            raise ValueError(f"unknown provider {n!r}; choose from {', '.join(table)}")
        out.append(table[n]())
    return out


# -- timing ------------------------------------------------------------------------------


SETTLE_S = 0.02  # busy-wait before each provider's lead-in call (see _time_call)


def _settle(seconds: float = SETTLE_S) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _time_call(call: Callable[[], object], lead_in: bool = False) -> tuple[float, object]:
    if lead_in:
        # JAX/XLA and OpenMP pools spin after a call, so round-robin timing would charge
        # that spinning to whichever provider runs next, and with a rotating order the
        # same provider always follows jax. Measured at C=32000 forward, engine alone
        # 24-27 GB/s; right after jax 12-15; after jax and one untimed lead-in call 16-17;
        # after jax, 20 ms of busy-waiting and the lead-in call ~22. So: busy-wait, then
        # one untimed call. Sleeping instead is worse: after 0.05-0.15 s idle every
        # provider's next call is slow (engine 17 GB/s back to back vs 9 after a sleep),
        # while a streaming job calls its kernel back to back.
        _settle()
        call()
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def _new_record(base: dict, p: Provider, nthreads: int | None) -> dict:
    rec = dict(base)
    rec.update(
        provider=p.name,
        device=p.device,
        median_s=None,
        p20_s=None,
        p80_s=None,
        gb_s=None,
        ratio_to_best_peer=None,
        roofline_share=None,
        roofline_gb_s=None,
        threads=nthreads if p.device == "cpu" else None,
        first_call_s=None,
        status="ok",
        check=None,
        note="",
    )
    return rec


def _run_case(provs, unavailable, case, repeats, roof, base, quiet, nthreads):
    """All providers on one case: prepare and warm each, then time them round-robin.

    Round-robin (one call of each provider per round) spreads the noise of a shared
    machine evenly over the providers instead of charging it to whichever ran last.
    """
    recs, live = [], []
    ref: dict[str, Output] = {}
    for p in provs:  # engines first in `provs` order, so peers can be checked against them
        rec = _new_record(base, p, nthreads)
        recs.append(rec)
        if p.name in unavailable:
            rec["status"] = f"skipped: {unavailable[p.name]}"
            continue
        try:
            p.note = ""
            call = p.prepare(case)
            first, out = _time_call(call)
            for _ in range(2 if p.compiles else 1):
                del out
                _, out = _time_call(call)
        except Skip as exc:
            rec["status"] = f"skipped: {exc}"
            p.release()
            continue
        except Exception as exc:  # a peer that fails on this dtype/shape
            rec["status"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
            _log(quiet, f"  {p.name} {case.mode} {case.dtype} C={case.classes}: {rec['status']}")
            p.release()
            continue
        rec["first_call_s"] = first
        rec["note"] = p.note
        try:
            o = p.output(out)
        except Exception:
            o = None
        del out
        if p.name in ENGINE_PROVIDERS:
            if o is not None:
                ref[p.device] = o
        elif o is not None and p.device in ref:
            rec["check"] = _compare(ref[p.device], o)
            _warn_check(quiet, rec)
        live.append((p, rec, call, []))
    ref.clear()
    for k in range(max(1, repeats)):
        # rotate the order each round, so no provider always follows the same neighbour
        # (XLA's pool, for one, keeps spinning into whatever runs next)
        for _p, _rec, call, times in live[k % len(live) :] + live[: k % len(live)]:
            t, result = _time_call(call, lead_in=True)
            del result
            times.append(t)
    for p, rec, _call, times in live:
        med = float(np.median(times))
        rec.update(
            median_s=med,
            p20_s=float(np.percentile(times, 20)),
            p80_s=float(np.percentile(times, 80)),
            gb_s=rec["bytes"] / med / 1e9,
        )
        if roof is not None and p.device == "cpu":
            ceiling = roof["copy_gb_s"] if case.mode == "forward_grad" else roof["read_gb_s"]
            rec["roofline_gb_s"] = ceiling
            rec["roofline_share"] = rec["gb_s"] / ceiling
        p.release()
        _log(
            quiet,
            f"  {p.name:13s} {case.mode:12s} {case.dtype} C={case.classes:<6d} "
            f"rows={case.rows:<8d} {rec['gb_s']:7.2f} GB/s  median {med * 1e3:8.2f} ms",
        )
    return recs


def _compare(ref: Output, got: Output) -> dict:
    check = {}
    if np.isfinite(ref.loss) and np.isfinite(got.loss):
        check["loss_rel"] = abs(got.loss - ref.loss) / max(abs(ref.loss), 1e-30)
    elif np.isfinite(ref.loss):
        # the peer's loss is inf/NaN where the engine's is finite: float16 peers reduce in
        # float16 and overflow past 65504 (the engine reduces in float64, SPEC §2)
        check["loss_rel"] = None
        check["peer_loss_nonfinite"] = str(got.loss)
    else:
        same = str(ref.loss) == str(got.loss)
        check["loss_rel"] = None if same else 1.0  # engine inf/NaN where the peer differs
        check["engine_loss_nonfinite"] = str(ref.loss)
    if ref.grad is not None and got.grad is not None:
        g_ref = ref.grad.astype(np.float32)
        scale = float(np.max(np.abs(g_ref))) or 1.0
        check["grad_rel"] = float(np.max(np.abs(got.grad.astype(np.float32) - g_ref))) / scale
    return check


def _make_case_data(rows: int, classes: int, dtype: str, seed: int = 0):
    rng = np.random.default_rng(seed + classes)
    x = rng.standard_normal((rows, classes), dtype=np.float32)
    x *= 2.0
    x = x.astype(dtype, copy=False)
    y = rng.integers(0, classes, size=rows, dtype=np.int64)
    return x, y


def _set_threads(threads: int | None) -> int:
    import numba

    if threads is None:
        return numba.get_num_threads()
    n = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:
        pass
    return n


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run(
    rows: int | None = None,
    classes: Sequence[int] = DEFAULT_CLASSES,
    dtypes: Sequence[str] = ("float32",),
    modes: Sequence[str] = DEFAULT_MODES,
    providers: Sequence[str] | None = None,
    repeats: int = 7,
    device: str = "cpu",
    quick: bool = False,
    json: bool = False,
    *,
    threads: int | None = 2,
    save: bool = False,
    roofline: bool = True,
    repeats_large: int | None = None,
) -> list[dict]:
    """Benchmark every (dtype, classes, mode, provider); one JSON-ready dict per pair.

    rows: fixed row count; None = logits of ~100 MB per case (~16 MB with ``quick``).
    quick: fewer classes (QUICK_CLASSES, when ``classes`` is the default) and 16 MB cases.
    device: cpu | cuda | all (which providers run when ``providers`` is None).
    json: machine mode: no progress lines on stderr (the result is JSON-ready either way).
    threads: Numba and torch CPU threads (None: leave as they are).
    save: append to bench/results/kernels.csv and redraw the PNGs.
    roofline: measure bench/roofline.py first (CPU providers get ``roofline_share``).
    repeats_large: timed calls for C >= 128256 (default: ``repeats``).

    Each dict: provider, device, mode, dtype, rows, classes, bytes, median_s, p20_s, p80_s,
    gb_s, ratio_to_best_peer (engine providers only), roofline_share, threads,
    first_call_s, status ("ok" or "skipped: why"), check (peers: agreement with the
    engine), note, timestamp, host, roofline_gb_s.
    """
    quiet = bool(json)
    for m in modes:
        if m not in ALL_MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(ALL_MODES)}")
    for d in dtypes:
        if d not in TOLERANCE:
            raise ValueError(f"unsupported dtype {d!r}; choose float32 or float16")
    if quick and tuple(classes) == DEFAULT_CLASSES:
        classes = QUICK_CLASSES
    target_bytes = QUICK_BYTES if quick else TARGET_BYTES
    nthreads = _set_threads(threads)
    provs = make_providers(providers, device)
    provs.sort(key=lambda p: p.name not in ENGINE_PROVIDERS)  # engines first: the reference
    unavailable = {}
    for p in provs:
        try:
            p.available()
        except Skip as exc:
            unavailable[p.name] = str(exc)
            _log(quiet, f"skip {p.name}: {exc}")

    roof = None
    if roofline and any(p.device == "cpu" and p.name not in unavailable for p in provs):
        from bench import roofline as roofline_mod

        roof = roofline_mod.measure(nthreads)
        _log(
            quiet,
            f"roofline: read {roof['read_gb_s']:.2f} GB/s, copy {roof['copy_gb_s']:.2f} GB/s "
            f"({nthreads} threads)",
        )

    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    host = socket.gethostname()
    results: list[dict] = []
    for dtype in dtypes:
        itemsize = np.dtype(dtype).itemsize
        for C in classes:
            n = int(rows) if rows else rows_for(C, itemsize, target_bytes)
            x, y = _make_case_data(n, C, dtype)
            reps = repeats_large if (repeats_large and C >= 128256) else repeats
            for mode in modes:
                case = Case(mode, dtype, x, y)
                nbytes = byte_count(mode, n, C, itemsize)
                base = {
                    "timestamp": stamp,
                    "host": host,
                    "mode": mode,
                    "dtype": dtype,
                    "rows": n,
                    "classes": C,
                    "bytes": nbytes,
                }
                case_results = _run_case(
                    provs, unavailable, case, reps, roof, base, quiet, nthreads
                )
                _fill_ratios(case_results)
                results.extend(case_results)
            del x, y
    if save:
        save_results(results)
    return results


def _warn_check(quiet: bool, rec: dict) -> None:
    tol = TOLERANCE[rec["dtype"]]
    chk = rec["check"] or {}
    bad = [
        f"{k}={v:.2e}"
        for k, v in chk.items()
        if k in ("loss_rel", "grad_rel") and v is not None and not v <= tol
    ]
    if bad:
        _log(
            quiet,
            f"  WARNING {rec['provider']} disagrees with the engine ({rec['mode']} "
            f"{rec['dtype']} {rec['rows']}x{rec['classes']}): {', '.join(bad)}",
        )


def _fill_ratios(case_results: list[dict]) -> None:
    for rec in case_results:
        if rec["provider"] not in ENGINE_PROVIDERS or rec["gb_s"] is None:
            continue
        peers = [
            r["gb_s"]
            for r in case_results
            if r["provider"] not in ENGINE_PROVIDERS
            and r["device"] == rec["device"]
            and r["gb_s"] is not None
        ]
        if peers:
            rec["ratio_to_best_peer"] = rec["gb_s"] / max(peers)


# -- output ------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def format_table(results: Sequence[dict]) -> str:
    """Markdown: C, dtype, mode, rows, GB/s per provider, engine/best peer, roofline share."""
    if not results:
        return "(no results)"
    providers = list(dict.fromkeys(r["provider"] for r in results))
    measured = [p for p in providers if any(r["gb_s"] for r in results if r["provider"] == p)]
    providers = measured or providers  # wholly skipped providers: footnote only
    engines = [p for p in providers if p in ENGINE_PROVIDERS]
    head = ["C", "dtype", "mode", "rows"] + [f"{p} GB/s" for p in providers]
    for e in engines:
        head.append("engine/best peer" if len(engines) == 1 else f"{e}/best peer")
    for e in engines:
        if e == "engine-cpu":
            head.append("roofline share")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    keys = list(dict.fromkeys((r["dtype"], r["classes"], r["mode"]) for r in results))
    by = {(r["dtype"], r["classes"], r["mode"], r["provider"]): r for r in results}
    for key in keys:
        dtype, C, mode = key
        rows = next(r["rows"] for r in results if (r["dtype"], r["classes"], r["mode"]) == key)
        cells = [str(C), dtype, mode, str(rows)]
        for p in providers:
            r = by.get((dtype, C, mode, p))
            cells.append(_fmt(r and r["gb_s"], ".2f"))
        for e in engines:
            r = by.get((dtype, C, mode, e))
            ratio = r and r["ratio_to_best_peer"]
            cells.append("—" if ratio is None else f"{ratio:.2f}x")
        if "engine-cpu" in engines:
            r = by.get((dtype, C, mode, "engine-cpu"))
            share = r and r["roofline_share"]
            cells.append("—" if share is None else f"{share:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(_footnotes(results))
    return "\n".join(lines)


def _footnotes(results: Sequence[dict]) -> list[str]:
    notes = []
    roof = {}
    for r in results:
        if r.get("roofline_gb_s") is not None:
            roof["copy" if r["mode"] == "forward_grad" else "read"] = r["roofline_gb_s"]
    if roof:
        parts = [f"{k} {v:.2f} GB/s" for k, v in sorted(roof.items(), reverse=True)]
        threads = next((r["threads"] for r in results if r["threads"]), None)
        notes.append(f"Roofline ({threads} threads): " + ", ".join(parts) + ".")
    seen = set()
    firsts = []
    for r in results:
        if r["provider"] in ENGINE_PROVIDERS and r["first_call_s"] is not None:
            k = (r["provider"], r["mode"], r["dtype"])
            if k not in seen:
                seen.add(k)
                firsts.append(f"{r['provider']} {r['mode']} {r['dtype']} {r['first_call_s']:.3f} s")
    if firsts:
        notes.append("Engine first call (compile/cache load + one call): " + "; ".join(firsts))
    skips = sorted({f"{r['provider']}: {r['status'][9:]}" for r in results if r["status"] != "ok"})
    if skips:
        notes.append("Skipped: " + "; ".join(skips) + ".")
    bad = []
    for r in results:
        chk = r.get("check") or {}
        tol = TOLERANCE.get(r["dtype"], 1e-5)
        for k in ("loss_rel", "grad_rel"):
            v = chk.get(k)
            if v is not None and not v <= tol:
                bad.append(f"{r['provider']} {r['mode']} {r['dtype']} C={r['classes']} {k}={v:.1e}")
    if bad:
        notes.append("Disagreements with the engine beyond tolerance: " + "; ".join(bad) + ".")
    overflow = sorted(
        {
            f"{r['provider']} {r['mode']} {r['dtype']}"
            for r in results
            if "peer_loss_nonfinite" in (r.get("check") or {})
        }
    )
    if overflow:
        notes.append(
            "Peer loss not finite where the engine's is (float16 reduction overflow): "
            + "; ".join(overflow)
            + "."
        )
    how = sorted({f"{r['provider']} {r['mode']}: {r['note']}" for r in results if r.get("note")})
    if how:
        notes.append("Notes: " + "; ".join(how) + ".")
    return notes


def save_results(results: Sequence[dict], directory: Path = RESULTS_DIR) -> None:
    """Append measured rows to kernels.csv and draw kernels_<mode>_<dtype>.png."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CSV_PATH.name
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(CSV_COLUMNS)
        for r in results:
            if r["gb_s"] is None:
                continue
            w.writerow(["" if r[c] is None else r[c] for c in CSV_COLUMNS])
    plot(results, directory)


def plot(results: Sequence[dict], directory: Path = RESULTS_DIR) -> list[Path]:
    """GB/s vs C (log x), one line per provider, one PNG per (mode, dtype)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print("matplotlib missing: no PNG drawn", file=sys.stderr)
        return []
    written = []
    for mode, dtype in dict.fromkeys((r["mode"], r["dtype"]) for r in results):
        sel = [r for r in results if (r["mode"], r["dtype"]) == (mode, dtype) and r["gb_s"]]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r["classes"], r["gb_s"]) for r in sel if r["provider"] == p)
            ax.plot(*zip(*pts, strict=True), marker="o", label=p)
        ceil = next((r["roofline_gb_s"] for r in sel if r.get("roofline_gb_s")), None)
        if ceil:
            kind = "copy" if mode == "forward_grad" else "read"
            ax.axhline(ceil, ls="--", color="grey", label=f"roofline ({kind})")
        ax.set_xscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel("GB/s (compulsory bytes)")
        ax.set_title(f"cross-entropy {mode}, {dtype}, ~{sel[0]['bytes'] / 1e6:.0f} MB per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        out = directory / f"kernels_{mode}_{dtype}.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


# -- cold start --------------------------------------------------------------------------

_COLD_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import engine
out = {"import_s": time.perf_counter() - t0, "calls": []}
rng = np.random.default_rng(0)
for dtype in sys.argv[1].split(","):
    x = rng.standard_normal((64, 256), dtype=np.float32).astype(dtype)
    y = rng.integers(0, 256, size=64)
    calls = {
        "forward": lambda: engine.cross_entropy(x, y),
        "forward_grad": lambda: engine.cross_entropy_grad(x, y, out=np.empty_like(x)),
        "row_stats": lambda: engine.row_stats(x, y),
    }
    for mode in sys.argv[2].split(","):
        t = time.perf_counter(); calls[mode](); first = time.perf_counter() - t
        t = time.perf_counter(); calls[mode](); second = time.perf_counter() - t
        out["calls"].append({"mode": mode, "dtype": dtype, "first_s": first, "second_s": second})
print(json.dumps(out))
"""


def cold_start(
    dtypes: Sequence[str] = ("float32", "float16"), modes: Sequence[str] = ALL_MODES
) -> dict:
    """Numba compile time with an empty cache, then first-call time with a warm cache.

    Two fresh processes share one new, empty NUMBA_CACHE_DIR: the first compiles every
    kernel (and writes the cache), the second loads them. Kernels are called in order
    (dtype-major), so later kernels reuse helpers already compiled by earlier ones.
    """
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="xent-numba-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", _COLD_SCRIPT, ",".join(dtypes), ",".join(modes)],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"cold-start subprocess failed:\n{proc.stderr[-2000:]}")
            res = _json.loads(proc.stdout.strip().splitlines()[-1])
            res["process_s"] = wall
            runs.append(res)
    return {"empty_cache": runs[0], "warm_cache": runs[1]}


def format_cold_start(res: dict) -> str:
    cold, warm = res["empty_cache"], res["warm_cache"]
    lines = [
        "| kernel | dtype | compile (empty cache) s | first call, new process, warm cache s "
        "| steady call s |",
        "|---|---|---:|---:|---:|",
    ]
    for c, w in zip(cold["calls"], warm["calls"], strict=True):
        lines.append(
            f"| {c['mode']} | {c['dtype']} | {c['first_s'] - c['second_s']:.3f} "
            f"| {w['first_s']:.4f} | {w['second_s']:.5f} |"
        )
    total_c = sum(c["first_s"] for c in cold["calls"])
    total_w = sum(w["first_s"] for w in warm["calls"])
    lines += [
        "",
        f"`import engine`: {cold['import_s']:.3f} s (empty cache), {warm['import_s']:.3f} s "
        f"(warm). All first calls: {total_c:.2f} s compiling vs {total_w:.3f} s from cache. "
        f"Whole process: {cold['process_s']:.2f} s vs {warm['process_s']:.2f} s.",
        "Compile = first call - second call in a process with an empty NUMBA_CACHE_DIR; "
        "calls run in table order, so a kernel reuses helpers compiled by earlier rows.",
    ]
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------


def _csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels", description="engine vs peers, in-memory kernels"
    )
    parser.add_argument("--quick", action="store_true", help="~16 MB cases, fewer classes")
    parser.add_argument("--classes", type=lambda s: [int(v) for v in _csv_list(s)])
    parser.add_argument("--dtypes", type=_csv_list, default=["float32"])
    parser.add_argument("--modes", type=_csv_list, default=list(DEFAULT_MODES))
    parser.add_argument("--providers", type=_csv_list)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--repeats-large", type=int, help="timed calls for C >= 128256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, help="fixed rows (default: ~100 MB of logits)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "all", "auto"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-save", action="store_true", help="do not write CSV/PNG")
    parser.add_argument("--cold-start", action="store_true", help="Numba compile/cache timings")
    args = parser.parse_args(argv)

    if args.cold_start:
        res = cold_start(args.dtypes if args.dtypes != ["float32"] else ("float32", "float16"))
        print(_json.dumps(res, indent=2) if args.json else format_cold_start(res))
        return 0
    results = run(
        rows=args.rows,
        classes=tuple(args.classes) if args.classes else DEFAULT_CLASSES,
        dtypes=tuple(args.dtypes),
        modes=tuple(args.modes),
        providers=args.providers,
        repeats=args.repeats,
        device=args.device,
        quick=args.quick,
        json=args.json,
        threads=args.threads,
        save=not args.no_save,
        repeats_large=args.repeats_large,
    )
    print(_json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
