"""CPU kernels against the float64 reference and torch (float64 autograd).

Tolerances are the contract's: float32 loss within 2e-6 relative of float64, gradient within
1e-6·max|g| absolute. The reference sees the same (rounded) inputs as the kernel.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import engine
import engine.reference as R
from engine import dtypes
from tests.oracles import torch_loss_and_grad

LOSS_RTOL = {np.float64: 1e-11, np.float32: 2e-6, np.float16: 2e-6}


def _inputs(rng, rows, classes, dtype=np.float32, scale=3.0, ignore_frac=0.0, ignore_index=-100):
    x = (rng.standard_normal((rows, classes)) * scale).astype(dtype)
    y = rng.integers(0, classes, rows)
    if ignore_frac:
        y[rng.random(rows) < ignore_frac] = ignore_index
    return x, y


def check(x, target, *, loss_rtol=2e-6, grad_tol=1e-6, torch_oracle=True, grad_output=1.0, **opts):
    """Engine vs reference (and torch) for loss and gradient; returns the engine's outputs."""
    loss = engine.cross_entropy(x, target, **opts)
    loss_g, grad = engine.cross_entropy_grad(x, target, grad_output=grad_output, **opts)
    ref_loss, ref_grad = R.cross_entropy_grad(x, target, grad_output=grad_output, **opts)
    _close(loss, ref_loss, loss_rtol)
    _close(loss_g, ref_loss, loss_rtol)
    _grad_close(grad, ref_grad, grad_tol)
    if torch_oracle:
        t_loss, t_grad = torch_loss_and_grad(x, target, grad_output=grad_output, **opts)
        # torch forms a row's loss as lse - x_y: near-zero losses of large logits carry an
        # absolute error of some ulps of the logits (float64 torch 2.13: 2e-13 at x = 25).
        finite = np.abs(np.asarray(x, np.float64)[np.isfinite(x)])
        scale = float(finite.max()) if finite.size else 1.0
        _close(ref_loss, t_loss, 1e-10, atol=1e-13 * max(1.0, scale))
        _grad_close(ref_grad, t_grad, 1e-10)
    return loss, grad


def _close(a, b, rtol, atol=None):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    same_special = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
    finite = ~same_special
    assert not np.any(np.isnan(a[finite]) | np.isnan(b[finite])), (a, b)
    atol = rtol * 1e-3 if atol is None else atol
    np.testing.assert_allclose(a[finite], b[finite], rtol=rtol, atol=atol)


def _grad_close(a, b, tol):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    both_nan = np.isnan(a) & np.isnan(b)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    if a.size == 0 or both_nan.all():
        return
    scale = max(np.nanmax(np.abs(b)), 1e-300)
    err = np.nanmax(np.abs(np.where(both_nan, 0.0, a - b)))
    assert err <= tol * scale, f"grad error {err:.3g} > {tol:g}·max|g| = {tol * scale:.3g}"


# -- shapes -------------------------------------------------------------------------------

SHAPES = [
    (rows, c)
    for c in (1, 3, 7, 1000, 32003, 128256)
    for rows in (1, 3, 423, 1000)
    if rows * c <= 4_300_000
]


@pytest.mark.parametrize("rows,classes", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shapes_float32(rng, rows, classes, reduction):
    x, y = _inputs(rng, rows, classes, ignore_frac=0.3)
    check(x, y, reduction=reduction, torch_oracle=rows * classes <= 500_000)


@pytest.mark.parametrize("classes", [7, 1000, 32003])
def test_float64_matches_reference_tightly(rng, classes):
    x, y = _inputs(rng, 37, classes, dtype=np.float64, ignore_frac=0.3)
    check(x, y, loss_rtol=1e-11, grad_tol=1e-12, label_smoothing=0.1, weight=rng.random(classes))


# -- every option --------------------------------------------------------------------------

OPTION_SETS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": "random"},
    {"weight": "random", "label_smoothing": 0.1},
    {"ignore_index": 2},
    {"ignore_index": 2, "weight": "random", "label_smoothing": 0.1},
    {"z_loss": 1e-4},
    {"softcap": 30.0},
    {"softcap": 30.0, "z_loss": 1e-4, "label_smoothing": 0.1, "weight": "random"},
]


def _materialise(opts, rng, classes):
    opts = dict(opts)
    if opts.get("weight") == "random":
        opts["weight"] = rng.random(classes) + 0.1
    return opts


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("rows,classes", [(423, 1000), (3, 32003), (5, 3)])
def test_options(rng, opts, reduction, ignore_frac, rows, classes):
    opts = _materialise(opts, rng, classes)
    x, y = _inputs(
        rng, rows, classes, ignore_frac=ignore_frac, ignore_index=opts.get("ignore_index", -100)
    )
    if "ignore_index" in opts:
        y[: rows // 2] = opts["ignore_index"]  # the ignored class is also a valid class
    loss, grad = check(x, y, reduction=reduction, **opts)
    if ignore_frac == 1.0 and "ignore_index" not in opts:
        if reduction == "mean":
            assert np.isnan(loss)
        assert not grad.any()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("classes", [1, 7, 1000])
def test_probability_targets(rng, smoothing, weighted, reduction, classes):
    x, _ = _inputs(rng, 50, classes)
    t = rng.random((50, classes))
    t[:, : classes // 2] = 0.0  # zeros: 0·log p must count as 0
    t /= np.maximum(t.sum(1, keepdims=True), 1e-12)
    if classes == 1:
        t[:] = 1.0
    weight = rng.random(classes) + 0.1 if weighted else None
    check(x, t, reduction=reduction, label_smoothing=smoothing, weight=weight)
    if classes > 1:  # with one class the exact gradient is the z-term alone (~1e-5)
        check(x, t, reduction=reduction, label_smoothing=smoothing, weight=weight, z_loss=1e-4)


@pytest.mark.parametrize("kind", ["log_probs", "probs"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "weight": "random"}])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_input_kinds(rng, kind, opts, reduction):
    opts = _materialise(opts, rng, 100)
    x, y = _inputs(rng, 60, 100, ignore_frac=0.2)
    x64 = x.astype(np.float64)
    logp = x64 - np.log(np.exp(x64).sum(1, keepdims=True))
    data = (logp if kind == "log_probs" else np.exp(logp)).astype(np.float32)
    check(data, y, input_kind=kind, reduction=reduction, **opts)


def test_probs_input_equals_logits_input(rng):
    """The seeds' question: softmax outputs fed as probs give the same loss as the logits."""
    x, y = _inputs(rng, 40, 10, dtype=np.float64)
    p = np.exp(x - np.log(np.exp(x).sum(1, keepdims=True)))
    a = engine.cross_entropy(x, y)
    b = engine.cross_entropy(p, y, input_kind="probs")
    c = engine.cross_entropy(np.log(p), y, input_kind="log_probs")
    assert a == pytest.approx(b, rel=1e-12) and a == pytest.approx(c, rel=1e-12)


# -- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [3, 1000, 32003])
def test_float16_input(rng, classes):
    x, y = _inputs(rng, 64, classes, dtype=np.float16, ignore_frac=0.2)
    loss, grad = check(x, y, label_smoothing=0.1)
    assert grad.dtype == np.float32
    # PyTorch's own float16 path overflows at large logits; ours computes in float32.
    big = (x.astype(np.float32) * 1000).clip(-60000, 60000).astype(np.float16)
    assert np.isfinite(engine.cross_entropy(big, y))


@pytest.mark.parametrize("classes", [63, 100, 127, 129, 999])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}])
def test_float16_rows_with_a_masked_tail(rng, classes, opts):
    """16-bit one-block rows run their last C % 64 elements as one masked vector: the
    tail's maxima, NaN, -inf and targets must count exactly once."""
    x, y = _inputs(rng, 140, classes, dtype=np.float16)
    x[1, -1] = np.nan
    x[2, -3:] = -np.inf
    x[3, -1] = 40.0  # confident, target in the tail
    y[3] = classes - 1
    x[4, -2] = 30.0  # the row's max in the tail, target elsewhere
    x[70] = -np.inf
    x[70, -1] = 2.0  # the only finite logit, in the tail
    y[70] = classes - 1
    check(x, y, reduction="none", torch_oracle=False, **opts)
    ref_loss, ref_grad = R.cross_entropy_grad(x, y, reduction="none", **opts)
    grad = np.empty(x.shape, np.float16)
    loss, _ = engine.cross_entropy_grad(x, y, reduction="none", out=grad, **opts)
    _close(loss, ref_loss, 2e-6)
    _grad_close(grad, ref_grad, 1e-3)
    assert np.isnan(loss[1]) and np.isfinite(loss[3])
    if not opts:
        assert loss[3] < 1e-6 and loss[70] == 0


@pytest.mark.parametrize("classes", [7, 1000, 32003])
def test_bfloat16_bits(rng, classes):
    x, y = _inputs(rng, 64, classes, ignore_frac=0.2)
    bits = dtypes.float32_to_bf16_bits(x)
    loss, grad = check(bits, y, logits_dtype="bfloat16", z_loss=1e-4)
    exact = engine.cross_entropy(dtypes.bf16_bits_to_float32(bits), y, z_loss=1e-4)
    assert loss == pytest.approx(exact, rel=1e-6)


def test_uint16_without_bf16_marker_is_an_error():
    with pytest.raises(TypeError, match="bfloat16"):
        engine.cross_entropy(np.zeros((2, 3), np.uint16), np.array([0, 1]))


# -- special values ---------------------------------------------------------------------------


def test_large_logits(rng):
    x, y = _inputs(rng, 100, 1000, scale=1e4)
    check(x, y, reduction="none")
    check(x, y, label_smoothing=0.1)


def test_confident_rows_keep_relative_accuracy():
    x = np.zeros((4, 50), np.float32)
    x[:, 0] = [10, 15, 20, 30]
    y = np.zeros(4, np.int64)
    check(x, y, reduction="none")


def test_masked_classes_and_inf_target(rng):
    x, y = _inputs(rng, 20, 300)
    x[:, ::3] = -np.inf
    y = np.where(y % 3 == 0, y + 1, y)  # targets on unmasked classes
    check(x, y, reduction="none")
    y2 = y.copy()
    y2[4] = 0  # a masked class as target: loss inf for that row only
    loss = engine.cross_entropy(x, y2, reduction="none")
    assert np.isinf(loss[4]) and np.isfinite(np.delete(loss, 4)).all()
    check(x, y2, reduction="none")


def test_nan_row_is_nan_only_for_that_row(rng):
    x, y = _inputs(rng, 10, 100)
    x[3, 17] = np.nan
    x[6, 5] = np.inf
    loss, grad = check(x, y, reduction="none")
    assert np.isnan(loss[3]) and np.isnan(loss[6])
    assert np.isfinite(np.delete(loss, [3, 6])).all()
    assert np.isnan(grad[3]).all() and np.isfinite(np.delete(grad, [3, 6], axis=0)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_of_several_blocks(rng, dtype):
    """Rows longer than a block (4096): later blocks are summed against the running max in
    one pass, and redone when they hold a new max. Exercise both, with confident rows."""
    C = 3 * 4096 + 7
    x = (rng.standard_normal((8, C)) * 2).astype(dtype)
    y = rng.integers(0, C, 8)
    x[0] = 0
    x[0, C - 3] = 30  # confident, max in the last block
    y[0] = C - 3
    x[1] = np.linspace(0, 10, C)  # a new max in every block
    y[1] = C - 1
    x[2, :4096] = -np.inf  # first block masked: the running max starts late
    x[3] = 0
    x[3, 5] = 25  # confident, max in the first block: every later block takes one pass
    y[3] = 5
    x[4, 100] = 40  # a new max far above the first block's, in the same block
    x[5, 9000] = 40  # ... and in a later block
    check(x, y, reduction="none")
    check(x, y, label_smoothing=0.1, reduction="none")
    bad = x.copy()
    bad[6, C - 1] = np.nan  # NaN in the last block, after a max-free pass
    bad[7, 5000] = np.inf
    loss = engine.cross_entropy(bad, y, reduction="none")
    assert np.isnan(loss[6]) and np.isnan(loss[7]) and np.isfinite(loss[:6]).all()
    loss_g, grad = engine.cross_entropy_grad(bad, y, reduction="none")
    np.testing.assert_array_equal(np.isnan(loss_g), np.isnan(loss))
    assert np.isnan(grad[6]).all() and np.isfinite(grad[:6]).all()


@pytest.mark.parametrize("classes", [100, 1000, 2048])
def test_special_rows_among_pipelined_rows(rng, classes):
    """One-block rows take each row's max in the same loop as the previous row's exp sum,
    with a max that may skip or keep NaN: special rows next to each other and next to
    ordinary ones, across tile boundaries (64 rows), must each come out as on their own."""
    x, y = _inputs(rng, 140, classes)
    x[0, 0] = np.nan  # NaN first, in the very first row
    x[1, classes // 2] = np.nan  # ... in the middle of the next
    x[2] = -np.inf  # all masked
    x[3] = np.nan  # all NaN
    x[4] = -np.inf
    x[4, 1] = np.nan  # masked and NaN
    x[5, 7] = np.inf
    y[6] = -100  # ignored, between special rows
    x[7] = 1.0  # ties
    x[63, -1] = np.nan  # last row of a tile, then the first of the next
    x[64] = -np.inf
    x[65, 3] = 40.0  # confident
    y[65] = 3
    x[139, -1] = np.nan  # the last row
    loss, grad = check(x, y, reduction="none")
    assert np.isnan(loss[[0, 1, 2, 3, 4, 5, 63, 64, 139]]).all()
    assert np.isfinite(loss[[6, 7, 8, 62, 65, 66, 138]]).all() and loss[6] == 0


def _special_rows(rng, rows, classes, dtype=np.float32):
    x, y = _inputs(rng, rows, classes, dtype=dtype)
    x[0, 0] = np.nan
    x[2] = -np.inf
    x[3] = np.nan
    x[5, 7] = np.inf
    y[6] = -100
    x[64] = -np.inf  # the first row of the second tile
    x[65, 3] = 40.0  # confident
    y[65] = 3
    x[rows - 1, -1] = np.nan
    return x, y


@pytest.mark.parametrize("classes", [40, 300, 2048])
@pytest.mark.parametrize("where", ["apart", "in_place", "float16_out"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}])
def test_special_rows_among_pipelined_gradient_rows(rng, classes, where, opts):
    """One-block rows' gradients park their exps in out, or in a float tile (16-bit or
    in-place gradients); rows without a finite max fall back to the row-by-row path."""
    dtype = np.float16 if where == "float16_out" else np.float32
    x, y = _special_rows(rng, 140, classes, dtype)
    ref_loss, ref_grad = R.cross_entropy_grad(x, y, reduction="none", **opts)
    if where == "apart":
        loss, grad = engine.cross_entropy_grad(x, y, reduction="none", **opts)
    elif where == "in_place":
        grad = x.copy()
        loss, _ = engine.cross_entropy_grad(grad, y, reduction="none", out=grad, **opts)
    else:
        grad = np.empty(x.shape, np.float16)
        loss, _ = engine.cross_entropy_grad(x, y, reduction="none", out=grad, **opts)
    _close(loss, ref_loss, 2e-6)
    _grad_close(grad, ref_grad, 1e-3 if dtype == np.float16 else 1e-6)
    assert np.isnan(loss[[0, 2, 3, 5, 64, 139]]).all() and loss[6] == 0
    assert (grad[6] == 0).all() and np.isnan(grad[[0, 2, 3, 5, 64, 139]]).all()


def test_all_masked_row_is_nan_like_torch():
    x = np.full((2, 5), -np.inf, np.float32)
    x[1] = 0
    check(x, np.array([0, 0]), reduction="none")


# -- layouts, in place, grad_output ------------------------------------------------------------


def test_non_contiguous_inputs(rng):
    x, y = _inputs(rng, 200, 301)
    fortran = np.asfortranarray(x)
    strided = np.asarray(rng.standard_normal((200, 602)), dtype=np.float32)[:, ::2]
    for arr in (fortran, strided, x[::2]):
        yy = y[: arr.shape[0]]
        check(arr, yy, label_smoothing=0.1, torch_oracle=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("classes", [13, 37, 999])  # transposed tiles; row tiles; rows
def test_in_place_gradient(rng, dtype, classes):
    x, y = _inputs(rng, 150, classes, dtype=dtype, ignore_frac=0.2)
    ref_loss, ref_grad = R.cross_entropy_grad(x, y, label_smoothing=0.1)
    buf = x.copy()
    loss, grad = engine.cross_entropy_grad(buf, y, label_smoothing=0.1, out=buf)
    assert grad is buf
    _close(loss, ref_loss, 2e-6)
    tol = 1e-3 if dtype == np.float16 else 1e-6  # the output itself is rounded to float16
    _grad_close(buf, ref_grad, tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_gradient_of_rows_with_late_maxima(rng, dtype):
    """Rows of several blocks sum later blocks against the running max and redo a block
    that holds a new one: in place, its logits must still be there to redo it."""
    C = 3 * 4096 + 7
    x = (rng.standard_normal((4, C)) * 2).astype(dtype)
    x[1] = np.linspace(0, 10, C)  # a new max in every block
    x[2, 9000] = 40.0  # a new max in the third block
    y = rng.integers(0, C, 4)
    ref_loss, ref_grad = R.cross_entropy_grad(x, y, reduction="none")
    buf = x.copy()
    loss, grad = engine.cross_entropy_grad(buf, y, reduction="none", out=buf)
    assert grad is buf
    _close(loss, ref_loss, LOSS_RTOL[dtype])
    _grad_close(buf, ref_grad, 1e-6)


def test_out_overlapping_the_logits_is_refused(rng):
    x, y = _inputs(rng, 10, 20)
    with pytest.raises(ValueError, match="overlaps"):
        engine.cross_entropy_grad(x[1:], y[1:], out=x[:-1])


def test_in_place_bf16(rng):
    x, y = _inputs(rng, 20, 100)
    bits = dtypes.float32_to_bf16_bits(x)
    ref_loss, ref_grad = R.cross_entropy_grad(bits, y, logits_dtype="bfloat16")
    loss, grad = engine.cross_entropy_grad(bits, y, logits_dtype="bfloat16", out=bits)
    _grad_close(dtypes.bf16_bits_to_float32(bits), ref_grad, 1e-2)


@pytest.mark.parametrize("classes", [10, 50, 300, 3000])  # transposed, row tiles, rows
def test_vector_grad_output(rng, classes):
    x, y = _inputs(rng, 30, classes, ignore_frac=0.2)
    g = rng.standard_normal(30)
    check(x, y, reduction="none", grad_output=g, z_loss=1e-4)
    # a scalar reaches the kernels as a one-entry scale for every row
    check(x, y, reduction="none", grad_output=-2.5, z_loss=1e-4)
    with pytest.raises(ValueError):
        engine.cross_entropy_grad(x, y, reduction="mean", grad_output=g)


# -- row stats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts", [{}, {"label_smoothing": 0.1, "weight": "random"}, {"softcap": 30.0}]
)
@pytest.mark.parametrize("classes", [1, 7, 5000])
def test_row_stats(rng, opts, classes):
    opts = _materialise(opts, rng, classes)
    x, y = _inputs(rng, 40, classes, ignore_frac=0.25)
    x[5, :] = x[5, 0]  # ties: argmax is the first
    got = engine.row_stats(x, y, **opts).as_dict()
    ref = R.row_stats(x, y, **opts)
    assert set(got) == set(ref)
    for key in ("loss", "lse", "target_logprob", "max_prob", "entropy"):
        _close(got[key], ref[key], 3e-6 if key != "entropy" else 2e-5)
    np.testing.assert_array_equal(got["argmax"], ref["argmax"])
    np.testing.assert_array_equal(got["target_rank"], ref["target_rank"])
    ignored = y == -100
    assert np.isnan(got["target_logprob"][ignored]).all()
    assert (got["target_rank"][ignored] == -1).all() and (got["loss"][ignored] == 0).all()


# 10, 100: transposed tiles; 300: one block per row; 3000: several blocks per row
@pytest.mark.parametrize("classes", [10, 100, 300, 3000])
def test_row_stats_edge_rows(rng, classes):
    x, y = _inputs(rng, 70, classes)
    x[1, 0] = np.nan  # NaN first
    x[2, 3] = np.nan
    x[3] = -np.inf  # all masked
    x[4] = -np.inf
    x[4, 2] = np.nan  # masked and NaN
    x[5] = 1.0  # ties
    y[6] = -100  # ignored: stats still computed, loss 0, rank -1
    x[7, [4, 6]] = np.inf  # argmax: the first +inf
    x[8, [min(65, classes - 2), classes - 1]] = 50.0  # tied maxima, past the first chunk
    got = engine.row_stats(x, y).as_dict()
    ref = R.row_stats(x, y)
    normal = np.r_[0, 5, 6, 8:70]
    assert got["argmax"][7] == 4
    for key in ("loss", "lse", "target_logprob", "max_prob", "entropy"):
        _close(got[key][normal], ref[key][normal], 3e-6 if key != "entropy" else 2e-5)
    np.testing.assert_array_equal(got["target_rank"][normal], ref["target_rank"][normal])
    np.testing.assert_array_equal(got["argmax"][normal], ref["argmax"][normal])
    assert got["argmax"][1] == 0 and got["argmax"][2] == min(3, np.nanargmax(x[2]))
    for key in ("loss", "lse", "target_logprob", "max_prob", "entropy"):
        assert np.isnan(got[key][[1, 2, 4]]).all(), key
    assert got["lse"][3] == -np.inf and np.isnan(got["loss"][3])
    assert got["loss"][6] == 0 and got["target_rank"][6] == -1 and np.isfinite(got["lse"][6])


def test_row_stats_soft_targets_have_kl(rng):
    x, _ = _inputs(rng, 30, 20)
    t = rng.random((30, 20))
    t[:, :5] = 0
    t /= t.sum(1, keepdims=True)
    got = engine.row_stats(x, t).as_dict()
    ref = R.row_stats(x, t)
    for key in ("loss", "kl", "target_logprob", "entropy"):
        _close(got[key], ref[key], 2e-5)
    np.testing.assert_array_equal(got["target_rank"], ref["target_rank"])


@pytest.mark.parametrize("kind", ["log_probs", "probs"])
def test_row_stats_input_kinds(rng, kind):
    x, y = _inputs(rng, 30, 40)
    logp = x - np.log(np.exp(x.astype(np.float64)).sum(1, keepdims=True))
    data = (logp if kind == "log_probs" else np.exp(logp)).astype(np.float32)
    got = engine.row_stats(data, y, input_kind=kind).as_dict()
    ref = R.row_stats(data, y, input_kind=kind)
    for key in ("loss", "target_logprob", "entropy", "max_prob"):
        _close(got[key], ref[key], 2e-5)


# -- validation --------------------------------------------------------------------------------


def test_validation_messages(rng):
    x, y = _inputs(rng, 4, 3)
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        engine.cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
        engine.cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight tensor should be defined either for all 3"):
        engine.cross_entropy(x, y, weight=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"Expected input batch_size \(4\) to match"):
        engine.cross_entropy(x, y[:2])
    with pytest.raises(IndexError, match=r"Target 3 is out of bounds \(row 1\)"):
        engine.cross_entropy(x, np.array([0, 3, 1, 1]))
    with pytest.raises(ValueError, match="input_kind='logits'"):
        engine.cross_entropy(x, y, input_kind="probs", z_loss=1e-3)


def test_empty_input():
    x = np.zeros((0, 5), np.float32)
    y = np.zeros(0, np.int64)
    assert np.isnan(engine.cross_entropy(x, y))
    assert engine.cross_entropy(x, y, reduction="sum") == 0.0
    assert engine.cross_entropy(x, y, reduction="none").shape == (0,)
    loss, grad = engine.cross_entropy_grad(x, y)
    assert grad.shape == (0, 5)


# -- the seeds' worked examples ------------------------------------------------------------------


def test_seed_examples():
    assert engine.cross_entropy(np.array([[0, 0, 0, 1]], np.float32), np.array([3])) == (
        pytest.approx(0.7437, abs=1e-4)
    )
    x = np.array([[0.3367, 0.1288, 0.2345, 0.2303, -1.1229]], np.float32)
    assert engine.cross_entropy(x, np.array([0])) == pytest.approx(1.3472, abs=1e-4)
    x = np.array([[3.0, 1.0, -3.0]])
    assert engine.cross_entropy(x, np.array([1])) == pytest.approx(2.1291, abs=1e-4)
    stats = engine.row_stats(x, np.array([1]))
    assert stats.max_prob[0] == pytest.approx(0.8789, abs=1e-4)
    assert np.exp(stats.target_logprob[0]) == pytest.approx(0.1189, abs=1e-4)


def test_int64_targets_serve_as_kernel_targets_untouched(rng):
    """int64 targets with a negative ignore_index go to the kernels as they are (no copy)."""
    x, y = _inputs(rng, 200, 30, ignore_frac=0.3)
    y = y.astype(np.int64)
    before = y.copy()
    ref_loss, ref_grad = R.cross_entropy_grad(x, y)
    loss, grad = engine.cross_entropy_grad(x, y)
    _close(loss, ref_loss, 2e-6)
    _grad_close(grad, ref_grad, 1e-6)
    np.testing.assert_array_equal(y, before)
    y[3] = 30  # still checked: out of range names the row
    with pytest.raises(Exception, match="3"):
        engine.cross_entropy(x, y)


# -- reductions from the kernels' per-block sums -----------------------------------------------


@pytest.mark.parametrize("classes", [10, 300, 3000])  # transposed tiles, row tiles, rows
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_from_block_sums(rng, classes, reduction):
    """mean/sum come from sums of 64-row blocks the kernels add: against the reference,
    against the rows they sum, and the same to the bit for any thread count."""
    x, y = _inputs(rng, 1000 if classes < 3000 else 141, classes, ignore_frac=0.1)
    w = rng.uniform(0.5, 2.0, classes)
    rows_loss = engine.cross_entropy(x, y, reduction="none", weight=w)
    for fn in (engine.cross_entropy, lambda *a, **k: engine.cross_entropy_grad(*a, **k)[0]):
        got = fn(x, y, reduction=reduction, weight=w)
        _close(got, R.cross_entropy(x, y, reduction=reduction, weight=w), 2e-6)
        total = np.sum(rows_loss, dtype=np.float64)
        expect = total if reduction == "sum" else total / np.sum(w[y[y >= 0]])
        assert got == pytest.approx(expect, rel=1e-12)
        old = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            assert fn(x, y, reduction=reduction, weight=w) == got
        finally:
            numba.set_num_threads(old)


def _rank_oracle(x, cls):
    """#{j: x_j > x_y} + #{j < y: x_j == x_y}: classes above the target, and those tied
    with it before it (argmax takes the first maximal class)."""
    xt = x[np.arange(x.shape[0]), cls][:, None]
    before = np.arange(x.shape[1])[None, :] < cls[:, None]
    return np.sum(x > xt, axis=1) + np.sum((x == xt) & before, axis=1)


# 10, 100, 300: transposed tiles; 1000: one block per row; 5000: several blocks per row
@pytest.mark.parametrize("classes", [10, 100, 300, 1000, 5000])
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_target_rank_ties(rng, classes, storage):
    v = rng.integers(-4, 4, (150, classes)).astype(np.float32) * 0.5  # 8 values: ties
    v[0] = 1.0  # every class tied
    y = rng.integers(0, classes, 150)
    y[[0, 1, 2]] = [classes // 2, 0, classes - 1]
    if storage == "float16":
        x, opts = v.astype(np.float16), {}
    else:
        x, opts = dtypes.float32_to_bf16_bits(v), {"logits_dtype": "bfloat16"}
    got = engine.row_stats(x, y, **opts)
    want = _rank_oracle(v.astype(np.float64), y)
    assert got.target_rank[0] == classes // 2
    np.testing.assert_array_equal(got.target_rank, want)
    np.testing.assert_array_equal(got.target_rank == 0, got.argmax == y)
    np.testing.assert_array_equal(R.row_stats(x, y, **opts)["target_rank"], want)


def test_target_rank_ties_soft_targets(rng):
    v = rng.integers(-2, 2, (40, 30)).astype(np.float16)
    t = rng.random((40, 30))
    t /= t.sum(1, keepdims=True)
    got = engine.row_stats(v, t)
    want = _rank_oracle(v.astype(np.float64), np.argmax(t, axis=1))
    np.testing.assert_array_equal(got.target_rank, want)
    np.testing.assert_array_equal(R.row_stats(v, t)["target_rank"], want)
