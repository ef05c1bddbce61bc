"""gen, demo and bench."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from engine.commands import bench as bench_cmd
from tests.commands.helpers import (
    leftovers,
    ok,
    run,
    user_error,
)


@pytest.mark.parametrize(
    "args, layout_check",
    [
        (["--layout", "list", "--format", "arrow"], pa.types.is_list),
        (["--dtype", "bfloat16"], pa.types.is_fixed_size_list),
        (["--layout", "large_list", "--format", "arrow-stream", "--soft"], pa.types.is_large_list),
    ],
)
def test_gen_command(tmp_path, args, layout_check):
    out = tmp_path / "g.data"
    r = ok("gen", out, "--rows", "64", "--classes", "7", "--seed", "3", *args)
    assert "wrote 64 rows x 7 classes" in r.stdout
    info = json.loads(ok("inspect", out, "--json").stdout)
    assert info["rows"] == 64 and info["classes"] == 7
    src_type = pa.ipc.open_stream if "arrow-stream" in args else None
    if "--format" not in args:
        schema = pq.read_schema(out)
    elif src_type is not None:
        schema = pa.ipc.open_stream(pa.memory_map(str(out))).schema
    else:
        schema = pa.ipc.open_file(pa.memory_map(str(out))).schema
    assert layout_check(schema.field("logits").type)
    if "--dtype" in args:
        assert info["storage"] == "bfloat16"
    user_error(run("gen", out, "--rows", "5", "--classes", "2"), "--overwrite")
    ok("gen", out, "--rows", "5", "--classes", "2", "--overwrite")
    d = json.loads(ok("gen", out, "--rows", "5", "--classes", "2", "--overwrite", "--json").stdout)
    assert d["rows"] == 5 and d["bytes"] == os.path.getsize(out)
    assert leftovers(tmp_path) == []


def test_gen_bad_values(tmp_path):
    out = tmp_path / "g.parquet"
    user_error(run("gen", out, "--rows", "0", "--classes", "3"), "--rows")
    user_error(run("gen", out, "--rows", "5", "--classes", "3", "--layout", "csv"), "--layout")
    user_error(run("gen", out, "--rows", "5", "--classes", "3", "--ignore-frac", "2"))
    user_error(run("gen", out, "--rows", "5", "--classes", "3", "--soft", "--ignore-frac", "0.1"))
    assert os.listdir(tmp_path) == []


def test_demo_runs_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = ok("demo", "--rows", "3000", "--classes", "50")
    for text in ("xent gen", "eval sample.parquet", "perplexity", "scored 3,000 rows"):
        assert text in r.stdout
    assert "engine.cross_entropy" in r.stdout and "torch F.cross_entropy" in r.stdout
    assert os.listdir(tmp_path) == []


def test_bench_passes_flags(monkeypatch):
    calls = {}

    class FakeKernels:
        @staticmethod
        def run(**kw):
            calls.update(kw)
            return [{"provider": "engine-cpu", "gb_s": 1.0}]

        @staticmethod
        def format_table(results):
            return "TABLE"

    monkeypatch.setattr(bench_cmd, "import_bench", lambda: FakeKernels)
    r = ok("bench", "--rows", "128", "--classes", "10,1000", "--dtype", "float16", "--repeats", "2")
    assert r.stdout.strip() == "TABLE"
    assert calls["rows"] == 128 and calls["classes"] == [10, 1000]
    assert calls["dtypes"] == ["float16"] and calls["quick"] is True and calls["repeats"] == 2
    assert "modes" not in calls  # unset flags keep bench's defaults
    r = ok("bench", "--json", "--full")
    assert json.loads(r.stdout)[0]["provider"] == "engine-cpu"
    assert calls["quick"] is False


def test_bench_without_the_bench_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_cmd, "REPO_ROOT", str(tmp_path))
    for name in ("bench", "bench.kernels"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    user_error(run("bench"), "bench/")


def test_bench_real_run():
    r = ok(
        "bench",
        "--rows",
        "64",
        "--classes",
        "10",
        "--mode",
        "forward",
        "--providers",
        "engine-cpu",
        "--repeats",
        "1",
        "--json",
    )
    results = json.loads(r.stdout)
    assert results and results[0]["provider"] == "engine-cpu"
