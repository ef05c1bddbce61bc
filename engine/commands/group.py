"""The `xent` group: --version, --debug, one error policy, and subcommands loaded lazily.

Each command lives in its own module under engine/commands/, imported only when that
command runs or shows its help, so ``xent --help`` and ``xent explain`` load no more than
they need. `COMMANDS` names each command's module and its one-line help (shown by
``xent --help`` without importing the module; a test keeps it equal to the docstrings).
"""

from __future__ import annotations

import importlib
import os
import re

import click

from engine import interrupt
from engine.commands.errors import debug_option, handle_errors

# name -> (module, command object, one-line help)
COMMANDS = {
    "bench": (
        "engine.commands.bench",
        "bench_cmd",
        "The fused kernels against torch.nn.functional.cross_entropy (in memory).",
    ),
    "compare": (
        "engine.commands.compare",
        "compare_cmd",
        "Two models' logits over the same rows: KL, JSD, TVD, agreement, NLL ratio.",
    ),
    "demo": (
        "engine.commands.demo",
        "demo_cmd",
        "Generate a sample dataset and run eval and score on it (no data needed).",
    ),
    "eval": (
        "engine.commands.eval",
        "eval_cmd",
        "Loss, perplexity, accuracy and calibration of a logit dataset.",
    ),
    "explain": (
        "engine.commands.explain",
        "explain_cmd",
        "The loss of one row, step by step, with the numbers filled in.",
    ),
    "gen": (
        "engine.commands.gen",
        "gen_cmd",
        "Write a synthetic dataset of logits (a ~60% accurate classifier) to OUT.",
    ),
    "grad": (
        "engine.commands.grad",
        "grad_cmd",
        "d loss / d logits for every row, written to a file (column 'grad').",
    ),
    "inspect": (
        "engine.commands.inspect",
        "inspect_cmd",
        "Format, layout, rows, classes, dtype and size; warns on suspicious data.",
    ),
    "score": (
        "engine.commands.score",
        "score_cmd",
        "Per-row loss, log-prob, prediction, confidence and entropy, written to a file.",
    ),
}


class XentGroup(click.Group):
    """Subcommands imported on first use, all under one error policy (`handle_errors`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(n, click.Command(n, help=COMMANDS[n][2]).get_short_help_str(limit)) for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with handle_errors(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        interrupt.install()  # Ctrl-C is remembered, so no job can swallow it and commit
        with handle_errors(ctx):
            return super().invoke(ctx)


def version() -> str:
    """The installed version, or the one in pyproject.toml of a source checkout."""
    from importlib import metadata

    try:
        return metadata.version("xent")
    except metadata.PackageNotFoundError:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            with open(os.path.join(root, "pyproject.toml")) as f:
                found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
            return f"{found.group(1)} (source checkout)" if found else "unknown"
        except OSError:
            return "unknown"


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        click.echo(f"xent {version()}")
        ctx.exit()


@click.group(cls=XentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
@debug_option
def main():
    """xent: fused cross-entropy, gradients and metrics over Arrow/Parquet logit datasets.

    \b
    Start with:  xent demo          (a built-in sample, no data needed)
                 xent explain --logits 0,0,0,1 --target 3
    """
