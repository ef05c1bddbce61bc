"""`xent bench`: the fused kernels against torch.nn.functional.cross_entropy."""

from __future__ import annotations

import os
import sys

import click

from engine.commands.errors import XentCliError, debug_option, one_line
from engine.commands.options import json_option, split_csv, split_ints, threads_option
from engine.commands.output import to_json

# bench/ sits beside engine/ in a source checkout
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def import_bench():
    """bench/ is a folder of the source checkout, not installed with the package."""
    try:
        from bench import kernels
    except ImportError:
        if REPO_ROOT not in sys.path:
            sys.path.insert(0, REPO_ROOT)
        try:
            from bench import kernels
        except ImportError as e:
            if not os.path.isdir(os.path.join(REPO_ROOT, "bench")):
                raise XentCliError(
                    "xent bench needs the bench/ folder of a source checkout of xent "
                    f"(not found in {REPO_ROOT}); "
                    "run it from a clone of the repository"
                ) from None
            raise XentCliError(f"cannot import bench.kernels: {one_line(e)}") from None
    return kernels


@click.command("bench")
@click.option("--rows", type=click.IntRange(min=1), default=None, help="Rows per case.")
@click.option("--classes", callback=split_ints, default=None, help="Classes, e.g. 1000,32000.")
@click.option("--dtype", callback=split_csv, default=None, help="float32,float16.")
@click.option("--mode", callback=split_csv, default=None, help="forward,forward_grad,row_stats.")
@click.option("--providers", callback=split_csv, default=None, help="engine-cpu,torch-eager,...")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda", "all"]), default="cpu", show_default=True
)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@threads_option
@click.option("--full", is_flag=True, help="All class counts and ~100 MB cases (slow).")
@json_option
@debug_option
def bench_cmd(rows, classes, dtype, mode, providers, device, repeats, threads, full, as_json):
    """The fused kernels against torch.nn.functional.cross_entropy (in memory)."""
    kernels = import_bench()
    args = {"repeats": repeats, "device": device, "quick": not full, "json": as_json}
    for name, value in (
        ("rows", rows),
        ("classes", classes),
        ("dtypes", dtype),
        ("modes", mode),
        ("providers", providers),
        ("threads", threads),
    ):
        if value is not None:
            args[name] = value
    results = kernels.run(**args)
    click.echo(to_json(results) if as_json else kernels.format_table(results))
