"""The CUDA compare kernel against the float64 reference and the CPU kernel.

Runs under Numba's CUDA simulator (see conftest.py) or on a real GPU (XENT_REAL_GPU=1);
C <= 64 takes the warp-per-row shape, larger C the block-per-row shape with several warps.
"""

from __future__ import annotations

import numpy as np
import pytest

import engine.kernels.cuda as K
import engine.reference as R
from engine import dtypes

FLOATS = ("kl", "kl_reverse", "jsd", "tvd")
INTS = ("base_argmax", "candidate_argmax", "candidate_rank")


@pytest.fixture(autouse=True)
def launch(monkeypatch):
    cfg = K.LaunchConfig(warp_max_classes=64, rows_per_block=2, max_block_threads=64)
    monkeypatch.setattr(K.driver, "LAUNCH", cfg)


def _store(x, kind):
    if kind == "bfloat16":
        return dtypes.float32_to_bf16_bits(x).reshape(x.shape)
    return x.astype(kind)


def _decoded(x, kind):
    return dtypes.bf16_bits_to_float32(x) if kind == "bfloat16" else x


@pytest.mark.parametrize("classes", [1, 5, 64, 150])
@pytest.mark.parametrize(
    "kinds", [("float32", "float32"), ("bfloat16", "float32"), ("float16", "float64")]
)
def test_matches_reference(rng, classes, kinds):
    n = 5
    x = (rng.standard_normal((n, classes)) * 3).astype(np.float32)
    z = x + (
        rng.standard_normal((n, classes)) * np.array([0.01, 0.7, 2, 0.1, 0.3])[:, None]
    ).astype(np.float32)
    a, b = _store(x, kinds[0]), _store(z, kinds[1])
    y = rng.integers(0, classes, n)
    y[1] = -1
    got = K.compare(a, kinds[0], b, kinds[1], y, 1.0)
    exp = R.compare_rows(_decoded(a, kinds[0]), _decoded(b, kinds[1]), y)
    for key in FLOATS:
        np.testing.assert_allclose(got[key], exp[key], rtol=1e-5, atol=1e-6, err_msg=key)
        assert (got[key] >= -1e-7).all()
    for key in INTS:
        np.testing.assert_array_equal(got[key], exp[key], err_msg=key)
    for key in ("logp_base", "logp_candidate"):
        np.testing.assert_allclose(got[key], exp[key], rtol=2e-6, atol=1e-6, err_msg=key)


def test_temperature_masks_nan_and_ties(rng):
    x = np.round(rng.standard_normal((6, 40)) * 2).astype(np.float32)  # ties
    z = np.round(rng.standard_normal((6, 40)) * 2).astype(np.float32)
    x[0, :10] = -np.inf
    z[1, :10] = -np.inf
    x[2, 3] = np.nan
    z[3, :] = -np.inf
    got = K.compare(x, "float32", z, "float32", None, 0.7)
    exp = R.compare_rows(x, z, temperature=0.7)
    for key in FLOATS:
        np.testing.assert_allclose(got[key], exp[key], rtol=1e-5, atol=1e-6, err_msg=key)
    ok = [0, 1, 4, 5]
    for key in INTS:
        np.testing.assert_array_equal(got[key][ok], exp[key][ok], err_msg=key)
