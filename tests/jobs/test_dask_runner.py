"""Jobs on Dask distributed equal the local run: metrics, score/grad parts, failures, resume.

One LocalCluster of 2 worker processes serves the module (its tcp:// address is what the
engine gets); one test starts its own through ``local:2``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

distributed = pytest.importorskip("distributed")

import engine  # noqa: E402
from engine.errors import XentInputError  # noqa: E402
from engine.io import open_source  # noqa: E402
from engine.jobs import dask as xdist  # noqa: E402
from tests.datagen import write_dataset  # noqa: E402

CLASSES = 37
ROWS = (200, 160)  # two files
FRAGMENT_ROWS = 60  # row groups of 30: fragments of <= 60 rows, 7 of them
TIMING = {"seconds", "rows_per_second", "gb_per_second"}


@pytest.fixture(scope="module")
def cluster():
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster)
    yield cluster, client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def address(cluster):
    return cluster[0].scheduler_address


@pytest.fixture(autouse=True)
def _small_fragments(monkeypatch):
    monkeypatch.setenv("XENT_DASK_FRAGMENT_ROWS", str(FRAGMENT_ROWS))


def _write(directory, seed=7, soft=False):
    """Two Parquet files (row groups of 30): ignored and null targets, groups, ids."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    start = 0
    for name, rows in zip("ab", ROWS, strict=True):
        x = (rng.standard_normal((rows, CLASSES)) * 2).astype(np.float32)
        cols = {
            "id": np.arange(start, start + rows),
            "lang": pa.array(
                [None if i % 23 == 0 else "en fr de".split()[i % 3] for i in range(rows)]
            ),
        }
        if soft:
            t = rng.random(x.shape).astype(np.float32)
            t /= t.sum(1, keepdims=True)
            write_dataset(
                directory / f"{name}.parquet", x, None, soft=t, row_group_rows=30, columns=cols
            )
        else:
            y = rng.integers(0, CLASSES, rows)
            y[rng.random(rows) < 0.15] = -100
            target = pa.array(y, mask=rng.random(rows) < 0.05)  # some null targets
            write_dataset(directory / f"{name}.parquet", x, target, row_group_rows=30, columns=cols)
        start += rows
    return str(directory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("data"))


def _assert_same(local, remote, path="report"):
    """Every metric equal to 1e-12 relative (timings aside)."""
    if isinstance(local, dict):
        assert set(local) - TIMING == set(remote) - TIMING, path
        for key in set(local) - TIMING:
            _assert_same(local[key], remote[key], f"{path}.{key}")
    elif isinstance(local, list) and isinstance(remote, list) and len(local) == len(remote):
        for i, (a, b) in enumerate(zip(local, remote, strict=True)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(local, float) and remote is not None:
        assert math.isclose(local, remote, rel_tol=1e-12, abs_tol=0.0), (path, local, remote)
    else:
        assert local == remote, (path, local, remote)


def test_data_splits_into_several_fragments(data):
    frags = open_source(data).fragments(FRAGMENT_ROWS)
    assert len(frags) == 7 and sum(f.rows for f in frags) == sum(ROWS)


@pytest.mark.parametrize(
    "options",
    [
        {"group_by": "lang"},
        {"label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "sum", "top_k": (1, 3, 5)},
        {"weight": np.linspace(0.5, 2.0, CLASSES), "chunk_rows": 7, "group_by": "lang"},
    ],
    ids=["group_by", "smoothing-zloss-sum", "weights-small-chunks"],
)
def test_evaluate_equals_local(data, address, options):
    local = engine.evaluate(data, device="cpu", **options).to_dict()
    remote = engine.evaluate(data, device="cpu", dask=address, **options).to_dict()
    assert remote["rows"] == sum(ROWS) and remote["counted"] > 0
    _assert_same(local, remote)


def test_evaluate_soft_targets(tmp_path, address):
    path = _write(tmp_path / "soft", soft=True)
    local = engine.evaluate(path, device="cpu").to_dict()
    remote = engine.evaluate(path, device="cpu", dask=address).to_dict()
    assert remote["kl"] is not None
    _assert_same(local, remote)


def test_probability_warning_as_local(tmp_path, address):
    rng = np.random.default_rng(3)
    x = rng.random((90, 5)).astype(np.float32)
    x /= x.sum(1, keepdims=True)
    path = write_dataset(tmp_path / "p.parquet", x, rng.integers(0, 5, 90), row_group_rows=30)
    local = engine.evaluate(path, device="cpu")
    remote = engine.evaluate(path, device="cpu", dask=address)
    assert remote.warnings == local.warnings and len(local.warnings) == 1


def test_local_cluster_address(data):
    local = engine.evaluate(data, device="cpu", group_by="lang").to_dict()
    remote = engine.evaluate(data, device="cpu", group_by="lang", dask="local:2").to_dict()
    _assert_same(local, remote)


def _assert_tables_equal(a: pa.Table, b: pa.Table):
    """Same schema and values row for row (NaN equal to NaN: ignored rows score NaN)."""
    assert a.schema == b.schema
    for name in a.column_names:
        x, y = a[name].to_numpy(zero_copy_only=False), b[name].to_numpy(zero_copy_only=False)
        if x.dtype == object:  # list columns (grad)
            x, y = np.stack(x), np.stack(y)
        np.testing.assert_array_equal(x, y, err_msg=name)


def _read_parts(directory):
    manifest = json.loads((directory / "_manifest.json").read_text())
    return pq.ParquetDataset(str(directory)).read(), manifest


def test_score_parts_equal_local(tmp_path, data, address):
    local_out = tmp_path / "local.parquet"
    local = engine.score(data, local_out, keep=["id"], device="cpu")
    out = tmp_path / "scores"
    remote = engine.score(data, out, keep=["id"], device="cpu", dask=address)
    table, manifest = _read_parts(out)
    _assert_tables_equal(table, pq.read_table(local_out))  # row for row, input order
    assert manifest["complete"] and manifest["total_rows"] == sum(ROWS)
    assert sorted(manifest["parts"], key=int) == [str(i) for i in range(7)]
    assert sorted(os.listdir(out)) == ["_manifest.json", "_metrics"] + [
        f"part-{i:05d}.parquet" for i in range(7)
    ]
    assert sorted(os.listdir(out / "_metrics")) == [f"part-{i:05d}.json" for i in range(7)]
    _assert_same(local.to_dict(), remote.to_dict())
    with pytest.raises(XentInputError, match="exists"):
        engine.score(data, out, device="cpu", dask=address)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_parts_equal_local(tmp_path, data, address, reduction):
    opts = {"reduction": reduction, "label_smoothing": 0.05, "device": "cpu"}
    local_out = tmp_path / "local.parquet"
    local = engine.gradients(data, local_out, keep=["id"], **opts)
    out = tmp_path / "grads"
    remote = engine.gradients(data, out, keep=["id"], dask=address, **opts)
    table, manifest = _read_parts(out)
    assert table.column_names == ["grad", "id"] and manifest["complete"]
    _assert_tables_equal(table, pq.read_table(local_out))
    _assert_same(local.to_dict(), remote.to_dict())


def test_input_error_names_file_and_row(tmp_path, address):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = rng.integers(0, 6, 120)
    y[97] = 50
    path = write_dataset(tmp_path / "bad.parquet", x, y, row_group_rows=30)
    with pytest.raises(XentInputError) as local:
        engine.evaluate(path, device="cpu")
    with pytest.raises(XentInputError) as remote:
        engine.evaluate(path, device="cpu", dask=address)
    assert str(remote.value) == str(local.value)
    assert "bad.parquet" in str(remote.value) and "(row 97)" in str(remote.value)


# -- failures ---------------------------------------------------------------------------


def _slow_down(seconds):
    """Run on the workers: every chunk takes `seconds` longer (restored by _restore)."""
    from engine.jobs import dask as runner

    original = getattr(runner, "_test_original_eval_chunk", runner.eval_chunk)
    runner._test_original_eval_chunk = original

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    runner.eval_chunk = slow


def _restore():
    from engine.jobs import dask as runner

    runner.eval_chunk = getattr(runner, "_test_original_eval_chunk", runner.eval_chunk)


def test_worker_killed_mid_job(tmp_path, data, cluster, address):
    _, client = cluster
    local_out = tmp_path / "local.parquet"
    local = engine.score(data, local_out, device="cpu")
    client.run(_slow_down, 0.4)
    out = tmp_path / "scores"
    result = {}

    def job():
        try:
            result["report"] = engine.score(data, out, device="cpu", dask=address)
        except BaseException as e:  # pragma: no cover - reported below
            result["error"] = e

    thread = threading.Thread(target=job)
    thread.start()
    try:
        victim = None
        deadline = time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:
            busy = {w: keys for w, keys in client.processing().items() if keys}
            victim = next(iter(busy), None)
            time.sleep(0.05)
        assert victim is not None, "no task started"
        time.sleep(0.1)  # inside the task's sleep
        client.run(os._exit, 1, workers=[victim], on_error="ignore")
        thread.join(120)
        assert not thread.is_alive()
        assert victim not in client.scheduler_info(n_workers=-1)["workers"]  # it did die
    finally:
        client.run(_restore, on_error="ignore")
    assert "error" not in result, result.get("error")
    table, manifest = _read_parts(out)
    _assert_tables_equal(table, pq.read_table(local_out))
    assert manifest["complete"]
    _assert_same(local.to_dict(), result["report"].to_dict())
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == []  # no stray temps
    try:  # the nanny restarts the worker; later tests like two
        client.wait_for_workers(2, timeout=60)
    except Exception:  # pragma: no cover
        pass


def test_resume_after_client_died(tmp_path, data, address, monkeypatch):
    out = tmp_path / "scores"
    full = engine.score(data, out, keep=["id"], device="cpu", dask=address)
    whole, _ = _read_parts(out)
    # The client died before recording parts 2 and 4 (part 4's file never appeared) and
    # before finalizing.
    manifest_path = out / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for index in ("2", "4"):
        del manifest["parts"][index]
    manifest["complete"] = False
    manifest_path.write_text(json.dumps(manifest))
    os.remove(out / "part-00004.parquet")
    kept = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.startswith("part-")}
    time.sleep(0.01)
    # A different fragment size now: the resume still splits as the manifest says.
    monkeypatch.setenv("XENT_DASK_FRAGMENT_ROWS", "1000")
    resumed = engine.score(data, out, keep=["id"], device="cpu", dask=address, resume=True)
    for name, mtime in kept.items():
        if name != "part-00002.parquet":
            assert os.stat(out / name).st_mtime_ns == mtime, f"{name} was recomputed"
    table, manifest = _read_parts(out)
    _assert_tables_equal(table, whole)
    assert manifest["complete"] and len(manifest["parts"]) == 7
    assert full["rows"] == sum(ROWS)
    # The report covers the whole output: the recomputed parts' sums merged with those the
    # manifest recorded for the parts kept.
    timing = ("seconds", "rows_per_second", "gb_per_second")
    whole_report = {k: v for k, v in full.to_dict().items() if k not in timing}
    assert {k: v for k, v in resumed.to_dict().items() if k not in timing} == whole_report
    assert not resumed.warnings


def test_resume_refuses_a_different_split(tmp_path, data, address):
    out = tmp_path / "scores"
    engine.score(data, out, device="cpu", chunk_rows=50, resume=True)  # local parts
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["complete"] = False
    (out / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(XentInputError, match="cannot resume"):
        engine.score(data, out, device="cpu", dask=address, resume=True)


# -- addresses --------------------------------------------------------------------------


def test_unreachable_scheduler(tmp_path, data, monkeypatch):
    monkeypatch.setenv("XENT_DASK_TIMEOUT", "1")
    with pytest.raises(XentInputError, match=r"^tcp://127.0.0.1:1: cannot reach the Dask sched"):
        engine.evaluate(data, device="cpu", dask="tcp://127.0.0.1:1")
    out = tmp_path / "scores"
    with pytest.raises(XentInputError, match="cannot reach"):
        engine.score(data, out, device="cpu", dask="tcp://127.0.0.1:1")
    assert not out.exists()  # nothing left behind


@pytest.mark.parametrize("bad", ["local:0", "local:two", "nonsense", "tcp://"])
def test_bad_address(data, bad):
    with pytest.raises(XentInputError, match="Dask address|N >= 1"):
        engine.evaluate(data, device="cpu", dask=bad)


def test_missing_dask_says_how_to_install(data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # import raises ImportError
    with pytest.raises(XentInputError, match=r"pip install 'xent\[dask\]'"):
        engine.evaluate(data, device="cpu", dask="local:1")


def test_fragment_rows_auto(data, monkeypatch):
    monkeypatch.delenv("XENT_DASK_FRAGMENT_ROWS")
    src = open_source(data)
    row_bytes = CLASSES * 4
    assert xdist.fragment_rows(src, 2) == xdist.MIN_FRAGMENT_BYTES // row_bytes
    assert xdist.fragment_rows(src, 2, override=10) == 10


@pytest.mark.parametrize("fmt", ["arrow-file", "arrow-stream"])
def test_ipc_files_are_whole_fragments(tmp_path, address, fmt):
    rng = np.random.default_rng(11)
    for name in "abc":
        x = rng.standard_normal((50, 9)).astype(np.float32)
        write_dataset(tmp_path / f"{name}.arrow", x, rng.integers(0, 9, 50), fmt=fmt)
    local = engine.evaluate(str(tmp_path), device="cpu").to_dict()
    remote = engine.evaluate(str(tmp_path), device="cpu", dask=address).to_dict()
    assert remote["rows"] == 150
    _assert_same(local, remote)


def test_empty_file_among_others(tmp_path, address):
    rng = np.random.default_rng(13)
    src = tmp_path / "src"
    src.mkdir()
    for name, rows in (("a", 70), ("b", 0), ("c", 40)):
        x = rng.standard_normal((rows, 9)).astype(np.float32)
        ids = np.arange(rows, dtype=np.int64)
        write_dataset(src / f"{name}.parquet", x, rng.integers(0, 9, rows), columns={"id": ids})
    local_out = tmp_path / "local.parquet"
    local = engine.score(str(src), local_out, keep=["id"], device="cpu")
    out = tmp_path / "scores"
    remote = engine.score(str(src), out, keep=["id"], device="cpu", dask=address)
    table, manifest = _read_parts(out)
    _assert_tables_equal(table, pq.read_table(local_out))
    assert manifest["total_rows"] == 110
    _assert_same(local.to_dict(), remote.to_dict())


def test_file_uri_source_runs_on_the_cluster(address, tmp_path):
    """Workers open pyarrow filesystem URIs themselves (file:// stands in for s3:// here)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, 9)).astype(np.float32)
    y = rng.integers(0, 9, 120)
    path = write_dataset(tmp_path / "u.parquet", x, y, row_group_rows=40)
    local = engine.evaluate(path, device="cpu").to_dict()
    remote = engine.evaluate(f"file://{path}", device="cpu", dask=address).to_dict()
    for key in ("loss", "nll", "accuracy", "rows", "counted"):
        assert remote[key] == pytest.approx(local[key], rel=1e-12)


def test_sparse_topk_score_and_eval_equal_local(data, address, tmp_path):
    """score --emit-topk on Dask writes the same top-k parts; eval of sparse rows (read
    back from them) merges to the local report."""
    local_out = tmp_path / "local.parquet"
    engine.score(data, local_out, keep=("target", "lang"), emit_topk=6, device="cpu")
    parts = tmp_path / "parts"
    engine.score(data, parts, keep=("target", "lang"), emit_topk=6, device="cpu", dask=address)
    import pyarrow.dataset as ds

    remote_table = ds.dataset(str(parts), format="parquet").to_table()
    local_table = pq.read_table(local_out)
    for col in ("topk_indices", "topk_logprobs"):
        assert remote_table.column(col).to_pylist() == local_table.column(col).to_pylist()
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    pq.write_table(local_table.slice(0, 150), sparse / "a.parquet", row_group_size=30)
    pq.write_table(local_table.slice(150), sparse / "b.parquet", row_group_size=30)
    options = {"group_by": "lang", "top_k": (1, 3, 8)}
    local = engine.evaluate(str(sparse), device="cpu", **options).to_dict()
    remote = engine.evaluate(str(sparse), device="cpu", dask=address, **options).to_dict()
    assert remote["topk"] == 6 and remote["target_stored"] > 0
    _assert_same(local, remote)
    with pytest.raises(XentInputError, match="sparse top-k"):
        engine.score(str(sparse), tmp_path / "x", device="cpu", dask=address)
