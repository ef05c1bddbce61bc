"""End to end: `xent compare` on two Parquet files against a pyarrow + torch loop that
computes mean KL, as whole processes (clock started before the imports).

    python -m bench.compare_e2e [--rows 16384] [--classes 32000] [--dir /tmp/xent-cmp-e2e]

The files: float32 logits (snappy Parquet, 1024-row groups, ~2.1 GB each at the
defaults), the candidate = base + N(0, 0.1²) noise. The torch loop reads both files'
batches in lockstep and sums `F.kl_div(log_softmax(c), log_softmax(b), log_target=True)`
row sums (KL alone); xent computes every compare statistic. GB/s counts both files' logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOBS = {
    "torch-loop": """
import time
t = time.perf_counter()
import json, sys, numpy as np, pyarrow.parquet as pq, torch
import torch.nn.functional as F
torch.set_num_threads(2)
total = 0.0; rows = 0
a = pq.ParquetFile(sys.argv[1]).iter_batches(columns=['logits'])
b = pq.ParquetFile(sys.argv[2]).iter_batches(columns=['logits'])
for ba, bb in zip(a, b):
    c = ba.column(0).type.list_size
    x = torch.from_numpy(ba.column(0).values.to_numpy(zero_copy_only=False).reshape(-1, c))
    z = torch.from_numpy(bb.column(0).values.to_numpy(zero_copy_only=False).reshape(-1, c))
    kl = F.kl_div(F.log_softmax(z, 1), F.log_softmax(x, 1), log_target=True, reduction='none')
    total += float(kl.sum()); rows += x.shape[0]
print(json.dumps({'seconds': time.perf_counter() - t, 'kl': total / rows}))
""",
    "xent-compare": """
import time
t = time.perf_counter()
import json, sys
import engine
r = engine.compare(sys.argv[1], sys.argv[2], device='cpu', threads=2).to_dict()
print(json.dumps({'seconds': time.perf_counter() - t, 'kl': r['kl']['mean']}))
""",
}


def make_pair(directory: str, rows: int, classes: int, seed: int = 0) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"{n}_{rows}x{classes}.parquet") for n in ("base", "cand")]
    if all(os.path.exists(p) for p in paths):
        return paths[0], paths[1]
    schema = pa.schema([pa.field("logits", pa.list_(pa.float32(), classes), nullable=False)])
    rng = np.random.default_rng(seed)
    with (
        pq.ParquetWriter(paths[0] + ".tmp", schema, compression="snappy") as wa,
        pq.ParquetWriter(paths[1] + ".tmp", schema, compression="snappy") as wb,
    ):
        for lo in range(0, rows, 1024):
            n = min(1024, rows - lo)
            x = rng.standard_normal((n, classes), dtype=np.float32) * 2
            z = x + rng.standard_normal((n, classes), dtype=np.float32) * 0.1
            for w, m in ((wa, x), (wb, z)):
                col = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), classes)
                w.write_batch(pa.record_batch([col], schema=schema), row_group_size=1024)
    for p in paths:
        os.replace(p + ".tmp", p)
    return paths[0], paths[1]


def run_job(job: str, a: str, b: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", JOBS[job], a, b], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if out.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--dir", default="/tmp/xent-cmp-e2e")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    a, b = make_pair(args.dir, args.rows, args.classes)
    nbytes = 2 * args.rows * args.classes * 4
    res = {}
    for _ in range(args.repeats):  # interleaved
        for job in JOBS:
            res.setdefault(job, []).append(run_job(job, a, b))
    print(f"**{args.rows} x {args.classes} float32, two files, {nbytes / 1e9:.2f} GB of logits**\n")
    print("| job | seconds (median) | GB/s | × torch loop | mean KL |")
    print("|---|---:|---:|---:|---:|")
    med = {j: float(np.median([r["seconds"] for r in v])) for j, v in res.items()}
    for job, runs in res.items():
        print(
            f"| {job} | {med[job]:.2f} | {nbytes / med[job] / 1e9:.2f} | "
            f"{med['torch-loop'] / med[job]:.2f} | {runs[0]['kl']:.6g} |"
        )


if __name__ == "__main__":
    main()
