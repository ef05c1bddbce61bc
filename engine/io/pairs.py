"""Two sources read in lockstep: pairs of chunks that hold the same rows of each.

Each side is read by its own pipeline (`Source.iter_chunks`, read-ahead included), so the
two may differ in format, layout, dtype, files and row groups. Where their chunk edges
differ, the longer chunk is cut (views, no copies), so memory stays bounded by the chunk
size of each side.
"""

from __future__ import annotations

from collections.abc import Iterator

from engine.errors import XentInputError
from engine.io.records import Chunk
from engine.io.source import Source


def slice_chunk(chunk: Chunk, start: int, stop: int) -> Chunk:
    """Rows [start, stop) of a chunk (numpy and Arrow views)."""
    if start == 0 and stop == chunk.num_rows:
        return chunk

    def cut(a):
        return None if a is None else a[start:stop]

    return Chunk(
        logits=cut(chunk.logits),
        target=cut(chunk.target),
        target_valid=cut(chunk.target_valid),
        keep=None if chunk.keep is None else chunk.keep.slice(start, stop - start),
        group=None if chunk.group is None else chunk.group.slice(start, stop - start),
        file=chunk.file,
        file_row=chunk.file_row + start,
        row=chunk.row + start,
    )


def paired_chunks(
    base: Source, candidate: Source, chunk_rows: int
) -> Iterator[tuple[Chunk, Chunk]]:
    """(base chunk, candidate chunk) pairs over the same global rows, in order.

    A side that ends first is an error naming both files and row counts (streams, whose
    row counts are known only at their end, are checked here rather than up front).
    """
    left = base.iter_chunks(chunk_rows=chunk_rows)
    right = candidate.iter_chunks(chunk_rows=chunk_rows)
    a = b = None
    ai = bi = 0  # rows of the current chunks already paired
    rows = 0
    while True:
        if a is None or ai == a.num_rows:
            a, ai = _next_nonempty(left), 0
        if b is None or bi == b.num_rows:
            b, bi = _next_nonempty(right), 0
        if a is None or b is None:
            if a is not None or b is not None:
                rest = a.num_rows - ai if a is not None else b.num_rows - bi
                _unequal(
                    base, candidate, rows, rest, left if a is not None else right, a is not None
                )
            return
        take = min(a.num_rows - ai, b.num_rows - bi)
        yield slice_chunk(a, ai, ai + take), slice_chunk(b, bi, bi + take)
        ai += take
        bi += take
        rows += take


def _next_nonempty(chunks):
    for chunk in chunks:
        if chunk.num_rows:
            return chunk
    return None


def _unequal(base, candidate, rows, rest, longer_chunks, base_longer):
    rest += sum(chunk.num_rows for chunk in longer_chunks)
    a_rows = rows + (rest if base_longer else 0)
    b_rows = rows + (0 if base_longer else rest)
    longer = base if base_longer else candidate
    raise XentInputError(
        f"the two sources have different row counts: {base.files[0].path} has {a_rows}, "
        f"{candidate.files[0].path} has {b_rows}; compare pairs rows by position",
        file=longer.files[0].path,
    )
