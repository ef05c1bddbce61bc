"""`engine.compare` over files: statistics, percentiles, alignment, errors, -o output."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine
import engine.reference as R
from engine import dtypes
from engine.errors import XentInputError, XentUsageError
from tests.datagen import write_dataset


def _pair(rng, rows=423, classes=37, noise=0.5, ignore_frac=0.1):
    x = (rng.standard_normal((rows, classes)) * 2).astype(np.float32)
    z = (x + rng.standard_normal((rows, classes)) * noise).astype(np.float32)
    y = rng.integers(0, classes, rows)
    y[rng.random(rows) < ignore_frac] = -100
    return x, z, y


def _expected(x, z, y, temperature=1.0, top_k=(5, 10)):
    e = R.compare_rows(x, z, np.where(y == -100, -1, y), temperature=temperature)
    m = y != -100
    nb, nc = -e["logp_base"][m], -e["logp_candidate"][m]
    d = nc - nb
    return {
        "kl": e["kl"][m],
        "kl_reverse": e["kl_reverse"][m].mean(),
        "jsd": e["jsd"][m].mean(),
        "tvd": e["tvd"][m].mean(),
        "top1": np.mean(e["base_argmax"][m] == e["candidate_argmax"][m]),
        "topk": {k: np.mean(e["candidate_rank"][m] < k) for k in top_k},
        "nll_base": nb.mean(),
        "nll_candidate": nc.mean(),
        "acc_base": np.mean(e["base_argmax"][m] == y[m]),
        "log_ratio": d.mean(),
        "log_ratio_se": d.std(ddof=1) / math.sqrt(d.size),
        "corr": np.corrcoef(nb, nc)[0, 1],
        "delta_p": np.exp(-nc) - np.exp(-nb),
        "counted": int(m.sum()),
    }


def _assert_matches(d, exp):
    assert d["counted"] == exp["counted"]
    assert d["kl"]["mean"] == pytest.approx(exp["kl"].mean(), rel=1e-5)
    assert d["kl"]["se"] == pytest.approx(
        exp["kl"].std(ddof=1) / math.sqrt(exp["kl"].size), rel=1e-4
    )
    assert d["kl_reverse"]["mean"] == pytest.approx(exp["kl_reverse"], rel=1e-5)
    assert d["jsd"]["mean"] == pytest.approx(exp["jsd"], rel=1e-5)
    assert d["tvd"]["mean"] == pytest.approx(exp["tvd"], rel=1e-5)
    assert d["top1_agreement"]["mean"] == pytest.approx(exp["top1"])
    for k, v in exp["topk"].items():
        assert d["top_k_agreement"][str(k)]["mean"] == pytest.approx(v)
    assert d["base"]["nll"] == pytest.approx(exp["nll_base"], rel=1e-5)
    assert d["candidate"]["nll"] == pytest.approx(exp["nll_candidate"], rel=1e-5)
    assert d["base"]["perplexity"] == pytest.approx(math.exp(exp["nll_base"]), rel=1e-5)
    assert d["base"]["accuracy"] == pytest.approx(exp["acc_base"])
    assert d["log_ppl_ratio"]["mean"] == pytest.approx(exp["log_ratio"], rel=1e-4)
    assert d["log_ppl_ratio"]["se"] == pytest.approx(exp["log_ratio_se"], rel=1e-4)
    assert d["ppl_ratio"]["mean"] == pytest.approx(math.exp(exp["log_ratio"]), rel=1e-5)
    assert d["nll_correlation"] == pytest.approx(exp["corr"], rel=1e-5)
    assert d["delta_p"]["mean"] == pytest.approx(exp["delta_p"].mean(), rel=1e-4, abs=1e-9)
    assert d["delta_p"]["rms"] == pytest.approx(np.sqrt(np.mean(exp["delta_p"] ** 2)), rel=1e-4)
    for key, q in (("max", 100), ("p99_9", 99.9), ("p99", 99), ("p90", 90), ("median", 50),
                   ("p10", 10), ("p0_1", 0.1), ("min", 0)):  # fmt: skip
        want = np.percentile(exp["kl"], q)
        assert abs(d["kl"][key] - want) <= 0.005 * abs(want) + 1e-9, key
        want = np.percentile(exp["delta_p"], q)
        assert abs(d["delta_p"][key] - want) <= 0.005 * abs(want) + 1e-9, key


def test_statistics_match_reference(tmp_path, rng):
    x, z, y = _pair(rng)
    a = write_dataset(tmp_path / "base.parquet", x, y)
    b = write_dataset(tmp_path / "cand.parquet", z, y)
    d = engine.compare(a, b).to_dict()
    assert d["rows"] == 423 and d["classes"] == 37 and d["temperature"] == 1.0
    assert d["ignored"] == int((y == -100).sum()) and d["nan_rows"] == 0
    _assert_matches(d, _expected(x, z, y))


def test_any_chunking_and_layouts_give_the_same_report(tmp_path, rng):
    """Different formats, layouts, dtypes and row groups on the two sides; percentiles
    identical whatever the chunk size."""
    x, z, y = _pair(rng)
    a = write_dataset(
        tmp_path / "base.arrow", x.astype(np.float16), y, fmt="arrow-file", layout="list"
    )
    b = write_dataset(tmp_path / "cand.parquet", z, row_group_rows=50)  # no target here
    reports = [engine.compare(a, b, chunk_rows=n).to_dict() for n in (None, 7, 64, 1000)]
    first = reports[0]
    for d in reports[1:]:
        for key in ("kl", "delta_p"):
            for q in ("max", "p99", "median", "p0_1", "min"):
                assert d[key][q] == first[key][q]
        assert d["kl"]["mean"] == pytest.approx(first["kl"]["mean"], rel=1e-12)
    _assert_matches(first, _expected(x.astype(np.float16).astype(np.float32), z, y))


def test_temperature_and_top_k(tmp_path, rng):
    x, z, y = _pair(rng, rows=100)
    a = write_dataset(tmp_path / "a.parquet", x, y)
    b = write_dataset(tmp_path / "b.parquet", z, y)
    d = engine.compare(a, b, temperature=2.5, top_k=(3,)).to_dict()
    exp = _expected(x, z, y, temperature=2.5, top_k=(3,))
    assert d["temperature"] == 2.5 and list(d["top_k_agreement"]) == ["3"]
    _assert_matches(d, exp)


def test_without_target(tmp_path, rng):
    x, z, _ = _pair(rng, rows=50)
    a = write_dataset(tmp_path / "a.parquet", x)
    b = write_dataset(tmp_path / "b.parquet", z)
    d = engine.compare(a, b).to_dict()
    assert "base" not in d and "delta_p" not in d and d["counted"] == 50
    e = R.compare_rows(x, z)
    assert d["kl"]["mean"] == pytest.approx(e["kl"].mean(), rel=1e-5)


def test_groups(tmp_path, rng):
    x, z, y = _pair(rng, rows=200, ignore_frac=0)
    g = np.array(["a", "b"])[rng.integers(0, 2, 200)]
    a = write_dataset(tmp_path / "a.parquet", x, y, columns={"g": g})
    b = write_dataset(tmp_path / "b.parquet", z, y)
    d = engine.compare(a, b, group_by="g").to_dict()
    e = R.compare_rows(x, z, y)
    for key in ("a", "b"):
        m = g == key
        assert d["groups"][key]["rows"] == int(m.sum())
        assert d["groups"][key]["kl"]["mean"] == pytest.approx(e["kl"][m].mean(), rel=1e-5)


def test_row_output(tmp_path, rng):
    x, z, y = _pair(rng, rows=120)
    ids = np.arange(120) * 10
    a = write_dataset(tmp_path / "a.parquet", x, y, columns={"id": ids})
    b = write_dataset(tmp_path / "b.parquet", z, y)
    out = tmp_path / "rows.parquet"
    engine.compare(a, b, output=out, keep=("id",), chunk_rows=33)
    t = pq.read_table(out)
    assert t.column_names == [
        "kl", "kl_reverse", "jsd", "tvd", "base_argmax", "candidate_argmax", "top1_same",
        "nll_base", "nll_candidate", "delta_p", "id",
    ]  # fmt: skip
    e = R.compare_rows(x, z, np.where(y == -100, -1, y))
    np.testing.assert_allclose(t["kl"].to_numpy(), e["kl"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t["id"].to_numpy(), ids)
    nll = t["nll_base"].to_numpy()
    assert np.isnan(nll[y == -100]).all()
    np.testing.assert_allclose(nll[y != -100], -e["logp_base"][y != -100], rtol=1e-5)
    with pytest.raises(XentInputError):
        engine.compare(a, b, output=out)  # exists: --overwrite needed
    engine.compare(a, b, output=out, overwrite=True)


def test_vocab_and_class_mismatch(tmp_path, rng):
    x, z, y = _pair(rng, rows=60, classes=40)
    a = write_dataset(tmp_path / "a.parquet", x[:, :32], np.minimum(y, 31))
    b = write_dataset(tmp_path / "b.parquet", z)
    with pytest.raises(XentInputError, match=r"32.*40.*--vocab 32"):
        engine.compare(a, b)
    d = engine.compare(a, b, vocab=32).to_dict()
    e = R.compare_rows(x[:, :32], z[:, :32])
    yy = np.minimum(y, 31)
    m = yy != -100
    assert d["classes"] == 32
    assert d["kl"]["mean"] == pytest.approx(e["kl"][m].mean(), rel=1e-5)
    with pytest.raises(XentUsageError, match="vocab 50"):
        engine.compare(a, b, vocab=50)


def test_row_count_mismatch(tmp_path, rng):
    x, z, y = _pair(rng, rows=60)
    a = write_dataset(tmp_path / "a.parquet", x, y)
    b = write_dataset(tmp_path / "b.parquet", z[:59], y[:59])
    with pytest.raises(XentInputError, match="has 60.*has 59"):
        engine.compare(a, b)
    # a stream's row count is known only at its end
    s = write_dataset(tmp_path / "b.arrows", z[:59], y[:59], fmt="arrow-stream")
    with pytest.raises(XentInputError, match="has 60.*has 59"):
        engine.compare(a, s, chunk_rows=16)


def test_keys_and_targets_must_agree(tmp_path, rng):
    x, z, y = _pair(rng, rows=60, ignore_frac=0)
    ids = np.arange(60)
    a = write_dataset(tmp_path / "a.parquet", x, y, columns={"id": ids})
    other = ids.copy()
    other[41] = 999
    b = write_dataset(tmp_path / "b.parquet", z, y, columns={"id": other})
    engine.compare(a, b)  # no --on: positions only
    with pytest.raises(XentInputError, match=r"key 'id' differs at row 41.*41.*999") as err:
        engine.compare(a, b, on="id", chunk_rows=16)
    assert err.value.row == 41
    y2 = y.copy()
    y2[17] = (y[17] + 1) % 37
    c = write_dataset(tmp_path / "c.parquet", z, y2)
    with pytest.raises(XentInputError, match="targets differ at row 17"):
        engine.compare(a, c)


def test_nan_policies(tmp_path, rng):
    x, z, y = _pair(rng, rows=50, ignore_frac=0)
    z[13, 4] = np.nan
    a = write_dataset(tmp_path / "a.parquet", x, y)
    b = write_dataset(tmp_path / "b.parquet", z, y)
    with pytest.raises(XentInputError, match="candidate: NaN") as err:
        engine.compare(a, b)
    assert err.value.row == 13 and "b.parquet" in str(err.value)
    d = engine.compare(a, b, nan_policy="skip").to_dict()
    assert d["nan_rows"] == 1 and d["counted"] == 49
    e = R.compare_rows(x, z)
    keep = np.arange(50) != 13
    assert d["kl"]["mean"] == pytest.approx(e["kl"][keep].mean(), rel=1e-5)
    d = engine.compare(a, b, nan_policy="propagate").to_dict()
    assert d["kl"]["mean"] is None
    assert d["nan_rows"] == 0 and d["counted"] == 50  # kept, as eval (nan_rows: dropped rows)


def test_bfloat16_against_float32(tmp_path, rng):
    x = (rng.standard_normal((80, 300)) * 2).astype(np.float32)
    bits = dtypes.float32_to_bf16_bits(x).reshape(x.shape)
    a = write_dataset(tmp_path / "a.parquet", bits, bf16=True)
    b = write_dataset(tmp_path / "b.parquet", x)
    d = engine.compare(a, b).to_dict()
    e = R.compare_rows(dtypes.bf16_bits_to_float32(bits), x)
    assert d["kl"]["mean"] == pytest.approx(e["kl"].mean(), rel=1e-4)
    assert 0 < d["kl"]["min"] and d["kl"]["max"] < 1e-3


def test_bad_options(tmp_path, rng):
    x, z, y = _pair(rng, rows=10)
    a = write_dataset(tmp_path / "a.parquet", x, y)
    with pytest.raises(XentUsageError):
        engine.compare(a, a, temperature=0)
    with pytest.raises(XentUsageError):
        engine.compare(a, a, top_k=(0,))
    with pytest.raises(XentInputError, match="no target column 'label'"):
        engine.compare(a, a, target="label")


def test_empty_sources(tmp_path):
    x = np.zeros((0, 5), np.float32)
    y = np.zeros(0, np.int64)
    a = write_dataset(tmp_path / "a.parquet", x, y)
    out = tmp_path / "rows.parquet"
    d = engine.compare(a, a, output=out).to_dict()
    assert d["rows"] == 0 and d["kl"]["mean"] is None
    assert pq.read_table(out).num_rows == 0


def test_paired_chunks_cut_at_both_sides_edges(tmp_path, rng):
    from engine.io import open_source
    from engine.io.pairs import paired_chunks

    x, z, y = _pair(rng, rows=100)
    a = write_dataset(tmp_path / "a.parquet", x, y, row_group_rows=30)
    b1 = write_dataset(tmp_path / "b1.arrow", z[:45], fmt="arrow-file")
    b2 = write_dataset(tmp_path / "b2.arrow", z[45:], fmt="arrow-file")
    sa = open_source(a)
    sb = open_source([b1, b2], target=None)
    seen = 0
    for ca, cb in paired_chunks(sa, sb, 20):
        assert ca.row == cb.row == seen and ca.num_rows == cb.num_rows
        np.testing.assert_array_equal(ca.logits, x[seen : seen + ca.num_rows])
        np.testing.assert_array_equal(cb.logits, z[seen : seen + cb.num_rows])
        seen += ca.num_rows
    assert seen == 100
    assert isinstance(pa.table({"a": [1]}), pa.Table)


def test_dask_equals_local(tmp_path, rng, monkeypatch):
    """Row ranges from the base's row groups; the candidate's files and groups differ."""
    pytest.importorskip("distributed")
    monkeypatch.setenv("XENT_DASK_FRAGMENT_ROWS", "40")
    x, z, y = _pair(rng, rows=150)
    g = np.array(["a", "b", "c"])[rng.integers(0, 3, 150)]
    a = write_dataset(tmp_path / "a.parquet", x, y, row_group_rows=30, columns={"g": g})
    b1 = write_dataset(tmp_path / "b1.arrow", z[:70], y[:70], fmt="arrow-file")
    b2 = write_dataset(tmp_path / "b2.parquet", z[70:], y[70:], row_group_rows=25)
    local = engine.compare(a, [b1, b2], group_by="g").to_dict()
    remote = engine.compare(a, [b1, b2], group_by="g", dask="local:2").to_dict()
    for key in ("rows", "counted", "ignored"):
        assert remote[key] == local[key]
    for q in ("max", "p99", "median", "min"):
        assert remote["kl"][q] == local["kl"][q]
        assert remote["delta_p"][q] == local["delta_p"][q]
    assert remote["kl"]["mean"] == pytest.approx(local["kl"]["mean"], rel=1e-12)
    assert remote["ppl_ratio"]["mean"] == pytest.approx(local["ppl_ratio"]["mean"], rel=1e-12)
    assert remote["groups"]["b"]["kl"]["mean"] == pytest.approx(
        local["groups"]["b"]["kl"]["mean"], rel=1e-12
    )
    y2 = y.copy()
    y2[111] = (y[111] + 1) % 37
    c = write_dataset(tmp_path / "c.parquet", z, y2, row_group_rows=50)
    with pytest.raises(XentInputError, match="targets differ at row 111"):
        engine.compare(a, c, dask="local:1")
    with pytest.raises(XentUsageError, match="-o"):
        engine.compare(a, c, dask="local:1", output=tmp_path / "rows.parquet")
