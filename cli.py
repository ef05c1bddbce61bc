"""The `xent` command line (SPEC §6): thin wrappers around the engine's API.

Each command parses its flags, calls one engine function and prints the result: a table
for people, or JSON (``--json``) for scripts. Errors a user can cause (bad data, bad
flags, missing files) end in one line ``Error: <file>: <what, where>`` and exit status 2;
Ctrl-C exits 130 and leaves no partial output. ``--debug`` shows the traceback instead.

The engine is imported inside the commands, so that ``xent --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
import warnings

import click

from engine import interrupt

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
INPUT_KINDS = {"logits": "logits", "log-probs": "log_probs", "probs": "probs"}
_REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


# ======================================================================================
# Errors: one line, status 2; Ctrl-C: status 130
# ======================================================================================


class XentCliError(click.ClickException):
    """A user error, shown as one line ``Error: <message>`` with status 2."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _user_error_types() -> tuple[type[BaseException], ...]:
    from engine.errors import XentInputError

    types: list[type[BaseException]] = [XentInputError, ValueError, TypeError, IndexError]
    types += [FileNotFoundError, PermissionError, OSError]
    pa = sys.modules.get("pyarrow")  # an Arrow error can only come from a loaded pyarrow
    if pa is not None:
        types.append(pa.ArrowException)
    return tuple(types)


def describe_error(err: BaseException) -> str:
    """The message of a user error: ``<file>: <what>`` where a file is known."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return one_line(str(err)) or type(err).__name__


def _debug(ctx: click.Context | None) -> bool:
    if os.environ.get("XENT_DEBUG", "") not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.meta.get("xent.debug"))


@contextlib.contextmanager
def _handle_errors(ctx: click.Context):
    """Turn user errors and Ctrl-C into one line and an exit status (the one place)."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as e:
        if _debug(ctx):
            raise
        where = e.ctx.command_path if e.ctx is not None else ctx.command_path
        raise XentCliError(f"{one_line(e.format_message())} (see '{where} --help')") from None
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except KeyboardInterrupt:
        if _debug(ctx):
            raise
        _interrupted()
    except BrokenPipeError:
        raise  # `xent ... | head`: click ends quietly
    except Exception as e:
        if interrupt.requested() and not _debug(ctx):
            _interrupted()  # an error in the interrupt's wake (see engine/interrupt.py)
        if _debug(ctx) or not isinstance(e, _user_error_types()):
            raise
        raise XentCliError(describe_error(e)) from None


def _interrupted():
    click.echo("Interrupted", err=True)
    raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


class XentGroup(click.Group):
    """A group whose subcommands share one error policy (see `_handle_errors`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _handle_errors(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        interrupt.install()  # Ctrl-C is remembered, so no job can swallow it and commit
        with _handle_errors(ctx):
            return super().invoke(ctx)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["xent.debug"] = True
    return value


debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="Show the full traceback of an error.",
)


# ======================================================================================
# Option parsing helpers
# ======================================================================================


def _numbers(text: str, what: str) -> list[float]:
    tokens = [t for t in re.split(r"[\s,;]+", text.strip().strip("[]()")) if t]
    if not tokens:
        raise click.BadParameter(f"{what}: no numbers given")
    try:
        return [float(t) for t in tokens]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def parse_weight(ctx, param, value):
    """--weight: C comma-separated numbers, or a file (whitespace/comma text, or .npy)."""
    if value is None:
        return None
    import numpy as np

    if os.path.isfile(value):
        if value.lower().endswith(".npy"):
            try:
                arr = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise click.BadParameter(f"{value}: cannot read as .npy ({one_line(e)})") from None
            return np.asarray(arr, dtype=np.float64).reshape(-1)
        try:
            with open(value) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"{value}: cannot read ({one_line(e)})") from None
        try:
            return np.array(_numbers(text, value), dtype=np.float64)
        except click.BadParameter:
            raise click.BadParameter(
                f"{value}: expected numbers separated by commas or whitespace"
            ) from None
    try:
        return np.array(_numbers(value, "--weight"), dtype=np.float64)
    except click.BadParameter:
        raise click.BadParameter(
            f"{value!r} is neither an existing file nor a comma-separated list of numbers"
        ) from None


def parse_top_k(ctx, param, value):
    if value is None:
        return (1, 5)
    try:
        ks = tuple(int(t) for t in re.split(r"[\s,]+", value.strip()) if t)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not ks or any(k < 1 for k in ks):
        raise click.BadParameter(f"{value!r}: each k must be an integer >= 1")
    return ks


def split_names(ctx, param, value):
    """--keep a,b --keep c -> ('a', 'b', 'c')."""
    names: list[str] = []
    for item in value or ():
        names += [n.strip() for n in item.split(",") if n.strip()]
    return tuple(dict.fromkeys(names))


def split_csv(ctx, param, value):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def split_ints(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _input_kind(ctx, param, value):
    return None if value is None else INPUT_KINDS[value]


def _options(*decorators):
    """Several click options as one decorator (declared once, shared by commands)."""

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


source_options = _options(
    click.option(
        "--logits",
        default="logits",
        show_default=True,
        help="Logits column, or a glob of one float column per class ('logit_*').",
    ),
    click.option(
        "--target",
        default="target",
        show_default=True,
        help="Target column: integer classes, or a list of probabilities.",
    ),
)

loss_options = _options(
    click.option(
        "--weight",
        callback=parse_weight,
        metavar="FILE|w0,w1,..",
        help="Class weights: C numbers, or a file of them (text or .npy).",
    ),
    click.option(
        "--ignore-index",
        type=int,
        default=-100,
        show_default=True,
        help="Target value whose rows are not counted.",
    ),
    click.option(
        "--label-smoothing",
        type=click.FloatRange(0.0, 1.0),
        default=0.0,
        show_default=True,
        help="Label smoothing ε in [0, 1].",
    ),
    click.option(
        "--z-loss",
        type=click.FloatRange(min=0.0),
        default=0.0,
        show_default=True,
        help="Add ζ·lse² per row (PaLM's z-loss).",
    ),
    click.option(
        "--softcap",
        type=click.FloatRange(min=0.0, min_open=True),
        default=None,
        help="Replace logits by c·tanh(x/c) first (c > 0).",
    ),
    click.option(
        "--input-kind",
        type=click.Choice(list(INPUT_KINDS)),
        default="logits",
        show_default=True,
        callback=_input_kind,
        help="What the rows hold: logits (CrossEntropyLoss), log-probs (NLLLoss), "
        "probs (softmax outputs).",
    ),
    click.option(
        "--reduction",
        type=click.Choice(["mean", "sum"]),
        default="mean",
        show_default=True,
        help="How the reported loss reduces rows (as PyTorch).",
    ),
    click.option(
        "--nan-policy",
        type=click.Choice(["error", "skip", "propagate"]),
        default="error",
        show_default=True,
        help="Rows with NaN/inf: stop with the row, drop and count them, or propagate NaN.",
    ),
    click.option(
        "--logits-dtype",
        type=click.Choice(["bfloat16", "float16", "float32", "float64"]),
        default=None,
        help="Read 16-bit integer logits as bfloat16 bit patterns.",
    ),
)

run_options = _options(
    click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where kernels run (auto: CUDA when a GPU is present).",
    ),
    click.option(
        "--threads", type=click.IntRange(min=1), default=None, help="CPU threads (Numba)."
    ),
    click.option(
        "--chunk-rows",
        type=click.IntRange(min=1),
        default=None,
        help="Rows per chunk (default: about 64 MB of logits).",
    ),
    click.option("--no-progress", is_flag=True, help="No progress bar on stderr."),
    click.option(
        "--dask",
        metavar="ADDRESS|local:N",
        default=None,
        help="Run on Dask: a scheduler address, or local:N for N local workers.",
    ),
    debug_option,
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")

LOSS_KEYS = (
    "weight",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "softcap",
    "input_kind",
    "reduction",
    "logits_dtype",
)


# ======================================================================================
# Running engine jobs: options -> engine keyword arguments, progress, output
# ======================================================================================


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if threads > limit:
        raise XentCliError(
            f"--threads {threads}: Numba was started with {limit} threads at most "
            "(set NUMBA_NUM_THREADS to allow more)"
        )
    numba.set_num_threads(threads)


def _check_device(device: str) -> None:
    if device != "cuda":
        return
    from engine.api import resolve_device

    try:
        resolve_device("cuda")
    except RuntimeError:
        raise XentCliError(
            "--device cuda: no CUDA device or driver found (use --device cpu or auto)"
        ) from None


def engine_kwargs(kw: dict) -> tuple[dict, dict]:
    """Split the shared options into (engine keyword arguments, the rest).

    Loss options are validated here, once, before any file is opened.
    """
    from engine.options import make_options

    kw = dict(kw)
    loss = {k: kw.pop(k) for k in LOSS_KEYS}
    make_options(**loss)  # ValueError/TypeError -> one line, before any work
    run = {
        "logits": kw.pop("logits"),
        "target": kw.pop("target"),
        "chunk_rows": kw.pop("chunk_rows"),
        "device": kw.pop("device"),
        "nan_policy": kw.pop("nan_policy"),
        "threads": kw.pop("threads"),
        "dask": kw.pop("dask"),
    }
    _set_threads(run["threads"])
    _check_device(run["device"])
    _check_dask(run["dask"])
    return {**run, **loss}, kw


def _check_dask(address: str | None) -> None:
    if not address:
        return
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        raise XentCliError(f"--dask {address}: needs Dask distributed (pip install 'xent[dask]')")


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A one-line progress bar on stderr: rows, percent, GB/s, ETA.

    Called as ``progress(rows_done, bytes_done, total_rows)`` (the engine's protocol);
    redraws at most every `interval` seconds; `close()` ends the line.
    """

    def __init__(self, label: str, stream=None, interval: float = 0.1, width: int | None = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.width = width
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = 0
        self._state = (0, 0, None)

    def __call__(self, rows_done: int, bytes_done: int = 0, total_rows: int | None = None):
        self._state = (int(rows_done), int(bytes_done), total_rows)
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        rows, nbytes, total = self._state
        elapsed = max((now if now is not None else time.perf_counter()) - self.start, 1e-9)
        parts = [self.label]
        if total:
            frac = min(rows / total, 1.0)
            filled = int(frac * 20)
            parts.append("[" + "#" * filled + "." * (20 - filled) + "]")
            parts.append(f"{frac:4.0%}")
            parts.append(f"{rows:,}/{total:,} rows")
        else:
            parts.append(f"{rows:,} rows")
        parts.append(f"{nbytes / elapsed / 1e9:.2f} GB/s")
        if total and 0 < rows < total:
            parts.append(f"ETA {format_seconds(elapsed * (total - rows) / rows)}")
        else:
            parts.append(format_seconds(elapsed))
        return "  ".join(parts)

    def _draw(self, now: float | None = None) -> None:
        width = self.width or shutil.get_terminal_size((80, 20)).columns
        text = self.line(now)[: max(10, width - 1)]
        pad = " " * max(0, self._shown - len(text))
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._shown = len(text)

    def close(self) -> None:
        if self._shown or self._state[0]:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str):
    """A Progress (or False) for the engine's ``progress=``; the line is ended on exit."""
    if not enabled:
        yield False
        return
    bar = Progress(label)
    try:
        yield bar
    finally:
        bar.close()


def _want_progress(no_progress: bool, as_json: bool) -> bool:
    return not no_progress and not as_json and _stderr_is_terminal()


def _temp_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


class JsonFile:
    """A JSON result file written atomically: the temporary file is created up front
    (an unwritable place fails before any work), renamed into place by `commit`, and
    removed on any exception, Ctrl-C included (use as a context manager)."""

    def __init__(self, path: str | None):
        self.path = path
        self.temp = None
        if path is None:
            return
        if os.path.isdir(path):
            raise XentCliError(f"{path}: is a directory; give a file name for the JSON output")
        self.temp = _temp_name(path)
        try:
            with open(self.temp, "w"):
                pass
        except OSError as e:
            raise XentCliError(f"{path}: cannot write ({e.strerror or e})") from None

    def commit(self, data) -> None:
        if self.path is None:
            return
        with open(self.temp, "w") as f:
            f.write(to_json(data) + "\n")
        os.replace(self.temp, self.path)
        self.temp = None

    def discard(self) -> None:
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
            self.temp = None

    def __enter__(self) -> JsonFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.discard()
        return False


def jsonable(value):
    """Plain JSON values: NumPy scalars/arrays converted, NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def to_json(data) -> str:
    return json.dumps(jsonable(data), indent=2, allow_nan=False)


def _report_dict(report) -> dict:
    return jsonable(report.to_dict())


def _print_warnings(report) -> None:
    for w in getattr(report, "warnings", None) or ():
        click.echo(f"Warning: {one_line(w)}", err=True)


# ======================================================================================
# Human output
# ======================================================================================


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _num(v, spec: str = ".6f") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if spec.endswith("f") and abs(v) >= 1e7:
            return f"{v:.4g}"
        return format(v, spec)
    return str(v)


# (key, label, format) of the metrics table, in order
METRIC_ROWS = (
    ("rows", "rows", ","),
    ("counted", "counted", ","),
    ("ignored", "ignored", ","),
    ("nan_rows", "nan rows", ","),
    ("classes", "classes", ","),
    ("loss", "loss", ".6f"),
    ("nll", "nll (nats)", ".6f"),
    ("perplexity", "perplexity", ".4f"),
    ("bits_per_token", "bits/token", ".6f"),
    ("accuracy", "accuracy", ".4f"),
    ("top_k_accuracy", "top-k", ".4f"),
    ("entropy", "entropy", ".6f"),
    ("ece", "ece (15 bins)", ".4f"),
    ("kl", "kl(target‖pred)", ".6f"),
    ("z_loss", "z-loss term", ".6f"),
)


def metric_lines(d: dict, reduction: str = "mean") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, label, spec in METRIC_ROWS:
        if key not in d:
            continue
        value = d[key]
        if key == "top_k_accuracy":
            for k, acc in (value or {}).items():
                out.append((f"top-{k} accuracy", _num(acc, spec)))
            continue
        if key in ("kl", "z_loss") and value is None:
            continue
        if key == "loss" and reduction == "sum":
            label = "loss (sum)"
        out.append((label, _num(value, spec)))
    return out


def timing_line(d: dict) -> str | None:
    if d.get("seconds") is None:
        return None
    parts = [f"{d['seconds']:.3f} s"]
    if d.get("rows_per_second") is not None:
        parts.append(f"{d['rows_per_second']:,.0f} rows/s")
    if d.get("gb_per_second") is not None:
        parts.append(f"{d['gb_per_second']:.2f} GB/s")
    return ", ".join(parts)


def format_table(rows: list[tuple[str, str]], indent: str = "  ") -> str:
    """Two aligned columns: labels left, values right-aligned."""
    if not rows:
        return ""
    lw = max(len(a) for a, _ in rows)
    vw = max(len(b) for _, b in rows)
    return "\n".join(f"{indent}{a:<{lw}}  {b:>{vw}}" for a, b in rows)


GROUP_COLUMNS = (
    ("rows", "rows", ","),
    ("counted", "counted", ","),
    ("loss", "loss", ".4f"),
    ("nll", "nll", ".4f"),
    ("perplexity", "ppl", ".3f"),
    ("accuracy", "acc", ".4f"),
    ("ece", "ece", ".4f"),
)
MAX_GROUPS_SHOWN = 50


def format_groups(groups: dict) -> str:
    keys = list(groups)
    first = groups[keys[0]] if keys else {}
    tk = list((first.get("top_k_accuracy") or {}).keys())
    head = ["group"] + [label for _, label, _ in GROUP_COLUMNS[:6]]
    head += [f"top-{k}" for k in tk] + ["ece"]
    table = [head]
    for g in keys[:MAX_GROUPS_SHOWN]:
        m = groups[g] or {}
        row = [str(g)] + [_num(m.get(key), spec) for key, _, spec in GROUP_COLUMNS[:6]]
        row += [_num((m.get("top_k_accuracy") or {}).get(k), ".4f") for k in tk]
        row.append(_num(m.get("ece"), ".4f"))
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = []
    for r in table:
        pairs = zip(r[1:], widths[1:], strict=True)
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in pairs]
        lines.append("  " + "  ".join(cells).rstrip())
    if len(keys) > MAX_GROUPS_SHOWN:
        lines.append(f"  … {len(keys) - MAX_GROUPS_SHOWN} more groups (see --json)")
    return "\n".join(lines)


def format_report(d: dict, title: str, reduction: str = "mean") -> str:
    rows = metric_lines(d, reduction)
    lines = [title, format_table(rows)]
    t = timing_line(d)
    if t:
        lw = max([len(a) for a, _ in rows] + [4])
        lines.append(f"  {'time':<{lw}}  {t}")
    if d.get("groups"):
        lines.append("")
        lines.append(f"by group ({len(d['groups'])})")
        lines.append(format_groups(d["groups"]))
    return "\n".join(line for line in lines if line is not None)


def _sources_label(sources) -> str:
    return sources[0] if len(sources) == 1 else f"{sources[0]} (+{len(sources) - 1} more)"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("xent")
    except metadata.PackageNotFoundError:
        try:
            with open(os.path.join(_REPO_ROOT, "pyproject.toml")) as f:
                found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
            return f"{found.group(1)} (source checkout)" if found else "unknown"
        except OSError:
            return "unknown"


def _print_version(ctx: click.Context) -> None:
    click.echo(f"xent {_version()}")
    ctx.exit()


# ======================================================================================
# The group
# ======================================================================================


@click.group(cls=XentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, p, v: _print_version(ctx) if v else None,
    help="Show the version and exit.",
)
@debug_option
def main():
    """xent: fused cross-entropy, gradients and metrics over Arrow/Parquet logit datasets.

    \b
    Start with:  xent demo          (a built-in sample, no data needed)
                 xent explain --logits 0,0,0,1 --target 3
    """


# --------------------------------------------------------------------------------------
# eval / score / grad
# --------------------------------------------------------------------------------------


@main.command("eval")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@source_options
@click.option("--group-by", default=None, help="Also report the metrics per value of COLUMN.")
@click.option("--top-k", default="1,5", callback=parse_top_k, help="Top-k accuracies (1,5).")
@loss_options
@run_options
@json_option
@click.option(
    "-o", "--output", "json_output", default=None, help="Also write the JSON to FILE.json."
)
def eval_cmd(sources, group_by, top_k, as_json, json_output, **kw):
    """Loss, perplexity, accuracy and calibration of a logit dataset."""
    import engine

    kwargs, rest = engine_kwargs(kw)
    with JsonFile(json_output) as out:
        with progress_bar(_want_progress(rest["no_progress"], as_json), "eval") as bar:
            report = engine.evaluate(
                list(sources), group_by=group_by, top_k=top_k, progress=bar, **kwargs
            )
        d = _report_dict(report)
        out.commit(d)
    _print_warnings(report)
    if as_json:
        click.echo(to_json(d))
    else:
        click.echo(format_report(d, f"eval {_sources_label(sources)}", kwargs["reduction"]))


def _check_output(path: str, overwrite: bool, resume: bool = False) -> None:
    from engine.errors import XentInputError

    if os.path.exists(path) and not (overwrite or resume):
        raise XentInputError("exists; pass --overwrite to replace it", file=path)


def _written_line(verb: str, d: dict, output: str) -> str:
    size = None
    if os.path.isfile(output):
        size = os.path.getsize(output)
    elif os.path.isdir(output):
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(output) for f in fs)
    rows = d.get("rows")
    text = f"{verb} {_num(rows)} rows -> {output} ({format_bytes(size)})"
    t = timing_line(d)
    return f"{text} in {t}" if t else text


@main.command("score")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("-o", "--output", required=True, help="Output file (.parquet or .arrow).")
@click.option(
    "--keep", multiple=True, callback=split_names, help="Input columns to copy (a,b,...)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--resume", is_flag=True, help="Continue an interrupted job's output.")
@source_options
@loss_options
@run_options
@json_option
def score_cmd(sources, output, keep, overwrite, resume, as_json, **kw):
    """Per-row loss, log-prob, prediction, confidence and entropy, written to a file."""
    import engine

    _run_output_job(
        engine.score,
        "score",
        "scored",
        sources,
        output,
        as_json,
        kw,
        keep=keep,
        overwrite=overwrite,
        resume=resume,
    )


@main.command("grad")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("-o", "--output", required=True, help="Output file (.parquet or .arrow).")
@click.option(
    "--keep", multiple=True, callback=split_names, help="Input columns to copy (a,b,...)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option(
    "--grad-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Gradient storage type.",
)
@source_options
@loss_options
@run_options
@json_option
def grad_cmd(sources, output, keep, overwrite, grad_dtype, as_json, **kw):
    """d loss / d logits for every row, written to a file (column 'grad')."""
    import engine

    _run_output_job(
        engine.gradients,
        "grad",
        "wrote gradients of",
        sources,
        output,
        as_json,
        kw,
        keep=keep,
        overwrite=overwrite,
        grad_dtype=grad_dtype,
    )


def _run_output_job(job, label, verb, sources, output, as_json, kw, **job_kwargs):
    """score/grad: check the output, run the job with progress, print what was written."""
    kwargs, rest = engine_kwargs(kw)
    _check_output(output, job_kwargs["overwrite"], job_kwargs.get("resume", False))
    with progress_bar(_want_progress(rest["no_progress"], as_json), label) as bar:
        report = job(list(sources), output, progress=bar, **job_kwargs, **kwargs)
    d = _report_dict(report)
    _print_warnings(report)
    if as_json:
        click.echo(to_json({"output": output, **d}))
    else:
        click.echo(_written_line(verb, d, output))
        click.echo(format_report(d, "metrics", kwargs["reduction"]))


# --------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------

SAMPLE_BYTES = 64 * 2**20


def _open_for_inspect(sources, logits, target, logits_dtype):
    """open_source; without --target, a file lacking a 'target' column is fine."""
    from engine.errors import XentInputError
    from engine.io import open_source

    try:
        return open_source(
            list(sources), logits=logits, target=target or "target", logits_dtype=logits_dtype
        )
    except XentInputError as e:
        if target is None and e.what.startswith("no target column 'target'"):
            return open_source(list(sources), logits=logits, target=None, logits_dtype=logits_dtype)
        raise


def scan_logits(x, file: str, file_row: int) -> tuple[dict, list[str]]:
    """Facts and warnings about a sample of logit rows (a float matrix)."""
    import numpy as np

    n, c = x.shape
    facts: dict = {"rows": int(n), "file": file, "first_row": int(file_row)}
    warnings: list[str] = []
    if n == 0:
        return facts, warnings
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    posinf = np.isposinf(x)
    neginf = np.isneginf(x)
    facts["nan_values"] = int(nan.sum())
    facts["posinf_values"] = int(posinf.sum())
    facts["neginf_values"] = int(neginf.sum())
    bad_rows = np.flatnonzero((nan | posinf).any(axis=1))
    facts["nan_inf_rows"] = int(bad_rows.size)
    if bad_rows.size:
        first = file_row + int(bad_rows[0])
        kinds = []
        if facts["nan_values"]:
            kinds.append(f"{facts['nan_values']:,} NaN")
        if facts["posinf_values"]:
            kinds.append(f"{facts['posinf_values']:,} +inf")
        warnings.append(
            f"{' and '.join(kinds)} values in {bad_rows.size:,} of the first {n:,} rows "
            f"(first: {file} row {first}): eval stops there under --nan-policy error; "
            "--nan-policy skip drops and counts such rows"
        )
    good = ~(nan | posinf).any(axis=1)
    xg = x[good]
    if xg.shape[0]:
        with np.errstate(all="ignore"):
            finite = np.where(np.isfinite(xg), xg, np.nan)
            lo = np.nanmin(np.where(np.isneginf(xg), np.inf, xg), axis=1)
            hi = np.nanmax(finite, axis=1)
            in_unit = np.all((xg >= 0) & (xg <= 1), axis=1)
            sums = np.sum(np.where(np.isneginf(xg), 0.0, xg), axis=1)
            probs = in_unit & (np.abs(sums - 1.0) <= 1e-3)
            m = np.max(xg, axis=1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
            lse = m[:, 0] + np.log(np.sum(np.exp(xg - m), axis=1))
            logprobs = np.all(xg <= 0, axis=1) & (np.abs(lse) <= 1e-3)
        constant = (hi == lo) & np.isfinite(hi)
        facts["probability_rows"] = int(probs.sum())
        facts["log_probability_rows"] = int(logprobs.sum())
        facts["constant_rows"] = int(constant.sum())
        facts["min"] = float(np.nanmin(finite)) if np.isfinite(finite).any() else None
        facts["max"] = float(np.nanmax(finite)) if np.isfinite(finite).any() else None
        k = xg.shape[0]
        if c > 1 and probs.all():
            warnings.append(
                f"all {k:,} sampled rows look like probabilities (values in [0, 1], each row "
                "sums to 1): cross-entropy applies softmax to its input, so these would be "
                "read as logits and the loss would be far too high; if they are softmax "
                "outputs, use --input-kind probs"
            )
        elif c > 1 and probs.mean() > 0.5:
            warnings.append(
                f"{int(probs.sum()):,} of {k:,} sampled rows look like probabilities (values "
                "in [0, 1], summing to 1): if the model ends with softmax, use "
                "--input-kind probs"
            )
        elif c > 1 and logprobs.all():
            warnings.append(
                f"all {k:,} sampled rows look like log-probabilities (all <= 0, "
                "logsumexp = 0): --input-kind log-probs (NLLLoss) reads them as such; as "
                "logits the loss is the same, since log_softmax leaves them unchanged"
            )
        if c > 1 and constant.any():
            warnings.append(
                f"{int(constant.sum()):,} of {k:,} sampled rows are constant (every class "
                f"has the same logit: a uniform prediction, loss log C = {math.log(c):.4f})"
            )
    return facts, warnings


def scan_soft_targets(t, file: str, file_row: int) -> list[str]:
    import numpy as np

    sums = np.sum(np.asarray(t, dtype=np.float64), axis=1)
    bad = np.flatnonzero(~(np.abs(sums - 1.0) <= 1e-3))
    if not bad.size:
        return []
    return [
        f"{bad.size:,} of the first {len(sums):,} probability-target rows do not sum to 1 "
        f"(first: {file} row {file_row + int(bad[0])}, sum {sums[bad[0]]:.4g})"
    ]


def scan_targets(source, classes: int | None, ignore_index: int) -> tuple[dict, list[str]]:
    """Read only the target column: counts, range, first out-of-range row."""
    import numpy as np

    facts = {"counted": 0, "ignored": 0, "nulls": 0, "min": None, "max": None}
    out_of_range = 0
    first_bad = None
    lo, hi = None, None
    for chunk in source.iter_chunks(targets_only=True):
        y = chunk.target
        valid = chunk.target_valid
        null = np.zeros(len(y), bool) if valid is None else ~valid
        ignored = (y == ignore_index) | null
        facts["nulls"] += int(null.sum())
        facts["ignored"] += int(ignored.sum())
        counted = ~ignored
        facts["counted"] += int(counted.sum())
        yc = y[counted]
        if yc.size:
            lo = int(yc.min()) if lo is None else min(lo, int(yc.min()))
            hi = int(yc.max()) if hi is None else max(hi, int(yc.max()))
        if classes is not None:
            bad = counted & ((y < 0) | (y >= classes))
            if bad.any():
                i = int(np.argmax(bad))
                out_of_range += int(bad.sum())
                if first_bad is None:
                    first_bad = (chunk.file, chunk.file_row + i, int(y[i]))
    facts["min"], facts["max"] = lo, hi
    facts["out_of_range"] = out_of_range
    warnings = []
    if first_bad is not None:
        f, r, v = first_bad
        warnings.append(
            f"{out_of_range:,} targets are outside [0, {classes}) and not the ignore index "
            f"{ignore_index} (first: {f} row {r}, value {v}): eval stops there"
        )
    total = facts["counted"] + facts["ignored"]
    if total and facts["counted"] == 0:
        warnings.append(
            f"every target is ignored (ignore index {ignore_index} or null): loss is "
            "undefined (NaN, as PyTorch)"
        )
    return facts, warnings


def inspect_source(sources, logits, target, logits_dtype, ignore_index, sample_rows) -> dict:
    from engine import dtypes

    source = _open_for_inspect(sources, logits, target, logits_dtype)
    info = source.describe()
    warnings: list[str] = []
    sample: dict = {"rows": 0}
    row_bytes = max(1, (source.num_classes or 1) * source.logits_dtype_numpy.itemsize)
    want = max(1, min(sample_rows, SAMPLE_BYTES // row_bytes))
    chunks = source.iter_chunks(chunk_rows=want, readahead=0)
    try:
        chunk = next(chunks, None)
    finally:
        chunks.close()
    if chunk is not None and chunk.logits is not None:
        kind = "bfloat16" if source.storage == "bfloat16" else None
        x = dtypes.decode(chunk.logits, kind)
        sample, found = scan_logits(x, chunk.file, chunk.file_row)
        warnings += found
        if source.soft_targets and chunk.target is not None:
            warnings += scan_soft_targets(chunk.target, chunk.file, chunk.file_row)
    info["sample"] = sample
    if source.target_column is not None and not source.soft_targets:
        tfacts, found = scan_targets(source, source.num_classes, ignore_index)
        info["targets"] = tfacts
        warnings += found
    if source.num_rows is None:  # an IPC stream knows its length only once read through
        source.fragments()
    if info.get("rows") is None:
        info["rows"] = source.num_rows
        info["files"] = source.describe()["files"]
    info["warnings"] = warnings
    return info


def format_inspect(info: dict) -> str:
    files = info["files"]
    rows: list[tuple[str, str]] = []
    if len(files) == 1:
        rows.append(("path", files[0]["path"]))
    else:
        rows.append(("files", f"{len(files)}: {files[0]['path']} … {files[-1]['path']}"))
    rows.append(("format", info["format"]))
    cols = info.get("logits") or []
    where = f"column '{cols[0]}'" if len(cols) == 1 else f"{len(cols)} columns {cols[0]}…"
    rows.append(("layout", f"{info['layout']} ({where})"))
    rows.append(("rows", _num(info.get("rows"))))
    rows.append(("classes", _num(info.get("classes"))))
    rows.append(("dtype", str(info.get("storage"))))
    groups = [f.get("row_groups") for f in files]
    if all(g is not None for g in groups):
        rows.append(("row groups", _num(sum(groups))))
    rows.append(("size", format_bytes(info.get("bytes"))))
    t = info.get("targets")
    if info.get("target") is None:
        rows.append(("target", "none (no 'target' column; name one with --target)"))
    elif info.get("soft_targets"):
        rows.append(("target", f"{info['target']} (probabilities, {info.get('target_type')})"))
    else:
        text = f"{info['target']} ({info.get('target_type')} class indices)"
        if t:
            text += f": {t['counted']:,} counted, {t['ignored']:,} ignored"
            if t["min"] is not None:
                text += f", classes {t['min']}..{t['max']}"
        rows.append(("target", text))
    s = info.get("sample") or {}
    if s.get("rows"):
        bits = [f"first {s['rows']:,} rows"]
        if s.get("min") is not None:
            bits.append(f"values {s['min']:.4g}..{s['max']:.4g}")
        bits.append(f"{s.get('nan_values', 0):,} NaN, {s.get('posinf_values', 0):,} +inf")
        if s.get("neginf_values"):
            bits.append(f"{s['neginf_values']:,} -inf (masked classes: fine)")
        rows.append(("sample", ", ".join(bits)))
    lw = max(len(a) for a, _ in rows)
    lines = [f"{a:<{lw}}  {b}" for a, b in rows]
    col_items = list(info.get("columns", {}).items())
    if col_items:
        shown = col_items if len(col_items) <= 12 else col_items[:10] + [("…", "")] + col_items[-1:]
        for i, (name, typ) in enumerate(shown):
            label = "columns" if i == 0 else ""
            text = f"{name}: {typ}" if typ else name
            if len(col_items) > 12 and i == 0:
                text += f"   ({len(col_items)} columns)"
            lines.append(f"{label:<{lw}}  {text}")
    ws = info.get("warnings") or []
    lines.append("")
    if ws:
        import textwrap

        lines.append(f"warnings ({len(ws)}):")
        for w in ws:
            w = re.sub(r"(--[\w-]+) (?=[\w-])", "\\1\u00a0", w)  # keep '--flag value' together
            wrapped = textwrap.wrap(
                w,
                88,
                initial_indent="  - ",
                subsequent_indent="    ",
                break_on_hyphens=False,
                break_long_words=False,
            )
            lines.extend(line.replace("\u00a0", " ") for line in wrapped)
    else:
        lines.append("no warnings")
    return "\n".join(lines)


@main.command("inspect")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--logits", default="logits", show_default=True, help="Logits column or glob.")
@click.option("--target", default=None, help="Target column (default: 'target' if present).")
@click.option(
    "--logits-dtype",
    type=click.Choice(["bfloat16", "float16", "float32", "float64"]),
    default=None,
    help="Read 16-bit integer logits as bfloat16 bit patterns.",
)
@click.option("--ignore-index", type=int, default=-100, show_default=True)
@click.option(
    "--sample-rows",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Rows scanned for suspicious values (the first ones).",
)
@json_option
@debug_option
def inspect_cmd(sources, logits, target, logits_dtype, ignore_index, sample_rows, as_json):
    """Format, layout, rows, classes, dtype and size; warns on suspicious data."""
    info = inspect_source(sources, logits, target, logits_dtype, ignore_index, sample_rows)
    if as_json:
        click.echo(to_json(info))
    else:
        click.echo(format_inspect(info))


# --------------------------------------------------------------------------------------
# gen
# --------------------------------------------------------------------------------------


@main.command("gen")
@click.argument("output", metavar="OUT")
@click.option("--rows", type=click.IntRange(min=1), required=True, help="Number of rows.")
@click.option("--classes", type=click.IntRange(min=1), required=True, help="Number of classes.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "float64", "bfloat16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--layout",
    type=click.Choice(["fixed_size_list", "list", "large_list", "tensor", "wide"]),
    default="fixed_size_list",
    show_default=True,
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "arrow", "arrow-stream"]),
    default="parquet",
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--ignore-frac",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Fraction of rows whose target is the ignore index -100.",
)
@click.option("--soft", is_flag=True, help="Probability targets instead of class indices.")
@click.option(
    "--row-group-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per Parquet row group / IPC record batch (default ~1k, <= 4 MB).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@json_option
@debug_option
def gen_cmd(output, rows, classes, dtype, layout, fmt, seed, ignore_frac, soft, **kw):
    """Write a synthetic dataset of logits (a ~60% accurate classifier) to OUT."""
    from engine.gen import generate

    as_json = kw.pop("as_json")
    with progress_bar(_want_progress(kw.pop("no_progress"), as_json), "gen") as bar:
        res = generate(
            output,
            rows=rows,
            classes=classes,
            dtype=dtype,
            layout=layout,
            format=fmt,
            seed=seed,
            ignore_frac=ignore_frac,
            soft=soft,
            row_group_rows=kw["row_group_rows"],
            overwrite=kw["overwrite"],
            progress=bar or None,
        )
    if as_json:
        click.echo(to_json(res.to_dict()))
        return
    click.echo(gen_summary(res))


def gen_summary(res) -> str:
    target = "probability targets" if res.soft else "class targets"
    text = (
        f"wrote {res.rows:,} rows x {res.classes:,} classes ({res.dtype}, {res.layout}, "
        f"{res.format}, {target}) to {res.path}: {format_bytes(res.bytes)} "
        f"in {res.seconds:.1f} s"
    )
    if res.layout == "wide":
        text += "  (read it with --logits 'logit_*')"
    return text


# --------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------


def _parse_numbers(ctx, param, value):
    if value is None:
        return None
    return _numbers(value, param.opts[0])


@main.command("explain")
@click.option(
    "--logits",
    "values",
    required=True,
    callback=_parse_numbers,
    metavar="x0,x1,..",
    help="One row of model outputs, e.g. 0,0,0,1.",
)
@click.option("--target", type=int, default=None, help="The target class.")
@click.option(
    "--target-probs",
    callback=_parse_numbers,
    default=None,
    metavar="t0,t1,..",
    help="Probability target instead of a class.",
)
@click.option(
    "--input-kind",
    type=click.Choice(list(INPUT_KINDS)),
    default="logits",
    show_default=True,
    callback=_input_kind,
    help="What the numbers are: logits (CrossEntropyLoss), log-probs (NLLLoss), probs.",
)
@click.option("--weight", callback=parse_weight, metavar="FILE|w0,w1,..", help="Class weights.")
@click.option("--label-smoothing", type=click.FloatRange(0.0, 1.0), default=0.0)
@json_option
@debug_option
def explain_cmd(values, target, target_probs, input_kind, weight, label_smoothing, as_json):
    """The loss of one row, step by step, with the numbers filled in.

    \b
    xent explain --logits 0,0,0,1 --target 3     # why is CrossEntropyLoss 0.7437, not 0?
    """
    from engine.explain import explain

    if (target is None) == (target_probs is None):
        raise XentCliError("give --target CLASS or --target-probs t0,t1,.. (one of them)")
    ex = explain(
        values,
        target,
        target_probs=target_probs,
        input_kind=input_kind,
        weight=weight,
        label_smoothing=label_smoothing,
    )
    click.echo(to_json(ex.to_dict()) if as_json else ex.render())


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------

DEMO_ROWS = 50_000
DEMO_CLASSES = 1000


def _best_time(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _torch_comparison(path: str, device: str) -> list[str]:
    """engine.cross_entropy vs torch.nn.functional.cross_entropy on the same array."""
    import numpy as np
    import pyarrow.parquet as pq

    import engine

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return ["torch is not installed: skipping the comparison (pip install torch)"]
    table = pq.read_table(path, columns=["logits", "target"])
    col = table.column("logits").combine_chunks()
    n, c = len(col), col.type.list_size
    x = col.values.to_numpy(zero_copy_only=False).reshape(n, c)
    y = table.column("target").to_numpy().astype(np.int64)
    dev = "cpu" if device == "auto" else device
    t_engine, ours = _best_time(lambda: engine.cross_entropy(x, y, device=dev))
    with warnings.catch_warnings():  # read-only Arrow memory: torch only reads it here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t_torch, theirs = _best_time(lambda: F.cross_entropy(xt, yt).item())
    gb = x.nbytes / 1e9
    width = len("torch F.cross_entropy")
    lines = [
        f"in memory, {n:,} x {c:,} float32 ({format_bytes(x.nbytes)}), best of 3, "
        f"{torch.get_num_threads()} torch threads:",
        f"  {'engine.cross_entropy':<{width}}  {t_engine * 1e3:8.1f} ms  "
        f"{gb / t_engine:6.2f} GB/s  loss {ours:.6f}",
        f"  {'torch F.cross_entropy':<{width}}  {t_torch * 1e3:8.1f} ms  "
        f"{gb / t_torch:6.2f} GB/s  loss {theirs:.6f}",
        f"  speed-up {t_torch / t_engine:.2f}x, |difference| {abs(ours - theirs):.2e}",
    ]
    return lines


@main.command("demo")
@click.option("--rows", type=click.IntRange(min=1), default=DEMO_ROWS, show_default=True)
@click.option("--classes", type=click.IntRange(min=2), default=DEMO_CLASSES, show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (Numba).")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
@debug_option
def demo_cmd(rows, classes, device, threads, no_progress):
    """Generate a sample dataset and run eval and score on it (no data needed)."""
    import tempfile

    import engine
    from engine.gen import generate

    _set_threads(threads)
    _check_device(device)
    show = _want_progress(no_progress, False)
    tmp = tempfile.mkdtemp(prefix="xent-demo-")
    try:
        click.echo(
            f"xent demo: {rows:,} rows x {classes:,} classes of float32 logits from a "
            "synthetic classifier (~60% accurate), in a temporary directory."
        )
        click.echo("(The first run compiles the kernels; later runs load them from a cache.)")
        click.echo("")
        data = os.path.join(tmp, "sample.parquet")
        with progress_bar(show, "gen") as bar:
            res = generate(data, rows=rows, classes=classes, ignore_frac=0.02, progress=bar or None)
        click.echo(
            f"$ xent gen sample.parquet --rows {rows} --classes {classes} --ignore-frac 0.02"
        )
        click.echo(gen_summary(res).replace(data, "sample.parquet"))
        click.echo("")

        click.echo("$ xent eval sample.parquet")
        with progress_bar(show, "eval") as bar:
            report = engine.evaluate(
                data, device=device, threads=threads, progress=bar, nan_policy="error"
            )
        _print_warnings(report)
        d = _report_dict(report)
        click.echo(format_report(d, "eval sample.parquet"))
        click.echo("")

        out = os.path.join(tmp, "scores.parquet")
        click.echo("$ xent score sample.parquet -o scores.parquet --keep id")
        with progress_bar(show, "score") as bar:
            sreport = engine.score(
                data, out, keep=("id",), device=device, threads=threads, progress=bar
            )
        sd = _report_dict(sreport)
        click.echo(_written_line("scored", sd, out).replace(out, "scores.parquet"))
        click.echo(_score_head(out))
        click.echo("")

        click.echo("engine vs PyTorch")
        for line in _torch_comparison(data, device):
            click.echo(line)
        click.echo("")
        click.echo("Next:  xent inspect YOUR.parquet")
        click.echo("       xent eval YOUR.parquet --logits COLUMN --target COLUMN")
        click.echo("       xent explain --logits 0,0,0,1 --target 3   (why is that loss 0.7437?)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _score_head(path: str, n: int = 3) -> str:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(0).slice(0, n)
    names = table.column_names
    cols = [table.column(c).to_pylist() for c in names]
    cells = [names]
    for row in zip(*cols, strict=True):
        cells.append([f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    widths = [max(len(r[i]) for r in cells) for i in range(len(names))]
    lines = ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------


def _import_bench():
    """bench/ is a folder of the source checkout, not installed with the package."""
    try:
        from bench import kernels
    except ImportError:
        if _REPO_ROOT not in sys.path:
            sys.path.insert(0, _REPO_ROOT)
        try:
            from bench import kernels
        except ImportError as e:
            if not os.path.isdir(os.path.join(_REPO_ROOT, "bench")):
                raise XentCliError(
                    "xent bench needs the bench/ folder of a source checkout of xent "
                    f"(not found next to {os.path.basename(__file__)} in {_REPO_ROOT}); "
                    "run it from a clone of the repository"
                ) from None
            raise XentCliError(f"cannot import bench.kernels: {one_line(e)}") from None
    return kernels


@main.command("bench")
@click.option("--rows", type=click.IntRange(min=1), default=None, help="Rows per case.")
@click.option("--classes", callback=split_ints, default=None, help="Classes, e.g. 1000,32000.")
@click.option("--dtype", callback=split_csv, default=None, help="float32,float16.")
@click.option("--mode", callback=split_csv, default=None, help="forward,forward_grad,row_stats.")
@click.option("--providers", callback=split_csv, default=None, help="engine-cpu,torch-eager,...")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda", "all"]), default="cpu", show_default=True
)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--full", is_flag=True, help="All class counts and ~100 MB cases (slow).")
@json_option
@debug_option
def bench_cmd(rows, classes, dtype, mode, providers, device, repeats, threads, full, as_json):
    """The fused kernels against torch.nn.functional.cross_entropy (in memory)."""
    kernels = _import_bench()
    args = {"repeats": repeats, "device": device, "quick": not full, "json": as_json}
    for name, value in (
        ("rows", rows),
        ("classes", classes),
        ("dtypes", dtype),
        ("modes", mode),
        ("providers", providers),
        ("threads", threads),
    ):
        if value is not None:
            args[name] = value
    results = kernels.run(**args)
    click.echo(to_json(results) if as_json else kernels.format_table(results))


if __name__ == "__main__":  # python -m cli
    main(prog_name="xent")
