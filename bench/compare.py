"""The fused compare kernel against each peer's strongest formulation of per-row KL.

    python -m bench.compare [--classes 10,1000,32000,128256] [--threads 2] [--mb 100]
                            [--repeats 7] [--json]

Same process, same arrays, ``--threads`` threads for every provider. Cases: float32 base
vs float32 candidate, and bfloat16 base (bit patterns; torch.bfloat16 for torch) vs
float32 candidate. Providers:

- ``engine-cpu``: ``engine.kernels.cpu.compare``: KL both ways, JSD, TVD, both argmaxes
  and the candidate's rank of the base's argmax, every row, in one pass.
- ``torch-eager``: ``F.kl_div(F.log_softmax(c, 1), F.log_softmax(b, 1), log_target=True,
  reduction="none").sum(1)`` (a bfloat16 base goes through ``log_softmax(..., dtype=
  torch.float32)``); KL alone.
- ``torch-compile``: ``torch.compile(dynamic=False)`` of the same function (compilation
  excluded: warm-up calls).
- ``jax-cpu``: ``jax.jit`` of the same with ``jax.nn.log_softmax`` (skipped when JAX is
  not installed).

GB/s counts the bytes of both inputs (rows x C x (itemsize base + itemsize candidate)).
``roof%`` is the engine's GB/s over this machine's read bandwidth (bench.roofline).
Timing: warm-up, then ``repeats`` rounds round-robin over the providers in rotating order,
each after bench.timing's settle + lead-in; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np  # noqa: E402

from bench.timing import set_threads, time_call  # first: sets OMP_WAIT_POLICY
from engine import dtypes  # noqa: E402

CLASSES = (10, 1000, 32000, 128256)
CASES = (("float32", "float32"), ("bfloat16", "float32"))


def _data(rows, classes, base_kind, seed=0):
    rng = np.random.default_rng(seed + classes)
    x = rng.standard_normal((rows, classes), dtype=np.float32) * 2
    z = x + rng.standard_normal((rows, classes), dtype=np.float32) * 0.1
    if base_kind == "bfloat16":
        return dtypes.float32_to_bf16_bits(x).reshape(rows, classes), z
    return x, z


def _providers(a, kind_a, b, kind_b):
    from engine.kernels import cpu

    out = {"engine-cpu": lambda: cpu.compare(a, kind_a, b, kind_b, None, 1.0)["kl"]}
    skipped = {}
    try:
        import torch
        import torch.nn.functional as F

        ta = (
            torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            if kind_a == "bfloat16"
            else torch.from_numpy(a)
        )
        tb = torch.from_numpy(b)

        def kl(base, cand):
            lp = F.log_softmax(base, 1, dtype=torch.float32)
            lq = F.log_softmax(cand, 1, dtype=torch.float32)
            return F.kl_div(lq, lp, log_target=True, reduction="none").sum(1)

        out["torch-eager"] = lambda: kl(ta, tb)
        compiled = torch.compile(kl, dynamic=False)
        out["torch-compile"] = lambda: compiled(ta, tb)
    except ImportError as e:
        skipped["torch"] = str(e)
    try:
        import jax
        import jax.numpy as jnp

        ja = jnp.asarray(dtypes.decode(a, "bfloat16" if kind_a == "bfloat16" else None))
        jb = jnp.asarray(b)

        @jax.jit
        def jkl(base, cand):
            lp = jax.nn.log_softmax(base, axis=1)
            lq = jax.nn.log_softmax(cand, axis=1)
            return jnp.sum(jnp.exp(lp) * (lp - lq), axis=1)

        out["jax-cpu"] = lambda: jkl(ja, jb).block_until_ready()
    except ImportError as e:
        skipped["jax-cpu"] = str(e)
    return out, skipped


def run(classes=CLASSES, threads=2, mb=100, repeats=7, quiet=False):
    from bench.roofline import measure

    set_threads(threads)
    roof = measure(threads=threads)
    results = []
    for kind_a, kind_b in CASES:
        for C in classes:
            item = (2 if kind_a == "bfloat16" else 4) + 4
            rows = max(2, int(mb * 1e6 // (C * item)))
            a, b = _data(rows, C, kind_a)
            nbytes = rows * C * item
            provs, skipped = _providers(a, kind_a, b, kind_b)
            ref = None
            for name, call in provs.items():  # warm-up (compiles), and the accuracy check
                call()
                got = np.asarray(call(), dtype=np.float64)
                ref = got if ref is None else ref
                err = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)))
                if err > 1e-2 and not quiet:
                    print(f"  {name}: KL differs from the engine's by {err:.1e}", file=sys.stderr)
            times = {n: [] for n in provs}
            names = list(provs)
            for r in range(repeats):
                order = names[r % len(names) :] + names[: r % len(names)]
                for n in order:
                    t, _ = time_call(provs[n], lead_in=True)
                    times[n].append(t)
            med = {n: statistics.median(v) for n, v in times.items()}
            best_peer = min((v for n, v in med.items() if n != "engine-cpu"), default=None)
            rec = {
                "base": kind_a, "candidate": kind_b, "classes": C, "rows": rows,
                "gb_s": {n: nbytes / v / 1e9 for n, v in med.items()},
                "engine_vs_best_peer": best_peer / med["engine-cpu"] if best_peer else None,
                "roof_pct": 100 * nbytes / med["engine-cpu"] / 1e9 / roof["read_gb_s"],
                "skipped": skipped,
            }  # fmt: skip
            results.append(rec)
            if not quiet:
                print(_row(rec), file=sys.stderr)
    return {"roofline": roof, "threads": threads, "results": results}


def _row(rec) -> str:
    g = rec["gb_s"]
    cells = [f"{g.get(n, float('nan')):.2f}" if n in g else "–" for n in PEERS]
    ratio = rec["engine_vs_best_peer"]
    return (
        f"| {rec['base']} vs {rec['candidate']} | {rec['classes']} | "
        + " | ".join(cells)
        + f" | {ratio:.2f}x | {rec['roof_pct']:.0f}% |"
    )


PEERS = ("engine-cpu", "torch-eager", "torch-compile", "jax-cpu")


def format_table(res) -> str:
    head = "| base vs candidate | C | " + " | ".join(f"{n} GB/s" for n in PEERS)
    head += " | engine / best peer | engine roof% |"
    lines = [head, "|---|---:|" + "---:|" * (len(PEERS) + 2)]
    lines += [_row(r) for r in res["results"]]
    roof = res["roofline"]
    lines.append(
        f"\nread roofline {roof['read_gb_s']:.1f} GB/s ({res['threads']} threads); "
        "GB/s counts both inputs; the engine computes KL both ways, JSD, TVD, argmaxes "
        "and ranks, the peers KL alone"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--classes", default=",".join(map(str, CLASSES)))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mb", type=float, default=100, help="MB of both inputs per case")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    classes = tuple(int(c) for c in args.classes.split(","))
    res = run(classes, args.threads, args.mb, args.repeats, quiet=args.json)
    print(json.dumps(res, indent=1) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
