"""`xent demo`: generate a sample dataset and run eval and score on it."""

from __future__ import annotations

import os
import shutil
import time
import warnings

import click

from engine.commands.errors import debug_option
from engine.commands.options import check_device, no_progress_option, threads_option
from engine.commands.output import (
    format_bytes,
    format_report,
    gen_summary,
    print_warnings,
    progress_bar,
    report_dict,
    want_progress,
    written_line,
)
from engine.threads import set_threads

DEMO_ROWS = 50_000
DEMO_CLASSES = 1000


def _best_time(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _torch_comparison(path: str, device: str) -> list[str]:
    """engine.cross_entropy vs torch.nn.functional.cross_entropy on the same array."""
    import numpy as np
    import pyarrow.parquet as pq

    import engine

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return ["torch is not installed: skipping the comparison (pip install torch)"]
    table = pq.read_table(path, columns=["logits", "target"])
    col = table.column("logits").combine_chunks()
    n, c = len(col), col.type.list_size
    x = col.values.to_numpy(zero_copy_only=False).reshape(n, c)
    y = table.column("target").to_numpy().astype(np.int64)
    dev = "cpu" if device == "auto" else device
    t_engine, ours = _best_time(lambda: engine.cross_entropy(x, y, device=dev))
    with warnings.catch_warnings():  # read-only Arrow memory: torch only reads it here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t_torch, theirs = _best_time(lambda: F.cross_entropy(xt, yt).item())
    gb = x.nbytes / 1e9
    width = len("torch F.cross_entropy")
    lines = [
        f"in memory, {n:,} x {c:,} float32 ({format_bytes(x.nbytes)}), best of 3, "
        f"{torch.get_num_threads()} torch threads:",
        f"  {'engine.cross_entropy':<{width}}  {t_engine * 1e3:8.1f} ms  "
        f"{gb / t_engine:6.2f} GB/s  loss {ours:.6f}",
        f"  {'torch F.cross_entropy':<{width}}  {t_torch * 1e3:8.1f} ms  "
        f"{gb / t_torch:6.2f} GB/s  loss {theirs:.6f}",
        f"  speed-up {t_torch / t_engine:.2f}x, |difference| {abs(ours - theirs):.2e}",
    ]
    return lines


@click.command("demo")
@click.option("--rows", type=click.IntRange(min=1), default=DEMO_ROWS, show_default=True)
@click.option("--classes", type=click.IntRange(min=2), default=DEMO_CLASSES, show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@threads_option
@no_progress_option
@debug_option
def demo_cmd(rows, classes, device, threads, no_progress):
    """Generate a sample dataset and run eval and score on it (no data needed)."""
    import tempfile

    import engine
    from engine.gen import generate

    set_threads(threads)
    check_device(device)
    show = want_progress(no_progress, False)
    tmp = tempfile.mkdtemp(prefix="xent-demo-")
    try:
        click.echo(
            f"xent demo: {rows:,} rows x {classes:,} classes of float32 logits from a "
            "synthetic classifier (~60% accurate), in a temporary directory."
        )
        click.echo("(The first run compiles the kernels; later runs load them from a cache.)")
        click.echo("")
        data = os.path.join(tmp, "sample.parquet")
        with progress_bar(show, "gen") as bar:
            res = generate(data, rows=rows, classes=classes, ignore_frac=0.02, progress=bar or None)
        click.echo(
            f"$ xent gen sample.parquet --rows {rows} --classes {classes} --ignore-frac 0.02"
        )
        click.echo(gen_summary(res).replace(data, "sample.parquet"))
        click.echo("")

        click.echo("$ xent eval sample.parquet")
        with progress_bar(show, "eval") as bar:
            report = engine.evaluate(
                data, device=device, threads=threads, progress=bar, nan_policy="error"
            )
        print_warnings(report)
        d = report_dict(report)
        click.echo(format_report(d, "eval sample.parquet"))
        click.echo("")

        out = os.path.join(tmp, "scores.parquet")
        click.echo("$ xent score sample.parquet -o scores.parquet --keep id")
        with progress_bar(show, "score") as bar:
            sreport = engine.score(
                data, out, keep=("id",), device=device, threads=threads, progress=bar
            )
        sd = report_dict(sreport)
        click.echo(written_line("scored", sd, out).replace(out, "scores.parquet"))
        click.echo(_score_head(out))
        click.echo("")

        click.echo("engine vs PyTorch")
        for line in _torch_comparison(data, device):
            click.echo(line)
        click.echo("")
        click.echo("Next:  xent inspect YOUR.parquet")
        click.echo("       xent eval YOUR.parquet --logits COLUMN --target COLUMN")
        click.echo("       xent explain --logits 0,0,0,1 --target 3   (why is that loss 0.7437?)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _score_head(path: str, n: int = 3) -> str:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(0).slice(0, n)
    names = table.column_names
    cols = [table.column(c).to_pylist() for c in names]
    cells = [names]
    for row in zip(*cols, strict=True):
        cells.append([f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    widths = [max(len(r[i]) for r in cells) for i in range(len(names))]
    lines = ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
