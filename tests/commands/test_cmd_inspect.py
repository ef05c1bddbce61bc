"""inspect: what it reports about a source, and the suspicious data it warns about."""

from __future__ import annotations

import json

import numpy as np

from engine.gen import generate
from tests.commands.helpers import (
    CLASSES,
    ROWS,
    ok,
    run,
    user_error,
)
from tests.datagen import write_dataset


def test_inspect_describes_the_source(dataset):
    r = ok("inspect", dataset)
    for text in ("parquet", "fixed_size_list", "400", "30", "float32", "row groups", "kB"):
        assert text in r.stdout
    assert "no warnings" in r.stdout
    d = json.loads(ok("inspect", dataset, "--json").stdout)
    assert d["rows"] == ROWS and d["classes"] == CLASSES and d["storage"] == "float32"
    assert d["layout"] == "fixed_size_list" and d["format"] == "parquet"
    assert d["files"][0]["row_groups"] == 4
    assert d["targets"]["ignored"] == d["rows"] - d["targets"]["counted"]
    assert d["warnings"] == []


def test_inspect_warns_about_probabilities(probs_dataset):
    path, _, _ = probs_dataset
    r = ok("inspect", path)
    assert "look like probabilities" in r.stdout and "--input-kind probs" in r.stdout
    assert "softmax" in r.stdout
    d = json.loads(ok("inspect", path, "--json").stdout)
    assert d["sample"]["probability_rows"] == 200


def test_inspect_warns_about_log_probs_nan_targets_constant(tmp_path):
    rng = np.random.default_rng(2)
    z = rng.standard_normal((60, 5))
    logp = (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)
    path = tmp_path / "logp.arrow"
    write_dataset(path, logp, rng.integers(0, 5, 60), fmt="arrow-file")
    assert "--input-kind log-probs" in ok("inspect", path).stdout

    x = rng.standard_normal((60, 5)).astype(np.float32)
    x[3] = 0.0  # constant row
    x[7, 1] = np.nan
    x[9, 0] = np.inf
    x[11, 4] = -np.inf  # a masked class: fine
    y = rng.integers(0, 5, 60)
    y[20] = 12  # out of range
    y[21] = -100
    path = tmp_path / "bad.parquet"
    write_dataset(path, x, y)
    d = json.loads(ok("inspect", path, "--json").stdout)
    text = " ".join(d["warnings"])
    assert "NaN" in text and "row 7" in text
    assert "outside [0, 5)" in text and "row 20" in text
    assert "constant" in text
    assert d["sample"]["neginf_values"] == 1 and d["targets"]["ignored"] == 1


def test_inspect_without_target_and_wide(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    path = tmp_path / "notarget.parquet"
    write_dataset(path, x, None)
    assert "no 'target' column" in ok("inspect", path).stdout
    wide = tmp_path / "wide.parquet"
    generate(wide, rows=30, classes=5, layout="wide")
    r = ok("inspect", wide, "--logits", "logit_*")
    assert "wide" in r.stdout and "5 columns" in r.stdout
    user_error(run("inspect", wide), "'logits'", "logit_0")
