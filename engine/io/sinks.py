"""Output writers: per-row scores and gradients as Parquet or Arrow IPC files.

Outputs appear only complete: a sink writes to a temporary name beside the
target and renames it into place on `commit()`; `abort()` (or an exception, Ctrl-C
included, inside a `with` block) removes the temporary file. An existing output is
refused unless `overwrite=True`, before anything is written.

`PartsWriter` is the directory form for resumable and distributed jobs: one file per
part, written the same way, and a `_manifest.json` that records finished parts.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from engine import interrupt
from engine.atomic import is_temp_name, temp_path, write_text
from engine.errors import XentInputError, XentUsageError
from engine.io.layouts import CLASSES_METADATA_KEY, DEFAULT_TOPK_INDICES, DEFAULT_TOPK_VALUES
from engine.schema import row_stats_columns

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
GRAD_DTYPES = {"float32": np.float32, "float16": np.float16}


def output_format(path: str) -> str:
    """'arrow' for .arrow/.feather/.ipc, else 'parquet' (the default)."""
    return "arrow" if str(path).lower().endswith(ARROW_SUFFIXES) else "parquet"


def _write_error(path: str, err: OSError) -> XentInputError:
    return XentInputError(f"cannot write ({err.strerror or err})", file=path)


class Sink:
    """One output file written through a temporary name; use `open_sink`."""

    def __init__(self, path: str, *, overwrite: bool = False, schema: pa.Schema | None = None):
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self.format = output_format(self.path)
        self.schema = schema
        self.rows = 0
        self._writer = None
        self._state = "open"
        self._check_target()
        self.temp_path = temp_path(self.path)
        try:
            self._file = pa.OSFile(self.temp_path, "wb")
        except OSError as e:  # missing or unwritable directory: say so before any work
            raise _write_error(self.path, e) from None

    def _check_target(self) -> None:
        if os.path.isdir(self.path):
            raise XentInputError("is a directory; give a file name for the output", file=self.path)
        if os.path.exists(self.path) and not self.overwrite:
            raise XentInputError("exists; pass --overwrite to replace it", file=self.path)

    def _open_writer(self, schema: pa.Schema) -> None:
        if self.format == "arrow":
            self._writer = pa.ipc.new_file(self._file, schema)
        else:
            self._writer = pq.ParquetWriter(self._file, schema)
        self.schema = schema

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        """Append rows; the first write fixes the schema."""
        if self._state != "open":
            raise RuntimeError(f"sink for {self.path} is {self._state}")
        if self._writer is None:
            self._open_writer(data.schema)
        try:
            if isinstance(data, pa.RecordBatch):
                self._writer.write_batch(data)
            else:
                self._writer.write_table(data)
        except OSError as e:
            raise _write_error(self.path, e) from None
        self.rows += data.num_rows

    def commit(self) -> str:
        """Finish the file and rename it into place; returns the output path."""
        if self._state != "open":
            raise RuntimeError(f"sink for {self.path} is {self._state}")
        try:
            if self._writer is None:  # nothing written: still a valid (empty) file
                self._open_writer(self.schema if self.schema is not None else pa.schema([]))
            self._writer.close()
            self._file.close()
            # Someone may have created the output while we worked: still never clobber.
            self._check_target()
            interrupt.check()  # a Ctrl-C swallowed somewhere must still stop the commit
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return self.path

    def abort(self) -> None:
        """Drop everything written; the target is left as it was."""
        if self._state == "committed":
            return
        self._state = "aborted"
        for close in (getattr(self._writer, "close", None), self._file.close):
            try:
                if close is not None:
                    close()
            except Exception:
                pass
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:  # any exception, KeyboardInterrupt included: leave no partial output
            self.abort()
        return False

    def __del__(self):
        # A sink dropped without commit (a crash between chunks) must not leave a file.
        if getattr(self, "_state", None) == "open" and hasattr(self, "_file"):
            self.abort()


def open_sink(path, *, overwrite: bool = False, schema: pa.Schema | None = None) -> Sink:
    """A Sink for `path`: Parquet unless the suffix is .arrow/.feather/.ipc.

    `schema` is only used when nothing is written (an empty output keeps its columns).
    """
    return Sink(path, overwrite=overwrite, schema=schema)


# --------------------------------------------------------------------------------------
# Output tables
# --------------------------------------------------------------------------------------


def _with_keep(columns: list[tuple], keep: pa.Table | None) -> pa.Table:
    """Output columns ((name or pa.Field, array) pairs) and then the keep columns."""
    fields = [n if isinstance(n, pa.Field) else pa.field(n, a.type) for n, a in columns]
    names = [f.name for f in fields]
    arrays = [a for _, a in columns]
    if keep is not None:
        rows = len(arrays[0]) if arrays else keep.num_rows
        if keep.num_rows != rows:
            raise ValueError(f"keep has {keep.num_rows} rows, output has {rows}")
        for name in keep.column_names:
            if name in names:
                raise XentInputError(
                    f"--keep column '{name}' has the name of an output column; rename it"
                )
            names.append(name)
            fields.append(keep.schema.field(name))
            arrays.append(keep.column(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def score_table(
    stats: Mapping[str, np.ndarray], keep: pa.Table | None, soft: bool, topk=None
) -> pa.Table:
    """The `score` output: the per-row columns of engine.schema (plus kl for soft targets),
    ``topk`` columns when given (``topk_columns``), then the keep columns."""
    columns = []
    for column in row_stats_columns(soft):
        values = np.asarray(stats[column.name], dtype=column.numpy)
        columns.append((column.name, pa.array(values, type=column.arrow)))
    return _with_keep(columns + list(topk or ()), keep)


def topk_columns(indices: np.ndarray, logprobs: np.ndarray, classes: int) -> list[tuple]:
    """``--emit-topk``: (field, array) of topk_indices (int32) and topk_logprobs (float32),
    K per row, each field marked with ``xent.classes`` so that the file reads back as
    sparse top-k rows without --classes (SPEC §8)."""
    k = indices.shape[1]
    meta = {CLASSES_METADATA_KEY: str(int(classes)).encode()}
    out = []
    for name, values, arrow in (
        (DEFAULT_TOPK_INDICES, indices, pa.int32()),
        (DEFAULT_TOPK_VALUES, logprobs, pa.float32()),
    ):
        flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow)
        array = pa.FixedSizeListArray.from_arrays(flat, k)
        out.append((pa.field(name, array.type, metadata=meta), array))
    return out


def grad_column(grad: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """rows x C gradient as fixed_size_list<dtype>; no copy when already that dtype and
    C-contiguous (the Arrow array then references `grad`: write it before reusing it)."""
    if dtype not in GRAD_DTYPES:
        raise XentUsageError(f"grad dtype must be float32 or float16, got {dtype!r}")
    grad = np.asarray(grad)
    if grad.ndim != 2:
        raise ValueError(f"grad must be 2-D (rows x classes), got shape {grad.shape}")
    rows, classes = grad.shape
    flat = np.ascontiguousarray(grad, dtype=GRAD_DTYPES[dtype]).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), classes)


def grad_table(grad: np.ndarray, keep: pa.Table | None = None, dtype: str = "float32") -> pa.Table:
    """The `grad` output: column `grad` (fixed_size_list<float32|float16>) + keep columns."""
    return _with_keep([("grad", grad_column(grad, dtype))], keep)


# --------------------------------------------------------------------------------------
# Directory of parts
# --------------------------------------------------------------------------------------

MANIFEST = "_manifest.json"  # leading underscore: pyarrow datasets skip it
# Each part's metric sums, one small file per part (written once, not with every rewrite
# of the manifest, which would grow with the square of the part count).
METRICS_DIR = "_metrics"


def write_part_file(path: str, table: pa.Table) -> None:
    """Write one part through a temporary name: a retried part replaces, never doubles."""
    sink = Sink(path, overwrite=True)
    with sink:
        sink.write(table)


class PartsWriter:
    """Output directory of `part-00000.parquet` files plus `_manifest.json`.

    The manifest lists finished parts (file, rows, first_row) and is rewritten
    atomically after each one, so `completed()` after a crash tells `--resume` what is
    done. `resume=True` opens an existing output directory to continue it;
    `overwrite=True` first deletes the parts and manifest found there (nothing else).
    """

    def __init__(
        self,
        directory,
        *,
        overwrite: bool = False,
        resume: bool = False,
        suffix: str = ".parquet",
    ):
        self.directory = os.fspath(directory)
        self.suffix = suffix
        self._lock = threading.Lock()
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise XentInputError("exists and is not a directory", file=self.directory)
        existing = os.path.isdir(self.directory) and any(
            n == MANIFEST or n.startswith("part-") for n in os.listdir(self.directory)
        )
        if existing and not (overwrite or resume):
            raise XentInputError(
                "exists; pass --overwrite to replace it or --resume to continue it",
                file=self.directory,
            )
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise _write_error(self.directory, e) from None
        if existing and overwrite and not resume:
            for name in os.listdir(self.directory):
                if name == MANIFEST or name.startswith("part-"):
                    os.unlink(os.path.join(self.directory, name))
            shutil.rmtree(os.path.join(self.directory, METRICS_DIR), ignore_errors=True)
        if existing and (overwrite or resume):
            self._sweep_temporaries()
        self.manifest = self._load() if resume else None
        if self.manifest is None:
            self.manifest = {"format": "xent-parts", "version": 1, "complete": False}
            self.manifest.update({"total_rows": None, "parts": {}})
        if not os.access(self.directory, os.W_OK):
            raise XentInputError("cannot write (permission denied)", file=self.directory)

    def _sweep_temporaries(self) -> None:
        """Remove half-written parts a killed job left (``.part-*.tmp-*``): never data."""
        for name in os.listdir(self.directory):
            if name.startswith((".part-", f".{MANIFEST}")) and is_temp_name(name):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST)

    def _load(self) -> dict | None:
        try:
            with open(self.manifest_path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise XentInputError(f"unreadable manifest ({e})", file=self.manifest_path) from None
        if data.get("format") != "xent-parts" or not isinstance(data.get("parts"), dict):
            raise XentInputError("not an xent manifest", file=self.manifest_path)
        return data

    def part_path(self, index: int) -> str:
        return os.path.join(self.directory, f"part-{int(index):05d}{self.suffix}")

    def write_part(
        self,
        index: int,
        table: pa.Table,
        *,
        first_row: int | None = None,
        metrics: dict | None = None,
    ) -> str:
        """Write part `index` (temp + rename) and record it in the manifest."""
        path = self.part_path(index)
        write_part_file(path, table)
        self.record(index, table.num_rows, first_row, metrics=metrics)
        return path

    def record(
        self, index: int, rows: int, first_row: int | None = None, *, metrics: dict | None = None
    ) -> None:
        """Record a part written elsewhere (a Dask worker) as finished. ``metrics`` (plain
        JSON data: the part's metric sums) lets a resumed job report the whole output; it
        is on disk before the manifest lists the part."""
        if metrics is not None:
            write_text(self._metrics_path(index), json.dumps(metrics) + "\n")
        entry = {
            "file": os.path.basename(self.part_path(index)),
            "rows": int(rows),
            "first_row": None if first_row is None else int(first_row),
        }
        with self._lock:
            self.manifest["parts"][str(int(index))] = entry
            self._save()

    def _metrics_path(self, index: int) -> str:
        folder = os.path.join(self.directory, METRICS_DIR)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"part-{int(index):05d}.json")

    def part_metrics(self, index: int) -> dict | None:
        """The metric sums recorded with a finished part (None if none were)."""
        try:
            with open(self._metrics_path(index)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise XentInputError(f"unreadable part metrics ({e})", file=self.directory) from None

    def completed(self) -> dict[int, int]:
        """index -> rows of the parts the manifest lists whose file is present."""
        return {
            int(k): int(v["rows"])
            for k, v in self.manifest["parts"].items()
            if os.path.exists(os.path.join(self.directory, v["file"]))
        }

    def finalize(self, total_rows: int) -> None:
        """Mark the output complete."""
        with self._lock:
            self.manifest["complete"] = True
            self.manifest["total_rows"] = int(total_rows)
            self._save()

    def _save(self) -> None:
        parts = self.manifest["parts"]
        self.manifest["parts"] = {k: parts[k] for k in sorted(parts, key=int)}
        write_text(self.manifest_path, json.dumps(self.manifest, indent=1) + "\n")
