"""What the commands print and write: tables for people, JSON for scripts.

Metric tables, the per-group table, the timing line, bytes and seconds; JSON values
(NumPy converted, NaN/inf as null) and the JSON result file, written atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import click

from engine.atomic import AtomicPath
from engine.commands.errors import XentCliError, one_line
from engine.progress import TerminalBar, format_seconds, stderr_is_terminal

__all__ = ["format_seconds"]


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str):
    """A TerminalBar (or False) for the engine's ``progress=``; the line is ended on exit."""
    if not enabled:
        yield False
        return
    bar = TerminalBar(label)
    try:
        yield bar
    finally:
        bar.close()


def want_progress(no_progress: bool, as_json: bool) -> bool:
    return not no_progress and not as_json and stderr_is_terminal()


class JsonFile:
    """A JSON result file written atomically: the temporary file is created up front
    (an unwritable place fails before any work), renamed into place by `commit`, and
    removed on any exception, Ctrl-C included (use as a context manager)."""

    def __init__(self, path: str | None):
        self.path = path
        self.target: AtomicPath | None = None
        if path is None:
            return
        if os.path.isdir(path):
            raise XentCliError(f"{path}: is a directory; give a file name for the JSON output")
        try:
            self.target = AtomicPath(path, create=True)
        except OSError as e:
            raise XentCliError(f"{path}: cannot write ({e.strerror or e})") from None

    def commit(self, data) -> None:
        if self.target is None:
            return
        with open(self.target.temp, "w") as f:
            f.write(to_json(data) + "\n")
        self.target.commit()

    def discard(self) -> None:
        if self.target is not None:
            self.target.discard()

    def __enter__(self) -> JsonFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.discard()
        return False


def jsonable(value):
    """Plain JSON values: NumPy scalars/arrays converted, NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def to_json(data) -> str:
    return json.dumps(jsonable(data), indent=2, allow_nan=False)


def report_dict(report) -> dict:
    return jsonable(report.to_dict())


def print_warnings(report) -> None:
    for w in getattr(report, "warnings", None) or ():
        click.echo(f"Warning: {one_line(w)}", err=True)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def num(v, spec: str = ".6f") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if spec.endswith("f") and abs(v) >= 1e7:
            return f"{v:.4g}"
        return format(v, spec)
    return str(v)


# (key, label, format) of the metrics table, in order
METRIC_ROWS = (
    ("rows", "rows", ","),
    ("counted", "counted", ","),
    ("ignored", "ignored", ","),
    ("nan_rows", "nan rows", ","),
    ("classes", "classes", ","),
    ("topk", "stored top-k", ","),
    ("target_stored", "target stored", ","),
    ("target_outside_topk", "target not stored", ","),
    ("loss", "loss", ".6f"),
    ("nll", "nll (nats)", ".6f"),
    ("nll_lower_bound", "nll lower bound", ".6f"),
    ("perplexity", "perplexity", ".4f"),
    ("bits_per_token", "bits/token", ".6f"),
    ("accuracy", "accuracy", ".4f"),
    ("top_k_accuracy", "top-k", ".4f"),
    ("entropy", "entropy", ".6f"),
    ("entropy_lower_bound", "entropy lower bound", ".6f"),
    ("tail_mass", "mean tail mass", ".6f"),
    ("ece", "ece (15 bins)", ".4f"),
    ("kl", "kl(target‖pred)", ".6f"),
    ("z_loss", "z-loss term", ".6f"),
)


def metric_lines(d: dict, reduction: str = "mean") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, label, spec in METRIC_ROWS:
        if key not in d:
            continue
        value = d[key]
        if key == "top_k_accuracy":
            for k, acc in (value or {}).items():
                out.append((f"top-{k} accuracy", num(acc, spec)))
            continue
        if key in ("kl", "z_loss") and value is None:
            continue
        if key == "loss" and reduction == "sum":
            label = "loss (sum)"
        if key in ("nll", "loss") and "target_stored" in d:
            label += ", stored targets"
        out.append((label, num(value, spec)))
    return out


def timing_line(d: dict) -> str | None:
    if d.get("seconds") is None:
        return None
    parts = [f"{d['seconds']:.3f} s"]
    if d.get("rows_per_second") is not None:
        parts.append(f"{d['rows_per_second']:,.0f} rows/s")
    if d.get("gb_per_second") is not None:
        parts.append(f"{d['gb_per_second']:.2f} GB/s")
    return ", ".join(parts)


def format_table(rows: list[tuple[str, str]], indent: str = "  ") -> str:
    """Two aligned columns: labels left, values right-aligned."""
    if not rows:
        return ""
    lw = max(len(a) for a, _ in rows)
    vw = max(len(b) for _, b in rows)
    return "\n".join(f"{indent}{a:<{lw}}  {b:>{vw}}" for a, b in rows)


GROUP_COLUMNS = (
    ("rows", "rows", ","),
    ("counted", "counted", ","),
    ("loss", "loss", ".4f"),
    ("nll", "nll", ".4f"),
    ("perplexity", "ppl", ".3f"),
    ("accuracy", "acc", ".4f"),
    ("ece", "ece", ".4f"),
)
MAX_GROUPS_SHOWN = 50


def format_groups(groups: dict) -> str:
    keys = list(groups)
    first = groups[keys[0]] if keys else {}
    tk = list((first.get("top_k_accuracy") or {}).keys())
    head = ["group"] + [label for _, label, _ in GROUP_COLUMNS[:6]]
    head += [f"top-{k}" for k in tk] + ["ece"]
    table = [head]
    for g in keys[:MAX_GROUPS_SHOWN]:
        m = groups[g] or {}
        row = [str(g)] + [num(m.get(key), spec) for key, _, spec in GROUP_COLUMNS[:6]]
        row += [num((m.get("top_k_accuracy") or {}).get(k), ".4f") for k in tk]
        row.append(num(m.get("ece"), ".4f"))
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = []
    for r in table:
        pairs = zip(r[1:], widths[1:], strict=True)
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in pairs]
        lines.append("  " + "  ".join(cells).rstrip())
    if len(keys) > MAX_GROUPS_SHOWN:
        lines.append(f"  … {len(keys) - MAX_GROUPS_SHOWN} more groups (see --json)")
    return "\n".join(lines)


def format_report(d: dict, title: str, reduction: str = "mean") -> str:
    rows = metric_lines(d, reduction)
    lines = [title, format_table(rows)]
    t = timing_line(d)
    if t:
        lw = max([len(a) for a, _ in rows] + [4])
        lines.append(f"  {'time':<{lw}}  {t}")
    if d.get("groups"):
        lines.append("")
        lines.append(f"by group ({len(d['groups'])})")
        lines.append(format_groups(d["groups"]))
    return "\n".join(line for line in lines if line is not None)


def sources_label(sources) -> str:
    return sources[0] if len(sources) == 1 else f"{sources[0]} (+{len(sources) - 1} more)"


def written_line(verb: str, d: dict, output: str) -> str:
    """``scored 400 rows -> out.parquet (12.3 kB) in 0.1 s, ...``"""
    size = None
    if os.path.isfile(output):
        size = os.path.getsize(output)
    elif os.path.isdir(output):
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(output) for f in fs)
    rows = d.get("rows")
    text = f"{verb} {num(rows)} rows -> {output} ({format_bytes(size)})"
    t = timing_line(d)
    return f"{text} in {t}" if t else text


def gen_summary(res) -> str:
    target = "probability targets" if res.soft else "class targets"
    text = (
        f"wrote {res.rows:,} rows x {res.classes:,} classes ({res.dtype}, {res.layout}, "
        f"{res.format}, {target}) to {res.path}: {format_bytes(res.bytes)} "
        f"in {res.seconds:.1f} s"
    )
    if res.layout == "wide":
        text += "  (read it with --logits 'logit_*')"
    return text
