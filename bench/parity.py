"""Bit-for-bit parity of the CPU kernels over a fixed grid of inputs.

    python -m bench.parity save FILE.npz    # run the grid, save every output
    python -m bench.parity check FILE.npz   # run it again, compare bit for bit

``check`` exits non-zero and names each output that differs (or is missing/extra). Use it
around refactors that must not change a single bit (moving kernels between modules,
renaming helpers). The grid: every logits storage dtype, class counts from 1 to 128256
(across the tile, row and block paths), and the loss options (weights, ignored rows, label
smoothing, z-loss, softcap, log-prob and prob inputs, soft targets, -inf masks, NaN rows)
under every reduction; each through cross_entropy, cross_entropy_grad and row_stats.

Compare runs of the same kind: a run that compiles the kernels and one that loads them
from Numba's cache measured a few float64 outputs 1 ulp apart (smoothing losses,
gradients of 32003+ classes) with no code changed. So save the baseline from a cold
cache (delete __pycache__) and check with a cold cache, or both warm.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import engine
from engine.dtypes import float32_to_bf16_bits

DTYPES = ("float16", "bfloat16", "float32", "float64")
CLASSES = (1, 10, 127, 128, 1000, 32003, 128256)
OPTIONS = (
    "plain",
    "weight",
    "ignore",
    "smooth",
    "zloss",
    "softcap",
    "log_probs",
    "probs",
    "soft",
    "mask",
    "nan",
    "combo",
)


def _rows(c: int) -> int:
    if c >= 100_000:
        return 4
    if c >= 10_000:
        return 16
    return 200


def _encode(x64: np.ndarray, dtype: str):
    """float64 values -> (logits array, options naming their storage)."""
    if dtype == "bfloat16":
        return float32_to_bf16_bits(x64.astype(np.float32)), {"logits_dtype": "bfloat16"}
    return x64.astype(dtype), {}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=1, keepdims=True))


def case(dtype: str, c: int, option: str):
    """(logits, target, options) of one grid point; the same every run."""
    seed = (DTYPES.index(dtype) * 1000 + CLASSES.index(c)) * 100 + OPTIONS.index(option)
    rng = np.random.default_rng(seed)
    n = _rows(c)
    x = rng.standard_normal((n, c)) * 3.0
    y = rng.integers(0, c, n)
    opts: dict = {}
    target = y
    if option == "weight":
        opts["weight"] = rng.uniform(0.25, 2.0, c)
    elif option == "ignore":
        y[rng.random(n) < 0.3] = -100
    elif option == "smooth":
        opts["label_smoothing"] = 0.1
    elif option == "zloss":
        opts["z_loss"] = 1e-4
    elif option == "softcap":
        x = x * 10.0
        opts["softcap"] = 30.0
    elif option == "log_probs":
        x = _log_softmax(x)
        opts["input_kind"] = "log_probs"
    elif option == "probs":
        x = np.exp(_log_softmax(x))
        opts["input_kind"] = "probs"
    elif option == "soft":
        target = np.exp(_log_softmax(rng.standard_normal((n, c))))
        opts["label_smoothing"] = 0.05
    elif option == "mask":
        masked = rng.random((n, c)) < 0.5
        masked[np.arange(n), y] = False
        x[masked] = -np.inf
        x[0, :] = -np.inf  # a row with nothing finite
        x[0, y[0]] = 0.0 if c > 1 else -np.inf
    elif option == "nan":
        x[1 % n, c // 2] = np.nan
    elif option == "combo":
        opts["weight"] = rng.uniform(0.25, 2.0, c)
        opts["label_smoothing"] = 0.2
        opts["z_loss"] = 1e-3
        opts["softcap"] = 15.0
        y[rng.random(n) < 0.2] = -100
    logits, storage = _encode(x, dtype)
    opts.update(storage)
    return logits, target, opts


def _as_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.copy()
    return np.asarray(value, dtype=np.float64)


def outputs() -> dict[str, np.ndarray]:
    """Every output of the grid, by name."""
    out: dict[str, np.ndarray] = {}
    for dtype in DTYPES:
        for c in CLASSES:
            for option in OPTIONS:
                logits, target, opts = case(dtype, c, option)
                key = f"{dtype}/C={c}/{option}"
                for reduction in ("none", "mean", "sum"):
                    kw = dict(opts, reduction=reduction, device="cpu")
                    _record(out, f"{key}/ce/{reduction}", engine.cross_entropy, logits, target, kw)
                    g = np.linspace(0.5, 1.5, logits.shape[0]) if reduction == "none" else 0.75
                    res = _call(engine.cross_entropy_grad, logits, target, dict(kw, grad_output=g))
                    if isinstance(res, str):
                        out[f"{key}/grad/{reduction}/error"] = np.asarray(res)
                    else:
                        out[f"{key}/grad/{reduction}/loss"] = _as_array(res[0])
                        out[f"{key}/grad/{reduction}/grad"] = _as_array(res[1])
                res = _call(engine.row_stats, logits, target, dict(opts, device="cpu"))
                if isinstance(res, str):
                    out[f"{key}/stats/error"] = np.asarray(res)
                else:
                    for field, value in res.as_dict().items():
                        out[f"{key}/stats/{field}"] = _as_array(value)
    return out


def _call(fn, logits, target, kw):
    try:
        return fn(logits, target, **kw)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _record(out, name, fn, logits, target, kw):
    res = _call(fn, logits, target, kw)
    out[name + ("/error" if isinstance(res, str) else "")] = _as_array(res)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "check"):
        print(__doc__)
        return 2
    verb, path = argv
    t0 = time.perf_counter()
    got = outputs()
    seconds = time.perf_counter() - t0
    if verb == "save":
        np.savez_compressed(path, **got)
        print(f"saved {len(got)} outputs to {path} ({seconds:.1f} s)")
        return 0
    with np.load(path) as f:
        want = {k: f[k] for k in f.files}
    bad = sorted(k for k in want.keys() & got.keys() if not _same(want[k], got[k]))
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    for k in bad:
        print(f"DIFFERS  {k}")
    for k in missing:
        print(f"MISSING  {k}")
    for k in extra:
        print(f"EXTRA    {k}")
    if bad or missing or extra:
        print(f"FAIL: {len(bad)} differ, {len(missing)} missing, {len(extra)} extra of {len(want)}")
        return 1
    print(f"OK: {len(want)} outputs identical bit for bit ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
