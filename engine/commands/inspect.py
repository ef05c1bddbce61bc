"""`xent inspect`: format, layout, rows, classes, dtype and size; suspicious data."""

from __future__ import annotations

import re

import click

from engine.commands.errors import debug_option
from engine.commands.options import json_option, logits_dtype_option, sparse_options
from engine.commands.output import format_bytes, num, to_json


def format_inspect(info: dict) -> str:
    files = info["files"]
    rows: list[tuple[str, str]] = []
    if len(files) == 1:
        rows.append(("path", files[0]["path"]))
    else:
        rows.append(("files", f"{len(files)}: {files[0]['path']} … {files[-1]['path']}"))
    rows.append(("format", info["format"]))
    cols = info.get("logits") or []
    where = f"column '{cols[0]}'" if len(cols) == 1 else f"{len(cols)} columns {cols[0]}…"
    sp = info.get("sparse")
    if sp:
        over = "all classes" if sp["normalised_over"] == "all" else "the stored k only"
        what = "log-probs" if sp["kind"] == "logprobs" else "logits"
        where = f"columns '{sp['indices']}', '{sp['values']}'"
        rows.append(("layout", f"sparse top-{sp['k']} {what}, normalised over {over} ({where})"))
    else:
        rows.append(("layout", f"{info['layout']} ({where})"))
    rows.append(("rows", num(info.get("rows"))))
    rows.append(("classes", num(info.get("classes"))))
    rows.append(("dtype", str(info.get("storage"))))
    groups = [f.get("row_groups") for f in files]
    if all(g is not None for g in groups):
        rows.append(("row groups", num(sum(groups))))
    rows.append(("size", format_bytes(info.get("bytes"))))
    t = info.get("targets")
    if info.get("target") is None:
        rows.append(("target", "none (no 'target' column; name one with --target)"))
    elif info.get("soft_targets"):
        rows.append(("target", f"{info['target']} (probabilities, {info.get('target_type')})"))
    else:
        text = f"{info['target']} ({info.get('target_type')} class indices)"
        if t:
            text += f": {t['counted']:,} counted, {t['ignored']:,} ignored"
            if t["min"] is not None:
                text += f", classes {t['min']}..{t['max']}"
        rows.append(("target", text))
    s = info.get("sample") or {}
    if s.get("rows"):
        bits = [f"first {s['rows']:,} rows"]
        if s.get("min") is not None:
            bits.append(f"values {s['min']:.4g}..{s['max']:.4g}")
        bits.append(f"{s.get('nan_values', 0):,} NaN, {s.get('posinf_values', 0):,} +inf")
        if s.get("neginf_values"):
            bits.append(f"{s['neginf_values']:,} -inf (masked classes: fine)")
        if s.get("mean_tail_mass") is not None:
            bits.append(f"mean tail mass {s['mean_tail_mass']:.4g} (probability not stored)")
        rows.append(("sample", ", ".join(bits)))
    lw = max(len(a) for a, _ in rows)
    lines = [f"{a:<{lw}}  {b}" for a, b in rows]
    col_items = list(info.get("columns", {}).items())
    if col_items:
        shown = col_items if len(col_items) <= 12 else col_items[:10] + [("…", "")] + col_items[-1:]
        for i, (name, typ) in enumerate(shown):
            label = "columns" if i == 0 else ""
            text = f"{name}: {typ}" if typ else name
            if len(col_items) > 12 and i == 0:
                text += f"   ({len(col_items)} columns)"
            lines.append(f"{label:<{lw}}  {text}")
    ws = info.get("warnings") or []
    lines.append("")
    if ws:
        import textwrap

        lines.append(f"warnings ({len(ws)}):")
        for w in ws:
            w = re.sub(r"(--[\w-]+) (?=[\w-])", "\\1\u00a0", w)  # keep '--flag value' together
            wrapped = textwrap.wrap(
                w,
                88,
                initial_indent="  - ",
                subsequent_indent="    ",
                break_on_hyphens=False,
                break_long_words=False,
            )
            lines.extend(line.replace("\u00a0", " ") for line in wrapped)
    else:
        lines.append("no warnings")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--logits", default="logits", show_default=True, help="Logits column or glob.")
@click.option("--target", default=None, help="Target column (default: 'target' if present).")
@logits_dtype_option
@click.option("--ignore-index", type=int, default=-100, show_default=True)
@click.option(
    "--sample-rows",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Rows scanned for suspicious values (the first ones).",
)
@json_option
@sparse_options
@debug_option
def inspect_cmd(sources, logits, target, logits_dtype, ignore_index, sample_rows, as_json, **kw):
    """Format, layout, rows, classes, dtype and size; warns on suspicious data."""
    from engine.inspection import inspect_source
    from engine.jobs.spec import sparse_request

    sparse = sparse_request(dict(kw))
    info = inspect_source(sources, logits, target, logits_dtype, ignore_index, sample_rows, sparse)
    if as_json:
        click.echo(to_json(info))
    else:
        click.echo(format_inspect(info))
