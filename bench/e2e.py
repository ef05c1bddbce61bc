"""End-to-end benchmark: whole jobs over files, xent against a pyarrow + torch loop.

Each measurement runs in its own subprocess so that wall time includes start-up and file
reading, and peak RSS (ru_maxrss) is the job's own. GB/s counts logits bytes
(rows x C x itemsize) per wall-clock second.

    python -m bench.e2e                       # 8192 x 32000 float32 (~1 GB) in /tmp/xent-e2e
    python -m bench.e2e --rows 32768          # the 4.2 GB file of the streaming issue
    python -m bench.e2e --scale-check         # score peak RSS on files 4x smaller / larger
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each job prints one JSON line {"seconds": ..., "value": ...}; peak RSS comes from rusage.
# Every job's clock starts before its imports: a user's job pays them (torch's ~1 s, xent's
# Numba cache load), and a small file shows it.
JOBS = {
    "decode-only": """
import time
t = time.perf_counter()
import pyarrow.parquet as pq, pyarrow as pa, json, sys
path = sys.argv[1]
n = 0
if path.endswith('.parquet'):
    for b in pq.ParquetFile(path).iter_batches(columns=['logits', 'target']):
        n += b.num_rows
else:
    with pa.memory_map(path) as src:
        r = pa.ipc.open_file(src)
        for i in range(r.num_record_batches):
            b = r.get_batch(i)
            b.column(0).values.to_numpy()
            n += b.num_rows
print(json.dumps({'seconds': time.perf_counter() - t, 'value': n}))
""",
    "torch-loop": """
import time
t = time.perf_counter()
import pyarrow.parquet as pq, pyarrow as pa, json, sys, numpy as np, torch
import torch.nn.functional as F
torch.set_num_threads(2)
path = sys.argv[1]
total = 0.0; count = 0
def batches():
    if path.endswith('.parquet'):
        yield from pq.ParquetFile(path).iter_batches(columns=['logits', 'target'])
    else:
        src = pa.memory_map(path); r = pa.ipc.open_file(src)
        for i in range(r.num_record_batches):
            yield r.get_batch(i)
for b in batches():
    col = b.column(0)
    c = col.type.list_size
    x = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(-1, c))
    y = torch.from_numpy(b.column(1).to_numpy().astype(np.int64))
    total += float(F.cross_entropy(x, y, reduction='sum')); count += len(y)
print(json.dumps({'seconds': time.perf_counter() - t, 'value': total / count}))
""",
    "xent-eval": """
import time, json, sys
t = time.perf_counter()
import engine
r = engine.evaluate(sys.argv[1], device='cpu').to_dict()
print(json.dumps({'seconds': time.perf_counter() - t, 'value': r['loss']}))
""",
    "xent-score": """
import time, json, sys, os
t = time.perf_counter()
import engine
out = sys.argv[1] + '.scores.parquet'
engine.score(sys.argv[1], out, device='cpu', overwrite=True)
os.remove(out)
print(json.dumps({'seconds': time.perf_counter() - t, 'value': 0}))
""",
}


def make_dataset(directory: str, rows: int, classes: int, seed: int = 0) -> tuple[str, str]:
    """Parquet (snappy, 1024-row groups) and uncompressed Arrow IPC, written batch by batch."""
    os.makedirs(directory, exist_ok=True)
    pq_path = os.path.join(directory, f"logits_{rows}x{classes}.parquet")
    ipc_path = os.path.join(directory, f"logits_{rows}x{classes}.arrow")
    if os.path.exists(pq_path) and os.path.exists(ipc_path):
        return pq_path, ipc_path
    schema = pa.schema(
        [
            pa.field("logits", pa.list_(pa.float32(), classes), nullable=False),
            pa.field("target", pa.int64()),
        ]
    )
    rng = np.random.default_rng(seed)
    with (
        pq.ParquetWriter(pq_path + ".tmp", schema, compression="snappy") as pw,
        pa.ipc.new_file(ipc_path + ".tmp", schema) as iw,
    ):
        for lo in range(0, rows, 1024):
            n = min(1024, rows - lo)
            x = rng.standard_normal((n, classes), dtype=np.float32)
            y = rng.integers(0, classes, n)
            col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), classes)
            batch = pa.record_batch([col, pa.array(y)], schema=schema)
            pw.write_batch(batch, row_group_size=1024)
            iw.write_batch(batch)
    os.replace(pq_path + ".tmp", pq_path)
    os.replace(ipc_path + ".tmp", ipc_path)
    return pq_path, ipc_path


def run_job(job: str, path: str) -> dict:
    """One measurement in a fresh process: wall seconds (in-process) and peak RSS (MB)."""
    code = (
        "import resource, sys\n"
        + JOBS[job]
        + "\nprint('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if out.returncode != 0:
        raise RuntimeError(f"{job} failed on {path}:\n{out.stderr[-2000:]}")
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-2])
    result["rss_mb"] = int(lines[-1].split()[1]) / 1024
    return result


def measure(paths: dict, logit_bytes: int, repeats: int) -> list[dict]:
    rows = []
    for fmt, path in paths.items():
        for job in JOBS:
            runs = [run_job(job, path) for _ in range(repeats)]
            secs = float(np.median([r["seconds"] for r in runs]))
            rows.append(
                {
                    "format": fmt,
                    "job": job,
                    "seconds": secs,
                    "gb_s": logit_bytes / secs / 1e9,
                    "rss_mb": max(r["rss_mb"] for r in runs),
                    "value": runs[0]["value"],
                }
            )
    for r in rows:
        peers = {p["job"]: p["seconds"] for p in rows if p["format"] == r["format"]}
        r["vs_torch_loop"] = peers["torch-loop"] / r["seconds"]
        r["vs_decode_only"] = peers["decode-only"] / r["seconds"]
    return rows


def table(rows: list[dict], title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| format | job | seconds | GB/s | × torch loop | × decode-only | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['job']} | {r['seconds']:.2f} | {r['gb_s']:.2f} | "
            f"{r['vs_torch_loop']:.2f} | {r['vs_decode_only']:.2f} | {r['rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--dir", default="/tmp/xent-e2e")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--scale-check",
        action="store_true",
        help="peak RSS of xent score on files 4x smaller and 4x larger",
    )
    args = ap.parse_args(argv)
    logit_bytes = args.rows * args.classes * 4
    pq_path, ipc_path = make_dataset(args.dir, args.rows, args.classes)
    rows = measure({"parquet": pq_path, "arrow": ipc_path}, logit_bytes, args.repeats)
    title = (
        f"{args.rows} x {args.classes} float32 ({logit_bytes / 1e9:.2f} GB), {os.cpu_count()} cores"
    )
    print(table(rows, title))
    if args.scale_check:
        print("\n| rows | xent-score peak RSS MB (parquet) |\n|---|---|")
        for n in (args.rows // 4, args.rows, args.rows * 4):
            p, _ = make_dataset(args.dir, n, args.classes)
            print(f"| {n} | {run_job('xent-score', p)['rss_mb']:.0f} |")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "e2e.jsonl"), "a") as f:
        for r in rows:
            f.write(
                json.dumps({"time": time.time(), "rows": args.rows, "classes": args.classes, **r})
                + "\n"
            )


if __name__ == "__main__":
    main()
