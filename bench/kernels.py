"""In-memory kernel benchmark: the engine's fused cross-entropy against its peers.

Usage (from the repository root)::

    python -m bench.kernels [--quick] [--classes 10,1000] [--dtypes float32,float16]
        [--modes forward,forward_grad,row_stats] [--providers engine-cpu,torch-eager]
        [--repeats 7] [--threads 2] [--rows N] [--device cpu|cuda|all] [--json] [--no-save]
    python -m bench.kernels --cold-start

Importable: ``run(...)`` returns one dict per (provider, mode, dtype, classes) and
``format_table(results)`` renders them as a markdown table (``xent bench`` prints it).

This module runs the benchmark; the rest is in its neighbours: bench/providers.py (the
engine and its peers, modes, byte counts, the correctness check), bench/timing.py (how a
call is timed), bench/report.py (table, footnotes, ratios, CSV, plots).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json as _json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.providers import (
    ENGINE_PROVIDERS,
    QUICK_BYTES,
    TARGET_BYTES,
    TOLERANCE,
    Case,
    Output,
    Provider,
    Skip,
    byte_count,
    compare,
    make_case_data,
    make_providers,
    rows_for,
)
from bench.report import fill_ratios, format_cold_start, format_table, plot, save_results
from bench.timing import set_threads, time_call

__all__ = ["run", "format_table", "cold_start", "format_cold_start", "save_results", "plot", "main"]

DEFAULT_CLASSES = (10, 128, 1000, 32000, 128256, 262144)
QUICK_CLASSES = (10, 1000, 32000, 128256)
DEFAULT_MODES = ("forward", "forward_grad")
ALL_MODES = ("forward", "forward_grad", "row_stats")


def _new_record(base: dict, p: Provider, nthreads: int | None) -> dict:
    rec = dict(base)
    rec.update(
        provider=p.name,
        device=p.device,
        median_s=None,
        p20_s=None,
        p80_s=None,
        gb_s=None,
        ratio_to_best_peer=None,
        roofline_share=None,
        roofline_gb_s=None,
        threads=nthreads if p.device == "cpu" else None,
        first_call_s=None,
        status="ok",
        check=None,
        note="",
    )
    return rec


def _run_case(provs, unavailable, case, repeats, roof, base, quiet, nthreads):
    """All providers on one case: prepare and warm each, then time them round-robin.

    Round-robin (one call of each provider per round) spreads the noise of a shared
    machine evenly over the providers instead of charging it to whichever ran last.
    """
    recs, live = [], []
    ref: dict[str, Output] = {}
    for p in provs:  # engines first in `provs` order, so peers can be checked against them
        rec = _new_record(base, p, nthreads)
        recs.append(rec)
        if p.name in unavailable:
            rec["status"] = f"skipped: {unavailable[p.name]}"
            continue
        try:
            p.note = ""
            call = p.prepare(case)
            first, out = time_call(call)
            for _ in range(2 if p.compiles else 1):
                del out
                _, out = time_call(call)
        except Skip as exc:
            rec["status"] = f"skipped: {exc}"
            p.release()
            continue
        except Exception as exc:  # a peer that fails on this dtype/shape
            rec["status"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
            _log(quiet, f"  {p.name} {case.mode} {case.dtype} C={case.classes}: {rec['status']}")
            p.release()
            continue
        rec["first_call_s"] = first
        rec["note"] = p.note
        try:
            o = p.output(out)
        except Exception:
            o = None
        del out
        if p.name in ENGINE_PROVIDERS:
            if o is not None:
                ref[p.device] = o
        elif o is not None and p.device in ref:
            rec["check"] = compare(ref[p.device], o)
            _warn_check(quiet, rec)
        live.append((p, rec, call, []))
    ref.clear()
    for k in range(max(1, repeats)):
        # rotate the order each round, so no provider always follows the same neighbour
        # (XLA's pool, for one, keeps spinning into whatever runs next)
        for _p, _rec, call, times in live[k % len(live) :] + live[: k % len(live)]:
            t, result = time_call(call, lead_in=True)
            del result
            times.append(t)
    for p, rec, _call, times in live:
        med = float(np.median(times))
        rec.update(
            median_s=med,
            p20_s=float(np.percentile(times, 20)),
            p80_s=float(np.percentile(times, 80)),
            gb_s=rec["bytes"] / med / 1e9,
        )
        if roof is not None and p.device == "cpu":
            ceiling = roof["copy_gb_s"] if case.mode == "forward_grad" else roof["read_gb_s"]
            rec["roofline_gb_s"] = ceiling
            rec["roofline_share"] = rec["gb_s"] / ceiling
        p.release()
        _log(
            quiet,
            f"  {p.name:13s} {case.mode:12s} {case.dtype} C={case.classes:<6d} "
            f"rows={case.rows:<8d} {rec['gb_s']:7.2f} GB/s  median {med * 1e3:8.2f} ms",
        )
    return recs


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run(
    rows: int | None = None,
    classes: Sequence[int] = DEFAULT_CLASSES,
    dtypes: Sequence[str] = ("float32",),
    modes: Sequence[str] = DEFAULT_MODES,
    providers: Sequence[str] | None = None,
    repeats: int = 7,
    device: str = "cpu",
    quick: bool = False,
    json: bool = False,
    *,
    threads: int | None = 2,
    save: bool = False,
    roofline: bool = True,
    repeats_large: int | None = None,
) -> list[dict]:
    """Benchmark every (dtype, classes, mode, provider); one JSON-ready dict per pair.

    rows: fixed row count; None = logits of ~100 MB per case (~16 MB with ``quick``).
    quick: fewer classes (QUICK_CLASSES, when ``classes`` is the default) and 16 MB cases.
    device: cpu | cuda | all (which providers run when ``providers`` is None).
    json: machine mode: no progress lines on stderr (the result is JSON-ready either way).
    threads: Numba and torch CPU threads (None: leave as they are).
    save: append to bench/results/kernels.csv and redraw the PNGs.
    roofline: measure bench/roofline.py first (CPU providers get ``roofline_share``).
    repeats_large: timed calls for C >= 128256 (default: ``repeats``).

    Each dict: provider, device, mode, dtype, rows, classes, bytes, median_s, p20_s, p80_s,
    gb_s, ratio_to_best_peer (engine providers only), roofline_share, threads,
    first_call_s, status ("ok" or "skipped: why"), check (peers: agreement with the
    engine), note, timestamp, host, roofline_gb_s.
    """
    quiet = bool(json)
    for m in modes:
        if m not in ALL_MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(ALL_MODES)}")
    for d in dtypes:
        if d not in TOLERANCE:
            raise ValueError(f"unsupported dtype {d!r}; choose float32 or float16")
    if quick and tuple(classes) == DEFAULT_CLASSES:
        classes = QUICK_CLASSES
    target_bytes = QUICK_BYTES if quick else TARGET_BYTES
    nthreads = set_threads(threads)
    provs = make_providers(providers, device)
    provs.sort(key=lambda p: p.name not in ENGINE_PROVIDERS)  # engines first: the reference
    unavailable = {}
    for p in provs:
        try:
            p.available()
        except Skip as exc:
            unavailable[p.name] = str(exc)
            _log(quiet, f"skip {p.name}: {exc}")

    roof = None
    if roofline and any(p.device == "cpu" and p.name not in unavailable for p in provs):
        from bench import roofline as roofline_mod

        roof = roofline_mod.measure(nthreads)
        _log(
            quiet,
            f"roofline: read {roof['read_gb_s']:.2f} GB/s, copy {roof['copy_gb_s']:.2f} GB/s "
            f"({nthreads} threads)",
        )

    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    host = socket.gethostname()
    results: list[dict] = []
    for dtype in dtypes:
        itemsize = np.dtype(dtype).itemsize
        for C in classes:
            n = int(rows) if rows else rows_for(C, itemsize, target_bytes)
            x, y = make_case_data(n, C, dtype)
            reps = repeats_large if (repeats_large and C >= 128256) else repeats
            for mode in modes:
                case = Case(mode, dtype, x, y)
                nbytes = byte_count(mode, n, C, itemsize)
                base = {
                    "timestamp": stamp,
                    "host": host,
                    "mode": mode,
                    "dtype": dtype,
                    "rows": n,
                    "classes": C,
                    "bytes": nbytes,
                }
                case_results = _run_case(
                    provs, unavailable, case, reps, roof, base, quiet, nthreads
                )
                fill_ratios(case_results)
                results.extend(case_results)
            del x, y
    if save:
        save_results(results)
    return results


def _warn_check(quiet: bool, rec: dict) -> None:
    tol = TOLERANCE[rec["dtype"]]
    chk = rec["check"] or {}
    bad = [
        f"{k}={v:.2e}"
        for k, v in chk.items()
        if k in ("loss_rel", "grad_rel") and v is not None and not v <= tol
    ]
    if bad:
        _log(
            quiet,
            f"  WARNING {rec['provider']} disagrees with the engine ({rec['mode']} "
            f"{rec['dtype']} {rec['rows']}x{rec['classes']}): {', '.join(bad)}",
        )


# -- cold start --------------------------------------------------------------------------

_COLD_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import engine
out = {"import_s": time.perf_counter() - t0, "calls": []}
rng = np.random.default_rng(0)
for dtype in sys.argv[1].split(","):
    x = rng.standard_normal((64, 256), dtype=np.float32).astype(dtype)
    y = rng.integers(0, 256, size=64)
    calls = {
        "forward": lambda: engine.cross_entropy(x, y),
        "forward_grad": lambda: engine.cross_entropy_grad(x, y, out=np.empty_like(x)),
        "row_stats": lambda: engine.row_stats(x, y),
    }
    for mode in sys.argv[2].split(","):
        t = time.perf_counter(); calls[mode](); first = time.perf_counter() - t
        t = time.perf_counter(); calls[mode](); second = time.perf_counter() - t
        out["calls"].append({"mode": mode, "dtype": dtype, "first_s": first, "second_s": second})
print(json.dumps(out))
"""


def cold_start(
    dtypes: Sequence[str] = ("float32", "float16"), modes: Sequence[str] = ALL_MODES
) -> dict:
    """Numba compile time with an empty cache, then first-call time with a warm cache.

    Two fresh processes share one new, empty NUMBA_CACHE_DIR: the first compiles every
    kernel (and writes the cache), the second loads them. Kernels are called in order
    (dtype-major), so later kernels reuse helpers already compiled by earlier ones.
    """
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="xent-numba-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", _COLD_SCRIPT, ",".join(dtypes), ",".join(modes)],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"cold-start subprocess failed:\n{proc.stderr[-2000:]}")
            res = _json.loads(proc.stdout.strip().splitlines()[-1])
            res["process_s"] = wall
            runs.append(res)
    return {"empty_cache": runs[0], "warm_cache": runs[1]}


# -- command line ------------------------------------------------------------------------


def _csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels", description="engine vs peers, in-memory kernels"
    )
    parser.add_argument("--quick", action="store_true", help="~16 MB cases, fewer classes")
    parser.add_argument("--classes", type=lambda s: [int(v) for v in _csv_list(s)])
    parser.add_argument("--dtypes", type=_csv_list, default=["float32"])
    parser.add_argument("--modes", type=_csv_list, default=list(DEFAULT_MODES))
    parser.add_argument("--providers", type=_csv_list)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--repeats-large", type=int, help="timed calls for C >= 128256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, help="fixed rows (default: ~100 MB of logits)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "all", "auto"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-save", action="store_true", help="do not write CSV/PNG")
    parser.add_argument("--cold-start", action="store_true", help="Numba compile/cache timings")
    args = parser.parse_args(argv)

    if args.cold_start:
        res = cold_start(args.dtypes if args.dtypes != ["float32"] else ("float32", "float16"))
        print(_json.dumps(res, indent=2) if args.json else format_cold_start(res))
        return 0
    results = run(
        rows=args.rows,
        classes=tuple(args.classes) if args.classes else DEFAULT_CLASSES,
        dtypes=tuple(args.dtypes),
        modes=tuple(args.modes),
        providers=args.providers,
        repeats=args.repeats,
        device=args.device,
        quick=args.quick,
        json=args.json,
        threads=args.threads,
        save=not args.no_save,
        repeats_large=args.repeats_large,
    )
    print(_json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
