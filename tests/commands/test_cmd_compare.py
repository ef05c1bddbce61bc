"""`xent compare` from the command line: the table, --json, -o, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from tests.commands.helpers import leftovers, ok, run, user_error
from tests.datagen import write_dataset


def _files(tmp_path, rng, rows=200, classes=20):
    x = (rng.standard_normal((rows, classes)) * 2).astype(np.float32)
    z = (x + rng.standard_normal((rows, classes)) * 0.3).astype(np.float32)
    y = rng.integers(0, classes, rows)
    a = write_dataset(tmp_path / "base.parquet", x, y, columns={"id": np.arange(rows)})
    b = write_dataset(tmp_path / "cand.parquet", z, y)
    return a, b


def test_table_and_json(tmp_path, rng):
    a, b = _files(tmp_path, rng)
    r = ok("compare", a, b, "--no-progress")
    assert "KL(base‖cand) mean" in r.output and "ppl ratio" in r.output
    assert "KL percentiles" in r.output
    r = ok("compare", a, b, "--json", "--top-k", "3,10", "--output", tmp_path / "r.json")
    d = json.loads(r.stdout)
    assert set(d) >= {
        "rows", "counted", "ignored", "nan_rows", "classes", "temperature", "kl",
        "kl_reverse", "jsd", "tvd", "top1_agreement", "top_k_agreement", "base", "candidate",
        "log_ppl_ratio", "ppl_ratio", "nll_correlation", "delta_p", "seconds",
        "rows_per_second", "gb_per_second",
    }  # fmt: skip
    assert list(d["top_k_agreement"]) == ["3", "10"]
    assert set(d["kl"]) == {"mean", "se", "max", "p99_9", "p99", "p95", "p90", "median",
                            "p10", "p5", "p1", "p0_1", "min"}  # fmt: skip
    assert json.load(open(tmp_path / "r.json")) == d


def test_row_output(tmp_path, rng):
    a, b = _files(tmp_path, rng)
    out = tmp_path / "rows.parquet"
    r = ok("compare", a, b, "-o", out, "--keep", "id", "--no-progress")
    assert "wrote 200 rows" in r.output
    t = pq.read_table(out)
    assert t.num_rows == 200 and t.column_names[-1] == "id"
    r = run("compare", a, b, "-o", out)
    user_error(r, "exists")
    assert leftovers(tmp_path) == []


def test_user_errors(tmp_path, rng):
    a, b = _files(tmp_path, rng)
    x = rng.standard_normal((150, 20)).astype(np.float32)
    short = write_dataset(tmp_path / "short.parquet", x)
    user_error(run("compare", a, short), "different row counts", "200", "150")
    wide = write_dataset(
        tmp_path / "wide.parquet", rng.standard_normal((200, 24)).astype(np.float32)
    )
    user_error(run("compare", a, wide), "--vocab 20")
    user_error(run("compare", a, b, "--temperature", "0"))
    user_error(run("compare", a, tmp_path / "missing.parquet"))
