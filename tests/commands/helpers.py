"""Helpers the command tests share: run a command in-process and check its result."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from engine.commands import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS, CLASSES = 400, 30


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


def torch_ce(x, y, **kw):
    xt, yt = torch.tensor(np.asarray(x, np.float64)), torch.tensor(np.asarray(y))
    return F.cross_entropy(xt, yt, **kw).item()


def internal_error(r, *contains: str) -> str:
    """Status 1, one line 'Internal error: ...' naming --debug, no traceback; the line."""
    assert r.exit_code == 1, f"exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Internal error: "), r.stderr
    assert "this is a bug in xent" in lines[0] and "--debug" in lines[0]
    assert "Traceback" not in r.output
    assert r.stdout == ""
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env
