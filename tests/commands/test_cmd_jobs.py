"""eval, score and grad: their numbers agree with PyTorch, in tables, JSON and files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from engine import reference
from tests.commands.helpers import (
    CLASSES,
    ROWS,
    leftovers,
    load,
    ok,
    run,
    torch_ce,
    user_error,
)
from tests.datagen import write_dataset


def test_eval_table_and_json_agree_with_torch(dataset):
    x, y = load(dataset)
    expected = torch_ce(x, y)
    r = ok("eval", dataset, "--no-progress")
    assert "loss" in r.stdout and "perplexity" in r.stdout and "accuracy" in r.stdout
    assert f"{expected:.6f}" in r.stdout
    r = ok("eval", dataset, "--json")
    d = json.loads(r.stdout)  # nothing but JSON on stdout
    assert d["rows"] == ROWS and d["classes"] == CLASSES
    assert d["ignored"] == int((y == -100).sum())
    assert d["loss"] == pytest.approx(expected, rel=2e-6)
    assert d["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
    counted = y != -100
    acc = (x[counted].argmax(axis=1) == y[counted]).mean()
    assert d["accuracy"] == pytest.approx(acc)
    assert set(d["top_k_accuracy"]) == {"5"}


def test_eval_loss_options_match_torch(dataset, tmp_path):
    x, y = load(dataset)
    w = np.linspace(0.5, 2.0, CLASSES)
    expected = torch_ce(x, y, weight=torch.from_numpy(w), label_smoothing=0.1, reduction="sum")
    args = ["--label-smoothing", "0.1", "--reduction", "sum", "--json"]
    d = json.loads(
        ok("eval", dataset, "--weight", ",".join(str(float(v)) for v in w), *args).stdout
    )
    assert d["loss"] == pytest.approx(expected, rel=2e-6)
    # the same weights from a text file and from .npy
    txt = tmp_path / "w.txt"
    lines = [" ".join(str(float(v)) for v in w[i : i + 7]) for i in range(0, CLASSES, 7)]
    txt.write_text("\n".join(lines))
    np.save(tmp_path / "w.npy", w)
    for f in (txt, tmp_path / "w.npy"):
        d2 = json.loads(ok("eval", dataset, "--weight", f, *args).stdout)
        assert d2["loss"] == pytest.approx(d["loss"], rel=1e-12)


def test_eval_output_file_and_groups(grouped, tmp_path):
    path, x, y, g = grouped
    out = tmp_path / "report.json"
    r = ok("eval", path, "--group-by", "split", "--top-k", "1,2,3", "--output", out)
    assert "by group (3)" in r.stdout
    d = json.loads(out.read_text())
    assert set(d["groups"]) == {"a", "b", "c"}
    assert set(d["top_k_accuracy"]) == {"2", "3"}
    for key in "abc":
        m = g == key
        assert d["groups"][key]["loss"] == pytest.approx(torch_ce(x[m], y[m]), rel=2e-6)
    assert leftovers(tmp_path) == []


def test_eval_json_floats_undefined_are_null(tmp_path):
    path = str(tmp_path / "ignored.parquet")
    write_dataset(path, np.zeros((5, 3), np.float32), np.full(5, -100))
    d = json.loads(ok("eval", path, "--json").stdout)
    assert d["counted"] == 0 and d["loss"] is None and d["accuracy"] is None


def test_eval_warns_about_probabilities(probs_dataset):
    path, p, y = probs_dataset
    r = ok("eval", path, "--json")
    assert "--input-kind probs" in r.stderr and "Warning:" in r.stderr
    json.loads(r.stdout)  # the warning stays off stdout
    # as probabilities: NLLLoss of log p
    d = json.loads(ok("eval", path, "--input-kind", "probs", "--json").stdout)
    expected = F.nll_loss(torch.from_numpy(p).double().log(), torch.from_numpy(y)).item()
    assert d["loss"] == pytest.approx(expected, rel=2e-6)


def test_score_writes_one_row_per_input_row(dataset, tmp_path):
    x, y = load(dataset)
    out = tmp_path / "scores.parquet"
    r = ok("score", dataset, "-o", out, "--keep", "id", "--no-progress")
    assert "scored 400 rows" in r.stdout
    table = pq.read_table(out)
    assert table.num_rows == ROWS
    for name in ("loss", "target_logprob", "lse", "argmax", "max_prob", "entropy", "target_rank"):
        assert name in table.column_names
    assert table.column("id").to_pylist() == list(range(ROWS))
    ref = reference.row_stats(x.astype(np.float64), y)
    np.testing.assert_allclose(table.column("loss").to_numpy(), ref["loss"], rtol=2e-5, atol=1e-6)
    assert leftovers(tmp_path) == []
    # an existing output is refused, then replaced with --overwrite
    before = out.read_bytes()
    user_error(run("score", dataset, "-o", out), str(out), "--overwrite")
    assert out.read_bytes() == before
    d = json.loads(ok("score", dataset, "-o", out, "--overwrite", "--json").stdout)
    assert d["rows"] == ROWS and d["output"] == str(out)


def test_grad_matches_reference(dataset, tmp_path):
    x, y = load(dataset)
    out = tmp_path / "grad.arrow"
    ok("grad", dataset, "-o", out, "--keep", "id", "--reduction", "sum")
    table = pa.ipc.open_file(pa.memory_map(str(out))).read_all()
    t = table.schema.field("grad").type
    assert pa.types.is_fixed_size_list(t) and t.list_size == CLASSES
    assert t.value_type == pa.float32()
    g = table.column("grad").combine_chunks().flatten().to_numpy().reshape(ROWS, CLASSES)
    _, ref = reference.cross_entropy_grad(x.astype(np.float64), y, reduction="sum")
    np.testing.assert_allclose(g, ref, atol=1e-6 * np.abs(ref).max())
    out16 = tmp_path / "grad16.parquet"
    ok("grad", dataset, "-o", out16, "--grad-dtype", "float16")
    assert pq.read_schema(out16).field("grad").type.value_type == pa.float16()
    assert leftovers(tmp_path) == []
