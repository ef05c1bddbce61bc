"""engine.io: formats, layouts, dtypes, chunking, zero-copy, errors (through open_source)."""

from __future__ import annotations

import gc
import os
import pickle
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datagen import FORMATS, LAYOUTS, make_table, random_logits, write_dataset, write_table

from engine.dtypes import float32_to_bf16_bits
from engine.errors import XentInputError
from engine.io import NULL_TARGET, list_matrix, open_fragment, open_source
from engine.io import parquet as parquet_pipeline
from engine.io.formats import ParquetReader, ordered
from engine.io.parquet import Buffers

DTYPES = ("float16", "float32", "float64", "bfloat16")


def logits_arg(layout: str) -> str:
    return "logit_*" if layout == "wide" else "logits"


def read_all(src, **kwargs):
    chunks = list(src.iter_chunks(**kwargs))
    logits = np.concatenate([c.logits for c in chunks]) if chunks else None
    has_target = chunks and chunks[0].target is not None
    target = np.concatenate([c.target for c in chunks]) if has_target else None
    return chunks, logits, target


@pytest.fixture
def small_units(monkeypatch):
    """Parquet: one row group per unit of work, decoded one row at a time, so that every
    chunk is assembled from pieces (copied into a chunk buffer) and row groups decode
    concurrently, several filling one chunk."""
    real = ParquetReader.units

    def one_group_each(self, columns, selection, unit_bytes):
        return real(self, columns, selection, 1)

    monkeypatch.setattr(ParquetReader, "units", one_group_each)
    monkeypatch.setattr(parquet_pipeline, "_DECODE_BYTES", 1)


# -- layouts x formats x dtypes ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_exact_values(tmp_path, layout, fmt, dtype):
    x = random_logits(23, 5, dtype, seed=1)
    t = np.arange(23) % 5
    path = write_dataset(
        tmp_path / "d.bin",
        x,
        t,
        layout=layout,
        fmt=fmt,
        row_group_rows=6,
        bf16=dtype == "bfloat16",
    )
    src = open_source(path, logits=logits_arg(layout))
    assert src.layout == layout
    assert src.storage == dtype
    assert src.num_classes == 5
    assert src.files[0].format == fmt
    assert src.num_rows == (None if fmt == "arrow-stream" else 23)
    expected_dtype = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    for chunk_rows in (1, 7, 1000):
        chunks, logits, target = read_all(src, chunk_rows=chunk_rows)
        assert logits.dtype == expected_dtype
        assert logits.shape == (23, 5)
        np.testing.assert_array_equal(logits.view(np.uint8), x.view(np.uint8))  # bit-exact
        np.testing.assert_array_equal(target, t)
        assert target.dtype == np.int64
        assert [c.row for c in chunks] == [c.file_row for c in chunks]
        assert all(c.target_valid is None for c in chunks)
    assert src.num_rows == 23  # a stream is counted once read through


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 12, 100])
def test_batched_parquet_reader_boundaries(tmp_path, small_units, chunk_rows):
    x = random_logits(40, 3)
    path = write_dataset(tmp_path / "d.parquet", x, np.zeros(40, np.int8), row_group_rows=10)
    chunks, logits, _ = read_all(open_source(path), chunk_rows=chunk_rows)
    np.testing.assert_array_equal(logits, x)
    sizes = [len(c.logits) for c in chunks]
    assert sizes == [chunk_rows] * (40 // chunk_rows) + (
        [40 % chunk_rows] if 40 % chunk_rows else []
    )
    assert [c.file_row for c in chunks] == list(range(0, 40, chunk_rows))


@pytest.mark.parametrize("readahead", [0, 1, 3])
def test_readahead_gives_same_chunks(tmp_path, small_units, readahead):
    x = random_logits(30, 4)
    paths = [
        write_dataset(tmp_path / "a.parquet", x[:12], np.ones(12, np.int32), row_group_rows=5),
        write_dataset(tmp_path / "b.arrows", x[12:], np.ones(18, np.int32), fmt="arrow-stream"),
    ]
    chunks, logits, _ = read_all(open_source(paths), chunk_rows=4, readahead=readahead)
    np.testing.assert_array_equal(logits, x)
    assert [(c.file, c.file_row, c.row, len(c.logits)) for c in chunks] == [
        (paths[0], 0, 0, 4),
        (paths[0], 4, 4, 4),
        (paths[0], 8, 8, 4),
        (paths[1], 0, 12, 4),
        (paths[1], 4, 16, 4),
        (paths[1], 8, 20, 4),
        (paths[1], 12, 24, 4),
        (paths[1], 16, 28, 2),
    ]


def test_chunks_never_span_files(tmp_path):
    x = random_logits(20, 3)
    a = write_dataset(tmp_path / "a.parquet", x[:10], np.zeros(10, np.int64))
    b = write_dataset(tmp_path / "b.arrow", x[10:], np.zeros(10, np.int64), fmt="arrow-file")
    src = open_source([a, b])
    chunks, logits, _ = read_all(src, chunk_rows=7)
    assert [(c.file, c.file_row, c.row, len(c.logits)) for c in chunks] == [
        (a, 0, 0, 7),
        (a, 7, 7, 3),
        (b, 0, 10, 7),
        (b, 7, 17, 3),
    ]
    np.testing.assert_array_equal(logits, x)
    assert src.num_rows == 20


def test_default_chunk_rows_from_bytes(tmp_path):
    x = random_logits(50, 8)
    src = open_source(write_dataset(tmp_path / "d.parquet", x, np.zeros(50, np.int64)))
    assert src.default_chunk_rows(8 * 4 * 6) == 6
    chunks = list(src.iter_chunks(chunk_bytes=8 * 4 * 6))
    assert [len(c.logits) for c in chunks] == [6] * 8 + [2]
    assert src.default_chunk_rows(1) == 1


# -- bfloat16 ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "fixed_shape_tensor", "wide"])
@pytest.mark.parametrize("how", ["field", "value", "option", "int16"])
def test_bf16_markers(tmp_path, layout, how):
    bits = random_logits(9, 4, "bfloat16")
    data = bits.view(np.int16) if how == "int16" else bits
    if how == "value" and layout in ("fixed_shape_tensor", "wide"):
        pytest.skip("no value field")
    bf16 = {"field": True, "value": "value", "option": False, "int16": True}[how]
    path = write_dataset(
        tmp_path / "d.parquet", data, np.zeros(9, np.int64), layout=layout, bf16=bf16
    )
    src = open_source(
        path, logits=logits_arg(layout), logits_dtype="bfloat16" if how == "option" else None
    )
    assert src.storage == "bfloat16"
    _, logits, _ = read_all(src)
    assert logits.dtype == np.uint16
    np.testing.assert_array_equal(logits, bits)


@pytest.mark.parametrize("layout", ["fixed_size_list", "wide"])
def test_uint16_without_marker_is_an_error(tmp_path, layout):
    bits = random_logits(4, 3, "bfloat16")
    path = write_dataset(tmp_path / "d.parquet", bits, np.zeros(4, np.int64), layout=layout)
    with pytest.raises(XentInputError, match="--logits-dtype bfloat16") as err:
        open_source(path, logits=logits_arg(layout))
    assert str(path) in str(err.value)


def test_bf16_option_on_float_logits_is_an_error(tmp_path):
    path = write_dataset(tmp_path / "d.parquet", random_logits(4, 3), np.zeros(4, np.int64))
    with pytest.raises(XentInputError, match="uint16/int16"):
        open_source(path, logits_dtype="bfloat16")


# -- zero copy ---------------------------------------------------------------------------


def _mapped_ranges(path):
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real:
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("fmt", ["arrow-file", "arrow-stream"])
@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "fixed_shape_tensor"])
def test_ipc_chunks_are_views_of_the_mapped_file(tmp_path, fmt, layout):
    x = random_logits(64, 16)
    path = write_dataset(tmp_path / "d.arrow", x, np.zeros(64, np.int64), layout=layout, fmt=fmt)
    src = open_source(path)
    chunks = list(src.iter_chunks(chunk_rows=16))
    assert len(chunks) == 4
    for chunk in chunks:
        address = chunk.logits.__array_interface__["data"][0]
        ranges = _mapped_ranges(path)
        assert any(lo <= address and address + chunk.logits.nbytes <= hi for lo, hi in ranges)
        assert not chunk.logits.flags.writeable
        assert not chunk.logits.flags.owndata


@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "large_list", "fixed_shape_tensor"])
def test_list_matrix_is_zero_copy_and_honours_offsets(layout):
    from datagen import list_array

    x = random_logits(10, 3, "float16")
    arr = list_array(x, layout)
    sliced = arr.slice(3, 5)
    m = list_matrix(sliced, 3)
    assert m.dtype == np.float16
    np.testing.assert_array_equal(m, x[3:8])
    storage = sliced.storage if isinstance(sliced, pa.ExtensionArray) else sliced
    buf = np.frombuffer(storage.values.buffers()[1], dtype=np.float16)
    assert np.shares_memory(m, buf)


def test_list_matrix_with_offset_values():
    # The values child itself is a slice: offsets are relative to it.
    values = pa.array(np.arange(20, dtype=np.float32)).slice(4)
    arr = pa.ListArray.from_arrays(pa.array([0, 2, 4, 6], pa.int32()), values)
    np.testing.assert_array_equal(list_matrix(arr.slice(1), 2), [[6, 7], [8, 9]])
    fsl = pa.FixedSizeListArray.from_arrays(values, 4).slice(1, 2)
    np.testing.assert_array_equal(list_matrix(fsl, 4), np.arange(8, 16).reshape(2, 4))


def test_parquet_single_piece_chunk_is_a_view(tmp_path):
    x = random_logits(30, 8)
    path = write_dataset(tmp_path / "d.parquet", x, np.zeros(30, np.int64), row_group_rows=30)
    chunks = list(open_source(path).iter_chunks(chunk_rows=10))
    assert all(not c.logits.flags.owndata and not c.logits.flags.writeable for c in chunks)


def test_sliced_table_in_ipc(tmp_path):
    # Batches written from a slice keep working (writer may keep offsets).
    x = random_logits(20, 3)
    table = make_table(x, np.arange(20) % 3).slice(5, 10)
    path = write_table(tmp_path / "d.arrow", table, "arrow-file", row_group_rows=4)
    _, logits, target = read_all(open_source(path), chunk_rows=3)
    np.testing.assert_array_equal(logits, x[5:15])
    np.testing.assert_array_equal(target, (np.arange(20) % 3)[5:15])


# -- targets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "int_type", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
)
def test_integer_targets_of_every_width(tmp_path, int_type):
    t = (np.arange(12) % 4).astype(int_type)
    path = write_dataset(tmp_path / "d.parquet", random_logits(12, 4), t)
    _, _, target = read_all(open_source(path), chunk_rows=5)
    assert target.dtype == np.int64
    np.testing.assert_array_equal(target, np.arange(12) % 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_null_targets_are_masked(tmp_path, fmt, small_units):
    values = [0, None, 2, 1, None, None, 3, 0, 1]
    t = pa.array(values, pa.int16())
    path = write_dataset(tmp_path / "d", random_logits(9, 4), t, fmt=fmt, row_group_rows=4)
    chunks = list(open_source(path).iter_chunks(chunk_rows=3))
    target = np.concatenate([c.target for c in chunks])
    valid = np.concatenate(
        [np.ones(len(c.target), bool) if c.target_valid is None else c.target_valid for c in chunks]
    )
    np.testing.assert_array_equal(valid, [v is not None for v in values])
    np.testing.assert_array_equal(target, [NULL_TARGET if v is None else v for v in values])
    assert chunks[2].target_valid is None  # rows 6..8 have no null


@pytest.mark.parametrize("soft_layout", ["fixed_size_list", "list", "large_list"])
@pytest.mark.parametrize("fmt", ["parquet", "arrow-file"])
def test_soft_targets(tmp_path, soft_layout, fmt):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(5), size=11)
    x = random_logits(11, 5)
    path = write_dataset(tmp_path / "d", x, soft=probs, soft_layout=soft_layout, fmt=fmt)
    src = open_source(path)
    assert src.soft_targets
    chunks, logits, target = read_all(src, chunk_rows=4)
    assert target.shape == (11, 5)
    np.testing.assert_array_equal(target, probs)
    assert all(c.target_valid is None for c in chunks)
    for t, valid in src.iter_targets(chunk_rows=4):
        assert t.ndim == 2 and valid is None


def test_soft_targets_must_match_classes(tmp_path):
    probs = np.full((3, 4), 0.25)
    path = write_dataset(tmp_path / "d.parquet", random_logits(3, 5), soft=probs)
    with pytest.raises(XentInputError, match="4 columns.*5 classes"):
        open_source(path)


def test_no_target(tmp_path):
    path = write_dataset(tmp_path / "d.parquet", random_logits(5, 3), None)
    src = open_source(path, target=None)
    chunks, logits, _ = read_all(src)
    assert chunks[0].target is None and chunks[0].target_valid is None
    with pytest.raises(XentInputError):
        list(src.iter_targets())


def test_iter_targets_reads_only_targets(tmp_path, small_units):
    t = pa.array([1, None, 2, 0, 1, 1, None], pa.int32())
    path = write_dataset(tmp_path / "d.parquet", random_logits(7, 3), t, row_group_rows=3)
    src = open_source(path)
    assert src.columns_for(src.entries[0], targets_only=True) == ["target"]
    got = list(src.iter_targets(chunk_rows=4))
    assert [len(tg) for tg, _ in got] == [4, 3]
    np.testing.assert_array_equal(
        np.concatenate([tg for tg, _ in got]), [1, NULL_TARGET, 2, 0, 1, 1, NULL_TARGET]
    )
    np.testing.assert_array_equal(got[0][1], [True, False, True, True])


# -- keep and group_by -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_keep_and_group_by(tmp_path, fmt, small_units):
    n = 13
    ids = np.arange(100, 100 + n)
    names = [f"doc{i % 3}" for i in range(n)]
    path = write_dataset(
        tmp_path / "d",
        random_logits(n, 3),
        np.zeros(n, np.int64),
        fmt=fmt,
        row_group_rows=5,
        columns={"id": ids, "doc": names},
    )
    src = open_source(path, keep=["id", "logits"], group_by="doc")
    chunks = list(src.iter_chunks(chunk_rows=4))
    keep = pa.concat_tables([c.keep for c in chunks])
    assert keep.column_names == ["id", "logits"]
    np.testing.assert_array_equal(keep["id"].to_numpy(), ids)
    groups = sum((c.group.to_pylist() for c in chunks), [])
    assert groups == names
    assert all(c.keep.num_rows == len(c.logits) for c in chunks)


def test_keep_string_is_comma_separated(tmp_path):
    path = write_dataset(
        tmp_path / "d.parquet",
        random_logits(3, 2),
        [0, 1, 0],
        columns={"a": [1, 2, 3], "b": [4, 5, 6]},
    )
    src = open_source(path, keep="a,b")
    assert src.keep_columns == ("a", "b")


# -- finding files -----------------------------------------------------------------------


def test_directory_recursive_sorted_skips_hidden(tmp_path):
    x = random_logits(12, 3)
    t = np.zeros(12, np.int64)
    (tmp_path / "sub").mkdir()
    (tmp_path / "_tmp").mkdir()
    write_dataset(tmp_path / "b.parquet", x[4:8], t[:4])
    write_dataset(tmp_path / "a.parquet", x[:4], t[:4])
    write_dataset(tmp_path / "sub" / "c.arrow", x[8:], t[:4], fmt="arrow-file")
    write_dataset(tmp_path / ".hidden.parquet", x[:1], t[:1])
    write_dataset(tmp_path / "_tmp" / "z.parquet", x[:1], t[:1])
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "manifest.json").write_text("{}")
    src = open_source(str(tmp_path))
    assert [os.path.relpath(f.path, tmp_path) for f in src.files] == [
        "a.parquet",
        "b.parquet",
        os.path.join("sub", "c.arrow"),
    ]
    _, logits, _ = read_all(src, chunk_rows=3)
    np.testing.assert_array_equal(logits, x)


def test_glob_and_stream_and_suffix_lies(tmp_path):
    x = random_logits(9, 3)
    t = np.zeros(9, np.int64)
    write_dataset(tmp_path / "p1.arrow", x[:3], t[:3], fmt="parquet")  # suffix lies
    write_dataset(tmp_path / "p2.parquet", x[3:6], t[:3], fmt="arrow-stream")
    write_dataset(tmp_path / "p3.dat", x[6:], t[:3], fmt="arrow-file")
    src = open_source(str(tmp_path / "p*"))
    assert [f.format for f in src.files] == ["parquet", "arrow-stream", "arrow-file"]
    _, logits, _ = read_all(src)
    np.testing.assert_array_equal(logits, x)


def test_missing_paths(tmp_path):
    with pytest.raises(XentInputError, match="no such file") as err:
        open_source(str(tmp_path / "nope.parquet"))
    assert "nope.parquet" in str(err.value)
    with pytest.raises(XentInputError, match="match"):
        open_source(str(tmp_path / "*.parquet"))
    with pytest.raises(XentInputError, match="no Parquet or Arrow files"):
        open_source(str(tmp_path))


# -- errors ------------------------------------------------------------------------------


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(XentInputError) as err:
        open_source(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("keep_bytes", [4, 100, -20])
def test_truncated_parquet(tmp_path, keep_bytes):
    path = write_dataset(tmp_path / "d.parquet", random_logits(50, 8), np.zeros(50, np.int64))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep_bytes])
    with pytest.raises(XentInputError) as err:
        list(open_source(path).iter_chunks())
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fmt", ["arrow-file", "arrow-stream"])
def test_truncated_ipc(tmp_path, fmt):
    path = write_dataset(
        tmp_path / "d.arrow",
        random_logits(50, 8),
        np.zeros(50, np.int64),
        fmt=fmt,
        row_group_rows=10,
    )
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2 + 3])
    with pytest.raises(XentInputError) as err:
        list(open_source(path).iter_chunks())
    assert str(path) in str(err.value)


def test_empty_file_bytes(tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    with pytest.raises(XentInputError, match="empty file"):
        open_source(str(path))


def test_unknown_column_lists_available(tmp_path):
    path = write_dataset(
        tmp_path / "data.parquet", random_logits(3, 2), [0, 1, 0], columns={"id": [1, 2, 3]}
    )
    with pytest.raises(XentInputError) as err:
        open_source(path, target="tgt")
    assert str(err.value) == f"{path}: no target column 'tgt' (available: logits, target, id)"
    with pytest.raises(XentInputError, match="no logits column 'x'"):
        open_source(path, logits="x")
    with pytest.raises(XentInputError, match=r"no keep column 'nope' \(available"):
        open_source(path, keep=["nope"])
    with pytest.raises(XentInputError, match="no group-by column"):
        open_source(path, group_by="nope")
    with pytest.raises(XentInputError, match="no columns match 'z_\\*'"):
        open_source(path, logits="z_*")


def test_wrong_column_types(tmp_path):
    path = write_dataset(
        tmp_path / "d.parquet",
        random_logits(3, 2),
        [0.0, 1.0, 0.0],
        columns={"s": ["a", "b", "c"], "ints": pa.array([[1, 2]] * 3, pa.list_(pa.int32()))},
    )
    with pytest.raises(XentInputError, match="target column 'target' has type double"):
        open_source(path)
    with pytest.raises(XentInputError, match="logits column 's' has type string"):
        open_source(path, logits="s", target=None)
    with pytest.raises(XentInputError, match="holds int32 values"):
        open_source(path, logits="ints", target=None)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["list", "large_list"])
def test_ragged_row_names_file_and_row(tmp_path, fmt, layout, small_units):
    rows = [[0.0, 1.0, 2.0]] * 13 + [[1.0, 2.0]] + [[0.0, 1.0, 2.0]] * 3
    typ = pa.list_(pa.float32()) if layout == "list" else pa.large_list(pa.float32())
    table = pa.table({"logits": pa.array(rows, typ), "target": np.zeros(17, np.int64)})
    path = write_table(tmp_path / "d", table, fmt, row_group_rows=5)
    src = open_source(path)
    assert src.num_classes == 3
    with pytest.raises(XentInputError) as err:
        list(src.iter_chunks(chunk_rows=4))
    assert str(err.value) == f"{path}: ragged logits: row has 2 values, expected 3 (row 13)"
    assert err.value.row == 13 and err.value.file == path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "wide"])
def test_null_logit_row(tmp_path, fmt, layout):
    x = random_logits(8, 3)
    if layout == "wide":
        cols = {f"logit_{j}": pa.array(x[:, j]) for j in range(3)}
        cols["logit_1"] = pa.array(
            [None if i == 6 else v for i, v in enumerate(x[:, 1])], pa.float32()
        )
        table = pa.table({**cols, "target": np.zeros(8, np.int64)})
    else:
        typ = pa.list_(pa.float32(), 3) if layout == "fixed_size_list" else pa.list_(pa.float32())
        rows = [None if i == 6 else list(r) for i, r in enumerate(x)]
        table = pa.table({"logits": pa.array(rows, typ), "target": np.zeros(8, np.int64)})
    path = write_table(tmp_path / "d", table, fmt, row_group_rows=4)
    with pytest.raises(XentInputError, match="null") as err:
        list(open_source(path, logits=logits_arg(layout)).iter_chunks(chunk_rows=3))
    assert err.value.row == 6 and err.value.file == path


def test_null_value_inside_a_row(tmp_path):
    rows = [[0.0, 1.0], [2.0, None], [1.0, 1.0]]
    table = pa.table({"logits": pa.array(rows, pa.list_(pa.float32(), 2)), "target": [0, 1, 0]})
    path = write_table(tmp_path / "d.parquet", table)
    with pytest.raises(XentInputError, match="null value in logits") as err:
        list(open_source(path).iter_chunks())
    assert err.value.row == 1


@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "wide"])
def test_classes_must_agree_across_files(tmp_path, layout):
    a = write_dataset(tmp_path / "a.parquet", random_logits(3, 4), [0, 1, 2], layout=layout)
    b = write_dataset(tmp_path / "b.parquet", random_logits(3, 5), [0, 1, 2], layout=layout)
    with pytest.raises(XentInputError, match="has 5 classes, but .*a.parquet has 4") as err:
        open_source([a, b], logits=logits_arg(layout))
    assert str(err.value).startswith(b)


def test_dtypes_must_agree_across_files(tmp_path):
    a = write_dataset(tmp_path / "a.parquet", random_logits(3, 4), [0, 1, 2])
    b = write_dataset(tmp_path / "b.parquet", random_logits(3, 4, "float16"), [0, 1, 2])
    with pytest.raises(XentInputError, match="float16.*float32"):
        open_source([a, b])


def test_tensor_must_be_one_dimensional(tmp_path):
    typ = pa.fixed_shape_tensor(pa.float32(), [2, 3])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(12, np.float32)), 6)
    table = pa.table({"logits": pa.ExtensionArray.from_storage(typ, storage), "target": [0, 1]})
    path = write_table(tmp_path / "d.arrow", table, "arrow-file")
    with pytest.raises(XentInputError, match=r"shape \[2, 3\]"):
        open_source(path)


# -- empty inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_file_yields_no_chunks(tmp_path, fmt):
    path = write_dataset(
        tmp_path / "d", np.zeros((0, 6), np.float32), np.zeros(0, np.int64), fmt=fmt
    )
    src = open_source(path)
    assert src.num_classes == 6
    assert list(src.iter_chunks()) == []
    assert src.num_rows == 0


def test_empty_file_among_others(tmp_path):
    x = random_logits(5, 3)
    a = write_dataset(tmp_path / "a.parquet", x, np.zeros(5, np.int64), layout="list")
    b = write_dataset(tmp_path / "b.parquet", x[:0], np.zeros(0, np.int64), layout="list")
    src = open_source([b, a])
    assert src.num_classes == 3
    chunks = list(src.iter_chunks())
    assert len(chunks) == 1 and chunks[0].file == a and chunks[0].row == 0


# -- wide --------------------------------------------------------------------------------


def test_wide_uses_schema_order_and_skips_other_columns(tmp_path):
    x = random_logits(4, 12)
    path = write_dataset(tmp_path / "d.arrow", x, [0, 1, 2, 3], layout="wide", fmt="arrow-file")
    src = open_source(path, logits="logit_*")
    assert src.num_classes == 12  # logit_10, logit_11 follow logit_9
    _, logits, _ = read_all(src)
    np.testing.assert_array_equal(logits, x)
    assert logits.flags.c_contiguous
    # A glob that also matches the target column leaves the target out.
    src = open_source(path, logits="*")
    assert src.num_classes == 12


def test_wide_columns_must_share_a_type(tmp_path):
    table = pa.table(
        {"l0": pa.array([1.0], pa.float32()), "l1": pa.array([1.0], pa.float64()), "target": [0]}
    )
    path = write_table(tmp_path / "d.parquet", table)
    with pytest.raises(XentInputError, match="share one type"):
        open_source(path, logits="l*")


# -- fragments ---------------------------------------------------------------------------


def test_fragments_cover_all_rows_once(tmp_path):
    x = random_logits(47, 3)
    t = np.arange(47) % 3
    a = write_dataset(tmp_path / "a.parquet", x[:25], t[:25], row_group_rows=4)
    b = write_dataset(tmp_path / "b.arrows", x[25:35], t[25:35], fmt="arrow-stream")
    c = write_dataset(tmp_path / "c.parquet", x[35:], t[35:], row_group_rows=5)
    src = open_source([a, b, c], keep=["target"])
    frags = src.fragments(max_rows=10)
    assert frags == pickle.loads(pickle.dumps(frags))
    assert [f.first_row for f in frags] == list(np.cumsum([0] + [f.rows for f in frags[:-1]]))
    assert sum(f.rows for f in frags) == 47
    assert all(f.rows <= 10 for f in frags)
    seen = np.zeros(47, int)
    for frag in frags:
        part = open_fragment(frag, keep=["target"])
        for chunk in part.iter_chunks(chunk_rows=3):
            rows = slice(chunk.row, chunk.row + len(chunk.logits))
            np.testing.assert_array_equal(chunk.logits, x[rows])
            np.testing.assert_array_equal(chunk.target, t[rows])
            first_in_file = {a: 0, b: 25, c: 35}[chunk.file]
            assert chunk.file_row == chunk.row - first_in_file
            seen[rows] += 1
    assert (seen == 1).all()
    whole = src.fragments()
    assert [(f.path, f.row_groups, f.first_row, f.rows) for f in whole] == [
        (a, None, 0, 25),
        (b, None, 25, 10),
        (c, None, 35, 12),
    ]


# -- describe ----------------------------------------------------------------------------


def test_describe(tmp_path):
    path = write_dataset(
        tmp_path / "d.parquet", random_logits(6, 4, "float16"), [0, 1, 2, 3, 0, 1], row_group_rows=4
    )
    d = open_source(path).describe()
    assert d["rows"] == 6 and d["classes"] == 4 and d["storage"] == "float16"
    assert d["layout"] == "fixed_size_list" and d["format"] == "parquet"
    assert d["files"][0]["row_groups"] == 2 and d["files"][0]["bytes"] == os.path.getsize(path)
    assert d["target_type"] == "int64" and d["soft_targets"] is False
    import json

    json.dumps(d)


def test_reads_only_needed_columns(tmp_path, monkeypatch):
    path = write_dataset(
        tmp_path / "d.parquet", random_logits(4, 2), [0, 1, 0, 1], columns={"big": ["x" * 10] * 4}
    )
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, columns=None, **kw):
        seen.append(columns)
        return real(self, *args, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    list(open_source(path).iter_chunks())
    assert seen == [["logits", "target"]]


def test_float16_logits_are_float16_not_copies(tmp_path):
    x = random_logits(10, 4, "float16")
    path = write_dataset(tmp_path / "d.arrow", x, np.zeros(10, np.int64), fmt="arrow-file")
    chunk = next(open_source(path).iter_chunks())
    assert chunk.logits.dtype == np.float16 and not chunk.logits.flags.owndata
    bf = float32_to_bf16_bits(np.ones(3, np.float32))
    assert bf.dtype == np.uint16


# -- read-ahead machinery ----------------------------------------------------------------


@pytest.mark.parametrize("readahead", [1, 2, 4])
def test_ordered_keeps_order_and_bounds_jobs_in_flight(readahead):
    import time

    pulled = []

    def jobs():
        for i in range(20):
            pulled.append(i)

            def job(i=i):
                time.sleep(0.002 * (i % 3))  # finish out of order
                return [i]

            yield 0, job

    got = []
    for k, (_, result) in enumerate(ordered(jobs(), readahead)):
        assert len(pulled) <= k + 1 + readahead  # memory bound: never more in flight
        got += result
    assert got == list(range(20))


@pytest.mark.parametrize("fmt", ["arrow-stream", "parquet"])
def test_abandoning_iteration_does_not_hang(tmp_path, fmt, small_units):
    x = random_logits(60, 3)
    path = write_dataset(tmp_path / "d", x, np.zeros(60, np.int64), fmt=fmt, row_group_rows=30)
    it = open_source(path).iter_chunks(chunk_rows=2, readahead=2)
    first = next(it)
    np.testing.assert_array_equal(first.logits, x[:2])
    it.close()  # shuts the pool down; serial jobs still queued must not deadlock
    assert not [t for t in threading.enumerate() if t.name.startswith("xent-read")]


# -- Parquet decoding pipeline -----------------------------------------------------------


@pytest.mark.parametrize("readahead", [0, 1, 2, 3])
def test_parquet_readahead_is_bounded(tmp_path, monkeypatch, small_units, readahead):
    # Decoders must stay within `readahead` chunks of the caller, whatever the row-group
    # size: memory is chunk size x read-ahead, never row group or file size.
    monkeypatch.setattr(parquet_pipeline, "_MIN_AHEAD_BYTES", 1)
    x = random_logits(120, 16)
    path = write_dataset(tmp_path / "d.parquet", x, np.zeros(120, np.int64), row_group_rows=40)
    lock = threading.Lock()
    decoded = [0]
    real = ParquetReader.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            assert batch.num_rows == 1  # small_units: one-row batches
            with lock:
                decoded[0] += batch.num_rows
            yield batch

    monkeypatch.setattr(ParquetReader, "iter_batches", spy)
    leads, got = [], []
    for chunk in open_source(path).iter_chunks(chunk_rows=4, readahead=readahead):
        time.sleep(0.005)  # a slow caller: decoders get as far ahead as they may
        with lock:
            leads.append(decoded[0] - (chunk.row + 4))
        got.append(chunk.logits.copy())
    np.testing.assert_array_equal(np.concatenate(got), x)
    # Besides the caller's chunk: `readahead` chunks, and the batch each decoder holds.
    assert max(leads) <= readahead * 4 + max(readahead, 1)
    if readahead:
        assert max(leads) >= 4


@pytest.mark.parametrize("readahead", [0, 2])
def test_parquet_chunk_buffers_are_reused_only_when_released(
    tmp_path, monkeypatch, small_units, readahead
):
    monkeypatch.setattr(parquet_pipeline, "_MIN_AHEAD_BYTES", 1)
    x = random_logits(200, 8)
    path = write_dataset(tmp_path / "d.parquet", x, np.zeros(200, np.int64), row_group_rows=30)
    src = open_source(path)

    def address(a):
        return a.__array_interface__["data"][0]

    held = list(src.iter_chunks(chunk_rows=10, readahead=readahead))
    np.testing.assert_array_equal(np.concatenate([c.logits for c in held]), x)
    assert len({address(c.logits) for c in held}) == 20
    del held
    seen = set()
    kept = None
    for chunk in src.iter_chunks(chunk_rows=10, readahead=readahead):
        np.testing.assert_array_equal(chunk.logits, x[chunk.row : chunk.row + 10])
        seen.add(address(chunk.logits))
        if chunk.row == 30:
            kept = chunk.logits[2:5, 1:]  # a view outlives its chunk: its memory stays
    np.testing.assert_array_equal(kept, x[32:35, 1:])
    assert len(seen) <= readahead + 3


def test_chunk_buffers_free_only_unreachable_memory():
    buffers = Buffers(keep=4)
    a = buffers.empty((10, 3), np.float32)
    a[:] = 1
    views = [a[2:5], memoryview(a), a.reshape(-1)[4:]]
    del a
    for _ in views:
        gc.collect()
        b = buffers.empty((10, 3), np.float32)
        b[:] = 2  # must not land in memory a view still reaches
        assert np.asarray(views[-1]).min() == 1
        views.pop()
    gc.collect()
    c = buffers.empty((5, 3), np.float32)  # the first buffer is free now: taken again
    assert not buffers._free and c.flags.writeable
    buffers.close()


@pytest.mark.parametrize("readahead", [0, 1, 3])
@pytest.mark.parametrize("chunk_rows", [3, 20])
def test_first_bad_row_is_reported_whichever_decoder_fails_first(
    tmp_path, monkeypatch, small_units, readahead, chunk_rows
):
    rows = [[0.0, 1.0, 2.0]] * 40
    rows[8] = [1.0, 2.0]  # row group 0
    rows[13] = [1.0]  # row group 1: same 20-row chunk as row 8
    rows[33] = [1.0, 2.0, 3.0, 4.0]  # row group 3
    table = pa.table({"logits": pa.array(rows, pa.list_(pa.float32())), "target": [0] * 40})
    path = write_table(tmp_path / "d.parquet", table, "parquet", row_group_rows=10)
    real = ParquetReader.iter_batches

    def slow_first_group(self, groups, *args, **kwargs):
        for batch in real(self, groups, *args, **kwargs):
            if groups[0] == 0:
                time.sleep(0.002)  # row group 1 fails first when decoded alongside
            yield batch

    monkeypatch.setattr(ParquetReader, "iter_batches", slow_first_group)
    for _ in range(3):
        with pytest.raises(XentInputError) as err:
            list(open_source(path).iter_chunks(chunk_rows=chunk_rows, readahead=readahead))
        assert err.value.row == 8


@pytest.mark.parametrize("readahead", [0, 1, 3])
def test_error_in_a_chunk_another_decoder_is_still_filling(
    tmp_path, monkeypatch, small_units, readahead
):
    # Row group 1 fails while row group 0, slower, still fills the same (only) chunk:
    # its last rows must wake the caller to raise.
    rows = [[0.0, 1.0, 2.0]] * 40
    rows[13] = [1.0]
    table = pa.table({"logits": pa.array(rows, pa.list_(pa.float32())), "target": [0] * 40})
    path = write_table(tmp_path / "d.parquet", table, "parquet", row_group_rows=10)
    real = ParquetReader.iter_batches

    def slow_first_group(self, groups, *args, **kwargs):
        for batch in real(self, groups, *args, **kwargs):
            if groups[0] == 0:
                time.sleep(0.002)
            yield batch

    monkeypatch.setattr(ParquetReader, "iter_batches", slow_first_group)
    with pytest.raises(XentInputError) as err:
        list(open_source(path).iter_chunks(chunk_rows=40, readahead=readahead))
    assert err.value.row == 13


@pytest.mark.parametrize("readahead", [0, 2])
def test_corrupt_parquet_page_raises_with_the_file(tmp_path, small_units, readahead):
    x = random_logits(40, 8)
    path = write_dataset(tmp_path / "d.parquet", x, np.zeros(40, np.int64), row_group_rows=10)
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    offset = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(open(path, "rb").read())
    data[offset : offset + 16] = b"\xff" * 16  # the page header
    open(path, "wb").write(bytes(data))
    got = []
    with pytest.raises(XentInputError) as err:
        for chunk in open_source(path).iter_chunks(chunk_rows=5, readahead=readahead):
            got.append(chunk.logits.copy())
    assert str(path) in str(err.value)
    np.testing.assert_array_equal(np.concatenate(got), x[:20])  # what precedes is read
