"""The `xent` command line: every command, its output forms, and every user error ending in
one line on stderr with status 2 (no traceback, no leftover files)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from engine import reference
from engine.commands import bench as bench_cmd
from engine.commands import main
from engine.commands.output import JsonFile
from engine.gen import generate
from engine.progress import TerminalBar
from tests.datagen import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, CLASSES = 400, 30


# ======================================================================================
# Helpers and data
# ======================================================================================


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str):
    r = run(*args)
    assert r.exit_code == 0, f"exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    return r


def leftovers(directory) -> list[str]:
    """Temporary files (hidden names) left in a directory."""
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def user_error(r, *contains: str) -> str:
    """Status 2, exactly one line 'Error: ...' on stderr, no traceback; the line."""
    assert r.exit_code == 2, f"exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
    assert r.stdout == ""
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


def load(path):
    table = pq.read_table(path)
    col = table.column("logits").combine_chunks()
    x = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
    return x, table.column("target").to_numpy()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-data")


@pytest.fixture(scope="module")
def dataset(data_dir):
    """A small realistic dataset with ignored rows and a group column."""
    path = str(data_dir / "d.parquet")
    generate(path, rows=ROWS, classes=CLASSES, ignore_frac=0.05, seed=11, row_group_rows=128)
    return path


@pytest.fixture(scope="module")
def grouped(data_dir):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = rng.integers(0, 6, 120)
    g = np.array(["a", "b", "c"])[np.arange(120) % 3]
    path = str(data_dir / "grouped.arrow")
    write_dataset(path, x, y, fmt="arrow-file", columns={"split": g, "id": np.arange(120)})
    return path, x, y, g


@pytest.fixture(scope="module")
def probs_dataset(data_dir):
    """Rows that are softmax outputs: the seeds' mistake, made on a whole file."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((200, 10)) * 2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = rng.integers(0, 10, 200)
    path = str(data_dir / "probs.parquet")
    write_dataset(path, p.astype(np.float32), y)
    return path, p.astype(np.float32), y


def torch_ce(x, y, **kw):
    xt, yt = torch.tensor(np.asarray(x, np.float64)), torch.tensor(np.asarray(y))
    return F.cross_entropy(xt, yt, **kw).item()


# ======================================================================================
# eval / score / grad
# ======================================================================================


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


# ======================================================================================
# Errors: status 2, one line, no traceback, nothing left behind
# ======================================================================================


def test_missing_file(tmp_path):
    user_error(run("eval", tmp_path / "nope.parquet"), "nope.parquet", "no such file")


def test_corrupt_files(dataset, tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    user_error(run("eval", garbage), "garbage.parquet")
    truncated = tmp_path / "truncated.parquet"
    with open(dataset, "rb") as f:
        truncated.write_bytes(f.read()[: os.path.getsize(dataset) // 2])
    user_error(run("eval", truncated), "truncated.parquet")
    user_error(run("inspect", truncated), "truncated.parquet")


def test_unknown_column_lists_the_available_ones(dataset):
    line = user_error(run("eval", dataset, "--logits", "scores"), "d.parquet", "'scores'")
    assert "logits" in line and "target" in line and "id" in line
    user_error(run("eval", dataset, "--target", "label"), "'label'", "available")
    user_error(run("eval", dataset, "--group-by", "split"), "'split'")


def test_target_out_of_range_names_file_and_row(tmp_path):
    y = np.array([0, 1, 2, 9, 1, 0])
    path = tmp_path / "bad_target.parquet"
    write_dataset(path, np.zeros((6, 3), np.float32), y)
    user_error(run("eval", path), "bad_target.parquet", "row 3")
    out = tmp_path / "s.parquet"
    user_error(run("score", path, "-o", out), "bad_target.parquet", "row 3")
    assert sorted(os.listdir(tmp_path)) == ["bad_target.parquet"]


def test_nan_under_error_policy(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    x[17, 2] = np.nan
    path = tmp_path / "nan.parquet"
    write_dataset(path, x, np.zeros(50, np.int64))
    user_error(run("eval", path), "nan.parquet", "row 17")
    d = json.loads(ok("eval", path, "--nan-policy", "skip", "--json").stdout)
    assert d["nan_rows"] == 1
    out = tmp_path / "g.parquet"
    user_error(run("grad", path, "-o", out), "row 17")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args, contains",
    [
        (["--label-smoothing", "2"], "--label-smoothing"),
        (["--reduction", "avg"], "--reduction"),
        (["--input-kind", "softmax"], "--input-kind"),
        (["--nan-policy", "ignore"], "--nan-policy"),
        (["--z-loss", "-1"], "--z-loss"),
        (["--softcap", "0"], "--softcap"),
        (["--chunk-rows", "0"], "--chunk-rows"),
        (["--top-k", "0"], "--top-k"),
        (["--threads", "1000000"], "--threads"),
        (["--weight", "1,x"], "--weight"),
        (["--weight", "missing-file.txt"], "missing-file.txt"),
        (["--weight", "1,2,3"], "3"),  # wrong number of classes
        (["--input-kind", "probs", "--z-loss", "0.1"], "z_loss"),
        (["--ignore-index", "x"], "--ignore-index"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_option_values(dataset, args, contains):
    user_error(run("eval", dataset, *args), contains)


def test_usage_errors(dataset):
    user_error(run("frobnicate"), "frobnicate")
    user_error(run("score", dataset), "-o")  # missing required output
    user_error(run("eval"), "SOURCE")


def test_unwritable_outputs(dataset, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    user_error(run("score", dataset, "-o", missing / "s.parquet"), "s.parquet")
    user_error(run("eval", dataset, "--output", missing / "r.json"), "r.json", "cannot write")
    a_file = tmp_path / "plain"
    a_file.write_text("x")
    user_error(run("grad", dataset, "-o", a_file / "g.parquet"), "g.parquet")
    user_error(run("gen", missing / "d.parquet", "--rows", "5", "--classes", "2"), "d.parquet")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            user_error(run("score", dataset, "-o", locked / "s.parquet"), "s.parquet")
        finally:
            locked.chmod(0o700)
    assert sorted(os.listdir(tmp_path)) == ["plain"]


def test_cuda_without_gpu(dataset):
    from engine.kernels import cuda

    if cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    user_error(run("eval", dataset, "--device", "cuda"), "--device cuda")


def test_debug_shows_the_traceback(tmp_path):
    r = run("eval", tmp_path / "nope.parquet", "--debug")
    assert r.exit_code != 2 and r.exception is not None


# ======================================================================================
# inspect
# ======================================================================================


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


# ======================================================================================
# gen, demo, bench
# ======================================================================================


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


# ======================================================================================
# Pieces: progress bar, JSON file
# ======================================================================================


def test_progress_bar_line():
    buf = io.StringIO()
    bar = TerminalBar("eval", stream=buf, interval=0.0, width=200)
    bar(250, 10_000_000, 1000)
    bar(500, 20_000_000, 1000)
    text = buf.getvalue()
    assert "\r" in text and "500/1,000 rows" in text and "GB/s" in text and "ETA" in text
    assert "50%" in text
    bar.close()
    assert buf.getvalue().endswith("\n")
    unknown = TerminalBar("score", stream=io.StringIO(), interval=0.0)
    unknown(10, 0, None)
    assert "10 rows" in unknown.line()


def test_no_progress_bar_off_a_terminal(dataset):
    r = run("eval", dataset)  # CliRunner's stderr is not a terminal
    assert r.exit_code == 0 and r.stderr == ""


def test_json_file_is_atomic(tmp_path):
    target = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        with JsonFile(str(target)):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with JsonFile(str(target)) as f:
        f.commit({"loss": float("nan"), "n": np.int64(3)})
    assert json.loads(target.read_text()) == {"loss": None, "n": 3}
    assert os.listdir(tmp_path) == ["r.json"]


# ======================================================================================
# Real processes: python -m cli, the console script, Ctrl-C
# ======================================================================================


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_python_m_cli(dataset, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "cli", "eval", dataset, "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rows"] == ROWS
    p = subprocess.run(
        [sys.executable, "-m", "cli", "eval", str(tmp_path / "missing.parquet")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=120,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'missing.parquet'}: no such file or directory"
    ]


def test_console_script():
    exe = shutil.which("xent") or os.path.join(os.path.dirname(sys.executable), "xent")
    if not os.path.exists(exe):
        pytest.skip("the xent console script is not installed (pip install .)")
    p = subprocess.run(
        [exe, "explain", "--logits", "0,0,0,1", "--target", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "0.7437" in p.stdout


def test_sigint_during_score(tmp_path):
    """Ctrl-C mid-job: status 130, 'Interrupted', no output and no temporary file."""
    data = tmp_path / "data"
    data.mkdir()
    one = data / "part.arrow"
    generate(one, rows=10_000, classes=1000, format="arrow")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "scores.parquet"
    # the same 40 MB file 1000 times: seconds of work even on a fast machine (the kernels
    # read ~8 GB/s here), few bytes on disk
    cmd = [sys.executable, "-m", "cli", "score", *[str(one)] * 1000, "-o", str(out)]
    cmd += ["--chunk-rows", "2000", "--device", "cpu"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.listdir(out_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the job has started once its temporary output exists
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)  # ~1 s after the start: imports, open, first chunks
        assert proc.poll() is None, "the job finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (stderr, os.listdir(out_dir))
    assert stderr.strip().splitlines()[-1] == "Interrupted"
    assert "Traceback" not in stderr
    assert stdout == ""
    assert os.listdir(out_dir) == []


def test_killed_then_resumed_score_equals_uninterrupted(tmp_path):
    """SIGKILL a real `xent score` writing parts, then --resume: same rows as one clean run."""
    src = tmp_path / "d.arrow"
    generate(src, rows=4000, classes=1000, format="arrow")
    sources = [str(src)] * 30  # 120k rows: a few seconds of work, in 200 parts
    base = [sys.executable, "-m", "cli", "score", *sources, "--chunk-rows", "600"]
    base += ["--device", "cpu", "--no-progress"]
    clean = tmp_path / "clean"
    done = subprocess.run(
        [*base, "-o", str(clean)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*base, "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        cwd=REPO,
    )
    try:
        manifest = out / "_manifest.json"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if manifest.exists() and len(json.loads(manifest.read_text())["parts"]) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job finished before it could be killed"
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    written = len(json.loads(manifest.read_text())["parts"])
    assert 3 <= written < 200
    resumed = subprocess.run(
        [*base, "-o", str(out), "--resume"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = pq.ParquetDataset(str(clean)).read()
    b = pq.ParquetDataset(str(out)).read()
    assert a.num_rows == b.num_rows == 120_000
    assert a.equals(b)
    assert not [n for n in os.listdir(out) if "tmp" in n]  # no stray temporary parts
