"""CUDA kernel tests: collected only under the simulator or on a real GPU.

NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first imported, so the plain test run
does not collect this directory; tests/test_cuda_sim.py runs it in its own process with
NUMBA_ENABLE_CUDASIM=1. On a machine with a GPU: ``XENT_REAL_GPU=1 pytest tests/cuda_sim``.
"""

from __future__ import annotations

import os
import sys

import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
REAL_GPU = os.environ.get("XENT_REAL_GPU") == "1" and not SIM

if not (SIM or REAL_GPU):
    collect_ignore_glob = ["test_*.py"]
elif SIM:
    # Simulated threads meet at barriers all the time; a short switch interval makes each
    # barrier cost ~1 ms instead of ~5 ms.
    sys.setswitchinterval(5e-4)


def pytest_configure(config):
    # NaN / inf rows raise NumPy scalar warnings in simulated kernels (not on a GPU)
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:engine.kernels.cuda")


def pytest_collection_modifyitems(config, items):
    if REAL_GPU:
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU (XENT_REAL_GPU=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
