"""Reading logit datasets (sources) and writing results (sinks)."""

from engine.io.sinks import PartsWriter, Sink, grad_table, open_sink, score_table
from engine.io.sources import (
    NULL_TARGET,
    Chunk,
    FileInfo,
    Fragment,
    Source,
    open_fragment,
    open_source,
)

__all__ = [
    "NULL_TARGET",
    "Chunk",
    "FileInfo",
    "Fragment",
    "PartsWriter",
    "Sink",
    "Source",
    "grad_table",
    "open_fragment",
    "open_sink",
    "open_source",
    "score_table",
]
