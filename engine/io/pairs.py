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
        indices=cut(chunk.indices),
        lse=cut(chunk.lse),
    )


def rows_between(chunks, start: int, stop: int) -> Iterator[Chunk]:
    """The parts of ``chunks`` (in row order) that hold global rows [start, stop)."""
    for chunk in chunks:
        lo = max(start, chunk.row)
        hi = min(stop, chunk.row + chunk.num_rows)
        if hi > lo:
            yield slice_chunk(chunk, lo - chunk.row, hi - chunk.row)
        if chunk.row + chunk.num_rows >= stop:
            return


def paired_chunks(
    base: Source, candidate: Source, chunk_rows: int
) -> Iterator[tuple[Chunk, Chunk]]:
    """(base chunk, candidate chunk) pairs over the same global rows, in order.

    A side that ends first is an error naming both files and row counts (streams, whose
    row counts are known only at their end, are checked here rather than up front).
    """
    yield from pair_streams(
        base.iter_chunks(chunk_rows=chunk_rows),
        candidate.iter_chunks(chunk_rows=chunk_rows),
        base.files[0].path,
        candidate.files[0].path,
    )


def pair_streams(left, right, left_name: str, right_name: str):
    """Pairs of two chunk iterators over the same rows, cut where their edges differ."""
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
                rest += sum(c.num_rows for c in (left if a is not None else right))
                counts = (rows + rest, rows) if a is not None else (rows, rows + rest)
                raise XentInputError(
                    f"the two sources have different row counts: {left_name} has "
                    f"{counts[0]}, {right_name} has {counts[1]}; compare pairs rows by "
                    "position",
                    file=left_name if a is not None else right_name,
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
