"""Reading logit datasets (sources) and writing results (sinks)."""

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
    "Source",
    "open_fragment",
    "open_source",
]
