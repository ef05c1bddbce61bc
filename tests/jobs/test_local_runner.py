"""Streaming jobs against the in-memory reference: every layout, chunking, outputs."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine
import engine.reference as R
from engine import dtypes
from engine.errors import XentInputError
from tests.datagen import write_dataset


def _data(rng, rows=300, classes=37, ignore_frac=0.2, dtype=np.float32):
    x = (rng.standard_normal((rows, classes)) * 2).astype(dtype)
    y = rng.integers(0, classes, rows)
    y[rng.random(rows) < ignore_frac] = -100
    return x, y


def _expected_metrics(x, y, **opts):
    """Metrics computed directly from the float64 reference's row stats."""
    stats = R.row_stats(x, y, **opts)
    counted = y != opts.get("ignore_index", -100)
    loss = R.cross_entropy(x, y, **opts)
    tl = stats["target_logprob"][counted]
    rank = stats["target_rank"][counted]
    return {
        "rows": len(y),
        "counted": int(counted.sum()),
        "loss": loss,
        "nll": -tl.mean(),
        "accuracy": float(np.mean(rank == 0)),
        "top5": float(np.mean(rank < 5)),
        "entropy": stats["entropy"][counted].mean(),
    }


def _assert_metrics(report, exp, rtol=1e-5):
    d = report.to_dict()
    assert d["rows"] == exp["rows"] and d["counted"] == exp["counted"]
    assert d["loss"] == pytest.approx(exp["loss"], rel=rtol)
    assert d["nll"] == pytest.approx(exp["nll"], rel=rtol)
    assert d["perplexity"] == pytest.approx(math.exp(exp["nll"]), rel=rtol)
    assert d["accuracy"] == pytest.approx(exp["accuracy"])
    assert d["top_k_accuracy"]["5"] == pytest.approx(exp["top5"])
    assert d["entropy"] == pytest.approx(exp["entropy"], rel=1e-4)


@pytest.mark.parametrize("fmt", ["parquet", "arrow-file", "arrow-stream"])
@pytest.mark.parametrize(
    "layout", ["fixed_size_list", "list", "large_list", "fixed_shape_tensor", "wide"]
)
def test_evaluate_every_layout_and_format(tmp_path, rng, fmt, layout):
    x, y = _data(rng)
    path = write_dataset(tmp_path / "d.bin", x, y, layout=layout, fmt=fmt, row_group_rows=64)
    logits = "logit_*" if layout == "wide" else "logits"
    report = engine.evaluate(path, logits=logits, chunk_rows=50, device="cpu")
    _assert_metrics(report, _expected_metrics(x, y))


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_evaluate_dtypes(tmp_path, rng, dtype):
    x, y = _data(rng)
    if dtype == "bfloat16":
        bits = dtypes.float32_to_bf16_bits(x)
        path = write_dataset(tmp_path / "d.parquet", bits, y, bf16=True)
        exp = _expected_metrics(bits, y, logits_dtype="bfloat16")
    else:
        x = x.astype(dtype)
        path = write_dataset(tmp_path / "d.parquet", x, y)
        exp = _expected_metrics(x, y)
    _assert_metrics(engine.evaluate(path, chunk_rows=70, device="cpu"), exp)


def test_chunk_size_and_file_split_invariance(tmp_path, rng):
    x, y = _data(rng, rows=500)
    one = write_dataset(tmp_path / "one.parquet", x, y, row_group_rows=100)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, lo in enumerate(range(0, 500, 130)):
        write_dataset(
            parts / f"p{i:02d}.arrow", x[lo : lo + 130], y[lo : lo + 130], fmt="arrow-file"
        )
    results = [engine.evaluate(one, chunk_rows=c, device="cpu").to_dict() for c in (1, 7, 64, 1000)]
    results.append(engine.evaluate(str(parts), chunk_rows=33, device="cpu").to_dict())
    for r in results[1:]:
        for key in ("loss", "nll", "accuracy", "entropy", "ece", "rows", "counted"):
            assert r[key] == pytest.approx(results[0][key], rel=1e-12, abs=1e-15), key


def test_null_targets_count_as_ignored(tmp_path, rng):
    x, y = _data(rng, ignore_frac=0.0)
    mask = rng.random(len(y)) < 0.3
    target = pa.array(y, mask=mask)
    path = write_dataset(tmp_path / "d.parquet", x, target)
    y_ref = np.where(mask, -100, y)
    report = engine.evaluate(path, device="cpu")
    _assert_metrics(report, _expected_metrics(x, y_ref))
    assert report["ignored"] == int(mask.sum())


def test_options_reach_the_kernels(tmp_path, rng):
    x, y = _data(rng)
    w = rng.random(x.shape[1]) + 0.5
    path = write_dataset(tmp_path / "d.parquet", x, y)
    opts = dict(weight=w, label_smoothing=0.1, z_loss=1e-4)
    report = engine.evaluate(path, device="cpu", **opts)
    assert report["loss"] == pytest.approx(R.cross_entropy(x, y, **opts), rel=1e-6)
    assert report["z_loss"] > 0
    total = engine.evaluate(path, device="cpu", reduction="sum", **opts)
    assert total["loss"] == pytest.approx(R.cross_entropy(x, y, reduction="sum", **opts), rel=1e-6)


def test_soft_targets(tmp_path, rng):
    x, _ = _data(rng)
    t = rng.random(x.shape).astype(np.float32)
    t /= t.sum(1, keepdims=True)
    path = write_dataset(tmp_path / "d.parquet", x, None, soft=t)
    report = engine.evaluate(path, device="cpu").to_dict()
    assert report["loss"] == pytest.approx(R.cross_entropy(x, t.astype(np.float64)), rel=1e-5)
    ref = R.row_stats(x, t.astype(np.float64))
    assert report["kl"] == pytest.approx(ref["kl"].mean(), rel=1e-4)


def test_group_by(tmp_path, rng):
    x, y = _data(rng)
    lang = np.array(["en", "fr", "de"])[rng.integers(0, 3, len(y))]
    path = write_dataset(tmp_path / "d.parquet", x, y, columns={"lang": lang})
    report = engine.evaluate(path, group_by="lang", chunk_rows=41, device="cpu").to_dict()
    assert set(report["groups"]) == {"en", "fr", "de"}
    for g in ("en", "fr"):
        m = lang == g
        _assert_metrics(
            engine.evaluate(path, group_by="lang", device="cpu"), _expected_metrics(x, y)
        )
        exp = _expected_metrics(x[m], y[m])
        assert report["groups"][g]["loss"] == pytest.approx(exp["loss"], rel=1e-5)
        assert report["groups"][g]["rows"] == int(m.sum())


def test_nan_policies(tmp_path, rng):
    x, y = _data(rng, ignore_frac=0.0)
    x[17, 3] = np.nan
    path = write_dataset(tmp_path / "d.parquet", x, y)
    with pytest.raises(XentInputError, match=r"d.parquet: NaN .* \(row 17\)"):
        engine.evaluate(path, device="cpu", chunk_rows=10)
    skipped = engine.evaluate(path, device="cpu", nan_policy="skip").to_dict()
    assert skipped["nan_rows"] == 1 and skipped["counted"] == len(y) - 1
    keep = np.arange(len(y)) != 17
    assert skipped["loss"] == pytest.approx(R.cross_entropy(x[keep], y[keep]), rel=1e-6)
    propagated = engine.evaluate(path, device="cpu", nan_policy="propagate").to_dict()
    assert propagated["loss"] is None  # NaN in JSON is null


def test_target_out_of_range_names_file_and_row(tmp_path, rng):
    x, y = _data(rng, ignore_frac=0.0)
    y[123] = 99
    path = write_dataset(tmp_path / "d.parquet", x, y)
    with pytest.raises(
        XentInputError, match=r"d.parquet: target 99 is out of range .* \(row 123\)"
    ):
        engine.evaluate(path, device="cpu", chunk_rows=50)


def test_empty_file_and_all_ignored(tmp_path, rng):
    x, y = _data(rng, rows=0)
    path = write_dataset(tmp_path / "empty.parquet", x, y)
    d = engine.evaluate(path, device="cpu").to_dict()
    assert d["rows"] == 0 and d["loss"] is None and d["accuracy"] is None
    x, y = _data(rng, rows=20, ignore_frac=1.0)
    path = write_dataset(tmp_path / "ignored.parquet", x, y)
    d = engine.evaluate(path, device="cpu").to_dict()
    assert d["counted"] == 0 and d["ignored"] == 20 and d["loss"] is None


def test_probability_warning(tmp_path, rng):
    x, y = _data(rng)
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    path = write_dataset(tmp_path / "p.parquet", p.astype(np.float32), y)
    report = engine.evaluate(path, device="cpu")
    assert any("--input-kind probs" in w for w in report.warnings)
    assert not engine.evaluate(path, device="cpu", input_kind="probs").warnings


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_score_output_round_trips(tmp_path, rng, suffix):
    x, y = _data(rng)
    ids = np.arange(len(y)) * 10
    path = write_dataset(tmp_path / "d.parquet", x, y, columns={"id": ids}, row_group_rows=64)
    out = tmp_path / f"scores{suffix}"
    engine.score(path, out, keep=["id"], chunk_rows=45, device="cpu")
    table = pq.read_table(out) if suffix == ".parquet" else pa.ipc.open_file(str(out)).read_all()
    assert table.column_names[:7] == [
        "loss",
        "target_logprob",
        "lse",
        "argmax",
        "max_prob",
        "entropy",
        "target_rank",
    ]
    assert table.column_names[-1] == "id"
    np.testing.assert_array_equal(table["id"].to_numpy(), ids)
    ref = R.row_stats(x, y)
    np.testing.assert_allclose(table["loss"].to_numpy(), ref["loss"], rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(table["target_rank"].to_numpy(), ref["target_rank"])
    with pytest.raises(XentInputError, match="exists"):
        engine.score(path, out, device="cpu")
    engine.score(path, out, device="cpu", overwrite=True)


def test_score_resume_equals_uninterrupted(tmp_path, rng):
    x, y = _data(rng, rows=400)
    path = write_dataset(tmp_path / "d.parquet", x, y, row_group_rows=100)
    full = tmp_path / "full"
    engine.score(path, full, chunk_rows=50, device="cpu")
    part = tmp_path / "part"
    engine.score(path, part, chunk_rows=50, device="cpu")
    # simulate a crash after 3 parts: later part files never made it to disk
    for index in range(3, 8):
        os.remove(part / f"part-{index:05d}.parquet")
    before = os.path.getmtime(part / "part-00000.parquet")
    engine.score(path, part, chunk_rows=50, device="cpu", resume=True)
    assert os.path.getmtime(part / "part-00000.parquet") == before  # not recomputed
    a = pq.ParquetDataset(str(full)).read()
    b = pq.ParquetDataset(str(part)).read()
    assert a.num_rows == b.num_rows == 400
    np.testing.assert_array_equal(a["loss"].to_numpy(), b["loss"].to_numpy())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad_dtype", ["float32", "float16"])
def test_gradients_match_reference(tmp_path, rng, reduction, grad_dtype):
    x, y = _data(rng)
    path = write_dataset(
        tmp_path / "d.parquet", x, y, columns={"id": np.arange(len(y))}, row_group_rows=64
    )
    out = tmp_path / "g.parquet"
    report = engine.gradients(
        path,
        out,
        keep="id",
        reduction=reduction,
        grad_dtype=grad_dtype,
        label_smoothing=0.1,
        chunk_rows=37,
        device="cpu",
    )
    table = pq.read_table(out)
    grad = np.stack(table["grad"].to_numpy(zero_copy_only=False)).astype(np.float64)
    ref_loss, ref_grad = R.cross_entropy_grad(x, y, reduction=reduction, label_smoothing=0.1)
    tol = 1e-3 if grad_dtype == "float16" else 1e-6
    assert np.max(np.abs(grad - ref_grad)) <= tol * np.max(np.abs(ref_grad))
    if reduction != "none":
        assert report.to_dict()["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert table["id"].to_pylist() == list(range(len(y)))


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_gradients_skip_nan_rows_keeps_the_rest_of_the_chunk(tmp_path, rng, suffix):
    """Under skip a NaN row gets a zero gradient; the other rows of its chunk still count."""
    x, y = _data(rng, ignore_frac=0.0)
    x[17, 3] = np.nan
    path = write_dataset(tmp_path / "d.parquet", x, y)
    out = tmp_path / f"g{suffix}"
    report = engine.gradients(
        path, out, reduction="sum", nan_policy="skip", chunk_rows=40, device="cpu"
    ).to_dict()
    keep = np.arange(len(y)) != 17
    ref_loss, ref_grad = R.cross_entropy_grad(x[keep], y[keep], reduction="sum")
    assert report["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert report["counted"] == len(y) - 1
    if suffix == ".parquet":
        table = pq.read_table(out)
    else:
        table = pa.ipc.open_file(str(out)).read_all()
    grad = np.stack(table["grad"].to_numpy(zero_copy_only=False)).astype(np.float64)
    assert not grad[17].any()
    assert np.max(np.abs(grad[keep] - ref_grad)) <= 1e-6 * np.max(np.abs(ref_grad))


def test_resumed_score_reports_the_whole_output(tmp_path, rng):
    x, y = _data(rng, rows=400)
    path = write_dataset(tmp_path / "d.parquet", x, y, row_group_rows=100)
    timing = ("seconds", "rows_per_second", "gb_per_second")
    full = engine.score(path, tmp_path / "full", chunk_rows=50, device="cpu")
    part = tmp_path / "part"
    engine.score(path, part, chunk_rows=50, device="cpu")
    for index in range(3, 8):  # a crash after 3 parts
        os.remove(part / f"part-{index:05d}.parquet")
    resumed = engine.score(path, part, chunk_rows=50, device="cpu", resume=True)
    whole = {k: v for k, v in full.to_dict().items() if k not in timing}
    assert {k: v for k, v in resumed.to_dict().items() if k not in timing} == whole
    assert resumed["rows"] == 400 and not resumed.warnings


def test_resumed_parts_without_sums_are_named_in_a_warning(tmp_path, rng):
    x, y = _data(rng, rows=200)
    path = write_dataset(tmp_path / "d.parquet", x, y)
    out = tmp_path / "out"
    engine.score(path, out, chunk_rows=50, device="cpu")
    import shutil

    shutil.rmtree(out / "_metrics")  # as an older xent wrote them
    os.remove(out / "part-00003.parquet")
    resumed = engine.score(path, out, chunk_rows=50, device="cpu", resume=True)
    assert resumed["rows"] == 50
    assert "3 resumed part(s)" in resumed.warnings[0]


def test_standard_errors_and_perplexity_interval(tmp_path, rng):
    x, y = _data(rng, rows=300)
    path = write_dataset(tmp_path / "d.parquet", x, y)
    d = engine.evaluate(path, chunk_rows=37, device="cpu", top_k=(1, 5)).to_dict()
    stats = R.row_stats(x, y)
    counted = y != -100
    n = int(counted.sum())
    nll = -stats["target_logprob"][counted]
    hit1 = (stats["target_rank"][counted] == 0).astype(float)
    hit5 = (stats["target_rank"][counted] < 5).astype(float)
    entropy = stats["entropy"][counted]
    for key, values in (("nll", nll), ("accuracy", hit1), ("entropy", entropy)):
        assert d["se"][key] == pytest.approx(np.std(values, ddof=1) / math.sqrt(n), rel=1e-4)
    assert d["se"]["top_k_accuracy"]["5"] == pytest.approx(
        np.std(hit5, ddof=1) / math.sqrt(n), rel=1e-9
    )
    low, high = d["perplexity_ci95"]
    se = d["se"]["nll"]
    assert low == pytest.approx(math.exp(d["nll"] - 1.96 * se), rel=1e-12)
    assert high == pytest.approx(math.exp(d["nll"] + 1.96 * se), rel=1e-12)
    assert low < d["perplexity"] < high


def test_standard_errors_undefined_below_two_rows(tmp_path, rng):
    x, y = _data(rng, rows=1, ignore_frac=0.0)
    path = write_dataset(tmp_path / "d.parquet", x, y)
    d = engine.evaluate(path, device="cpu").to_dict()
    assert d["se"]["nll"] is None and d["se"]["accuracy"] is None
    assert d["perplexity_ci95"] is None


def test_soft_targets_have_a_kl_standard_error(tmp_path, rng):
    x, _ = _data(rng, rows=120)
    t = rng.dirichlet(np.ones(x.shape[1]), size=x.shape[0]).astype(np.float32)
    path = write_dataset(tmp_path / "d.parquet", x, None, soft=t)
    d = engine.evaluate(path, device="cpu").to_dict()
    kl = R.row_stats(x, t.astype(np.float64))["kl"]
    assert d["se"]["kl"] == pytest.approx(np.std(kl, ddof=1) / math.sqrt(len(kl)), rel=1e-4)


def test_accuracy_follows_argmax_on_ties(tmp_path, rng):
    """bfloat16 rows full of ties: accuracy is the mean of argmax == target, exactly as a user
    recomputes it from `score` output (the first maximal index is the prediction)."""
    rows, classes = 400, 16
    levels = np.array([-1.0, 0.0, 0.5, 1.0], np.float32)  # 4 values over 16 classes: ties
    x = levels[rng.integers(0, 4, (rows, classes))]
    y = rng.integers(0, classes, rows)
    bits = dtypes.float32_to_bf16_bits(x)
    path = write_dataset(tmp_path / "ties.parquet", bits, y, bf16=True)
    out = tmp_path / "s.parquet"
    report = engine.score(path, out, device="cpu", top_k=(1, 2))
    scored = pq.read_table(out)
    argmax = scored["argmax"].to_numpy()
    rank = scored["target_rank"].to_numpy()
    assert np.array_equal(argmax, np.argmax(x, axis=1))
    ahead = (x > x[np.arange(rows), y][:, None]).sum(1)
    tied_before = (
        (x == x[np.arange(rows), y][:, None]) & (np.arange(classes)[None, :] < y[:, None])
    ).sum(1)
    assert np.array_equal(rank, ahead + tied_before)
    assert report["accuracy"] == pytest.approx(float(np.mean(argmax == y)), abs=1e-15)
    assert report["top_k_accuracy"]["2"] == pytest.approx(float(np.mean(rank < 2)), abs=1e-15)


def test_job_specs_are_frozen_and_sources_give_new_ones(tmp_path, rng):
    import dataclasses

    from engine.io import open_source
    from engine.jobs.spec import for_source, make_spec

    x, y = _data(rng, rows=10)
    path = write_dataset(tmp_path / "b.parquet", dtypes.float32_to_bf16_bits(x), y, bf16=True)
    spec = make_spec((1, 5), None, "cpu", "error", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.nan_policy = "skip"
    marked, classes = for_source(open_source(path), spec)
    assert classes == x.shape[1] and marked.opts.logits_dtype == "bfloat16"
    assert spec.opts.logits_dtype is None  # the caller's spec is untouched
