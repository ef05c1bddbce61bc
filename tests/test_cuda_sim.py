"""Runs the CUDA kernel tests (tests/cuda_sim) under Numba's CUDA simulator.

The simulator must be switched on before numba.cuda is first imported, hence a process of
its own. Also checks the no-GPU behaviour of engine.kernels.cuda in a clean interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM",)}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
    reason="simulator already on: tests/cuda_sim is collected directly",
)
def test_cuda_kernels_under_simulator():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/cuda_sim", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=_env(NUMBA_ENABLE_CUDASIM="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        print(proc.stdout[-20000:])
        print(proc.stderr[-5000:])
        pytest.fail(f"tests/cuda_sim failed under NUMBA_ENABLE_CUDASIM=1 (rc={proc.returncode})")


def test_import_is_lazy_and_missing_gpu_raises_one_clear_error():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import engine.kernels.cuda as K
        from engine.kernels import Problem
        assert "numba.cuda" not in sys.modules, "importing engine.kernels.cuda imported numba.cuda"
        if K.is_available():
            print("GPU")
            raise SystemExit(0)
        x = np.zeros((2, 3), np.float32)
        p = Problem(x, 0, np.dtype(np.float32), np.zeros(2, np.int64), None,
                    np.ones(3, np.float32), 0.0, 0.0, 0.0, 0)
        calls = [lambda: K.forward(p), lambda: K.stats(p),
                 lambda: K.forward_grad(p, np.ones(2), np.ones(2), np.empty_like(x))]
        for call in calls:
            try:
                call()
            except RuntimeError as e:
                assert str(e) == K.NO_CUDA_MESSAGE, e
            else:
                raise AssertionError("no RuntimeError without a GPU")
        print("STUB")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() in ("STUB", "GPU")


_PTX_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from numba import cuda, types as T
    import numba.cuda.dispatcher as dispatcher
    import engine.kernels.cuda.device as D

    class _Hopper:  # device functions ask the current device for its compute capability
        compute_capability = (9, 0)

    dispatcher.get_current_device = lambda: _Hopper()
    D.build()

    def sigs(F, X):
        a1, a2 = T.Array(F, 1, "C"), T.Array(F, 2, "C")
        x2, i1, i = T.Array(X, 2, "C"), T.Array(T.int64, 1, "C"), T.int64
        loss = (x2, i1, a2, a1, a1, a1, a2, a1, a1, i, i, i, i, i, F, F, F, F, i)
        stats = (x2, i1, a2, a1, a1, a1, a1, i1, a1, a1, i1, a1, i, i, i, i, i, F, F, F, F)
        return loss, stats

    try:
        cuda.compile_ptx(lambda a: None, (T.float32[::1],), cc=(9, 0))
    except Exception as e:  # no NVVM / libdevice / NVRTC: nothing to check here
        print("NO-TOOLKIT", type(e).__name__)
        raise SystemExit(0)
    variants = [(False, T.float32, T.float32), (False, T.float32, T.float16),
                (True, T.float32, T.uint16), (False, T.float64, T.float64)]
    for bf16, F, X in variants:
        kernels = D.kernels(bf16, np.dtype(str(F)))
        for name, kernel, sig in zip(("loss", "stats"), kernels, sigs(F, X)):
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
            assert "shfl.sync" in ptx, name
            if F == T.float32:  # no silent promotion to float64 on the float32 path
                assert ".f64" not in ptx, (name, X)
            print(name, X, "ok")
    print("PTX-OK")
    """
)


def test_kernels_compile_to_ptx_when_a_toolkit_is_present():
    """Types and lowers every kernel variant for sm_90 without a GPU (needs NVVM/libdevice:
    the nvidia-cuda-nvcc and nvidia-cuda-nvrtc wheels, or a CUDA toolkit)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    if "NO-TOOLKIT" in proc.stdout:
        pytest.skip("no CUDA toolkit (NVVM/libdevice) to compile PTX with")
    assert "PTX-OK" in proc.stdout, proc.stdout
