"""CUDA kernels (engine.kernels.cuda) against the float64 reference, and torch where useful.

Runs under Numba's CUDA simulator (see conftest.py) or on a real GPU (XENT_REAL_GPU=1).
Shapes are small because the simulator runs every CUDA thread as a Python thread. The
launch configuration is set so that C <= 64 takes the warp-per-row shape and C > 64 the
block-per-row shape with several warps (shared-memory stage included).

Tolerances: float32 compute within 2e-6 relative (loss) and 1e-6·max|g|
absolute (gradient) of float64; the reference sees the same rounded inputs as the kernel.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import engine.kernels.cuda as K
import engine.reference as R
from engine import dtypes
from engine.kernels import Problem
from engine.options import make_options

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

WARP_MAX = 64  # C above this: block-per-row


@pytest.fixture(autouse=True)
def launch(monkeypatch):
    cfg = (
        K.LaunchConfig(warp_max_classes=WARP_MAX, rows_per_block=2, max_block_threads=64)
        if SIM
        else K.LaunchConfig(warp_max_classes=WARP_MAX)
    )
    monkeypatch.setattr(K.driver, "LAUNCH", cfg)
    return cfg


@pytest.fixture
def rng():
    return np.random.default_rng(20240)


# -- helpers ------------------------------------------------------------------------------


def problem(logits, target, **options) -> Problem:
    """A Problem exactly as the host builds one (targets validated, ignored rows -1)."""
    opts = make_options(**options)
    logits = np.asarray(logits)
    kind = dtypes.storage_kind(logits.dtype, opts.logits_dtype)
    storage = {"float16": 1, "bfloat16": 2}.get(kind, 0)
    x = logits.view(np.uint16) if kind in ("float16", "bfloat16") else logits
    compute = dtypes.compute_dtype(kind)
    target = np.asarray(target)
    c = logits.shape[1]
    if target.ndim == 2:
        y, t = None, target.astype(compute)
    else:
        y = np.where(target == opts.ignore_index, -1, target).astype(np.int64)
        t = None
    w = opts.weight_for(c).astype(compute)
    return Problem(
        x, storage, compute, y, t, w, opts.label_smoothing, opts.z_loss,
        opts.softcap_value, opts.kind_code,
    )  # fmt: skip


def tol(p: Problem) -> float:
    return 1e-12 if p.compute == np.float64 else 2e-6


def close(a, b, rtol, atol=0.0, what=""):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    assert np.array_equal(np.isnan(a), np.isnan(b)), (what, a, b)
    inf = np.isinf(b)
    assert np.array_equal(a[inf], b[inf]), (what, a, b)
    ok = ~(np.isnan(b) | inf)
    np.testing.assert_allclose(a[ok], b[ok], rtol=rtol, atol=atol, err_msg=what)


def grad_close(a, b, tol_):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    fin = ~np.isnan(b)
    if not fin.any():
        return
    scale = max(np.max(np.abs(b[fin])), 1e-300)
    err = np.max(np.abs(a[fin] - b[fin]))
    assert err <= tol_ * scale, f"grad error {err:.3g} > {tol_:g}·max|g| = {tol_ * scale:.3g}"


def check(logits, target, *, stats=True, grad=True, g=None, **options):
    """forward, forward_grad (vector scale) and stats against the reference."""
    logits = np.asarray(logits)
    p = problem(logits, target, **options)
    rt = tol(p)
    ref = R.row_stats(logits, target, **options)
    loss, lse = K.forward(p)
    assert loss.dtype == p.compute and lse.dtype == p.compute
    close(loss, ref["loss"], rt, rt * 1e-3, "loss")
    close(lse, ref["lse"], rt, rt * 1e-3, "lse")
    out = {"loss": loss, "lse": lse}
    if grad:
        n = logits.shape[0]
        if g is None:
            g = np.random.default_rng(7).uniform(0.5, 2.0, n)
        _, ref_grad = R.cross_entropy_grad(
            logits, target, reduction="none", grad_output=g, **options
        )
        gout = np.full(logits.shape, np.nan, dtype=p.compute)
        loss2, lse2 = K.forward_grad(p, g, g, gout)
        np.testing.assert_array_equal(loss2, loss)  # same pass 1, same bits
        np.testing.assert_array_equal(lse2, lse)
        grad_close(gout, ref_grad, 1e-12 if p.compute == np.float64 else 1e-6)
        out["grad"] = gout
    if stats:
        st = K.stats(p)
        fin = np.isfinite(ref["lse"])  # the reference's stats of NaN rows are artefacts
        assert set(st) == set(ref)
        for key in ("loss", "lse", "target_logprob", "max_prob", "entropy", "kl"):
            if key in ref:
                close(st[key][fin], ref[key][fin], rt, 10 * rt, key)
        for key in ("argmax", "target_rank"):
            assert st[key].dtype == np.int64
            np.testing.assert_array_equal(st[key][fin], ref[key][fin], err_msg=key)
        np.testing.assert_array_equal(st["loss"], loss)
        out["stats"] = st
    return out


def inputs(rng, rows, classes, dtype=np.float32, scale=3.0):
    x = (rng.standard_normal((rows, classes)) * scale).astype(dtype)
    y = rng.integers(0, classes, rows)
    return x, y


def soft_targets(rng, rows, classes, sparse=True):
    t = rng.random((rows, classes))
    if sparse:
        t[t < 0.5] = 0.0  # some zero probabilities (t log t and KL skip them)
        t[:, 0] += 0.1
    return t / t.sum(axis=1, keepdims=True)


# -- shapes and launch shapes ----------------------------------------------------------------


@pytest.mark.parametrize("rows,classes", [(1, 1), (3, 3), (9, 7), (4, 33), (5, 130), (2, 1000)])
def test_shapes(rng, rows, classes):
    x, y = inputs(rng, rows, classes)
    check(x, y)


def test_launch_shapes():
    cfg = K.LaunchConfig()
    assert K.launch_shape(10, 1000, cfg) == (2, 256, 32)  # a warp per row, 8 rows a block
    assert K.launch_shape(16, 1000, cfg) == (2, 256, 32)
    grid, block, t = K.launch_shape(5, 32000, cfg)  # a block per row
    assert (grid, block) == (5, t) and t % 32 == 0 and 128 <= t <= 1024
    assert K.launch_shape(5, 4096, cfg)[1] <= K.launch_shape(5, 128256, cfg)[1] == 1024


def test_confident_rows_keep_relative_accuracy():
    x = np.zeros((4, 50), np.float32)
    x[:, 0] = [10, 15, 20, 30]  # loss ~ 49·e^-30: needs log1p, not log(1 + s)
    check(x, np.zeros(4, np.int64), stats=False)


def test_large_logits(rng):
    x, y = inputs(rng, 3, 130, scale=1e4)
    check(x, y, label_smoothing=0.1)


# -- options --------------------------------------------------------------------------------

OPTION_CASES = {
    "weights": dict(weight="w"),
    "ignore_some": dict(ignore_index=-100, _ignore=0.4),
    "ignore_all": dict(ignore_index=-100, _ignore=1.0),
    "ignore_valid_class": dict(ignore_index=2, _ignore=0.4),
    "smoothing_weights_ignores": dict(weight="w", label_smoothing=0.2, _ignore=0.4),
    "zloss": dict(z_loss=1e-4),
    "softcap": dict(softcap=30.0),
    "softcap_tight_zloss_smoothing": dict(softcap=2.0, z_loss=1e-4, label_smoothing=0.1),
    "log_probs_smoothing_weights": dict(input_kind="log_probs", label_smoothing=0.1, weight="w"),
    "probs_smoothing": dict(input_kind="probs", label_smoothing=0.1, _ignore=0.3),
}


# every case on the warp-per-row shape (33 classes: lane 0 holds two); the ones with the
# most terms also on the block-per-row shape
OPTION_PARAMS = [(case, 33) for case in OPTION_CASES] + [
    (case, 130)
    for case in (
        "ignore_some",
        "smoothing_weights_ignores",
        "softcap_tight_zloss_smoothing",
        "log_probs_smoothing_weights",
        "probs_smoothing",
    )
]


@pytest.mark.parametrize("case,classes", OPTION_PARAMS)
def test_options(rng, case, classes):
    opts = dict(OPTION_CASES[case])
    frac = opts.pop("_ignore", 0.0)
    x, y = inputs(rng, 5, classes)
    if opts.get("weight") == "w":
        opts["weight"] = rng.uniform(0.2, 3.0, classes)
    ignore = opts.get("ignore_index", -100)
    if frac:
        drop = rng.random(len(y)) < frac if frac < 1 else np.ones(len(y), bool)
        drop[0] = True
        y[drop] = ignore
    if opts.get("input_kind") == "log_probs":
        x = (x - np.log(np.exp(x.astype(np.float64)).sum(1, keepdims=True))).astype(np.float32)
    elif opts.get("input_kind") == "probs":
        e = np.exp(x.astype(np.float64))
        x = (e / e.sum(1, keepdims=True)).astype(np.float32)
        x[0, 1] = 0.0  # a zero probability: logp = log(tiny), gradient 0
        x[1, 2] = 1e-40  # subnormal, below tiny
    out = check(x, y, **opts)
    counted = y != ignore
    assert np.all(out["loss"][~counted] == 0)
    assert np.all(out["grad"][~counted] == 0)
    assert np.all(np.isnan(out["stats"]["target_logprob"][~counted]))
    assert np.all(out["stats"]["target_rank"][~counted] == -1)


@pytest.mark.parametrize(
    "weighted,smoothing,classes",
    [(False, 0.0, 33), (True, 0.15, 33), (True, 0.15, 130), (False, 0.15, 130)],
)
def test_soft_targets(rng, weighted, smoothing, classes):
    x, _ = inputs(rng, 4, classes)
    t = soft_targets(rng, 4, classes)
    opts = dict(label_smoothing=smoothing)
    if weighted:
        opts["weight"] = rng.uniform(0.2, 3.0, classes)
    out = check(x, t, **opts)
    assert "kl" in out["stats"]


def test_soft_targets_zloss_softcap(rng):
    x, _ = inputs(rng, 3, 33)
    check(x, soft_targets(rng, 3, 33, sparse=False), z_loss=1e-4, softcap=30.0)


# -- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [7, 130])
def test_float64(rng, classes):
    x, y = inputs(rng, 4, classes, dtype=np.float64)
    y[1] = -100
    check(x, y, label_smoothing=0.1, z_loss=1e-4, weight=rng.uniform(0.5, 2, classes))


@pytest.mark.parametrize("classes", [33])
def test_float16_bits(rng, classes):
    x, y = inputs(rng, 4, classes, dtype=np.float16)
    x[0, 0] = np.float16(6e-8)  # a subnormal half
    check(x, y, label_smoothing=0.1)


@pytest.mark.parametrize("classes", [130])
def test_bfloat16_bits(rng, classes):
    x, y = inputs(rng, 4, classes)
    bits = dtypes.float32_to_bf16_bits(x)
    bits[0, 0] = 0x0001  # a subnormal bfloat16
    bits[0, 1] = 0x8000  # -0.0
    bits[1, 3] = 0xFF80  # -inf: a masked class
    y[1] = 4
    check(bits, y, logits_dtype="bfloat16", z_loss=1e-4)


def test_bf16_decoder_is_exact():
    """A one-class row's lse is its decoded logit: compare bit patterns one by one."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    decoded = dtypes.bf16_bits_to_float32(every)
    every = every[np.isfinite(decoded)]  # -inf/+inf/NaN rows give NaN lse by design
    if SIM:  # the simulator is slow: edge patterns plus a spread sample
        edges = [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F, 0x3F80]
        every = np.unique(np.r_[np.array(edges, np.uint16), every[::1031]])
    x = every.reshape(-1, 1)
    p = problem(x, np.full(len(x), -100), logits_dtype="bfloat16")
    _, lse = K.forward(p)
    want = dtypes.bf16_bits_to_float32(every)
    np.testing.assert_array_equal(lse, want)  # exact (-0.0 + log1p(0) is +0.0, equal)


# -- ties -----------------------------------------------------------------------------------


def tie_rank(x, cls):
    """The tie rule, computed here: #{j: x_j > x_y} + #{j < y: x_j == x_y}; the prediction
    is the first maximal index (torch.argmax), and a top-k hit is rank < k."""
    x = np.asarray(x, dtype=np.float64)
    rows = np.arange(len(x))
    xy = x[rows, cls][:, None]
    before = np.arange(x.shape[1])[None, :] < cls[:, None]
    return np.sum(x > xy, axis=1) + np.sum((x == xy) & before, axis=1)


def tied_logits(rng, rows, classes):
    """float32 values from a handful of levels (and -inf), so every row is full of ties;
    near-equal pairs that only become equal once rounded to 16 bits; one constant row."""
    x = (rng.integers(-3, 4, (rows, classes)) * 0.75).astype(np.float32)
    x[0] = 1.5  # every class tied
    x[1, ::5] = -np.inf  # masked classes tie with each other
    x[2, 1::2] += np.float32(1e-3)  # equal to x[2, 0::2] in float16 and bfloat16
    return x


@pytest.mark.parametrize("classes", [33, 130])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_target_rank_ties(rng, dtype, classes):
    rows = 6
    x32 = tied_logits(rng, rows, classes)
    if dtype == "float16":
        logits, opts = x32.astype(np.float16), {}
        values = logits.astype(np.float64)
    else:
        logits, opts = dtypes.float32_to_bf16_bits(x32), dict(logits_dtype="bfloat16")
        values = dtypes.bf16_bits_to_float32(logits).astype(np.float64)
    y = rng.integers(0, classes, rows)
    y[0] = classes - 1  # every class tied: rank = y
    y[1] = 6  # a finite target among masked classes
    y[3] = -100
    st = K.stats(problem(logits, y, **opts))
    counted = y != -100
    want = np.where(counted, tie_rank(values, np.where(counted, y, 0)), -1)
    np.testing.assert_array_equal(st["target_rank"], want)
    assert st["target_rank"][0] == classes - 1
    np.testing.assert_array_equal(st["argmax"], np.argmax(values, axis=1))
    hit1 = (st["argmax"] == y)[counted]
    np.testing.assert_array_equal(hit1, (st["target_rank"] == 0)[counted])

    # soft targets: the ranked class is the target row's first maximal index
    t = soft_targets(rng, rows, classes)
    t[:, :3] = t.max(axis=1, keepdims=True)  # the target row's maximum is tied too
    t = t / t.sum(axis=1, keepdims=True)
    st = K.stats(problem(logits, t, **opts))
    np.testing.assert_array_equal(st["target_rank"], tie_rank(values, np.argmax(t, axis=1)))


# -- special values -------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_classes_and_inf_target(rng, smoothing):
    x, y = inputs(rng, 5, 130)
    x[:, ::3] = -np.inf
    y = np.where(y % 3 == 0, y + 1, y)
    y[2] = 0  # a masked class as the target: loss inf for that row only
    out = check(x, y, label_smoothing=smoothing)
    assert np.isinf(out["loss"][2])
    if smoothing == 0:
        assert np.isfinite(np.delete(out["loss"], 2)).all()
    else:  # smoothing puts weight on the masked classes: every row is inf
        assert np.isinf(out["loss"]).all()
    assert np.isfinite(out["grad"]).all()


def test_nan_and_inf_rows_only_poison_their_row(rng):
    x, y = inputs(rng, 6, 33)
    x[1, 5] = np.nan
    x[4, 7] = np.inf
    out = check(x, y, z_loss=1e-4)
    assert np.isnan(out["loss"][[1, 4]]).all()
    assert np.isfinite(np.delete(out["loss"], [1, 4])).all()
    assert np.isnan(out["grad"][[1, 4]]).all()
    assert np.isfinite(np.delete(out["grad"], [1, 4], axis=0)).all()


def test_all_masked_row_is_nan(rng):
    x = np.full((2, 130), -np.inf, np.float32)
    x[1] = 0.0
    out = check(x, np.array([0, 0]), stats=False)
    assert np.isnan(out["loss"][0]) and out["loss"][1] == pytest.approx(np.log(130))


# -- gradient buffers -----------------------------------------------------------------------


def test_vector_scale_and_mean_style_scales(rng):
    x, y = inputs(rng, 5, 33)
    y[3] = -100
    opts = dict(weight=rng.uniform(0.5, 2, 33), z_loss=1e-3, label_smoothing=0.05)
    _, ref = R.cross_entropy_grad(x, y, reduction="mean", grad_output=1.5, **opts)
    w = opts["weight"]
    counted = y != -100
    denom = np.sum(w[np.where(counted, y, 0)][counted])
    scale = np.full(5, 1.5 / denom)
    zscale = np.full(5, 1.5 / counted.sum())  # mean z-loss divides by counted rows
    p = problem(x, y, **opts)
    out = np.empty_like(x)
    K.forward_grad(p, scale, zscale, out)
    grad_close(out, ref, 1e-6)


@pytest.mark.parametrize("out_dtype", [np.float16, np.float64])
def test_grad_into_other_dtypes(rng, out_dtype):
    x, y = inputs(rng, 3, 33)
    _, ref = R.cross_entropy_grad(x, y, reduction="sum")
    out = np.empty(x.shape, dtype=out_dtype)
    K.forward_grad(problem(x, y), np.ones(3), np.ones(3), out)
    grad_close(out, ref, 1e-3 if out_dtype == np.float16 else 1e-6)


@pytest.mark.parametrize("classes", [7, 130])
def test_in_place_float32(rng, classes):
    x, y = inputs(rng, 5, classes)
    loss_ref, ref = R.cross_entropy_grad(x, y, reduction="none", label_smoothing=0.1)
    p = problem(x, y, label_smoothing=0.1)
    loss, _ = K.forward_grad(p, np.ones(5), np.ones(5), x)
    close(loss, loss_ref, 2e-6)
    grad_close(x, ref, 1e-6)


def test_in_place_float16_bits(rng):
    x, y = inputs(rng, 4, 33, dtype=np.float16)
    _, ref = R.cross_entropy_grad(x, y, reduction="none")
    p = problem(x, y)  # p.x is the uint16 view of x: writing it rewrites x
    K.forward_grad(p, np.ones(4), np.ones(4), p.x)
    grad_close(x, ref, 1e-3)


def test_in_place_bfloat16_bits(rng):
    x, y = inputs(rng, 4, 130)
    bits = dtypes.float32_to_bf16_bits(x)
    _, ref = R.cross_entropy_grad(bits, y, reduction="none", logits_dtype="bfloat16")
    p = problem(bits, y, logits_dtype="bfloat16")
    K.forward_grad(p, np.ones(4), np.ones(4), bits)
    grad_close(dtypes.bf16_bits_to_float32(bits), ref, 8e-3)


def test_grad_out_validation(rng):
    x, y = inputs(rng, 2, 7)
    p = problem(x, y)
    with pytest.raises(ValueError):
        K.forward_grad(p, np.ones(2), np.ones(2), np.empty((2, 8), np.float32))
    with pytest.raises(TypeError):
        K.forward_grad(p, np.ones(2), np.ones(2), np.empty((2, 7), np.uint16))


# -- host pipeline --------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True])
def test_chunked_pipeline_gives_identical_bits(rng, launch, monkeypatch, soft):
    x, y = inputs(rng, 5, 33)
    target = soft_targets(rng, 5, 33) if soft else y
    p = problem(x, target, label_smoothing=0.1)
    whole = (K.forward(p), K.stats(p))
    g_whole = np.empty_like(x)
    K.forward_grad(p, np.ones(5), np.ones(5), g_whole)
    # 2-3 rows per chunk: 2-3 chunks taking turns on both streams / staging slots
    monkeypatch.setattr(launch, "chunk_bytes", 2 * 33 * (4 + 4 + 4))
    loss, lse = K.forward(p)
    st = K.stats(p)
    g = np.empty_like(x)
    K.forward_grad(p, np.ones(5), np.ones(5), g)
    np.testing.assert_array_equal(loss, whole[0][0])
    np.testing.assert_array_equal(lse, whole[0][1])
    for key, v in st.items():
        np.testing.assert_array_equal(v, whole[1][key], err_msg=key)
    np.testing.assert_array_equal(g, g_whole)


def test_non_contiguous_logits(rng):
    base = (rng.standard_normal((5, 66)) * 3).astype(np.float32)
    y = rng.integers(0, 33, 5)
    check(base[:, ::2], y, stats=False)
    check(np.asfortranarray(base[:, :33]), y, stats=False)


def test_empty_and_single_class():
    p = problem(np.zeros((0, 5), np.float32), np.zeros(0, np.int64))
    loss, lse = K.forward(p)
    assert loss.shape == lse.shape == (0,)
    assert set(K.stats(p)) >= {"loss", "argmax", "target_rank"}
    x = np.array([[2.0], [-1.0]], np.float32)
    out = check(x, np.array([0, 0]))
    assert np.all(out["loss"] == 0) and np.all(out["grad"] == 0)


def test_release_buffers(rng):
    x, y = inputs(rng, 2, 7)
    K.forward(problem(x, y))
    K.release_buffers()
    K.forward(problem(x, y))


# -- torch ----------------------------------------------------------------------------------


def test_against_torch(rng):
    torch = pytest.importorskip("torch")
    from tests.oracles import torch_loss_and_grad

    x, y = inputs(rng, 5, 130)
    y[2] = -100
    w = rng.uniform(0.5, 2.0, 130)
    opts = dict(weight=w, label_smoothing=0.1)
    t_loss = torch.nn.functional.cross_entropy(
        torch.tensor(x, dtype=torch.float64),
        torch.tensor(y),
        weight=torch.tensor(w),
        label_smoothing=0.1,
        reduction="none",
    ).numpy()
    p = problem(x, y, **opts)
    loss, _ = K.forward(p)
    close(loss, t_loss, 2e-6, 1e-9)
    _, t_grad = torch_loss_and_grad(x, y, reduction="sum", z_loss=1e-4, softcap=30.0, **opts)
    p = problem(x, y, z_loss=1e-4, softcap=30.0, **opts)
    g = np.empty_like(x)
    K.forward_grad(p, np.ones(5), np.ones(5), g)
    grad_close(g, t_grad, 1e-6)


# -- real GPU only --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llm_shape_on_gpu(rng, launch, monkeypatch, dtype):
    monkeypatch.setattr(K.driver, "LAUNCH", K.LaunchConfig(chunk_bytes=64 << 20))
    x, y = inputs(rng, 3 * 423, 32000)
    y[::7] = -100
    if dtype == "bfloat16":
        check(dtypes.float32_to_bf16_bits(x), y, logits_dtype="bfloat16", label_smoothing=0.1)
    else:
        check(x, y, label_smoothing=0.1, z_loss=1e-4)


def test_public_api_on_device_cuda(rng):
    import engine

    x, y = inputs(rng, 4, 33)
    y[1] = -100
    opts = dict(label_smoothing=0.1, z_loss=1e-4)
    loss = engine.cross_entropy(x, y, device="cuda", **opts)
    assert loss == pytest.approx(R.cross_entropy(x, y, **opts), rel=2e-6)
    h = x.astype(np.float16)
    loss, grad = engine.cross_entropy_grad(h, y, device="cuda", out=h, **opts)
    _, ref = R.cross_entropy_grad(x.astype(np.float16), y, **opts)
    assert grad is h
    grad_close(h, ref, 1e-3)
    st = engine.row_stats(x, y, device="cuda")
    np.testing.assert_array_equal(st.argmax, np.argmax(x, axis=1))
