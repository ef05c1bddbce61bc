"""`xent gen`: write a synthetic dataset of logits."""

from __future__ import annotations

import click

from engine.commands.errors import debug_option
from engine.commands.options import json_option, no_progress_option
from engine.commands.output import gen_summary, progress_bar, to_json, want_progress


@click.command("gen")
@click.argument("output", metavar="OUT")
@click.option("--rows", type=click.IntRange(min=1), required=True, help="Number of rows.")
@click.option("--classes", type=click.IntRange(min=1), required=True, help="Number of classes.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "float64", "bfloat16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--layout",
    type=click.Choice(["fixed_size_list", "list", "large_list", "tensor", "wide"]),
    default="fixed_size_list",
    show_default=True,
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "arrow", "arrow-stream"]),
    default="parquet",
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--ignore-frac",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Fraction of rows whose target is the ignore index -100.",
)
@click.option("--soft", is_flag=True, help="Probability targets instead of class indices.")
@click.option(
    "--row-group-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per Parquet row group / IPC record batch (default ~1k, <= 4 MB).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@no_progress_option
@json_option
@debug_option
def gen_cmd(output, rows, classes, dtype, layout, fmt, seed, ignore_frac, soft, **kw):
    """Write a synthetic dataset of logits (a ~60% accurate classifier) to OUT."""
    from engine.gen import generate

    as_json = kw.pop("as_json")
    with progress_bar(want_progress(kw.pop("no_progress"), as_json), "gen") as bar:
        res = generate(
            output,
            rows=rows,
            classes=classes,
            dtype=dtype,
            layout=layout,
            format=fmt,
            seed=seed,
            ignore_frac=ignore_frac,
            soft=soft,
            row_group_rows=kw["row_group_rows"],
            overwrite=kw["overwrite"],
            progress=bar or None,
        )
    if as_json:
        click.echo(to_json(res.to_dict()))
        return
    click.echo(gen_summary(res))
