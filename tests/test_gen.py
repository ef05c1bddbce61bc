"""engine.gen: synthetic datasets round-trip through pyarrow and the sources."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from engine import reference
from engine.dtypes import BF16_METADATA_KEY, BF16_METADATA_VALUE, bf16_bits_to_float32
from engine.errors import XentInputError
from engine.gen import default_row_group_rows, generate
from engine.io import open_source

ROWS, CLASSES = 300, 20
SUFFIX = {"parquet": ".parquet", "arrow": ".arrow", "arrow-stream": ".arrows"}


def read_back(path: str, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "arrow":
        return pa.ipc.open_file(pa.memory_map(path)).read_all()
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


def logits_matrix(table: pa.Table, layout: str, classes: int) -> np.ndarray:
    if layout == "wide":
        cols = [table.column(f"logit_{j}").to_numpy() for j in range(classes)]
        return np.stack(cols, axis=1)
    col = table.column("logits").combine_chunks()
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    return col.flatten().to_numpy().reshape(len(col), classes)


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "arrow-stream"])
@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "large_list", "tensor", "wide"])
def test_round_trip_layouts_and_formats(tmp_path, layout, fmt):
    path = tmp_path / f"d{SUFFIX[fmt]}"
    res = generate(path, rows=ROWS, classes=CLASSES, layout=layout, format=fmt, seed=3)
    assert (res.rows, res.classes, res.layout, res.format) == (ROWS, CLASSES, layout, fmt)
    assert res.bytes == os.path.getsize(path)
    table = read_back(str(path), fmt)
    assert table.num_rows == ROWS
    assert table.column("id").to_pylist() == list(range(ROWS))
    assert table.schema.field("target").type == pa.int64()
    x = logits_matrix(table, layout, CLASSES)
    assert x.shape == (ROWS, CLASSES) and x.dtype == np.float32
    assert np.isfinite(x).all()
    y = table.column("target").to_numpy()
    assert ((y >= 0) & (y < CLASSES)).all()
    expected = {"fixed_size_list": pa.types.is_fixed_size_list, "list": pa.types.is_list}
    if layout in expected:
        assert expected[layout](table.schema.field("logits").type)
    if layout == "tensor":
        assert table.schema.field("logits").type.extension_name == "arrow.fixed_shape_tensor"
    # and the engine's own reader agrees on what it is
    src = open_source(str(path), logits="logit_*" if layout == "wide" else "logits")
    want_layout = "fixed_shape_tensor" if layout == "tensor" else layout
    assert (src.layout, src.num_classes, src.storage) == (want_layout, CLASSES, "float32")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_dtypes(tmp_path, dtype):
    path = tmp_path / "d.parquet"
    generate(path, rows=100, classes=8, dtype=dtype, seed=1)
    f32 = tmp_path / "f32.parquet"
    generate(f32, rows=100, classes=8, dtype="float32", seed=1)
    table = pq.read_table(path)
    field = table.schema.field("logits")
    values = table.column("logits").combine_chunks().flatten().to_numpy().reshape(100, 8)
    ref = logits_matrix(pq.read_table(f32), "fixed_size_list", 8)
    if dtype == "bfloat16":
        assert field.type.value_type == pa.uint16()
        assert field.metadata[BF16_METADATA_KEY] == BF16_METADATA_VALUE
        decoded = bf16_bits_to_float32(values).reshape(100, 8)
        np.testing.assert_allclose(decoded, ref, rtol=2**-8)
        assert open_source(str(path)).storage == "bfloat16"
    else:
        assert values.dtype == np.dtype(dtype)
        np.testing.assert_allclose(values.astype(np.float32), ref, rtol=1e-3)


def test_soft_targets(tmp_path):
    path = tmp_path / "soft.arrow"
    generate(path, rows=50, classes=6, soft=True, format="arrow")
    table = read_back(str(path), "arrow")
    t = table.schema.field("target").type
    assert pa.types.is_fixed_size_list(t) and t.list_size == 6 and t.value_type == pa.float32()
    probs = table.column("target").combine_chunks().flatten().to_numpy().reshape(50, 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert open_source(str(path)).soft_targets


def test_ignore_fraction_and_structure(tmp_path):
    path = tmp_path / "d.parquet"
    generate(path, rows=4000, classes=100, ignore_frac=0.1, seed=7)
    table = pq.read_table(path)
    y = table.column("target").to_numpy()
    x = logits_matrix(table, "fixed_size_list", 100)
    ignored = y == -100
    assert 0.07 < ignored.mean() < 0.13
    yc, xc = y[~ignored], x[~ignored]
    accuracy = (xc.argmax(axis=1) == yc).mean()
    assert 0.5 < accuracy < 0.7  # a ~60% accurate classifier, not noise
    stats = reference.row_stats(xc[:500].astype(np.float64), yc[:500])
    assert 0.5 < stats["loss"].mean() < 3.0
    assert (stats["max_prob"] > 0.9).any()  # some confident rows
    assert (stats["target_rank"] >= 5).any()  # top-5 accuracy below 1


def test_row_groups_and_determinism(tmp_path):
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    generate(a, rows=350, classes=10, row_group_rows=100, seed=5)
    generate(b, rows=350, classes=10, row_group_rows=100, seed=5)
    generate(c, rows=350, classes=10, row_group_rows=100, seed=6)
    meta = pq.ParquetFile(a).metadata
    assert meta.num_row_groups == 4
    assert [meta.row_group(i).num_rows for i in range(4)] == [100, 100, 100, 50]
    assert pq.read_table(a).equals(pq.read_table(b))
    assert not pq.read_table(a).equals(pq.read_table(c))
    assert default_row_group_rows(1000) == 1024
    assert default_row_group_rows(32000) == 32  # ~4 MB groups for wide vocabularies


def test_existing_output_needs_overwrite(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"keep me")
    with pytest.raises(XentInputError, match="exists; pass --overwrite"):
        generate(path, rows=10, classes=3)
    assert path.read_bytes() == b"keep me"
    generate(path, rows=10, classes=3, overwrite=True)
    assert pq.read_table(path).num_rows == 10
    assert leftovers(tmp_path) == []


def test_interrupt_leaves_nothing(tmp_path):
    path = tmp_path / "d.parquet"

    def interrupt(rows, nbytes, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(path, rows=10, classes=3, progress=interrupt)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows": 0, "classes": 3}, "rows must be >= 1"),
        ({"rows": 5, "classes": 0}, "classes must be >= 1"),
        ({"rows": 5, "classes": 3, "layout": "ragged"}, "layout must be one of"),
        ({"rows": 5, "classes": 3, "dtype": "int8"}, "dtype must be one of"),
        ({"rows": 5, "classes": 3, "format": "csv"}, "format must be one of"),
        ({"rows": 5, "classes": 3, "ignore_frac": 1.5}, "between 0 and 1"),
        ({"rows": 5, "classes": 3, "soft": True, "ignore_frac": 0.1}, "never ignored"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / "d.parquet", **kwargs)
    assert os.listdir(tmp_path) == []


def test_unwritable_directory(tmp_path):
    with pytest.raises(XentInputError, match="cannot write"):
        generate(tmp_path / "missing" / "d.parquet", rows=5, classes=3)


def test_single_and_two_classes(tmp_path):
    for c in (1, 2):
        path = tmp_path / f"c{c}.parquet"
        generate(path, rows=200, classes=c, ignore_frac=0.1)
        x = logits_matrix(pq.read_table(path), "fixed_size_list", c)
        assert np.isfinite(x).all()
