"""engine.topk_logprobs against independent oracles.

Indices: numpy's stable argsort of the negated values the kernel ranks (descending, the
smaller class first on ties); torch.topk confirms the values picked. Log-probs and lse:
torch.logsumexp in float64 of the same widened inputs (softcap / log-clamp applied in
float64). Tolerances: log-probs within 2e-6 absolute + 1e-6 relative, lse within 1e-6
relative, of the float64 reference.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

import engine
from engine.errors import XentTypeError, XentUsageError

LOGP_ATOL, LOGP_RTOL = 2e-6, 1e-6
LSE_RTOL = 1e-6


# -- inputs -----------------------------------------------------------------------------------


def _bf16_bits(v) -> np.ndarray:
    """Round-to-nearest-even bfloat16 bit patterns of float32 values (written here, not
    taken from engine.dtypes, so that the oracle's decoding is independent)."""
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[np.isnan(v)] = 0x7FC0
    return rounded


def _bf16_to_f32(bits) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _store(v, storage):
    """float values -> (array handed to the engine, options naming its dtype)."""
    if storage == "bfloat16":
        return _bf16_bits(v), {"logits_dtype": "bfloat16"}
    return np.asarray(v).astype(storage), {}


def _widened(x, logits_dtype=None) -> tuple[np.ndarray, type]:
    """The inputs as float64 (exactly), and the compute dtype the engine promises."""
    x = np.asarray(x)
    if logits_dtype == "bfloat16":
        return _bf16_to_f32(x).astype(np.float64), np.float32
    compute = np.float64 if x.dtype == np.float64 else np.float32
    return x.astype(np.float64), compute


# -- oracle -----------------------------------------------------------------------------------


def oracle(x, k, *, input_kind="logits", softcap=None, logits_dtype=None):
    """(indices, log-probs, lse) of the float64 reference; ``ranked``: the values the
    kernel orders (the transformed row in the compute dtype, as float64)."""
    w, compute = _widened(x, logits_dtype)
    if softcap is not None:
        z = softcap * np.tanh(w / softcap)
    elif input_kind == "probs":
        # the clamp is the compute dtype's tiny, as in the loss (engine/reference.py and
        # both backends): float32's, or float64's for float64 input
        with np.errstate(invalid="ignore"):
            z = np.log(np.maximum(w, np.finfo(compute).tiny))  # NaN stays NaN
    else:
        z = w
    ranked = z.astype(compute).astype(np.float64)
    idx = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    lse = torch.logsumexp(torch.from_numpy(z), dim=1).numpy()
    picked = np.take_along_axis(z, idx, axis=1)
    with np.errstate(invalid="ignore"):
        logp = picked - lse[:, None] if input_kind == "logits" else picked
    # torch.topk (NaN counts as largest there: rows holding one are left out) picks the
    # same values as the stable argsort
    clean = ~np.isnan(ranked).any(axis=1)
    if clean.any():
        tv = torch.topk(torch.from_numpy(ranked[clean]), k, dim=1).values.numpy()
        np.testing.assert_array_equal(tv, np.take_along_axis(ranked[clean], idx[clean], 1))
    return idx, logp, lse, ranked


def _assert_close(got, want, *, rtol, atol, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN places")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"{what}: infinities")
    fin = ~np.isnan(want) & ~inf
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=atol, err_msg=what)


def check(x, k, *, lse_rtol=LSE_RTOL, lse_atol=0.0, **opts):
    """engine.topk_logprobs(x, k, **opts) against the oracle; returns the engine's result.

    Rows holding a NaN: lse and (for logits) every log-prob NaN; which classes such a row
    returns is not specified, only that they are k distinct classes."""
    idx, logp, lse = engine.topk_logprobs(x, k, **opts)
    n, c = np.shape(x)
    ridx, rlogp, rlse, ranked = oracle(x, k, **opts)
    compute = _widened(x, opts.get("logits_dtype"))[1]
    assert idx.dtype == np.int32 and idx.shape == (n, k)
    assert logp.dtype == np.float32 and logp.shape == (n, k)
    assert lse.dtype == compute and lse.shape == (n,)

    nan_rows = np.isnan(ranked).any(axis=1)
    ok = ~nan_rows
    np.testing.assert_array_equal(idx[ok], ridx[ok], err_msg="indices (stable argsort order)")
    _assert_close(logp[ok], rlogp[ok], rtol=LOGP_RTOL, atol=LOGP_ATOL, what="logprobs")
    _assert_close(lse, rlse, rtol=lse_rtol, atol=lse_atol, what="lse")
    if nan_rows.any():
        assert np.isnan(lse[nan_rows]).all()
        if opts.get("input_kind", "logits") == "logits":
            assert np.isnan(logp[nan_rows]).all()
        bad = idx[nan_rows]
        assert ((bad >= 0) & (bad < c)).all()
        assert all(len(set(r)) == k for r in bad.tolist()), "NaN row: classes repeat"
    return idx, logp, lse


def _normal(rng, rows, classes, scale=3.0):
    return (rng.standard_normal((rows, classes)) * scale).astype(np.float32)


STORAGES = ["float32", "float64", "float16", "bfloat16"]


# -- dtypes and shapes ------------------------------------------------------------------------

SHAPES = [
    (3, 1, 1),  # one class
    (3, 7, 1),
    (3, 7, 7),  # k = C
    (423, 1000, 5),
    (423, 100, 1),
    (5, 32003, 64),
    (5, 32003, 1),
    (6, 5000, 256),
    (4, 5000, 5000),  # k = C over several blocks
    (7, 1500, 600),  # k larger than a block (512)
    (9, 513, 512),
]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("rows,classes,k", SHAPES, ids=lambda v: str(v))
def test_dtypes_and_shapes(rng, storage, rows, classes, k):
    x, opts = _store(_normal(rng, rows, classes), storage)
    check(x, k, **opts)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("classes,k", [(7, 3), (1000, 1), (1000, 50), (5000, 256), (300, 300)])
def test_ties(rng, storage, classes, k):
    """Rows of few distinct values (ties everywhere, inside and across blocks): the
    smaller class index first among equal values."""
    v = rng.integers(-4, 4, (60, classes)).astype(np.float32) * 0.5  # 8 levels
    v[0] = 1.0  # every class tied: 0, 1, ..., k-1
    v[1] = 0.0
    v[1, ::2] = -0.0  # -0.0 == 0.0: a tie as well
    v[2, : classes // 2] = -1.0  # the tied best all in the second half
    v[2, classes // 2 :] = 2.0
    x, opts = _store(v, storage)
    idx, _, _ = check(x, k, **opts)
    np.testing.assert_array_equal(idx[0], np.arange(k))
    np.testing.assert_array_equal(idx[1], np.arange(k))
    top = min(k, classes - classes // 2)
    np.testing.assert_array_equal(idx[2, :top], classes // 2 + np.arange(top))


def test_ties_handmade():
    """A value equal to the current k-th best, met later in the row, must not displace it."""
    x = np.zeros((2, 3000), np.float32)
    x[0, [2900, 700, 5, 100, 2000]] = 1.0
    x[1, [2999, 600]] = 2.0
    x[1, [0, 1500]] = 1.0
    idx, logp, _ = check(x, 3)
    np.testing.assert_array_equal(idx[0], [5, 100, 700])
    np.testing.assert_array_equal(idx[1], [600, 2999, 0])
    assert logp[0, 0] == logp[0, 1] == logp[0, 2]


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_16bit_rows_full_of_ties(rng, storage):
    """Random logits rounded to 16 bits: large rows hold many equal values."""
    v = (rng.standard_normal((20, 32003)) * 2).astype(np.float32)
    v = np.round(v * 4) / 4  # quarter steps: a few dozen levels
    x, opts = _store(v, storage)
    check(x, 64, **opts)
    check(x, 1, **opts)


# -- masked, NaN and special rows -------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("classes", [10, 300, 2000])
def test_masked_classes(rng, storage, classes):
    v = _normal(rng, 12, classes)
    v[:, ::3] = -np.inf
    v[1, :] = -np.inf
    v[1, [classes - 1, 4]] = [0.5, 1.5]  # two finite classes; k > 2: -inf in index order
    v[2, :] = -np.inf
    v[2, classes - 1] = 3.0  # the only finite class is the last
    v[3, : min(classes, 600)] = -np.inf  # masked head: the first k all -inf at the start
    x, opts = _store(v, storage)
    for k in (1, 5, classes):
        idx, logp, _ = check(x, k, **opts)
        if k >= 5:
            rest = [j for j in range(classes) if j not in (4, classes - 1)][: k - 2]
            np.testing.assert_array_equal(idx[1], [4, classes - 1, *rest])
            assert np.isneginf(logp[1, 2:]).all() and np.isfinite(logp[1, :2]).all()
            np.testing.assert_array_equal(idx[2], [classes - 1, *range(k - 1)])
            assert logp[2, 0] == 0.0 and np.isneginf(logp[2, 1:]).all()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("classes", [10, 700, 3000])
def test_nan_rows_and_all_masked_rows(rng, storage, classes):
    v = _normal(rng, 8, classes)
    v[1, classes - 2] = np.nan  # NaN after the first k
    v[2, 0] = np.nan  # NaN among the first k (the heap's initial members)
    v[3] = np.nan
    v[4] = -np.inf  # all masked: lse -inf, log-probs -inf - -inf = NaN (as torch)
    v[5] = -np.inf
    v[5, 1] = np.nan
    x, opts = _store(v, storage)
    for k in (1, 4):
        idx, logp, lse = check(x, k, **opts)
        assert np.isnan(lse[[1, 2, 3, 5]]).all()
        assert lse[4] == -np.inf
        np.testing.assert_array_equal(idx[4], np.arange(k))
        assert np.isnan(logp[4]).all()
        assert np.isfinite(lse[[0, 6, 7]]).all() and np.isfinite(logp[[0, 6, 7]]).all()


def test_max_in_the_last_element(rng):
    for classes in (2, 7, 64, 65, 511, 512, 513, 1000, 5000, 32003):
        v = _normal(rng, 6, classes)
        v[:, -1] = v.max(axis=1) + 5.0
        v[1, -2] = v[1, -1]  # tied with the one before it: that one first
        v[2] = np.linspace(-3, 3, classes)  # ascending: every element a new member
        v[3] = np.linspace(3, -3, classes)  # descending: none after the first k
        v[4, -1] = 60.0  # confident, in the last element
        for k in {1, min(3, classes), min(64, classes)}:
            idx, logp, _ = check(v, k)
            assert idx[0, 0] == classes - 1 and idx[4, 0] == classes - 1
            assert idx[1, 0] == classes - 2
            if k > 1:
                assert idx[1, 1] == classes - 1
            np.testing.assert_array_equal(idx[2], classes - 1 - np.arange(k))
            np.testing.assert_array_equal(idx[3], np.arange(k))
            assert abs(logp[4, 0]) < 1e-6


@pytest.mark.parametrize("storage", STORAGES)
def test_huge_magnitudes(rng, storage):
    """Log-probs stay within ~1e-6 relative of float64 at logits of 1e4 (float16: 6e4)."""
    scale = 2e4 if storage == "float16" else 1e4
    v = _normal(rng, 50, 1000, scale=scale)
    if storage == "float16":
        v = np.clip(v, -65000, 65000)
    v[1, 7] = v[1].max() + 0.5  # nearly tied leaders far from 0
    x, opts = _store(v, storage)
    check(x, 20, **opts)


def test_confident_rows_keep_accuracy():
    x = np.zeros((4, 50), np.float32)
    x[:, 10] = [10, 15, 20, 30]  # log-prob of the best ~ -49·e^-30: tiny, not 0 ± 1e-7
    idx, logp, lse = check(x, 2)
    w = x.astype(np.float64)
    exact = w[:, 10] - np.log(np.exp(w).sum(1))
    np.testing.assert_allclose(logp[:, 0], exact, rtol=1e-5)


# -- shapes and layouts -----------------------------------------------------------------------


def test_zero_rows():
    for dtype in (np.float32, np.float64):
        idx, logp, lse = engine.topk_logprobs(np.zeros((0, 5), dtype), 3)
        assert idx.shape == (0, 3) and idx.dtype == np.int32
        assert logp.shape == (0, 3) and logp.dtype == np.float32
        assert lse.shape == (0,) and lse.dtype == dtype
    bits = np.zeros((0, 5), np.uint16)
    idx, logp, lse = engine.topk_logprobs(bits, 5, logits_dtype="bfloat16")
    assert idx.shape == (0, 5) and lse.dtype == np.float32


@pytest.mark.parametrize("storage", ["float32", "float64", "float16"])
def test_non_contiguous_inputs(rng, storage):
    big = _normal(rng, 200, 1300).astype(storage)
    views = {
        "column slice": big[:, 3:1003],
        "strided columns": big[:, ::2],
        "fortran": np.asfortranarray(big[:, :700]),
        "every other row": big[::2, 100:1200],
        "reversed columns": big[:, ::-1],
    }
    for name, view in views.items():
        assert not view.flags.c_contiguous, name
        idx, _, _ = check(view, 17)
        # the same classes as the contiguous copy (the sums may differ in the last bit:
        # strided rows are summed in another order)
        want, _, _ = engine.topk_logprobs(np.ascontiguousarray(view), 17)
        np.testing.assert_array_equal(idx, want, err_msg=name)


def test_non_contiguous_bfloat16(rng):
    bits = _bf16_bits(_normal(rng, 50, 900))
    view = bits[:, 5:805]
    idx, _, _ = check(view, 9, logits_dtype="bfloat16")
    want, _, _ = engine.topk_logprobs(np.ascontiguousarray(view), 9, logits_dtype="bfloat16")
    np.testing.assert_array_equal(idx, want)


# -- input kinds and softcap ------------------------------------------------------------------


def _log_softmax(v):
    return torch.log_softmax(torch.from_numpy(v.astype(np.float64)), dim=1).numpy()


@pytest.mark.parametrize("storage", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("classes", [7, 1000, 5000])
def test_log_probs_input(rng, storage, classes):
    logp = _log_softmax(_normal(rng, 30, classes))
    logp[0, :] = -np.inf
    logp[0, 3] = 0.0  # one certain class
    x, opts = _store(logp, storage)
    # lse of log-probs is ~0: its error is absolute (a float32 sum of C exps)
    idx, got, _ = check(x, 10 if classes > 10 else 3, input_kind="log_probs", lse_atol=2e-6, **opts)
    assert idx[0, 0] == 3 and got[0, 0] == 0.0


@pytest.mark.parametrize("storage", ["float32", "float64", "float16"])
def test_log_probs_are_the_values_themselves(rng, storage):
    """Log-prob input is not renormalised: the values come back as they are (exactly, up
    to the float32 output) even when they do not sum to one; lse is theirs."""
    v = _normal(rng, 50, 700).astype(storage)
    idx, logp, lse = check(v, 12, input_kind="log_probs")
    want = np.take_along_axis(v.astype(np.float64), idx, axis=1).astype(np.float32)
    np.testing.assert_array_equal(logp, want)
    assert (np.abs(lse) > 1.0).all()  # far from normalised: a shift by lse would show


@pytest.mark.parametrize("storage", ["float32", "float64", "float16"])
@pytest.mark.parametrize("classes", [7, 1000, 5000])
def test_probs_input(rng, storage, classes):
    p = np.exp(_log_softmax(_normal(rng, 30, classes, scale=6.0)))
    p[:, ::5] = 0.0  # zeros: log(tiny), tied among themselves (index order)
    p[1, 2] = 1e-45  # below tiny: clamped, tied with the zeros
    p[2] = 0.0
    x, opts = _store(p, storage)
    k = classes if classes < 10 else 64
    idx, got, _ = check(x, k, input_kind="probs", lse_atol=2e-6, **opts)
    assert idx[2].tolist() == list(range(k))
    tiny = np.finfo(np.float64 if storage == "float64" else np.float32).tiny
    np.testing.assert_allclose(got[2], np.log(tiny), rtol=1e-7)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("cap", [30.0, 2.0])
def test_softcap(rng, storage, cap):
    """Ranked by c·tanh(x/c): with a small cap large logits saturate to ties at c."""
    v = _normal(rng, 40, 2000, scale=8.0)
    v[0, [5, 1500]] = [50.0, 60.0]  # both saturate to c at c = 2: class 5 first
    x, opts = _store(v, storage)
    idx, _, _ = check(x, 32, softcap=cap, **opts)
    if cap == 2.0:
        assert idx[0, 0] == 5


def test_softcap_large_magnitudes(rng):
    v = _normal(rng, 30, 1000, scale=1e4)
    check(v, 10, softcap=30.0)
    check(v.astype(np.float64), 10, softcap=30.0)


def test_float64_lse_is_float64_accurate(rng):
    v = _normal(rng, 40, 5000).astype(np.float64) + rng.standard_normal((40, 5000)) * 1e-9
    _, _, lse = check(v, 8, lse_rtol=1e-12)
    assert lse.dtype == np.float64


# -- threads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["float32", "float64", "float16", "bfloat16"])
def test_thread_count_does_not_change_bits(rng, storage):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread")
    v = _normal(rng, 423, 1000)
    v[7] = -np.inf
    v[9, 3] = np.nan
    x, opts = _store(v, storage)
    old = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            runs.append(engine.topk_logprobs(x, 37, **opts))
            runs.append(engine.topk_logprobs(x[:3], 37, **opts))  # 3 rows: an uneven split
    finally:
        numba.set_num_threads(old)
    for a, b in zip(runs[0] + runs[1], runs[2] + runs[3], strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# -- validation -------------------------------------------------------------------------------


def test_bad_k_and_shapes(rng):
    x = _normal(rng, 4, 6)
    for k in (0, -1, 7, 100):
        with pytest.raises(XentUsageError, match="k must be between 1"):
            engine.topk_logprobs(x, k)
        with pytest.raises(ValueError):
            engine.topk_logprobs(x, k)
    for k in (2.0, "3", None, True, np.float32(2)):
        with pytest.raises(XentTypeError, match="k must be an integer"):
            engine.topk_logprobs(x, k)
        with pytest.raises(TypeError):
            engine.topk_logprobs(x, k)
    idx, _, _ = engine.topk_logprobs(x, np.int64(2))  # numpy integers are integers
    assert idx.shape == (4, 2)
    for bad in (x[0], x[None], np.float32(1.0)):
        with pytest.raises(XentUsageError, match="2-D"):
            engine.topk_logprobs(bad, 1)
    with pytest.raises((ValueError, TypeError)):
        engine.topk_logprobs(np.zeros((3, 0), np.float32), 1)
    with pytest.raises(TypeError, match="bfloat16"):
        engine.topk_logprobs(np.zeros((2, 3), np.uint16), 1)
    with pytest.raises(ValueError, match="input_kind='logits'"):
        engine.topk_logprobs(x, 1, input_kind="probs", softcap=30.0)


def test_nan_only_block_before_finite_blocks_keeps_lse_nan():
    # a first block (512 values) of NaN, or of -inf and one NaN, then finite values: the
    # NaN must survive the merge with the first finite block
    x = np.zeros((2, 2000), np.float32)
    x[0, :512] = np.nan
    x[1, :512] = -np.inf
    x[1, 7] = np.nan
    _, _, lse = engine.topk_logprobs(x, 4)
    assert np.isnan(lse).all()
