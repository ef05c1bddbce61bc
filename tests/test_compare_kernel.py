"""The fused compare kernel against the float64 reference and torch (SPEC §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine.reference as R
from engine import dtypes
from engine.kernels import cpu

FLOAT_KEYS = ("kl", "kl_reverse", "jsd", "tvd")


def _store(x32: np.ndarray, kind: str) -> np.ndarray:
    if kind == "bfloat16":
        return dtypes.float32_to_bf16_bits(x32).reshape(x32.shape)
    return x32.astype(kind)


def _check(a, ka, b, kb, y=None, temperature=1.0):
    got = cpu.compare(a, ka, b, kb, y, temperature)
    ref_a = a if ka != "bfloat16" else dtypes.bf16_bits_to_float32(a)
    ref_b = b if kb != "bfloat16" else dtypes.bf16_bits_to_float32(b)
    exp = R.compare_rows(ref_a, ref_b, y, temperature=temperature)
    for key in FLOAT_KEYS:
        g, e = got[key], exp[key]
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=key)
        assert not (g < -1e-7).any(), key
    for key in ("base_argmax", "candidate_argmax", "candidate_rank"):
        np.testing.assert_array_equal(got[key], exp[key], err_msg=key)
    if y is not None:
        for key in ("logp_base", "logp_candidate"):
            np.testing.assert_allclose(got[key], exp[key], rtol=2e-6, atol=1e-6, err_msg=key)
    return got, exp


@pytest.mark.parametrize("classes", [1, 2, 3, 10, 127, 1000, 2049, 5000])
@pytest.mark.parametrize(
    "kinds",
    [("float32", "float32"), ("float64", "float32"), ("float16", "float32"),
     ("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "float64")],
)  # fmt: skip
def test_matches_reference(rng, classes, kinds):
    n = 23
    x = (rng.standard_normal((n, classes)) * 3).astype(np.float32)
    z = x + (rng.standard_normal((n, classes)) * 0.7).astype(np.float32)
    a, b = _store(x, kinds[0]), _store(z, kinds[1])
    y = rng.integers(0, classes, n)
    y[::5] = -1
    _check(a, kinds[0], b, kinds[1], y)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(rng, temperature):
    x = (rng.standard_normal((40, 300)) * 4).astype(np.float32)
    z = x + rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    _check(x, "float32", z, "float32", y, temperature=temperature)


def test_near_agreement_keeps_relative_accuracy(rng):
    """bf16 rounding of fp32 logits: KL ~ 1e-6..1e-8, computed without cancellation."""
    n, c = 64, 32000
    x = (rng.standard_normal((n, c)) * 2).astype(np.float32)
    xb = dtypes.float32_to_bf16_bits(x).reshape(n, c)
    got = cpu.compare(xb, "bfloat16", x, "float32", None, 1.0)
    exp = R.compare_rows(dtypes.bf16_bits_to_float32(xb), x)
    assert (exp["kl"] < 1e-4).all() and (exp["jsd"] < 1e-4).all()
    for key in FLOAT_KEYS:
        rel = np.abs(got[key] - exp[key]) / exp[key]
        assert rel.max() < 1e-3, (key, rel.max(), exp[key].min())


def test_shifted_and_identical_rows(rng):
    x = (rng.standard_normal((10, 500)) * 3).astype(np.float32)
    same = cpu.compare(x, "float32", x.copy(), "float32", None, 1.0)
    for key in FLOAT_KEYS:
        assert (same[key] == 0).all(), key
    shifted = cpu.compare(x, "float32", x + np.float32(7.0), "float32", None, 1.0)
    for key in FLOAT_KEYS:
        assert (np.abs(shifted[key]) < 1e-6).all(), key
        assert (shifted[key] >= 0).all()


def test_masks_zero_probabilities_and_nan(rng):
    x = (rng.standard_normal((6, 50)) * 2).astype(np.float32)
    z = x.copy()
    x[0, :10] = -np.inf  # base gives 0 where the candidate does not: KL finite
    z[1, :10] = -np.inf  # candidate 0 where base is not: KL(base‖cand) = inf
    x[2, :5] = -np.inf
    z[2, :5] = -np.inf  # both masked alike: 0
    x[3, 7] = np.nan
    z[4, :] = -np.inf  # nothing finite
    got = cpu.compare(x, "float32", z, "float32", None, 1.0)
    exp = R.compare_rows(x, z)
    assert np.isfinite(got["kl"][0]) and got["kl"][0] == pytest.approx(exp["kl"][0], rel=1e-5)
    assert np.isinf(got["kl_reverse"][0])
    assert np.isinf(got["kl"][1]) and np.isfinite(got["kl_reverse"][1])
    assert got["jsd"][1] == pytest.approx(exp["jsd"][1], rel=1e-5)
    assert got["tvd"][1] == pytest.approx(exp["tvd"][1], rel=1e-5)
    assert got["kl"][2] == 0 and got["jsd"][2] == 0
    for r in (3, 4):
        for key in FLOAT_KEYS:
            assert np.isnan(got[key][r]), (r, key)


def test_ties_follow_first_index(rng):
    """bfloat16 rows full of ties: argmax first maximal, rank counts ties before it."""
    x = np.round(rng.standard_normal((200, 40)) * 2).astype(np.float32)  # many ties
    z = np.round(rng.standard_normal((200, 40)) * 2).astype(np.float32)
    a, b = _store(x, "bfloat16"), _store(z, "bfloat16")
    got, exp = _check(a, "bfloat16", b, "bfloat16")
    np.testing.assert_array_equal(got["base_argmax"], np.argmax(x, axis=1))
    np.testing.assert_array_equal(got["candidate_argmax"], np.argmax(z, axis=1))


def test_torch_kl_div_oracle(rng):
    """The formulation users check with: F.kl_div(log q, log p, log_target=True)."""
    x = (rng.standard_normal((50, 1000)) * 3).astype(np.float32)
    z = x + rng.standard_normal((50, 1000)).astype(np.float32)
    got = cpu.compare(x, "float32", z, "float32", None, 1.0)
    b, c = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(z.astype(np.float64))
    kl = F.kl_div(F.log_softmax(c, 1), F.log_softmax(b, 1), log_target=True, reduction="none")
    np.testing.assert_allclose(got["kl"], kl.sum(1).numpy(), rtol=1e-5, atol=1e-7)


def test_empty():
    x = np.zeros((0, 10), np.float32)
    got = cpu.compare(x, "float32", x, "float32", None, 1.0)
    assert all(v.shape == (0,) for v in got.values())


@pytest.mark.parametrize("classes", [1, 3, 10, 64])
@pytest.mark.parametrize(
    "kinds", [("float32", "float32"), ("bfloat16", "float16"), ("float64", "float32")]
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_many_short_rows(rng, classes, kinds, temperature):
    """300 short rows split over threads, among them rows with NaN, +inf, nothing finite,
    half-masked rows and ties (rounded logits)."""
    n = 300
    x = np.round(rng.standard_normal((n, classes)) * 3, 1).astype(np.float32)  # ties too
    z = (x + rng.standard_normal((n, classes)) * rng.choice([0.01, 1.0], (n, 1))).astype(np.float32)
    x[5, 0] = np.nan
    z[70, -1] = np.inf
    x[100, :] = -np.inf
    z[130, :] = -np.inf
    if classes > 1:
        x[160, : classes // 2] = -np.inf
        z[161, : classes // 2] = -np.inf
    a, b = _store(x, kinds[0]), _store(z, kinds[1])
    y = rng.integers(0, classes, n)
    y[::7] = -1
    got = cpu.compare(a, kinds[0], b, kinds[1], y, temperature)
    ref_a = a if kinds[0] != "bfloat16" else dtypes.bf16_bits_to_float32(a)
    ref_b = b if kinds[1] != "bfloat16" else dtypes.bf16_bits_to_float32(b)
    exp = R.compare_rows(ref_a, ref_b, y, temperature=temperature)
    for key in FLOAT_KEYS:
        np.testing.assert_allclose(got[key], exp[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in ("base_argmax", "candidate_argmax", "candidate_rank"):
        np.testing.assert_array_equal(got[key], exp[key], err_msg=key)
    for key in ("logp_base", "logp_candidate"):
        np.testing.assert_allclose(got[key], exp[key], rtol=2e-6, atol=2e-6, err_msg=key)
