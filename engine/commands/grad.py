"""`xent grad`: d loss / d logits for every row, written to a file."""

from __future__ import annotations

import click

from engine.commands.options import (
    json_option,
    loss_options,
    row_file_options,
    run_options,
    source_options,
)
from engine.commands.rowfile import run_output_job


@click.command("grad")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@row_file_options
@click.option(
    "--grad-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Gradient storage type.",
)
@source_options
@loss_options
@run_options
@json_option
def grad_cmd(sources, output, keep, overwrite, grad_dtype, as_json, **kw):
    """d loss / d logits for every row, written to a file (column 'grad')."""
    import engine

    run_output_job(
        engine.gradients,
        "grad",
        "wrote gradients of",
        sources,
        output,
        as_json,
        kw,
        keep=keep,
        overwrite=overwrite,
        grad_dtype=grad_dtype,
    )
