"""The group and its pieces: lazy commands, progress bar, JSON file, and real processes
(python -m cli, the console script, Ctrl-C, kill and resume)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.commands.output import JsonFile
from engine.gen import generate
from engine.progress import TerminalBar
from tests.commands.helpers import (
    REPO,
    ROWS,
    run,
    subprocess_env,
)


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


def test_console_script_entry_point(tmp_path):
    """What `pip install .` makes the xent script run, run the same way (from elsewhere)."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "py-modules" not in project.get("tool", {}).get("setuptools", {})  # no top-level cli
    module, attr = project["project"]["scripts"]["xent"].split(":")
    code = f"import sys; from {module} import {attr}; sys.exit({attr}(prog_name='xent'))"
    p = subprocess.run(
        [sys.executable, "-c", code, "explain", "--logits", "0,0,0,1", "--target", "3"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
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


# ======================================================================================
# The group: commands imported only when used; the help table matches them
# ======================================================================================


def test_commands_are_imported_only_when_used():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from engine.commands import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0 and 'explain' in r.output, r.output\n"
        "r = CliRunner().invoke(main, ['explain', '--logits', '0,1', '--target', '1'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in sys.modules if m.startswith('engine.commands.')))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    loaded = {name.rsplit(".", 1)[1] for name in eval(p.stdout)}
    assert "explain" in loaded
    assert not loaded & {"eval", "score", "grad", "inspect", "gen", "demo", "bench"}


def test_help_lists_every_command_with_its_own_summary():
    from engine.commands.group import COMMANDS, main

    r = run("--help")
    assert r.exit_code == 0
    for name, (_, _, summary) in COMMANDS.items():
        command = main.get_command(None, name)
        assert command.name == name
        assert command.help.strip().splitlines()[0] == summary
        assert name in r.stdout
    assert run("--version").stdout.startswith("xent ")
