"""Data sets the command tests share (written once per module)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.gen import generate
from tests.commands.helpers import CLASSES, ROWS
from tests.datagen import write_dataset


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
