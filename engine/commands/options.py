"""Option groups and parsers shared by the commands, and their translation for the engine.

Every option is declared once here; `engine_kwargs` turns the parsed values into the
engine's keyword arguments and validates the loss options before any file is opened.
"""

from __future__ import annotations

import importlib.util
import os
import re

import click

from engine.commands.errors import XentCliError, debug_option, one_line

INPUT_KINDS = {"logits": "logits", "log-probs": "log_probs", "probs": "probs"}


def parse_numbers(text: str, what: str) -> list[float]:
    tokens = [t for t in re.split(r"[\s,;]+", text.strip().strip("[]()")) if t]
    if not tokens:
        raise click.BadParameter(f"{what}: no numbers given")
    try:
        return [float(t) for t in tokens]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def parse_weight(ctx, param, value):
    """--weight: C comma-separated numbers, or a file (whitespace/comma text, or .npy)."""
    if value is None:
        return None
    import numpy as np

    if os.path.isfile(value):
        if value.lower().endswith(".npy"):
            try:
                arr = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise click.BadParameter(f"{value}: cannot read as .npy ({one_line(e)})") from None
            return np.asarray(arr, dtype=np.float64).reshape(-1)
        try:
            with open(value) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"{value}: cannot read ({one_line(e)})") from None
        try:
            return np.array(parse_numbers(text, value), dtype=np.float64)
        except click.BadParameter:
            raise click.BadParameter(
                f"{value}: expected numbers separated by commas or whitespace"
            ) from None
    try:
        return np.array(parse_numbers(value, "--weight"), dtype=np.float64)
    except click.BadParameter:
        raise click.BadParameter(
            f"{value!r} is neither an existing file nor a comma-separated list of numbers"
        ) from None


def parse_top_k(ctx, param, value):
    if value is None:
        return (1, 5)
    try:
        ks = tuple(int(t) for t in re.split(r"[\s,]+", value.strip()) if t)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not ks or any(k < 1 for k in ks):
        raise click.BadParameter(f"{value!r}: each k must be an integer >= 1")
    return ks


def split_names(ctx, param, value):
    """--keep a,b --keep c -> ('a', 'b', 'c')."""
    names: list[str] = []
    for item in value or ():
        names += [n.strip() for n in item.split(",") if n.strip()]
    return tuple(dict.fromkeys(names))


def split_csv(ctx, param, value):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def split_ints(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def parse_number_list(ctx, param, value):
    """A callback: one comma-separated row of numbers (explain's --logits)."""
    if value is None:
        return None
    return parse_numbers(value, param.opts[0])


def parse_input_kind(ctx, param, value):
    return None if value is None else INPUT_KINDS[value]


def option_group(*decorators):
    """Several click options as one decorator (declared once, shared by commands)."""

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


logits_dtype_option = click.option(
    "--logits-dtype",
    type=click.Choice(["bfloat16", "float16", "float32", "float64"]),
    default=None,
    help="Read 16-bit integer logits as bfloat16 bit patterns.",
)
threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="CPU threads (Numba)."
)
no_progress_option = click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")

sparse_options = option_group(
    click.option(
        "--topk-indices",
        default=None,
        metavar="COL",
        help="Sparse top-k rows: the list column of class indices [topk_indices].",
    ),
    click.option(
        "--topk-values",
        default=None,
        metavar="COL",
        help="Sparse top-k rows: the list column of values [topk_logprobs].",
    ),
    click.option(
        "--classes",
        type=click.IntRange(min=1),
        default=None,
        help="Sparse top-k rows: the number of classes C (else field metadata xent.classes).",
    ),
    click.option(
        "--topk-kind",
        type=click.Choice(["logprobs", "logits"]),
        default=None,
        help="Sparse top-k values: log-probs over all C classes [logprobs], or raw logits.",
    ),
    click.option(
        "--lse",
        default=None,
        metavar="COL",
        help="Sparse top-k logits: the column of each row's lse over all C classes.",
    ),
)
"""Sparse top-k rows (SPEC §8): which columns, how many classes, what the values are."""

source_options = option_group(
    click.option(
        "--logits",
        default="logits",
        show_default=True,
        help="Logits column, or a glob of one float column per class ('logit_*').",
    ),
    click.option(
        "--target",
        default="target",
        show_default=True,
        help="Target column: integer classes, or a list of probabilities.",
    ),
    sparse_options,
)

loss_options = option_group(
    click.option(
        "--weight",
        callback=parse_weight,
        metavar="FILE|w0,w1,..",
        help="Class weights: C numbers, or a file of them (text or .npy).",
    ),
    click.option(
        "--ignore-index",
        type=int,
        default=-100,
        show_default=True,
        help="Target value whose rows are not counted.",
    ),
    click.option(
        "--label-smoothing",
        type=click.FloatRange(0.0, 1.0),
        default=0.0,
        show_default=True,
        help="Label smoothing ε in [0, 1].",
    ),
    click.option(
        "--z-loss",
        type=click.FloatRange(min=0.0),
        default=0.0,
        show_default=True,
        help="Add ζ·lse² per row (PaLM's z-loss).",
    ),
    click.option(
        "--softcap",
        type=click.FloatRange(min=0.0, min_open=True),
        default=None,
        help="Replace logits by c·tanh(x/c) first (c > 0).",
    ),
    click.option(
        "--input-kind",
        type=click.Choice(list(INPUT_KINDS)),
        default="logits",
        show_default=True,
        callback=parse_input_kind,
        help="What the rows hold: logits (CrossEntropyLoss), log-probs (NLLLoss), "
        "probs (softmax outputs).",
    ),
    click.option(
        "--reduction",
        type=click.Choice(["mean", "sum"]),
        default="mean",
        show_default=True,
        help="How the reported loss reduces rows (as PyTorch).",
    ),
    click.option(
        "--nan-policy",
        type=click.Choice(["error", "skip", "propagate"]),
        default="error",
        show_default=True,
        help="Rows with NaN/inf: stop with the row, drop and count them, or propagate NaN.",
    ),
    logits_dtype_option,
)

run_options = option_group(
    click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where kernels run (auto: CUDA when a GPU is present).",
    ),
    threads_option,
    click.option(
        "--chunk-rows",
        type=click.IntRange(min=1),
        default=None,
        help="Rows per chunk (default: about 64 MB of logits).",
    ),
    no_progress_option,
    click.option(
        "--dask",
        metavar="ADDRESS|local:N",
        default=None,
        help="Run on Dask: a scheduler address, or local:N for N local workers.",
    ),
    debug_option,
)

row_file_options = option_group(
    click.option("-o", "--output", required=True, help="Output file (.parquet or .arrow)."),
    click.option(
        "--keep", multiple=True, callback=split_names, help="Input columns to copy (a,b,...)."
    ),
    click.option("--overwrite", is_flag=True, help="Replace an existing output."),
)
"""-o, --keep and --overwrite: what `score` and `grad` write."""

json_option = click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")

LOSS_KEYS = (
    "weight",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "softcap",
    "input_kind",
    "reduction",
    "logits_dtype",
)


SPARSE_KEYS = ("topk_indices", "topk_values", "classes", "topk_kind", "lse")


def check_device(device: str) -> None:
    """``--device cuda`` without a GPU is the user's error, said before any work."""
    if device != "cuda":
        return
    from engine.api import resolve_device

    try:
        resolve_device("cuda")
    except RuntimeError:
        raise XentCliError(
            "--device cuda: no CUDA device or driver found (use --device cpu or auto)"
        ) from None


def check_dask(address: str | None) -> None:
    if not address:
        return
    if importlib.util.find_spec("distributed") is None:
        raise XentCliError(f"--dask {address}: needs Dask distributed (pip install 'xent[dask]')")


def engine_kwargs(kw: dict) -> tuple[dict, dict]:
    """Split the shared options into (engine keyword arguments, the rest).

    Loss options are validated here, once, before any file is opened.
    """
    from engine.options import make_options
    from engine.threads import set_threads

    kw = dict(kw)
    loss = {k: kw.pop(k) for k in LOSS_KEYS}
    make_options(**loss)  # a usage error -> one line, before any work
    run = {
        "logits": kw.pop("logits"),
        "target": kw.pop("target"),
        "chunk_rows": kw.pop("chunk_rows"),
        "device": kw.pop("device"),
        "nan_policy": kw.pop("nan_policy"),
        "threads": kw.pop("threads"),
        "dask": kw.pop("dask"),
    }
    for key in SPARSE_KEYS:  # sparse top-k rows: only what was given
        if kw.get(key) is not None:
            run[key] = kw[key]
        kw.pop(key, None)
    set_threads(run["threads"])
    check_device(run["device"])
    check_dask(run["dask"])
    return {**run, **loss}, kw
