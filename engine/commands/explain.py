"""`xent explain`: the loss of one row, step by step, with the numbers filled in."""

from __future__ import annotations

import click

from engine.commands.errors import XentCliError, debug_option
from engine.commands.options import (
    INPUT_KINDS,
    json_option,
    parse_input_kind,
    parse_number_list,
    parse_weight,
)
from engine.commands.output import to_json


@click.command("explain")
@click.option(
    "--logits",
    "values",
    required=True,
    callback=parse_number_list,
    metavar="x0,x1,..",
    help="One row of model outputs, e.g. 0,0,0,1.",
)
@click.option("--target", type=int, default=None, help="The target class.")
@click.option(
    "--target-probs",
    callback=parse_number_list,
    default=None,
    metavar="t0,t1,..",
    help="Probability target instead of a class.",
)
@click.option(
    "--input-kind",
    type=click.Choice(list(INPUT_KINDS)),
    default="logits",
    show_default=True,
    callback=parse_input_kind,
    help="What the numbers are: logits (CrossEntropyLoss), log-probs (NLLLoss), probs.",
)
@click.option("--weight", callback=parse_weight, metavar="FILE|w0,w1,..", help="Class weights.")
@click.option("--label-smoothing", type=click.FloatRange(0.0, 1.0), default=0.0)
@json_option
@debug_option
def explain_cmd(values, target, target_probs, input_kind, weight, label_smoothing, as_json):
    """The loss of one row, step by step, with the numbers filled in.

    \b
    xent explain --logits 0,0,0,1 --target 3     # why is CrossEntropyLoss 0.7437, not 0?
    """
    from engine.explain import explain

    if (target is None) == (target_probs is None):
        raise XentCliError("give --target CLASS or --target-probs t0,t1,.. (one of them)")
    ex = explain(
        values,
        target,
        target_probs=target_probs,
        input_kind=input_kind,
        weight=weight,
        label_smoothing=label_smoothing,
    )
    click.echo(to_json(ex.to_dict()) if as_json else ex.render())
