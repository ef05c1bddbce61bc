"""Top-K emission and sparse evaluation (SPEC §8) against their peers.

    python -m bench.topk [--classes 32000,128256] [--k 64] [--threads 2] [--mb 100]
                         [--repeats 7] [--eval-rows 50000] [--json]

1. Top-K emission, same process, same float32 array, ``--threads`` threads each:
   ``engine.topk_logprobs(x, K)`` (indices, log-probs over all C, lse: one read of each
   row) against the strongest torch formulation of the same result,
   ``v, i = torch.topk(x, K); v - torch.logsumexp(x, 1, keepdim=True)``. GB/s counts the
   bytes of the logits. Timing as bench.compare: warm-up, then round-robin rounds after
   bench.timing's settle + lead-in; medians.
2. Rows per second of ``engine.evaluate`` on a top-K Parquet file (written by ``xent
   score --emit-topk``) against dense ``engine.evaluate`` of C = 1000 logits, both over
   the same number of rows, in this process after a warm-up job (median of ``repeats``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np  # noqa: E402

from bench.timing import set_threads, time_call  # first: sets OMP_WAIT_POLICY

CLASSES = (32000, 128256)


def _emission(C, k, mb, repeats):
    import torch

    import engine

    rows = max(2, int(mb * 1e6 // (C * 4)))
    rng = np.random.default_rng(C)
    x = rng.standard_normal((rows, C), dtype=np.float32) * 3
    t = torch.from_numpy(x)

    def peer():
        v, i = torch.topk(t, k)
        return i, v - torch.logsumexp(t, 1, keepdim=True)

    provs = {"engine": lambda: engine.topk_logprobs(x, k), "torch": peer}
    ours, theirs = provs["engine"](), peer()
    same = bool((ours[0] == theirs[0].numpy()).all())
    err = float(np.max(np.abs(ours[1] - theirs[1].numpy())))
    times = {n: [] for n in provs}
    names = list(provs)
    for r in range(repeats):
        for n in names[r % 2 :] + names[: r % 2]:
            times[n].append(time_call(provs[n], lead_in=True)[0])
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "classes": C, "k": k, "rows": rows,
        "gb_s": {n: x.nbytes / v / 1e9 for n, v in med.items()},
        "engine_vs_torch": med["torch"] / med["engine"],
        "same_indices": same, "max_logprob_diff": err,
    }  # fmt: skip


def _eval_rates(rows, k, repeats, workdir):
    import engine
    from engine.gen import generate

    dense_small = os.path.join(workdir, "dense1000.parquet")
    generate(dense_small, rows=rows, classes=1000, seed=1)
    dense_big = os.path.join(workdir, "dense32000.parquet")
    big_rows = max(1000, rows // 32)
    generate(dense_big, rows=big_rows, classes=32000, seed=2)
    sparse = os.path.join(workdir, f"top{k}.parquet")
    engine.score(dense_big, sparse, keep=("target",), emit_topk=k)
    # the sparse file repeated to the same row count as the dense one
    import pyarrow.parquet as pq

    table = pq.read_table(sparse)
    reps = -(-rows // table.num_rows)
    import pyarrow as pa

    many = pa.concat_tables([table] * reps).slice(0, rows)
    pq.write_table(many, sparse)
    out = {}
    for name, path in (("dense C=1000", dense_small), (f"sparse top-{k}", sparse)):
        engine.evaluate(path)  # warm-up: kernels loaded, file in the page cache
        secs = [time_call(lambda p=path: engine.evaluate(p))[0] for _ in range(repeats)]
        med = statistics.median(secs)
        out[name] = {
            "rows": rows,
            "rows_per_second": rows / med,
            "bytes": os.path.getsize(path),
        }
    return out


def run(classes=CLASSES, k=64, threads=2, mb=100, repeats=7, eval_rows=50_000):
    set_threads(threads)
    emission = [_emission(C, k, mb, repeats) for C in classes]
    with tempfile.TemporaryDirectory() as d:
        rates = _eval_rates(eval_rows, k, repeats, d)
    return {"threads": threads, "emission": emission, "eval": rates}


def format_table(res) -> str:
    lines = [
        "| C | K | rows | engine GB/s | torch topk+logsumexp GB/s | engine / torch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["emission"]:
        g = r["gb_s"]
        lines.append(
            f"| {r['classes']} | {r['k']} | {r['rows']} | {g['engine']:.2f} | "
            f"{g['torch']:.2f} | {r['engine_vs_torch']:.2f}x |"
        )
    lines += ["", "| eval job | rows | file MB | rows/s |", "|---|---:|---:|---:|"]
    for name, r in res["eval"].items():
        lines.append(
            f"| {name} | {r['rows']} | {r['bytes'] / 1e6:.1f} | {r['rows_per_second']:,.0f} |"
        )
    lines.append(f"\n{res['threads']} threads; float32 logits; medians")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.topk", description=__doc__.split("\n")[0])
    p.add_argument("--classes", default=",".join(map(str, CLASSES)))
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mb", type=float, default=100, help="MB of logits per emission case")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--eval-rows", type=int, default=50_000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    classes = tuple(int(c) for c in a.classes.split(","))
    res = run(classes, a.k, a.threads, a.mb, a.repeats, a.eval_rows)
    print(json.dumps(res, indent=1) if a.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
