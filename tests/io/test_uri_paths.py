"""engine.io over pyarrow filesystem URIs (file:// to real temp files)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from datagen import random_logits, write_dataset

import engine
from engine.errors import XentInputError
from engine.io import expand_paths, open_fragment, open_source


def uri(path) -> str:
    return "file://" + os.path.abspath(os.fspath(path))


def read_all(src, **kwargs):
    chunks = list(src.iter_chunks(**kwargs))
    logits = np.concatenate([c.logits for c in chunks])
    target = np.concatenate([c.target for c in chunks])
    return chunks, logits, target


@pytest.mark.parametrize(
    "fmt,name",
    [("parquet", "d.parquet"), ("arrow-file", "d.arrow"), ("arrow-stream", "d.arrows")],
)
def test_single_file_uri(tmp_path, fmt, name):
    x = random_logits(23, 5)
    t = np.arange(23) % 5
    path = write_dataset(tmp_path / name, x, t, fmt=fmt, row_group_rows=6)
    src = open_source(uri(path))
    assert [f.path for f in src.files] == [uri(path)]
    assert src.files[0].format == fmt
    assert src.files[0].bytes == os.path.getsize(path)
    chunks, logits, target = read_all(src, chunk_rows=4)
    np.testing.assert_array_equal(logits, x)
    np.testing.assert_array_equal(target, t)
    assert {c.file for c in chunks} == {uri(path)}


def test_extensionless_file_uri_detected_by_magic(tmp_path):
    x = random_logits(7, 3)
    path = write_dataset(tmp_path / "blob", x, np.arange(7) % 3, fmt="arrow-file")
    src = open_source(uri(path))
    assert src.files[0].format == "arrow-file"
    np.testing.assert_array_equal(read_all(src)[1], x)


def _tree(tmp_path):
    x = random_logits(30, 4)
    t = np.arange(30) % 4
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "_meta").mkdir()
    a = write_dataset(root / "a.parquet", x[:10], t[:10], row_group_rows=3)
    b = write_dataset(root / "b.arrow", x[10:20], t[10:20], fmt="arrow-file")
    c = write_dataset(root / "sub" / "c.parquet", x[20:], t[20:])
    write_dataset(root / "_meta" / "hidden.parquet", x[:2], t[:2])
    write_dataset(root / ".tmp.parquet", x[:2], t[:2])
    (root / "notes.txt").write_text("not data")
    return root, x, t, [a, b, c]


def test_directory_uri_matches_local_listing(tmp_path):
    root, x, t, files = _tree(tmp_path)
    assert expand_paths(uri(root)) == [uri(f) for f in files]
    assert expand_paths(uri(root) + "/") == [uri(f) for f in files]
    assert expand_paths(str(root)) == files
    _, logits, target = read_all(open_source(uri(root)), chunk_rows=7)
    np.testing.assert_array_equal(logits, x)
    np.testing.assert_array_equal(target, t)


def test_glob_uri(tmp_path):
    root, x, t, (a, b, c) = _tree(tmp_path)
    assert expand_paths(uri(root) + "/*.parquet") == [uri(a)]
    assert expand_paths(uri(root) + "/**/*.parquet") == [uri(a), uri(c)]
    assert expand_paths(uri(root) + "/s*") == [uri(c)]  # a matched directory is scanned
    assert expand_paths(uri(root) + "/[ab].*") == [uri(a), uri(b)]
    with pytest.raises(XentInputError, match="no Parquet or Arrow files match") as e:
        expand_paths(uri(root) + "/*.csv")
    assert uri(root) + "/*.csv" in str(e.value)


def test_missing_uri_names_the_uri(tmp_path):
    missing = uri(tmp_path / "nope.parquet")
    with pytest.raises(XentInputError, match="no such file or directory") as e:
        open_source(missing)
    assert missing in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(XentInputError, match="holds no Parquet") as e:
        open_source(uri(empty))
    assert uri(empty) in str(e.value)


def test_corrupt_uri_error_names_the_uri(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(XentInputError) as e:
        open_source(uri(bad))
    assert uri(bad) in str(e.value)


def test_mixed_local_and_uri(tmp_path):
    x = random_logits(12, 3)
    t = np.arange(12) % 3
    a = write_dataset(tmp_path / "a.parquet", x[:5], t[:5])
    b = write_dataset(tmp_path / "b.arrows", x[5:], t[5:], fmt="arrow-stream")
    src = open_source([a, uri(b)])
    assert [f.path for f in src.files] == [a, uri(b)]
    np.testing.assert_array_equal(read_all(src, chunk_rows=4)[1], x)


def test_evaluate_uri_equals_local(tmp_path):
    x = random_logits(40, 6)
    t = np.arange(40) % 6
    path = write_dataset(tmp_path / "e.parquet", x, t, row_group_rows=9)
    local = engine.evaluate(path, chunk_rows=8, device="cpu")
    remote = engine.evaluate(uri(path), chunk_rows=8, device="cpu")
    timing = {"seconds", "rows_per_second", "gb_per_second"}
    drop = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
    assert drop(remote.metrics) == drop(local.metrics)
    assert remote.metrics["rows"] == 40


def test_fragments_over_uri(tmp_path):
    x = random_logits(33, 3)
    t = np.arange(33) % 3
    a = write_dataset(tmp_path / "a.parquet", x[:20], t[:20], row_group_rows=4)
    b = write_dataset(tmp_path / "b.arrows", x[20:], t[20:], fmt="arrow-stream")
    src = open_source([uri(a), uri(b)])
    frags = src.fragments(max_rows=8)
    frags = pickle.loads(pickle.dumps(frags))
    assert {f.path for f in frags} == {uri(a), uri(b)}
    assert sum(f.rows for f in frags) == 33
    seen = np.zeros(33, int)
    for frag in frags:
        for chunk in open_fragment(frag).iter_chunks(chunk_rows=3):
            rows = slice(chunk.row, chunk.row + len(chunk.logits))
            np.testing.assert_array_equal(chunk.logits, x[rows])
            np.testing.assert_array_equal(chunk.target, t[rows])
            seen[rows] += 1
    assert (seen == 1).all()
