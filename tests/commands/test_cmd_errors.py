"""User errors end in one line on stderr with status 2 (no traceback, no leftover
files); anything else is a bug: one 'Internal error' line with status 1."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from engine.errors import TargetOutOfRange, XentError, XentInputError, XentUsageError
from tests.commands.helpers import (
    internal_error,
    leftovers,
    ok,
    run,
    user_error,
)
from tests.datagen import write_dataset


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
# Bugs: status 1, one line that says so, the traceback only with --debug
# ======================================================================================


def _failing_evaluate(err: BaseException):
    def evaluate(*args, **kwargs):
        raise err

    return evaluate


@pytest.mark.parametrize(
    "err",
    [
        ValueError("operands could not be broadcast together"),  # numpy, deep in a job
        TypeError("unsupported operand type(s)"),
        IndexError("index 7 is out of bounds for axis 0 with size 3"),
        OSError("no space left on device"),  # no file named: not the user's doing
        pa.ArrowInvalid("an Arrow error the io layer did not wrap"),
    ],
)
def test_a_bug_is_an_internal_error_not_a_user_error(dataset, monkeypatch, err):
    from engine import jobs

    monkeypatch.setattr(jobs, "evaluate", _failing_evaluate(err))
    line = internal_error(run("eval", dataset), type(err).__name__, str(err))
    assert not line.startswith("Error:")


def test_debug_shows_a_bug_s_traceback(dataset, monkeypatch):
    from engine import jobs

    monkeypatch.setattr(jobs, "evaluate", _failing_evaluate(ValueError("boom")))
    r = run("eval", dataset, "--debug")
    assert isinstance(r.exception, ValueError) and str(r.exception) == "boom"
    monkeypatch.setenv("XENT_DEBUG", "1")
    r = run("eval", dataset)
    assert isinstance(r.exception, ValueError)


@pytest.mark.parametrize(
    "err, contains",
    [
        (XentUsageError("top_k values must be >= 1"), "top_k"),
        (XentInputError("bad row", file="f.parquet", row=3), "f.parquet: bad row (row 3)"),
        (TargetOutOfRange(9, 3, 5), "Target 9"),
        (FileNotFoundError(2, "No such file or directory", "gone.parquet"), "gone.parquet"),
        (PermissionError(13, "Permission denied", "locked.parquet"), "locked.parquet"),
    ],
)
def test_user_errors_raised_deep_in_a_job(dataset, monkeypatch, err, contains):
    from engine import jobs

    monkeypatch.setattr(jobs, "evaluate", _failing_evaluate(err))
    user_error(run("eval", dataset), contains)


def test_engine_option_errors_are_user_errors():
    """Plain ValueErrors from the option checks would now be bugs: they are user types."""
    from engine.options import make_options

    for bad in ({"reduction": "avg"}, {"label_smoothing": 2.0}, {"ignore_index": 1.5}):
        with pytest.raises((ValueError, TypeError)) as info:
            make_options(**bad)
        assert isinstance(info.value, XentError)
