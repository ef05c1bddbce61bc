"""What the kernel benchmark shows: the markdown table and its footnotes, the engine /
best-peer ratios, the CSV it appends to, the PNG plots, and the cold-start table.

``ratio_to_best_peer`` = engine GB/s / the best GB/s of all peers (library calls and
logsumexp formulations alike) for the same shape, measured in the same process (CPU
engine vs CPU peers, CUDA vs CUDA). ``roofline_share`` = GB/s / this machine's read
bandwidth (forward, row_stats) or copy bandwidth (forward_grad), measured by
bench/roofline.py in the same run.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.providers import ENGINE_PROVIDERS, TOLERANCE

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS_DIR / "kernels.csv"
CSV_COLUMNS = (
    "timestamp",
    "host",
    "provider",
    "mode",
    "dtype",
    "rows",
    "classes",
    "bytes",
    "median_s",
    "p20_s",
    "p80_s",
    "gb_s",
    "ratio_to_best_peer",
    "roofline_share",
    "threads",
)


def fill_ratios(case_results: list[dict]) -> None:
    """Set each engine record's ratio_to_best_peer: its GB/s over the best peer's, same device."""
    for rec in case_results:
        if rec["provider"] not in ENGINE_PROVIDERS or rec["gb_s"] is None:
            continue
        peers = [
            r["gb_s"]
            for r in case_results
            if r["provider"] not in ENGINE_PROVIDERS
            and r["device"] == rec["device"]
            and r["gb_s"] is not None
        ]
        if peers:
            rec["ratio_to_best_peer"] = rec["gb_s"] / max(peers)


# -- table ---------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def format_table(results: Sequence[dict]) -> str:
    """Markdown: C, dtype, mode, rows, GB/s per provider, engine/best peer, roofline share."""
    if not results:
        return "(no results)"
    providers = list(dict.fromkeys(r["provider"] for r in results))
    measured = [p for p in providers if any(r["gb_s"] for r in results if r["provider"] == p)]
    providers = measured or providers  # wholly skipped providers: footnote only
    engines = [p for p in providers if p in ENGINE_PROVIDERS]
    head = ["C", "dtype", "mode", "rows"] + [f"{p} GB/s" for p in providers]
    for e in engines:
        head.append("engine/best peer" if len(engines) == 1 else f"{e}/best peer")
    for e in engines:
        if e == "engine-cpu":
            head.append("roofline share")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    keys = list(dict.fromkeys((r["dtype"], r["classes"], r["mode"]) for r in results))
    by = {(r["dtype"], r["classes"], r["mode"], r["provider"]): r for r in results}
    for key in keys:
        dtype, C, mode = key
        rows = next(r["rows"] for r in results if (r["dtype"], r["classes"], r["mode"]) == key)
        cells = [str(C), dtype, mode, str(rows)]
        for p in providers:
            r = by.get((dtype, C, mode, p))
            cells.append(_fmt(r and r["gb_s"], ".2f"))
        for e in engines:
            r = by.get((dtype, C, mode, e))
            ratio = r and r["ratio_to_best_peer"]
            cells.append("—" if ratio is None else f"{ratio:.2f}x")
        if "engine-cpu" in engines:
            r = by.get((dtype, C, mode, "engine-cpu"))
            share = r and r["roofline_share"]
            cells.append("—" if share is None else f"{share:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(footnotes(results))
    return "\n".join(lines)


def footnotes(results: Sequence[dict]) -> list[str]:
    """Roofline, engine first calls, skips, disagreements, overflows and notes, one line each."""
    notes = []
    roof = {}
    for r in results:
        if r.get("roofline_gb_s") is not None:
            roof["copy" if r["mode"] == "forward_grad" else "read"] = r["roofline_gb_s"]
    if roof:
        parts = [f"{k} {v:.2f} GB/s" for k, v in sorted(roof.items(), reverse=True)]
        threads = next((r["threads"] for r in results if r["threads"]), None)
        notes.append(f"Roofline ({threads} threads): " + ", ".join(parts) + ".")
    seen = set()
    firsts = []
    for r in results:
        if r["provider"] in ENGINE_PROVIDERS and r["first_call_s"] is not None:
            k = (r["provider"], r["mode"], r["dtype"])
            if k not in seen:
                seen.add(k)
                firsts.append(f"{r['provider']} {r['mode']} {r['dtype']} {r['first_call_s']:.3f} s")
    if firsts:
        notes.append("Engine first call (compile/cache load + one call): " + "; ".join(firsts))
    skips = sorted({f"{r['provider']}: {r['status'][9:]}" for r in results if r["status"] != "ok"})
    if skips:
        notes.append("Skipped: " + "; ".join(skips) + ".")
    bad = []
    for r in results:
        chk = r.get("check") or {}
        tol = TOLERANCE.get(r["dtype"], 1e-5)
        for k in ("loss_rel", "grad_rel"):
            v = chk.get(k)
            if v is not None and not v <= tol:
                bad.append(f"{r['provider']} {r['mode']} {r['dtype']} C={r['classes']} {k}={v:.1e}")
    if bad:
        notes.append("Disagreements with the engine beyond tolerance: " + "; ".join(bad) + ".")
    overflow = sorted(
        {
            f"{r['provider']} {r['mode']} {r['dtype']}"
            for r in results
            if "peer_loss_nonfinite" in (r.get("check") or {})
        }
    )
    if overflow:
        notes.append(
            "Peer loss not finite where the engine's is (float16 reduction overflow): "
            + "; ".join(overflow)
            + "."
        )
    how = sorted({f"{r['provider']} {r['mode']}: {r['note']}" for r in results if r.get("note")})
    if how:
        notes.append("Notes: " + "; ".join(how) + ".")
    return notes


# -- files -------------------------------------------------------------------------------


def save_results(results: Sequence[dict], directory: Path = RESULTS_DIR) -> None:
    """Append measured rows to kernels.csv and draw kernels_<mode>_<dtype>.png."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CSV_PATH.name
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(CSV_COLUMNS)
        for r in results:
            if r["gb_s"] is None:
                continue
            w.writerow(["" if r[c] is None else r[c] for c in CSV_COLUMNS])
    plot(results, directory)


def plot(results: Sequence[dict], directory: Path = RESULTS_DIR) -> list[Path]:
    """GB/s vs C (log x), one line per provider, one PNG per (mode, dtype)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print("matplotlib missing: no PNG drawn", file=sys.stderr)
        return []
    written = []
    for mode, dtype in dict.fromkeys((r["mode"], r["dtype"]) for r in results):
        sel = [r for r in results if (r["mode"], r["dtype"]) == (mode, dtype) and r["gb_s"]]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r["classes"], r["gb_s"]) for r in sel if r["provider"] == p)
            ax.plot(*zip(*pts, strict=True), marker="o", label=p)
        ceil = next((r["roofline_gb_s"] for r in sel if r.get("roofline_gb_s")), None)
        if ceil:
            kind = "copy" if mode == "forward_grad" else "read"
            ax.axhline(ceil, ls="--", color="grey", label=f"roofline ({kind})")
        ax.set_xscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel("GB/s (compulsory bytes)")
        ax.set_title(f"cross-entropy {mode}, {dtype}, ~{sel[0]['bytes'] / 1e6:.0f} MB per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        out = directory / f"kernels_{mode}_{dtype}.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


# -- cold start --------------------------------------------------------------------------


def format_cold_start(res: dict) -> str:
    """Markdown of ``bench.kernels.cold_start()``: compile vs cache-load time per kernel."""
    cold, warm = res["empty_cache"], res["warm_cache"]
    lines = [
        "| kernel | dtype | compile (empty cache) s | first call, new process, warm cache s "
        "| steady call s |",
        "|---|---|---:|---:|---:|",
    ]
    for c, w in zip(cold["calls"], warm["calls"], strict=True):
        lines.append(
            f"| {c['mode']} | {c['dtype']} | {c['first_s'] - c['second_s']:.3f} "
            f"| {w['first_s']:.4f} | {w['second_s']:.5f} |"
        )
    total_c = sum(c["first_s"] for c in cold["calls"])
    total_w = sum(w["first_s"] for w in warm["calls"])
    lines += [
        "",
        f"`import engine`: {cold['import_s']:.3f} s (empty cache), {warm['import_s']:.3f} s "
        f"(warm). All first calls: {total_c:.2f} s compiling vs {total_w:.3f} s from cache. "
        f"Whole process: {cold['process_s']:.2f} s vs {warm['process_s']:.2f} s.",
        "Compile = first call - second call in a process with an empty NUMBA_CACHE_DIR; "
        "calls run in table order, so a kernel reuses helpers compiled by earlier rows.",
    ]
    return "\n".join(lines)
