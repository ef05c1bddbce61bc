"""The same timing script against two checkouts, through the public API only.

    python bench/ab_api.py BEFORE_DIR AFTER_DIR [ROUNDS]

bench/ab.py runs each tree's own `bench` package, so it also measures any change to the
benchmark harness; this one runs one script (below) in both trees: ``engine.cross_entropy``
on ~100 MB arrays, 2 threads, median and best of 9 calls after a warm-up, rounds
alternating. Use it when an ab.py cell stays low to tell a slower kernel from a harness.
"""

import subprocess
import sys

SCRIPT = r"""
import time, numpy as np, numba, engine
numba.set_num_threads(2)
out = []
for C, dt in ((128256, np.float32), (1000, np.float32), (1000, np.float16)):
    n = int(100e6 // (C * np.dtype(dt).itemsize))
    rng = np.random.default_rng(C)
    x = (rng.standard_normal((n, C), dtype=np.float32) * 2).astype(dt)
    y = rng.integers(0, C, n)
    engine.cross_entropy(x, y, device="cpu")
    ts = []
    for _ in range(9):
        t = time.perf_counter()
        engine.cross_entropy(x, y, device="cpu")
        ts.append(time.perf_counter() - t)
    gb = x.nbytes / 1e9
    out.append(f"{C}/{np.dtype(dt).name}: {gb / np.median(ts):.2f} (best {gb / min(ts):.2f})")
print(" | ".join(out))
"""


def main():
    trees = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    for _ in range(rounds):
        for tree in trees:
            env = {"PYTHONPATH": tree}
            p = subprocess.run(
                [sys.executable, "-c", SCRIPT], cwd=tree, env=env, capture_output=True, text=True
            )
            print(f"{tree}: {p.stdout.strip() or p.stderr[-500:]}", flush=True)


if __name__ == "__main__":
    main()
