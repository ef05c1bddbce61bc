"""`xent compare`: two models' logits over the same rows, side by side (SPEC §7)."""

from __future__ import annotations

import click

from engine.commands.options import (
    check_dask,
    check_device,
    debug_option,
    json_option,
    logits_dtype_option,
    no_progress_option,
    parse_top_k,
    sparse_options,
    split_names,
    threads_option,
)
from engine.commands.output import (
    JsonFile,
    format_table,
    num,
    progress_bar,
    report_dict,
    timing_line,
    want_progress,
    written_line,
)


@click.command("compare")
@click.argument("base", metavar="BASE")
@click.argument("candidate", metavar="CANDIDATE")
@click.option("--logits", default="logits", show_default=True, help="Logits column (both sides).")
@click.option(
    "--candidate-logits", default=None, help="The candidate's logits column, if named otherwise."
)
@click.option(
    "--target",
    default="target",
    show_default=True,
    help="Target column of BASE (optional: without it, divergences only).",
)
@click.option(
    "--on",
    callback=split_names,
    multiple=True,
    metavar="COL,...",
    help="Key columns both sides must hold equal, row by row.",
)
@click.option(
    "--vocab",
    type=click.IntRange(min=1),
    default=None,
    help="Keep the first N classes of each side (padded vocabularies).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Divide both sides' logits by T first.",
)
@click.option(
    "--top-k",
    default="5,10",
    callback=parse_top_k,
    help="k of top-k agreement (the base's argmax among the candidate's top k).",
)
@click.option("--group-by", default=None, help="Also report per value of COLUMN (of BASE).")
@click.option(
    "-o",
    "output",
    default=None,
    metavar="ROWS",
    help="Write the per-row values to ROWS (.parquet or .arrow).",
)
@click.option("--keep", multiple=True, callback=split_names, help="BASE columns to copy into -o.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o output.")
@json_option
@click.option(
    "--output",
    "json_output",
    default=None,
    metavar="FILE.json",
    help="Also write the JSON report to FILE.json.",
)
@click.option(
    "--nan-policy",
    type=click.Choice(["error", "skip", "propagate"]),
    default="error",
    show_default=True,
    help="Rows with NaN/inf: stop, drop and count them, or propagate.",
)
@logits_dtype_option
@sparse_options
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where kernels run.",
)
@threads_option
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per chunk (default: about 64 MB of both sides' logits).",
)
@no_progress_option
@click.option("--dask", metavar="ADDRESS|local:N", default=None, help="Run on Dask.")
@debug_option
def compare_cmd(base, candidate, top_k, as_json, json_output, no_progress, output, **kw):
    """Two models' logits over the same rows: KL, JSD, TVD, agreement, NLL ratio.

    KL both ways, Jensen-Shannon and total variation distance, top-1 and top-k agreement,
    and with a target column each model's NLL, perplexity and accuracy, and their ratio."""
    import engine

    kw.pop("debug", None)
    if output is None and (kw["keep"] or kw["overwrite"]):
        raise click.UsageError("--keep and --overwrite go with -o/--output")
    check_device(kw["device"])
    check_dask(kw["dask"])
    top_k = tuple(k for k in top_k if k != 1) or (5,)
    with JsonFile(json_output) as out:
        with progress_bar(want_progress(no_progress, as_json), "compare") as bar:
            report = engine.compare(base, candidate, top_k=top_k, output=output, progress=bar, **kw)
        d = report_dict(report)
        out.commit(d)
    if as_json:
        from engine.commands.output import to_json

        click.echo(to_json(d))
        return
    click.echo(format_compare(d, base, candidate))
    if output is not None:
        click.echo(written_line("wrote", d, output))


def _pct(d: dict, keys) -> str:
    return "  ".join(f"{label} {num(d.get(k), '.3g')}" for k, label in keys)


def format_compare(d: dict, base: str, candidate: str) -> str:
    rows = [
        ("rows", num(d["rows"])),
        ("counted", num(d["counted"])),
        ("ignored", num(d["ignored"])),
        ("nan rows", num(d["nan_rows"])),
        ("classes", num(d["classes"])),
    ]
    if d.get("temperature") != 1.0:
        rows.append(("temperature", num(d.get("temperature"), ".4g")))

    def mean_se(m, spec=".6g"):
        return f"{num(m.get('mean'), spec)} ± {num(m.get('se'), '.2g')}"

    rows += [
        ("KL(base‖cand) mean", mean_se(d["kl"])),
        ("KL(cand‖base) mean", mean_se(d["kl_reverse"])),
        ("JSD mean", mean_se(d["jsd"])),
        ("TVD mean", mean_se(d["tvd"])),
        ("top-1 agreement", mean_se(d["top1_agreement"], ".4f")),
    ]
    for k, m in d["top_k_agreement"].items():
        rows.append((f"base top-1 in cand top-{k}", mean_se(m, ".4f")))
    if "base" in d:
        for side in ("base", "candidate"):
            s = d[side]
            ppl, nll, acc = (
                num(s["perplexity"], ".4f"),
                num(s["nll"], ".6f"),
                num(s["accuracy"], ".4f"),
            )
            rows.append((f"{side} ppl / nll / acc", f"{ppl} / {nll} / {acc}"))
        rows.append(("ppl ratio (cand/base)", mean_se(d["ppl_ratio"], ".6f")))
        rows.append(("nll correlation", num(d["nll_correlation"], ".4f")))
        rows.append(("Δp mean (cand − base)", mean_se(d["delta_p"], ".4g")))
        rows.append(("Δp rms", num(d["delta_p"]["rms"], ".4g")))
    lines = [f"compare {base} (base) vs {candidate} (candidate)", format_table(rows)]
    kl = d["kl"]
    kl_keys = [("max", "max"), ("p99_9", "99.9%"), ("p99", "99%"), ("p90", "90%"),
               ("median", "median"), ("p10", "10%"), ("min", "min")]  # fmt: skip
    lines.append("  KL percentiles: " + _pct(kl, kl_keys))
    if "delta_p" in d:
        dp = d["delta_p"]
        dp_keys = [("max", "max"), ("p99", "99%"), ("p75", "75%"), ("median", "median"),
                   ("p25", "25%"), ("p1", "1%"), ("min", "min")]  # fmt: skip
        lines.append("  Δp percentiles: " + _pct(dp, dp_keys))
    t = timing_line(d)
    if t:
        lines.append(f"  time: {t}")
    if d.get("groups"):
        lines.append("")
        lines.append(f"by group ({len(d['groups'])})")
        grows = []
        for g, m in list(d["groups"].items())[:50]:
            agree = num(m["top1_agreement"]["mean"], ".4f")
            text = f"rows {num(m['rows'])}  KL {num(m['kl']['mean'], '.4g')}  top-1 agree {agree}"
            if "ppl_ratio" in m:
                text += f"  ppl ratio {num(m['ppl_ratio']['mean'], '.4f')}"
            grows.append((str(g), text))
        lines.append(format_table(grows))
    return "\n".join(lines)
