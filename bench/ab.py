"""Interleaved A/B of the engine's kernels between two checkouts (same machine, same data).

python bench/ab.py BEFORE_DIR AFTER_DIR ROUNDS OUT.json [--full] [--classes 10,128]
                  [--modes forward,row_stats]
(--full: ~100 MB cases instead of ~16 MB.
 BEFORE_DIR: e.g. `git worktree add /tmp/before <old commit>`)
"""

import json
import os
import statistics
import subprocess
import sys

CODE = r"""
import json, sys
from bench.kernels import run
res = run(classes=CLASSES, dtypes=("float32", "float16"),
          modes=MODES, providers=["engine-cpu"],
          repeats=7, quick=QUICK, json=True, threads=2, roofline=False)
print("@@" + json.dumps([{k: r[k] for k in ("mode", "dtype", "classes", "gb_s")} for r in res]))
"""


def one(tree, quick, classes, modes):
    env = dict(os.environ, PYTHONPATH=tree)
    code = f"QUICK = {quick}\nCLASSES = {classes!r}\nMODES = {modes!r}\n" + CODE
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True
    )
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("@@")]
    if not line:
        sys.exit(f"{tree}: {p.stderr[-3000:]}")
    return json.loads(line[0][2:])


def main():
    argv = sys.argv[1:]
    quick = "--full" not in argv
    classes = (10, 128, 1000, 32000, 128256)
    modes = ("forward", "forward_grad", "row_stats")
    args = []
    while argv:
        a = argv.pop(0)
        if a == "--classes":
            classes = tuple(int(c) for c in argv.pop(0).split(","))
        elif a == "--modes":
            modes = tuple(argv.pop(0).split(","))
        elif a != "--full":
            args.append(a)
    before, after, rounds, out = args[0], args[1], int(args[2]), args[3]
    samples = {"before": {}, "after": {}}
    for r in range(rounds):
        order = [("before", before), ("after", after)]
        if r % 2:
            order.reverse()
        for name, tree in order:
            for rec in one(tree, quick, classes, modes):
                key = f"{rec['mode']} {rec['dtype']} {rec['classes']}"
                samples[name].setdefault(key, []).append(rec["gb_s"])
            print(f"round {r} {name} done", file=sys.stderr, flush=True)
    rows = []
    for key in samples["before"]:
        b = statistics.median(samples["before"][key])
        a = statistics.median(samples["after"][key])
        rows.append((key, b, a, a / b))
    json.dump({"samples": samples, "rows": rows}, open(out, "w"), indent=1)
    print("| mode dtype C | before GB/s | after GB/s | after/before |")
    print("|---|---:|---:|---:|")
    for key, b, a, ratio in rows:
        print(f"| {key} | {b:.2f} | {a:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
