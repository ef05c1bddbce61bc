"""`compare` with sparse top-k sides (SPEC §8): the coarsened divergences against a float64
oracle, the bounds below the dense values, exact top-1/top-k agreement, errors."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import XentInputError, XentUsageError
from tests.commands.helpers import run, user_error
from tests.datagen import write_dataset

ROWS, C = 300, 120


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def _topk(lp, k):
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(lp, order, 1)


def _coarse(lpb, lpc, known):
    """float64 KL, reverse KL, JSD, TVD over the cells ``known`` (bool rows x C) + a tail."""
    p, q = np.exp(lpb), np.exp(lpc)
    out = []
    for i in range(p.shape[0]):
        pk, qk = p[i, known[i]], q[i, known[i]]
        P, Q = max(1 - pk.sum(), 0.0), max(1 - qk.sum(), 0.0)
        pp, qq = np.append(pk, P), np.append(qk, Q)
        m = (pp + qq) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.sum(np.where(pp > 0, pp * np.log(pp / qq), 0.0))
            klr = np.sum(np.where(qq > 0, qq * np.log(qq / pp), 0.0))
            jsd = 0.5 * np.sum(np.where(pp > 0, pp * np.log(pp / m), 0.0)) + 0.5 * np.sum(
                np.where(qq > 0, qq * np.log(qq / m), 0.0)
            )
        out.append((kl, klr, jsd, 0.5 * np.abs(pp - qq).sum()))
    return np.array(out)


@pytest.fixture
def pair(tmp_path, rng):
    x = (rng.standard_normal((ROWS, C)) * 2).astype(np.float32)
    z = (x + rng.standard_normal((ROWS, C)) * 0.4).astype(np.float32)
    y = rng.integers(0, C, ROWS)
    b = write_dataset(tmp_path / "b.parquet", x, y)
    c = write_dataset(tmp_path / "c.parquet", z, y)
    paths = {"b": b, "c": c}
    for name, src in (("b", b), ("c", c)):
        for k in (8, 32):
            out = tmp_path / f"{name}{k}.parquet"
            engine.score(src, out, keep=("target",), emit_topk=k)
            paths[f"{name}{k}"] = str(out)
    return paths, _log_softmax(x), _log_softmax(z)


@pytest.mark.parametrize("base, cand", [("b32", "c"), ("b", "c32"), ("b32", "c32"), ("b8", "c32")])
def test_coarsened_divergences_against_float64(pair, base, cand):
    paths, lpb, lpc = pair
    known = np.ones((ROWS, C), bool)
    for side in (base, cand):
        if side[1:]:
            order, _ = _topk(lpb if side[0] == "b" else lpc, int(side[1:]))
            mask = np.zeros((ROWS, C), bool)
            np.put_along_axis(mask, order, True, 1)
            known &= mask
    ref = _coarse(lpb, lpc, known)
    r = engine.compare(paths[base], paths[cand], output=None)
    d = r.to_dict()
    assert d["kl_is_lower_bound"] is True
    for j, key in enumerate(("kl", "kl_reverse", "jsd", "tvd")):
        assert d[key]["mean"] == pytest.approx(ref[:, j].mean(), rel=2e-5, abs=1e-7), key
    dense = engine.compare(paths["b"], paths["c"]).to_dict()
    for key in ("kl", "kl_reverse", "jsd", "tvd"):
        assert d[key]["mean"] <= dense[key]["mean"] + 1e-9
    assert d["top1_agreement"] == dense["top1_agreement"]
    k_c = int(cand[1:] or C)
    for k in ("5", "10"):
        if int(k) <= k_c:
            assert d["top_k_agreement"][k] == dense["top_k_agreement"][k]
    assert d["kl"]["min"] >= 0.0
    assert "base" not in d  # per-target statistics need dense rows on both sides
    assert any("sparse top-k" in w for w in r.warnings)


def test_per_row_output_and_topk_past_stored(pair, tmp_path):
    paths, lpb, lpc = pair
    d = engine.compare(paths["b"], paths["c8"], top_k=(5, 10)).to_dict()
    assert d["top_k_agreement"]["10"]["mean"] is None
    out = tmp_path / "rows.parquet"
    engine.compare(paths["b32"], paths["c32"], output=str(out))
    import pyarrow.parquet as pq

    t = pq.read_table(out)
    assert t.num_rows == ROWS and "nll_base" not in t.column_names


def test_refused_options_and_errors(pair, tmp_path, rng):
    paths, _, _ = pair
    with pytest.raises(XentUsageError, match="temperature"):
        engine.compare(paths["b32"], paths["c"], temperature=2.0)
    r = run("compare", paths["b"], paths["c32"], "--vocab", "50")
    user_error(r, "--vocab")
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(paths["c8"])
    idx = np.stack(t.column("topk_indices").to_numpy(zero_copy_only=False)).copy()
    idx[11, 3] = idx[11, 0]
    col = pa.FixedSizeListArray.from_arrays(pa.array(idx.ravel().astype(np.int32)), 8)
    field = t.schema.field("topk_indices")
    bad = t.set_column(t.schema.get_field_index("topk_indices"), field, col)
    path = tmp_path / "dup.parquet"
    pq.write_table(bad, path)
    with pytest.raises(XentInputError) as e:
        engine.compare(paths["b"], str(path))
    assert e.value.row == 11 and "candidate: " in str(e.value) and "twice" in str(e.value)


def test_named_columns_and_class_count_from_flags(pair, tmp_path):
    """A side stored under other names and without xent.classes (as an inference server's
    top-k log-probs): the sparse flags describe it; the dense side stays dense."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, _, _ = pair
    t = pq.read_table(paths["c32"])
    plain = pa.table(
        {
            "ids": t.column("topk_indices").cast(pa.list_(pa.int64())),
            "lps": t.column("topk_logprobs").cast(pa.list_(pa.float32())),
        }
    )
    path = tmp_path / "server.parquet"
    pq.write_table(plain, path)
    ref = engine.compare(paths["b"], paths["c32"]).to_dict()
    got = engine.compare(
        paths["b"], str(path), topk_indices="ids", topk_values="lps", classes=C
    ).to_dict()
    assert got["kl"]["mean"] == pytest.approx(ref["kl"]["mean"], rel=1e-12)
    r = run("compare", paths["b"], path, "--topk-indices", "ids", "--topk-values", "lps")
    user_error(r, "--classes")


def test_dask_equals_local(pair, tmp_path, monkeypatch):
    """A sparse side under other names (the flags travel to the workers) against a dense
    one split in row groups: the same report on Dask."""
    pytest.importorskip("distributed")
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("XENT_DASK_FRAGMENT_ROWS", "70")
    paths, _, _ = pair
    dense = pq.read_table(paths["b"])
    base = tmp_path / "base.parquet"
    pq.write_table(dense, base, row_group_size=50)
    t = pq.read_table(paths["c8"])
    cand = tmp_path / "cand.parquet"
    pq.write_table(
        pa.table({"ids": t.column("topk_indices"), "lps": t.column("topk_logprobs")}),
        cand,
        row_group_size=40,
    )
    opts = {"topk_indices": "ids", "topk_values": "lps", "classes": C}
    local = engine.compare(str(base), str(cand), **opts).to_dict()
    remote = engine.compare(str(base), str(cand), dask="local:2", **opts).to_dict()
    assert remote["rows"] == local["rows"] == ROWS and remote["kl_is_lower_bound"]
    for key in ("kl", "kl_reverse", "jsd", "tvd", "top1_agreement"):
        assert remote[key]["mean"] == pytest.approx(local[key]["mean"], rel=1e-12), key
    assert remote["kl"]["max"] == local["kl"]["max"]
    assert remote["top_k_agreement"]["10"]["mean"] is None


def test_nan_values_by_policy(pair, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, _, _ = pair
    t = pq.read_table(paths["c8"])
    lp = np.stack(t.column("topk_logprobs").to_numpy(zero_copy_only=False)).copy()
    lp[9, 2] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(lp.ravel()), 8)
    field = t.schema.field("topk_logprobs")
    path = tmp_path / "nan.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("topk_logprobs"), field, col), path)
    with pytest.raises(XentInputError) as e:
        engine.compare(paths["b"], str(path))
    assert e.value.row == 9 and "candidate: NaN" in str(e.value)
    d = engine.compare(paths["b"], str(path), nan_policy="skip").to_dict()
    assert d["nan_rows"] == 1 and d["counted"] == ROWS - 1
    d = engine.compare(paths["b"], str(path), nan_policy="propagate").to_dict()
    assert d["kl"]["mean"] is None
