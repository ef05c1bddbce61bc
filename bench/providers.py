"""The contestants of the kernel benchmark, and the data they are given.

A provider is one way to compute the loss (the engine, or a peer); each skips itself,
with a reason, when it cannot run here:

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
- ``torch-lse``, ``torch-compile-lse``, ``jax-lse``: each peer's strongest formulation,
  beside the library call above: the loss as ``logsumexp(x, 1) - x[row, y]`` (torch:
  ``torch.logsumexp(x, 1) - x.gather(1, y)``; jax: ``logsumexp(x, 1) -
  take_along_axis(x, y)``), eager, ``torch.compile``-d and ``jax.jit``-ted, gradients by
  autograd / ``grad_and_value`` / ``value_and_grad`` as for their neighbours. No
  log-softmax matrix is materialised (issue 19 measured ``jax-cpu``, which materialises
  it, 2-4x slower than this formulation). In float16 the log-sum-exp is rounded to
  float16 before the gradient's ``exp(x - lse)``, so their float16 gradients sit a few
  1e-3 from the engine's.
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

Correctness: each peer's loss (and gradient) from its warm-up call is compared with the
engine's (``compare``): the relative loss difference and the gradient's max abs
difference relative to max |grad|, against ``TOLERANCE`` (1e-5 float32, 2e-3 float16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

TARGET_BYTES = 100e6  # logits per case: ~100 MB
QUICK_BYTES = 16e6

CPU_PROVIDERS = (
    "engine-cpu",
    "torch-eager",
    "torch-lse",
    "torch-compile",
    "torch-compile-lse",
    "jax-cpu",
    "jax-lse",
)
CUDA_PROVIDERS = ("engine-cuda", "torch-cuda")
ENGINE_PROVIDERS = ("engine-cpu", "engine-cuda")
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


class Skip(Exception):
    """A provider cannot run this case (or at all) here; the message says why."""


# -- byte counts (see the module docstring) --------------------------------------------


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


def _torch_loss(lse: bool):
    """``loss(x, y, reduction)``: F.cross_entropy, or its logsumexp formulation (``lse``)."""
    torch = _torch()
    import torch.nn.functional as F

    if not lse:
        return lambda x, y, reduction: F.cross_entropy(x, y, reduction=reduction)

    def loss(x, y, reduction):
        per_row = torch.logsumexp(x, 1) - x.gather(1, y[:, None])[:, 0]
        return per_row.mean() if reduction == "mean" else per_row.sum()

    return loss


class TorchProvider(Provider):
    def __init__(self, name: str, device: str, compiled: bool, lse: bool = False):
        self.name = name
        self.device = device
        self.compiles = compiled
        self.compiled = compiled
        self.lse = lse
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
        loss_fn = _torch_loss(self.lse)

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
                return loss_fn(x, y, "mean")

            f = torch.compile(fwd, dynamic=False) if self.compiled else fwd

            def call():
                return f(x, y)

            return call

        if case.mode != "forward_grad":
            raise Skip(f"unknown mode {case.mode}")
        if self.compiled:
            from torch import func

            def loss_and_grad(x, y):
                grad, loss = func.grad_and_value(lambda z: loss_fn(z, y, "sum"))(x)
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
                fwd = torch.compile(lambda x, y: loss_fn(x, y, "sum"), dynamic=False)
        else:

            def fwd(x, y):
                return loss_fn(x, y, "sum")

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
    compiles = True

    def __init__(self, name: str = "jax-cpu", lse: bool = False):
        self.name = name
        self.lse = lse

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
        from jax.scipy.special import logsumexp

        if case.mode == "row_stats":
            raise Skip("no row_stats equivalent")
        cpu = jax.devices("cpu")[0]
        x = jax.device_put(case.x, cpu)
        y = jax.device_put(case.y.astype(np.int32), cpu)

        if self.lse:

            def nll(x, y):
                picked = jnp.take_along_axis(x, y[:, None], axis=1)[:, 0]
                return logsumexp(x, axis=1) - picked

        else:

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
        "torch-lse": lambda: TorchProvider("torch-lse", "cpu", False, lse=True),
        "torch-compile": lambda: TorchProvider("torch-compile", "cpu", True),
        "torch-compile-lse": lambda: TorchProvider("torch-compile-lse", "cpu", True, lse=True),
        "torch-cuda": lambda: TorchProvider("torch-cuda", "cuda", False),
        "jax-cpu": lambda: JaxProvider("jax-cpu"),
        "jax-lse": lambda: JaxProvider("jax-lse", lse=True),
    }
    out = []
    for n in names:
        if n not in table:
            raise ValueError(f"unknown provider {n!r}; choose from {', '.join(table)}")
        out.append(table[n]())
    return out


# -- case data and the correctness check ------------------------------------------------


def make_case_data(rows: int, classes: int, dtype: str, seed: int = 0):
    """Standard-normal logits x 2 in ``dtype`` and uniform int64 targets, seeded by C."""
    rng = np.random.default_rng(seed + classes)
    x = rng.standard_normal((rows, classes), dtype=np.float32)
    x *= 2.0
    x = x.astype(dtype, copy=False)
    y = rng.integers(0, classes, size=rows, dtype=np.int64)
    return x, y


def compare(ref: Output, got: Output) -> dict:
    """A peer's output against the engine's: loss_rel, grad_rel, and non-finite flags."""
    check = {}
    if np.isfinite(ref.loss) and np.isfinite(got.loss):
        check["loss_rel"] = abs(got.loss - ref.loss) / max(abs(ref.loss), 1e-30)
    elif np.isfinite(ref.loss):
        # the peer's loss is inf/NaN where the engine's is finite: float16 peers reduce in
        # float16 and overflow past 65504 (the engine sums the loss in float64)
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
