"""engine.io.sinks: temp-name-then-rename outputs, output tables, parts directories."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from engine import interrupt
from engine.errors import XentInputError
from engine.io.sinks import PartsWriter, grad_table, open_sink, output_format, score_table


def read_any(path) -> pa.Table:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"ARROW1":
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return pq.read_table(path)


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n)


def small_table(n=5) -> pa.Table:
    return pa.table({"x": np.arange(n, dtype=np.int32), "y": np.linspace(0, 1, n)})


@pytest.mark.parametrize("name", ["out.parquet", "out.arrow", "out.feather", "out.ipc", "out.xyz"])
def test_round_trip_by_suffix(tmp_path, name):
    path = tmp_path / name
    with open_sink(str(path)) as sink:
        sink.write(small_table(3))
        sink.write(small_table(4).to_batches()[0])
    got = read_any(path)
    assert got.num_rows == 7 and sink.rows == 7
    np.testing.assert_array_equal(got["x"].to_numpy(), [0, 1, 2, 0, 1, 2, 3])
    expected = "arrow" if name.endswith((".arrow", ".feather", ".ipc")) else "parquet"
    assert output_format(name) == expected
    assert (open(path, "rb").read(6) == b"ARROW1") == (expected == "arrow")


def test_nothing_at_target_until_commit(tmp_path):
    path = tmp_path / "out.parquet"
    sink = open_sink(str(path))
    sink.write(small_table())
    assert not path.exists()
    assert os.path.dirname(sink.temp_path) == str(tmp_path)
    assert os.path.basename(sink.temp_path).startswith(".out.parquet.tmp-")
    assert os.path.exists(sink.temp_path)
    sink.commit()
    assert path.exists() and leftovers(tmp_path) == []


def test_abort_leaves_nothing(tmp_path):
    sink = open_sink(str(tmp_path / "out.arrow"))
    sink.write(small_table())
    sink.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_with_aborts(tmp_path, exc):
    path = tmp_path / "out.parquet"
    with pytest.raises(exc):
        with open_sink(str(path)) as sink:
            sink.write(small_table())
            raise exc()
    assert os.listdir(tmp_path) == []


def test_a_swallowed_ctrl_c_still_stops_the_commit(tmp_path, monkeypatch):
    # e.g. a KeyboardInterrupt raised inside a ctypes callback of Numba's compiler is
    # printed as "Exception ignored" and lost; the job must still not write its output
    monkeypatch.setattr(interrupt, "_requested", False)
    sink = open_sink(str(tmp_path / "out.parquet"))
    sink.write(small_table(3))
    try:
        interrupt.handle_sigint(2, None)
    except KeyboardInterrupt:
        pass  # swallowed
    with pytest.raises(KeyboardInterrupt):
        sink.commit()
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_before_writing(tmp_path):
    path = tmp_path / "out.parquet"
    path.write_text("precious")
    with pytest.raises(XentInputError) as err:
        open_sink(str(path))
    assert str(err.value) == f"{path}: exists; pass --overwrite to replace it"
    assert path.read_text() == "precious" and leftovers(tmp_path) == []


def test_overwrite_replaces(tmp_path):
    path = tmp_path / "out.parquet"
    path.write_text("old")
    with open_sink(str(path), overwrite=True) as sink:
        sink.write(small_table(2))
    assert read_any(path).num_rows == 2


def test_output_created_meanwhile_is_not_clobbered(tmp_path):
    path = tmp_path / "out.parquet"
    sink = open_sink(str(path))
    sink.write(small_table())
    path.write_text("someone else's")
    with pytest.raises(XentInputError, match="exists"):
        sink.commit()
    assert path.read_text() == "someone else's" and leftovers(tmp_path) == []


def test_unwritable_or_missing_directory(tmp_path):
    with pytest.raises(XentInputError, match="cannot write") as err:
        open_sink(str(tmp_path / "no" / "such" / "out.parquet"))
    assert "out.parquet" in str(err.value)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(XentInputError, match="cannot write"):
            open_sink(str(locked / "out.parquet"))
    finally:
        locked.chmod(0o700)


def test_directory_target(tmp_path):
    with pytest.raises(XentInputError, match="is a directory"):
        open_sink(str(tmp_path), overwrite=True)


def test_empty_output_keeps_schema(tmp_path):
    schema = small_table().schema
    path = tmp_path / "out.parquet"
    with open_sink(str(path), schema=schema):
        pass
    got = read_any(path)
    assert got.num_rows == 0 and got.schema.names == ["x", "y"]


# -- tables ------------------------------------------------------------------------------


def _stats(n, soft=False):
    rng = np.random.default_rng(0)
    out = {
        name: rng.standard_normal(n)
        for name in ("loss", "target_logprob", "lse", "max_prob", "entropy", "kl")
    }
    out["argmax"] = np.arange(n, dtype=np.int64)
    out["target_rank"] = np.full(n, -1, dtype=np.int64)
    if not soft:
        del out["kl"]
    return out


@pytest.mark.parametrize("soft", [False, True])
def test_score_table_columns_and_types(soft):
    keep = pa.table({"id": pa.array(["a", "b", "c"]), "pos": [1, 2, 3]})
    stats = _stats(3, soft)
    t = score_table(stats, keep, soft)
    names = ["loss", "target_logprob", "lse", "argmax", "max_prob", "entropy", "target_rank"]
    names += ["kl"] if soft else []
    assert t.column_names == names + ["id", "pos"]
    for name in names:
        expected = pa.int32() if name in ("argmax", "target_rank") else pa.float32()
        assert t.schema.field(name).type == expected
        np.testing.assert_allclose(t[name].to_numpy(), stats[name], rtol=1e-6)
    assert t["id"].to_pylist() == ["a", "b", "c"]
    assert score_table(stats, None, soft).num_columns == len(names)


def test_score_table_keep_name_clash():
    with pytest.raises(XentInputError, match="'loss'"):
        score_table(_stats(2), pa.table({"loss": [1, 2]}), False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_grad_table(tmp_path, dtype):
    grad = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    keep = pa.table({"id": np.arange(6)})
    t = grad_table(grad, keep, dtype)
    assert t.column_names == ["grad", "id"]
    assert t.schema.field("grad").type == pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), 5)
    col = t["grad"].chunk(0)
    values = np.frombuffer(col.values.buffers()[1], dtype=dtype)
    np.testing.assert_array_equal(values.reshape(6, 5), grad.astype(dtype))
    # float32 is a view of the caller's array; float16 needs a conversion.
    assert np.shares_memory(values, grad) == (dtype == "float32")
    path = tmp_path / "g.parquet"
    with open_sink(str(path)) as sink:
        sink.write(t)
    back = read_any(path)["grad"].combine_chunks()
    np.testing.assert_array_equal(back.values.to_numpy().reshape(6, 5), grad.astype(dtype))


def test_grad_table_rejects_bad_input():
    with pytest.raises(ValueError):
        grad_table(np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        grad_table(np.zeros((3, 2), np.float32), dtype="bfloat16")


# -- parts -------------------------------------------------------------------------------


def test_parts_writer_manifest_and_resume(tmp_path):
    out = tmp_path / "out"
    w = PartsWriter(str(out))
    assert w.part_path(3) == str(out / "part-00003.parquet")
    w.write_part(0, small_table(4), first_row=0)
    w.write_part(2, small_table(3), first_row=9)
    w.write_part(2, small_table(3), first_row=9)  # a retried part replaces, never doubles
    assert sorted(os.listdir(out)) == ["_manifest.json", "part-00000.parquet", "part-00002.parquet"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is False
    assert manifest["parts"]["2"] == {"file": "part-00002.parquet", "rows": 3, "first_row": 9}
    assert w.completed() == {0: 4, 2: 3}

    with pytest.raises(XentInputError, match="--overwrite.*--resume"):
        PartsWriter(str(out))
    resumed = PartsWriter(str(out), resume=True)
    assert resumed.completed() == {0: 4, 2: 3}
    os.unlink(out / "part-00002.parquet")  # a part lost after recording is redone
    assert resumed.completed() == {0: 4}
    resumed.write_part(1, small_table(5), first_row=4)
    resumed.finalize(12)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is True and manifest["total_rows"] == 12
    assert list(manifest["parts"]) == ["0", "1", "2"]
    assert leftovers(out) == []
    assert read_any(out / "part-00001.parquet").num_rows == 5


def test_parts_writer_overwrite_removes_only_its_files(tmp_path):
    out = tmp_path / "out"
    w = PartsWriter(str(out))
    w.write_part(0, small_table(2))
    (out / "notes.txt").write_text("mine")
    w2 = PartsWriter(str(out), overwrite=True)
    assert w2.completed() == {}
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_parts_writer_record_from_elsewhere(tmp_path):
    w = PartsWriter(str(tmp_path / "o"), suffix=".arrow")
    from engine.io.sinks import write_part_file

    write_part_file(w.part_path(7), small_table(3))
    w.record(7, 3, first_row=100)
    assert w.completed() == {7: 3}
    assert open(w.part_path(7), "rb").read(6) == b"ARROW1"


def test_parts_writer_on_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(XentInputError, match="not a directory"):
        PartsWriter(str(f))


def test_resume_sweeps_half_written_parts(tmp_path):
    out = tmp_path / "parts"
    w = PartsWriter(out)
    w.write_part(0, pa.table({"a": [1, 2]}), first_row=0)
    stray = out / ".part-00001.parquet.tmp-999999-abcd"  # what a SIGKILL leaves behind
    stray.write_bytes(b"half a part")
    PartsWriter(out, resume=True)
    assert not stray.exists()
    assert (out / "part-00000.parquet").exists()


def test_parts_writer_keeps_part_metrics_beside_the_manifest(tmp_path):
    out = tmp_path / "parts"
    writer = PartsWriter(str(out))
    writer.write_part(0, small_table(4), first_row=0, metrics={"rows": 4})
    writer.write_part(1, small_table(3), first_row=4)
    assert writer.part_metrics(0) == {"rows": 4} and writer.part_metrics(1) is None
    assert "metrics" not in (out / "_manifest.json").read_text()  # one small file per part
    assert PartsWriter(str(out), resume=True).part_metrics(0) == {"rows": 4}
    PartsWriter(str(out), overwrite=True)
    assert not (out / "_metrics").exists()  # an overwritten job leaves no stale sums
