"""`eval` over sparse top-k rows (SPEC §8) against float64 oracles from the dense rows they
came from: what is exact is exact, the bounds bound, and malformed rows are one error."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine
from engine.dtypes import float32_to_bf16_bits
from engine.errors import XentInputError, XentUsageError
from tests.commands.helpers import ok, run, user_error
from tests.datagen import write_dataset

ROWS, C, K = 423, 300, 16


def logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def _dense(rng, rows=ROWS, classes=C):
    x = rng.standard_normal((rows, classes)) * 2.0
    y = rng.integers(0, classes, rows)
    # a third of the targets among each row's 10 best classes: both kinds of rows occur
    top = np.argsort(-x, axis=1, kind="stable")
    pick = rng.integers(0, 10, rows)
    some = rng.random(rows) < 0.35
    y[some] = top[some, pick[some]]
    return x.astype(np.float32), y


def _oracle(x, y, k):
    """float64 top-k facts of dense rows: the stored classes, their log-probs, the tail."""
    x64 = x.astype(np.float64)
    lse = logsumexp(x64, axis=1)
    order = np.argsort(-x64, axis=1, kind="stable")[:, :k]
    logp = np.take_along_axis(x64, order, 1) - lse[:, None]
    return order, logp, lse


def _sparse_table(idx, vals, y, classes, *, value_type=pa.float32(), list_kind="fixed", extra=None):
    k = idx.shape[1]
    if list_kind == "fixed":
        ia = pa.FixedSizeListArray.from_arrays(pa.array(idx.ravel().astype(np.int32)), k)
        va = pa.FixedSizeListArray.from_arrays(pa.array(vals.ravel(), type=value_type), k)
    else:
        ia = pa.array([list(map(int, r)) for r in idx], type=pa.list_(pa.int64()))
        va = pa.array([list(r) for r in vals], type=pa.list_(value_type))
    meta = {} if classes is None else {"xent.classes": str(classes)}
    fields = [
        pa.field("topk_indices", ia.type, metadata=meta),
        pa.field("topk_logprobs", va.type),
        pa.field("target", pa.int64()),
    ]
    arrays = [ia, va, pa.array(y)]
    for name, arr in (extra or {}).items():
        fields.append(pa.field(name, arr.type))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _write(tmp_path, table, name="top.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def test_exact_values_and_bounds_against_float64(tmp_path, rng):
    x, y = _dense(rng)
    y[:5] = -100  # ignored rows take no part
    order, logp, _ = _oracle(x, y, K)
    src = _write(tmp_path, _sparse_table(order, logp.astype(np.float32), y, C))
    d = engine.evaluate(src, top_k=(1, 5, 16, 20)).to_dict()

    counted = y >= 0
    x64 = x.astype(np.float64)
    lse = logsumexp(x64, axis=1)
    nll = lse - x64[np.arange(ROWS), np.maximum(y, 0)]
    stored = counted & (order == y[:, None]).any(axis=1)
    p = np.exp(logp)
    tail = np.maximum(1.0 - p.sum(1), 0.0)
    assert d["counted"] == counted.sum() and d["ignored"] == 5
    assert d["target_stored"] == stored.sum()
    assert d["target_outside_topk"] == (counted & ~stored).sum()
    assert d["nll"] == pytest.approx(nll[stored].mean(), rel=1e-6)
    bound = np.where(stored, nll, -np.log(tail))[counted].mean()
    assert d["nll_lower_bound"] == pytest.approx(bound, rel=1e-5)
    assert d["nll_lower_bound"] <= nll[counted].mean()
    h = -(p * logp).sum(1) - tail * np.log(tail)
    assert d["entropy_lower_bound"] == pytest.approx(h[counted].mean(), rel=1e-5)
    full_p = np.exp(x64 - lse[:, None])
    full_h = -(full_p * np.log(full_p)).sum(1)
    assert d["entropy_lower_bound"] <= full_h[counted].mean()
    assert d["tail_mass"] == pytest.approx(tail[counted].mean(), rel=1e-5)
    # accuracy and top-j (j <= k) are exact over every counted row: dense eval agrees
    dense = engine.evaluate(
        write_dataset(tmp_path / "dense.parquet", x, y), top_k=(1, 5, 16, 20)
    ).to_dict()
    assert d["accuracy"] == dense["accuracy"]
    assert d["top_k_accuracy"]["5"] == dense["top_k_accuracy"]["5"]
    assert d["top_k_accuracy"]["16"] == dense["top_k_accuracy"]["16"]
    assert d["top_k_accuracy"]["20"] is None  # past the stored k: unknown
    assert d["ece"] == pytest.approx(dense["ece"], abs=1e-6)
    assert d["topk"] == K and d["normalised_over"] == "all" and d["classes"] == C


def test_score_emit_topk_round_trip_and_chunking(tmp_path, rng):
    x, y = _dense(rng)
    dense = write_dataset(tmp_path / "dense.parquet", x, y, columns={"id": np.arange(ROWS)})
    out = tmp_path / "top.parquet"
    engine.score(dense, out, keep=("target", "id"), emit_topk=K)
    t = pq.read_table(out)
    idx = np.stack(t.column("topk_indices").to_numpy(zero_copy_only=False))
    lp = np.stack(t.column("topk_logprobs").to_numpy(zero_copy_only=False))
    order, logp, _ = _oracle(x, y, K)
    assert (idx == order).all()
    np.testing.assert_allclose(lp, logp, atol=2e-6)
    assert t.schema.field("topk_indices").metadata[b"xent.classes"] == str(C).encode()
    whole = engine.evaluate(str(out)).to_dict()
    chunked = engine.evaluate(str(out), chunk_rows=7).to_dict()
    for key in ("nll", "nll_lower_bound", "entropy_lower_bound", "accuracy", "ece"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15), key
    grouped = engine.evaluate(str(out), group_by="id").to_dict()
    assert grouped["groups"]["3"]["rows"] == 1


def test_bfloat16_values_and_list_layout(tmp_path, rng):
    x, y = _dense(rng, rows=60)
    order, logp, _ = _oracle(x, y, K)
    bits = float32_to_bf16_bits(logp.astype(np.float32)).view(np.int16)
    t = _sparse_table(order, bits, y, C, value_type=pa.int16(), list_kind="list")
    path = _write(tmp_path, t)
    d = engine.evaluate(path, logits_dtype="bfloat16").to_dict()
    assert d["rows"] == 60 and d["counted"] == 60
    assert np.isfinite(d["nll_lower_bound"])


def test_logits_with_lse_column_and_topk_normalised(tmp_path, rng):
    x, y = _dense(rng, rows=80)
    order, logp, lse = _oracle(x, y, K)
    raw = np.take_along_axis(x, order, 1)
    extra = {"row_lse": pa.array(lse.astype(np.float32))}
    t = _sparse_table(order, raw, y, C, extra=extra)
    path = _write(tmp_path, t)
    ref = engine.evaluate(_write(tmp_path, _sparse_table(order, logp, y, C), "lp.parquet"))
    with_lse = engine.evaluate(path, topk_kind="logits", lse="row_lse").to_dict()
    assert with_lse["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert with_lse["nll_lower_bound"] == pytest.approx(ref["nll_lower_bound"], rel=1e-5)
    over_k = engine.evaluate(path, topk_kind="logits").to_dict()
    assert over_k["normalised_over"] == "topk"
    assert over_k["tail_mass"] == 0.0
    assert over_k["nll_lower_bound"] is None or over_k["target_outside_topk"] == 0
    stored = (order == y[:, None]).any(axis=1)
    sub = raw[stored].astype(np.float64)
    k_nll = logsumexp(sub, axis=1) - sub[order[stored] == y[stored][:, None]]
    assert over_k["nll"] == pytest.approx(k_nll.mean(), rel=1e-6)


def _broken(tmp_path, rng, how):
    x, y = _dense(rng, rows=30)
    order, logp, _ = _oracle(x, y, 4)
    logp = logp.astype(np.float32)
    if how == "range":
        order[17, 2] = C
    elif how == "negative":
        order[17, 0] = -1
    elif how == "duplicate":
        order[17, 3] = order[17, 1]
    elif how == "nan":
        logp[17, 1] = np.nan
    return _write(tmp_path, _sparse_table(order, logp, y, C))


@pytest.mark.parametrize(
    "how, message",
    [
        ("range", f"out of range for {C} classes"),
        ("negative", "class -1"),
        ("duplicate", "appears twice"),
        ("nan", "NaN or +inf"),
    ],
)
def test_malformed_rows_are_one_error_naming_file_and_row(tmp_path, rng, how, message):
    path = _broken(tmp_path, rng, how)
    with pytest.raises(XentInputError) as e:
        engine.evaluate(path)
    assert e.value.row == 17 and message in str(e.value)
    r = run("eval", path, "--no-progress")
    user_error(r, path, "row 17", message)


def test_nan_policy_skip_and_propagate(tmp_path, rng):
    path = _broken(tmp_path, rng, "nan")
    d = engine.evaluate(path, nan_policy="skip").to_dict()
    assert d["nan_rows"] == 1 and d["counted"] == 29
    d = engine.evaluate(path, nan_policy="propagate").to_dict()
    assert d["counted"] == 30 and d["entropy_lower_bound"] is None


def test_ragged_and_mismatched_lengths(tmp_path, rng):
    x, y = _dense(rng, rows=10)
    order, logp, _ = _oracle(x, y, 4)
    idx = [list(map(int, r)) for r in order]
    vals = [list(map(float, r)) for r in logp]
    idx[6] = idx[6][:3]  # indices shorter than values in row 6
    t = pa.table(
        {
            "topk_indices": pa.array(idx, type=pa.list_(pa.int32())),
            "topk_logprobs": pa.array(vals, type=pa.list_(pa.float32())),
            "target": pa.array(y),
        }
    )
    path = _write(tmp_path, t)
    with pytest.raises(XentInputError) as e:
        engine.evaluate(path, classes=C)
    assert e.value.row == 6 and "topk_indices" in str(e.value)


def test_missing_class_count_and_refused_options(tmp_path, rng):
    x, y = _dense(rng, rows=10)
    order, logp, _ = _oracle(x, y, 4)
    path = _write(tmp_path, _sparse_table(order, logp.astype(np.float32), y, None))
    r = run("eval", path, "--no-progress")
    user_error(r, "--classes")
    d = engine.evaluate(path, classes=C).to_dict()
    assert d["classes"] == C
    with pytest.raises(XentUsageError, match="label-smoothing"):
        engine.evaluate(path, classes=C, label_smoothing=0.1)
    r = run("score", path, "-o", tmp_path / "o.parquet", "--classes", C, "--emit-topk", "2")
    user_error(r, "already top-k")


def test_all_rows_ignored_and_empty(tmp_path, rng):
    x, y = _dense(rng, rows=10)
    order, logp, _ = _oracle(x, y, 4)
    y[:] = -100
    d = engine.evaluate(_write(tmp_path, _sparse_table(order, logp, y, C))).to_dict()
    assert d["counted"] == 0 and d["nll"] is None and d["accuracy"] is None
    empty = _sparse_table(order[:0], logp[:0], y[:0], C)
    d = engine.evaluate(_write(tmp_path, empty, "empty.parquet")).to_dict()
    assert d["rows"] == 0


def test_cli_inspect_and_json(tmp_path, rng):
    x, y = _dense(rng, rows=50)
    order, logp, _ = _oracle(x, y, 8)
    path = _write(tmp_path, _sparse_table(order, logp.astype(np.float32), y, C))
    r = ok("inspect", path)
    assert "sparse top-8 log-probs" in r.output and "mean tail mass" in r.output
    d = json.loads(ok("eval", path, "--json").stdout)
    assert {
        "target_stored",
        "target_outside_topk",
        "nll_lower_bound",
        "entropy_lower_bound",
    } <= set(d)
    assert "entropy" not in d
    r = ok("eval", path, "--no-progress")
    assert "nll lower bound" in r.output and "target not stored" in r.output
