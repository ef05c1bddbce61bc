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
