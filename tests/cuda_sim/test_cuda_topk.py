"""The CUDA top-K kernel (engine/kernels/cuda/topk.py) against numpy and the CPU kernel.

Runs under Numba's CUDA simulator (see conftest.py) or on a real GPU (XENT_REAL_GPU=1).
The reference ranks the values the kernel ranks (decoded, softcapped or log-clamped in
float64, then rounded to the compute dtype) with numpy's stable argsort of their negation:
descending, the smaller class first on ties, NaN last. lse: float64 log-sum-exp of those
values with the max shifted out. Shapes are small: the simulator runs a Python thread per
CUDA thread, about a second per row of 2000 classes. Under the simulator C <= 512 runs one
warp per row and larger C two (the shared-memory stage of the reductions).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import engine.kernels.cpu as CPU
import engine.kernels.cuda as K
from engine import dtypes
from engine.api import Targets, make_problem, topk_logprobs
from engine.options import make_options

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
LOGP_ATOL, LOGP_RTOL = 2e-6, 1e-6
LSE_ATOL, LSE_RTOL = 1e-6, 1e-6


@pytest.fixture(autouse=True)
def launch(monkeypatch):
    cfg = K.LaunchConfig(max_block_threads=64) if SIM else K.LaunchConfig()
    monkeypatch.setattr(K.driver, "LAUNCH", cfg)
    return cfg


def _store(v, storage):
    """float32 values -> (the array handed to the engine, its options)."""
    if storage == "bfloat16":
        return dtypes.float32_to_bf16_bits(v).reshape(v.shape), {"logits_dtype": "bfloat16"}
    return v.astype(storage), {}


def _problem(x, **options):
    none = Targets(np.zeros(0, np.int64), None, np.zeros(0, bool), 0.0, 0)
    return make_problem(x, none, make_options(**options))


def _ranked(x, *, input_kind="logits", softcap=None, logits_dtype=None):
    """The values the kernel orders, as float64, and the compute dtype."""
    if logits_dtype == "bfloat16":
        w, compute = dtypes.bf16_bits_to_float32(x).astype(np.float64), np.float32
    else:
        compute = np.float64 if x.dtype == np.float64 else np.float32
        w = x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if softcap is not None:
            w = softcap * np.tanh(w / softcap)
        elif input_kind == "probs":
            w = np.where(np.isnan(w), w, np.log(np.maximum(w, np.finfo(compute).tiny)))
    return w.astype(compute).astype(np.float64), compute


def reference(x, k, **options):
    """(indices, log-probs, lse): stable argsort and the float64 log-sum-exp."""
    v, _ = _ranked(x, **options)
    idx = np.argsort(-v, axis=1, kind="stable")[:, :k]
    with np.errstate(invalid="ignore", over="ignore"):
        m = v.max(axis=1)  # NaN for rows holding one
        shift = np.where(np.isfinite(m), m, 0.0)[:, None]
        lse = m + np.log(np.exp(v - shift).sum(axis=1) * np.exp(shift[:, 0] - m))
        lse = np.where(m == -np.inf, -np.inf, lse)  # every class masked
        lse = np.where(m == np.inf, np.nan, lse)  # +inf: NaN, as the loss kernels
        picked = np.take_along_axis(v, idx, axis=1)
        logits = options.get("input_kind", "logits") == "logits"
        logp = picked - lse[:, None] if logits else picked
    return idx, logp, lse


def _close(got, want, rtol, atol, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaNs")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"{what}: infinities")
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=atol, err_msg=what)


def check(x, k, *, cpu_rows=None, **options):
    """The CUDA kernel against the reference and (on ``cpu_rows``: default, every row
    without NaN) the CPU kernel; returns the CUDA result."""
    p = _problem(x, **options)
    idx, logp, lse = K.topk(p, k)
    n = x.shape[0]
    assert idx.dtype == np.int32 and idx.shape == (n, k)
    assert logp.dtype == np.float32 and logp.shape == (n, k)
    assert lse.dtype == p.compute and lse.shape == (n,)
    ridx, rlogp, rlse = reference(x, k, **options)
    np.testing.assert_array_equal(idx, ridx, err_msg="indices")
    _close(logp, rlogp, LOGP_RTOL, LOGP_ATOL, "logprobs")
    _close(lse, rlse, LSE_RTOL, LSE_ATOL, "lse")
    if cpu_rows is None:
        cpu_rows = ~np.isnan(_ranked(x, **options)[0]).any(axis=1)
    cidx, clogp, clse = CPU.topk(p, k)
    np.testing.assert_array_equal(idx[cpu_rows], cidx[cpu_rows], err_msg="indices vs CPU")
    _close(logp[cpu_rows], clogp[cpu_rows], LOGP_RTOL, LOGP_ATOL, "logprobs vs CPU")
    _close(lse[cpu_rows], clse[cpu_rows], LSE_RTOL, LSE_ATOL, "lse vs CPU")
    return idx, logp, lse


def _tied(rng, rows, classes, step=0.5):
    """Values on a coarse grid (exact in float16/bfloat16): many ties, some at the K-th."""
    return (np.round(rng.standard_normal((rows, classes)) * 2 / step) * step).astype(np.float32)


@pytest.mark.parametrize("storage", ["float32", "float64", "float16", "bfloat16"])
def test_storages_ties_and_masks(rng, storage):
    v = _tied(rng, 5, 300)
    v[1, ::2] = -np.inf  # half the classes masked
    v[2] = -np.inf  # every class masked: lse -inf, log-probs NaN
    v[3] = 0.0
    v[3, 0:3] = -0.0  # -0 and +0 tie: index order among the zeros
    v[3, 6:9] = -0.0
    v[3, 10:15] = 1.0
    v[4, :] = 1.25  # one value: index order
    x, opts = _store(v, storage)
    idx, logp, lse = check(x, 20, **opts)
    assert lse[2] == -np.inf and np.isnan(logp[2]).all()
    np.testing.assert_array_equal(idx[4], np.arange(20))


def test_nan_and_inf_rows(rng):
    v = _tied(rng, 6, 100)
    v[0, 50] = np.nan  # past the first K: the CPU kernel never sees it, same result
    v[1, [0, 3]] = np.nan  # among the first K: NaN ranks last here (the CPU keeps them)
    v[2] = np.nan
    v[3, :60] = -np.inf
    v[3, 70] = np.nan
    v[4, 9] = np.inf  # lse NaN (exp(inf - inf)), +inf ranks first
    v[5, 40:] = -np.inf
    idx, logp, lse = check(v, 10, cpu_rows=np.array([True, False, False, False, True, True]))
    assert np.isnan(lse[:5]).all() and np.isfinite(lse[5])
    assert idx[4, 0] == 9
    assert 0 not in idx[1] and 3 not in idx[1]
    np.testing.assert_array_equal(idx[2], np.arange(10))


@pytest.mark.parametrize(
    ("classes", "k"), [(1, 1), (7, 1), (7, 7), (1000, 3), (300, 300), (513, 257)]
)
def test_shapes(rng, classes, k):
    # (300, 300) and (513, 257): two rounds of at most 256, ties across the boundary
    rows = 1 if classes > 512 else 2
    v = _tied(rng, rows, classes) if classes >= 300 else _tied(rng, 3, classes, step=0.01)
    check(v, k)


@pytest.mark.parametrize(("k", "tied"), [(64, False), (256, True)])
def test_large_k(rng, k, tied):
    v = (rng.standard_normal((1, 2003)) * 3).astype(np.float32)
    if tied:  # two thousand classes on some 20 values: the index digits decide
        v = np.round(v)
    check(v, k)


def test_float64_close_values(rng):
    """Values a float32 key could not tell apart (and float64 reductions across warps)."""
    v = 1.0 + rng.integers(0, 50, (2, 600)) * 1e-12
    check(v, 40)


def test_log_probs_input(rng):
    z = rng.standard_normal((3, 400)) * 2
    v = (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)
    v[1, :30] = -np.inf
    check(v, 16, input_kind="log_probs")


@pytest.mark.parametrize("storage", ["float32", "float64"])
def test_probs_input(rng, storage):
    z = rng.standard_normal((3, 400)) * 4
    v = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    v[1, :200] = 0.0  # clamped to tiny: ties at log(tiny)
    v[2, 5] = -1.0  # below tiny: clamped as well
    idx, logp, lse = check(v.astype(storage), 250, input_kind="probs")
    tiny = np.finfo(storage).tiny
    assert logp[1, -1] == np.float32(np.log(tiny))


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_softcap(rng, storage):
    v = (rng.standard_normal((3, 500)) * 30).astype(np.float32)  # saturates: ties at ±cap
    v[2, 100:] = -np.inf
    x, opts = _store(v, storage)
    check(x, 30, softcap=5.0, **opts)


def test_api_and_chunks(rng, launch):
    """engine.api.topk_logprobs(device="cuda") equals the CPU device; a small chunk size
    sends the rows in several launches."""
    launch.chunk_bytes = 3 * 90 * 4  # three rows per launch
    x = _tied(rng, 8, 90)
    got = topk_logprobs(x, 12, device="cuda")
    want = topk_logprobs(x, 12, device="cpu")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=LOGP_RTOL, atol=LOGP_ATOL)
    np.testing.assert_allclose(got[2], want[2], rtol=LSE_RTOL, atol=LSE_ATOL)


def test_no_rows_and_bad_k():
    idx, logp, lse = K.topk(_problem(np.zeros((0, 5), np.float32)), 3)
    assert idx.shape == (0, 3) and logp.shape == (0, 3) and lse.shape == (0,)
    p = _problem(np.zeros((2, 5), np.float32))
    for k in (0, 6):
        with pytest.raises(ValueError):
            K.topk(p, k)
