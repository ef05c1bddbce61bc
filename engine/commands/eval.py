"""`xent eval`: loss, perplexity, accuracy and calibration of a logit dataset."""

from __future__ import annotations

import click

from engine.commands.options import (
    engine_kwargs,
    json_option,
    loss_options,
    parse_top_k,
    run_options,
    source_options,
)
from engine.commands.output import (
    JsonFile,
    format_report,
    print_warnings,
    progress_bar,
    report_dict,
    sources_label,
    to_json,
    want_progress,
)


@click.command("eval")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@source_options
@click.option("--group-by", default=None, help="Also report the metrics per value of COLUMN.")
@click.option("--top-k", default="1,5", callback=parse_top_k, help="Top-k accuracies (1,5).")
@loss_options
@run_options
@json_option
@click.option(
    "-o", "--output", "json_output", default=None, help="Also write the JSON to FILE.json."
)
def eval_cmd(sources, group_by, top_k, as_json, json_output, **kw):
    """Loss, perplexity, accuracy and calibration of a logit dataset."""
    import engine

    kwargs, rest = engine_kwargs(kw)
    with JsonFile(json_output) as out:
        with progress_bar(want_progress(rest["no_progress"], as_json), "eval") as bar:
            report = engine.evaluate(
                list(sources), group_by=group_by, top_k=top_k, progress=bar, **kwargs
            )
        d = report_dict(report)
        out.commit(d)
    print_warnings(report)
    if as_json:
        click.echo(to_json(d))
    else:
        click.echo(format_report(d, f"eval {sources_label(sources)}", kwargs["reduction"]))
