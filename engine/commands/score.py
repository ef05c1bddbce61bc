"""`xent score`: per-row loss, log-prob, prediction, confidence and entropy, to a file."""

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


@click.command("score")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@row_file_options
@click.option("--resume", is_flag=True, help="Continue an interrupted job's output.")
@click.option(
    "--emit-topk",
    type=click.IntRange(min=1),
    default=None,
    metavar="K",
    help="Also write each row's top K classes and log-probs (a sparse top-k file).",
)
@source_options
@loss_options
@run_options
@json_option
def score_cmd(sources, output, keep, overwrite, resume, emit_topk, as_json, **kw):
    """Per-row loss, log-prob, prediction, confidence and entropy, written to a file."""
    import engine

    run_output_job(
        engine.score,
        "score",
        "scored",
        sources,
        output,
        as_json,
        kw,
        keep=keep,
        overwrite=overwrite,
        resume=resume,
        emit_topk=emit_topk,
    )
