"""Opening one fragment of a source (a file or some of its row groups) on a Dask worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from engine.io.records import Fragment
from engine.io.source import Source, normalise_keep, open_entry


def open_fragment(
    fragment: Fragment,
    *,
    logits: str = "logits",
    target: str | None = "target",
    keep: Sequence[str] | str = (),
    group_by: str | None = None,
    logits_dtype: str | None = None,
    sparse=None,
) -> Source:
    """A Source over one fragment; chunk `row`s continue from `fragment.first_row`."""
    keep = normalise_keep(keep)
    entry = open_entry(fragment.path, logits, target, keep, group_by, logits_dtype, sparse)
    if fragment.row_groups is not None:
        reader = entry.reader
        entry.selection = tuple(fragment.row_groups)
        groups = fragment.row_groups
        entry.first_file_row = sum(reader.group_rows(g) for g in range(groups[0] if groups else 0))
        entry.info = replace(entry.info, rows=fragment.rows, row_groups=len(groups))
    return Source(
        [entry],
        logits=logits,
        target=target,
        keep=keep,
        group_by=group_by,
        logits_dtype=logits_dtype,
        first_row=fragment.first_row,
    )
