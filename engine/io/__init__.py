"""Reading logit datasets (sources) and writing results (sinks): the io layer's front door.

A source is one or more Parquet files, Arrow IPC files (Feather v2) or Arrow IPC streams,
given as files, directories or globs, as local paths or pyarrow filesystem URIs
(`s3://bucket/prefix/`, `gs://...`, `file:///abs/path`). `open_source` reads only footers
and schemas; `Source.iter_chunks` then yields `Chunk`s whose `logits` is a 2-D NumPy view
of the Arrow buffer whenever the layout allows it, reading ahead on a small thread pool so
that decoding overlaps the caller's computation. Memory stays bounded by chunk size times
read-ahead, never by file size. Every problem a user can cause raises `XentInputError`
with the file (and row, numbered from 0 within its file).

Modules, lowest first: records (FileInfo, Chunk, Fragment), paths (finding files, format
from magic bytes), formats (per-format readers, the ordered read pool), layouts (which
columns, stored how), decode (Arrow -> NumPy), parquet (the Parquet chunk pipeline),
source (`Source`, `open_source`), fragments (`open_fragment`, for Dask), sinks (outputs).
"""

from engine.io import sinks
from engine.io.decode import index_targets, list_matrix
from engine.io.fragments import open_fragment
from engine.io.layouts import detect_logits_layout, detect_target_layout
from engine.io.paths import DATA_SUFFIXES, detect_format, expand_paths
from engine.io.records import (
    DEFAULT_CHUNK_BYTES,
    FORMATS,
    LAYOUTS,
    NULL_TARGET,
    Chunk,
    FileInfo,
    Fragment,
)
from engine.io.sinks import PartsWriter, Sink, grad_table, open_sink, score_table
from engine.io.source import Source, open_source

__all__ = [
    "DATA_SUFFIXES",
    "DEFAULT_CHUNK_BYTES",
    "FORMATS",
    "LAYOUTS",
    "NULL_TARGET",
    "Chunk",
    "FileInfo",
    "Fragment",
    "PartsWriter",
    "Sink",
    "Source",
    "detect_format",
    "detect_logits_layout",
    "detect_target_layout",
    "expand_paths",
    "grad_table",
    "index_targets",
    "list_matrix",
    "open_fragment",
    "open_sink",
    "open_source",
    "score_table",
    "sinks",
]
