"""Finding the files of a source: paths, directories, globs and pyarrow filesystem URIs;
reading their first bytes to tell Parquet from Arrow; the one wording of read errors."""

from __future__ import annotations

import fnmatch
import glob
import os
import threading
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from engine.errors import XentInputError

# Suffixes that mark a file inside a directory as data even when its bytes are not
# recognised, so that a corrupt part raises instead of being skipped silently.
DATA_SUFFIXES = (".parquet", ".pq", ".parq", ".arrow", ".feather", ".ipc", ".arrows")
_GLOB_CHARS = "*?["
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_LLAMA_KLD_MAGIC = b"_logits_"  # llama.cpp --kl-divergence-base files (engine/io/llama.py)
_STREAM_CONTINUATION = b"\xff\xff\xff\xff"

# --------------------------------------------------------------------------------------
# Finding files and their format
# --------------------------------------------------------------------------------------


def is_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _hidden(name: str) -> bool:
    # Writers (Spark, Dask, pyarrow datasets, we) keep metadata and temp files under these.
    return name.startswith((".", "_"))


def _is_uri(path: str) -> bool:
    return "://" in path


# URI -> (filesystem, path within it). Filled by expand_paths for the files it lists (so
# that a directory of many files builds one filesystem) and by locate; bounded, so that
# a long-lived process does not grow it without end.
_LOCATIONS: dict[str, tuple[pafs.FileSystem, str]] = {}
_LOCATIONS_LOCK = threading.Lock()
_MAX_LOCATIONS = 4096


def _remember(uri: str, fs: pafs.FileSystem, path: str) -> None:
    with _LOCATIONS_LOCK:
        if len(_LOCATIONS) >= _MAX_LOCATIONS:
            _LOCATIONS.clear()
        _LOCATIONS[uri] = (fs, path)


def _resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a URI; XentInputError naming the URI when pyarrow refuses."""
    with _LOCATIONS_LOCK:
        found = _LOCATIONS.get(uri)
    if found is not None:
        return found
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except ARROW_ERRORS as e:
        raise unreadable(uri, e, "cannot open URI") from None
    _remember(uri, fs, path)
    return fs, path


def locate(path: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for a URI; (None, path) for a local path."""
    if _is_uri(path):
        return _resolve_uri(path)
    return None, path


def open_random(path: str):
    """A random-access file: a memory map for local paths, else the filesystem's file."""
    fs, where = locate(path)
    return pa.memory_map(where) if fs is None else fs.open_input_file(where)


def file_size(path: str) -> int:
    fs, where = locate(path)
    if fs is None:
        return os.path.getsize(where)
    try:
        return int(fs.get_file_info(where).size or 0)
    except ARROW_ERRORS as e:
        raise unreadable(path, e) from None


def read_magic(path: str) -> bytes:
    try:
        fs, where = locate(path)
        if fs is not None:
            with fs.open_input_file(where) as f:
                return f.read(8)
        with open(where, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise XentInputError(f"cannot read: {e.strerror or e}", file=path) from None
    except pa.ArrowException as e:
        raise unreadable(path, e) from None


def _looks_like_data(path: str) -> bool:
    """Whether a file found by a directory scan or glob is one of ours."""
    if path.lower().endswith(DATA_SUFFIXES):
        return True
    head = read_magic(path)
    return head.startswith(
        (_PARQUET_MAGIC, _ARROW_FILE_MAGIC, _LLAMA_KLD_MAGIC, _STREAM_CONTINUATION)
    )


def _scan_directory(path: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        for name in files:
            full = os.path.join(root, name)
            if not _hidden(name) and os.path.isfile(full) and _looks_like_data(full):
                found.append(full)
    return sorted(found, key=lambda p: os.path.relpath(p, path))


def _split_query(uri: str) -> tuple[str, str]:
    """('scheme://.../path', '?query' or '')."""
    base, sep, query = uri.partition("?")
    return base, sep + query


def _list_uri(base: str, query: str) -> list[tuple[str, str]]:
    """(path relative to `base`, URI) of the visible files under the directory URI
    `base` (without its query), recursively, sorted by relative path."""
    fs, root = _resolve_uri(base + query)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except ARROW_ERRORS as e:
        raise unreadable(base + query, e, "cannot list") from None
    prefix = root.rstrip("/") + "/" if root.rstrip("/") else root
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.startswith(prefix):
            continue
        rel = info.path[len(prefix) :]
        if any(_hidden(part) for part in rel.split("/")):
            continue
        uri = base.rstrip("/") + "/" + rel + query
        _remember(uri, fs, info.path)
        out.append((rel, uri))
    return sorted(out)


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Whether the path `parts`, or a directory above it, matches the glob `pattern`
    (split on '/'): '*' stays within a name, '**' spans directories, as in glob.glob."""
    if not pattern:
        return True  # a matched directory takes in everything below it
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and (
        fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])
    )


def _expand_uri(uri: str) -> list[str]:
    """Files named by a URI: a file, a directory (scanned recursively) or a glob."""
    base, query = _split_query(uri)
    first = min((base.index(c) for c in _GLOB_CHARS if c in base), default=None)
    scheme_end = base.index("://") + 3
    if first is not None and first > scheme_end:
        cut = base.rfind("/", scheme_end, first)
        if cut < 0:
            raise XentInputError("a glob needs a directory before it", file=uri)
        pattern = [p for p in base[cut + 1 :].split("/") if p]
        listing = _list_uri(base[: cut + 1], query)
        matches = [
            u for rel, u in listing if _glob_match(rel.split("/"), pattern) and _looks_like_data(u)
        ]
        if not matches:
            raise XentInputError("no Parquet or Arrow files match this pattern", file=uri)
        return matches
    fs, path = _resolve_uri(uri)
    try:
        kind = fs.get_file_info(path).type
    except ARROW_ERRORS as e:
        raise unreadable(uri, e) from None
    if kind == pafs.FileType.Directory:
        found = [u for _, u in _list_uri(base, query) if _looks_like_data(u)]
        if not found:
            raise XentInputError("directory holds no Parquet or Arrow files", file=uri)
        return found
    if kind == pafs.FileType.NotFound:
        raise XentInputError("no such file or directory", file=uri)
    return [uri]


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by `paths` (files, directories scanned recursively, globs), in order.

    A path containing '://' is a pyarrow filesystem URI; the files it names are returned
    as URIs (so that they stay picklable and readable by remote workers)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if _is_uri(p):
            out.extend(_expand_uri(p))
        elif os.path.isdir(p):
            found = _scan_directory(p)
            if not found:
                raise XentInputError("directory holds no Parquet or Arrow files", file=p)
            out.extend(found)
        elif os.path.exists(p):
            out.append(p)
        elif is_glob(p):
            matches = []
            for m in sorted(glob.glob(p, recursive=True)):
                if os.path.isdir(m):
                    matches.extend(_scan_directory(m))
                elif not _hidden(os.path.basename(m)) and _looks_like_data(m):
                    matches.append(m)
            if not matches:
                raise XentInputError("no Parquet or Arrow files match this pattern", file=p)
            out.extend(matches)
        else:
            raise XentInputError("no such file or directory", file=p)
    if not out:
        raise XentInputError("no input files given")
    return out


def detect_format(path: str) -> str:
    """'parquet', 'arrow-file' or 'llama-kld' from the magic bytes; anything else may be a
    stream.

    IPC streams have no magic (modern ones open with a 0xFFFFFFFF continuation marker,
    old ones with a length), so the stream reader is left to accept or refuse them.
    """
    head = read_magic(path)
    if not head:
        raise XentInputError("empty file (0 bytes), not Parquet or Arrow", file=path)
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if head.startswith(_ARROW_FILE_MAGIC):
        return "arrow-file"
    if head.startswith(_LLAMA_KLD_MAGIC):
        return "llama-kld"
    return "arrow-stream"


def unreadable(path: str, err: BaseException, what: str = "cannot read") -> XentInputError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return XentInputError(f"{what} ({text})", file=path)


ARROW_ERRORS = (pa.ArrowException, OSError)
