"""What `score` and `grad` share: jobs that write one output row per input row."""

from __future__ import annotations

import os

import click

from engine.commands.options import engine_kwargs
from engine.commands.output import (
    format_report,
    print_warnings,
    progress_bar,
    report_dict,
    to_json,
    want_progress,
    written_line,
)
from engine.errors import XentInputError


def check_output(path: str, overwrite: bool, resume: bool = False) -> None:
    if os.path.exists(path) and not (overwrite or resume):
        raise XentInputError("exists; pass --overwrite to replace it", file=path)


def run_output_job(job, label, verb, sources, output, as_json, kw, **job_kwargs):
    """score/grad: check the output, run the job with progress, print what was written."""
    kwargs, rest = engine_kwargs(kw)
    check_output(output, job_kwargs["overwrite"], job_kwargs.get("resume", False))
    with progress_bar(want_progress(rest["no_progress"], as_json), label) as bar:
        report = job(list(sources), output, progress=bar, **job_kwargs, **kwargs)
    d = report_dict(report)
    print_warnings(report)
    if as_json:
        click.echo(to_json({"output": output, **d}))
    else:
        click.echo(written_line(verb, d, output))
        click.echo(format_report(d, "metrics", kwargs["reduction"]))
