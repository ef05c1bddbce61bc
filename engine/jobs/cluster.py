"""Reaching a Dask cluster: parse ``--dask`` addresses, start a LocalCluster for
``local:N`` or connect to a scheduler, and read the XENT_DASK_* settings."""

from __future__ import annotations

import contextlib
import logging
import os
import re

from engine.errors import XentInputError
from engine.threads import cpu_count, set_threads

DEFAULT_TIMEOUT_S = 10.0

_LOCAL = re.compile(r"^local:(\d+)$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
_HOST_PORT = re.compile(r"^[^\s:/]+:\d+$")


def import_distributed():
    try:
        import distributed
    except ImportError:
        raise XentInputError(
            "--dask needs Dask distributed, which is not installed: pip install 'xent[dask]'"
        ) from None
    return distributed


def env_number(name: str, default, cast=float):
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = cast(text)
    except ValueError:
        raise XentInputError(f"{name}={text!r} is not a number") from None
    if value <= 0:
        raise XentInputError(f"{name}={text!r} must be > 0")
    return value


def parse_address(address) -> tuple[str, object]:
    """("local", N) or ("remote", address); anything else raises XentInputError."""
    text = str(address).strip()
    m = _LOCAL.match(text)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise XentInputError("local:N needs N >= 1 workers", file=text)
        return "local", n
    if _URL.match(text) or _HOST_PORT.match(text):
        return "remote", text
    raise XentInputError(
        "not a Dask address (use tcp://HOST:PORT for a scheduler, or local:N)", file=text
    )


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def connect(address):
    """A Dask Client for `address` (a LocalCluster for ``local:N``, closed afterwards)."""
    kind, value = parse_address(address)
    distributed = import_distributed()
    timeout = env_number("XENT_DASK_TIMEOUT", DEFAULT_TIMEOUT_S)
    cluster = None
    try:
        if kind == "local":
            threads = env_number("XENT_DASK_THREADS", 1, int)
            cluster = distributed.LocalCluster(
                n_workers=value,
                threads_per_worker=threads,
                processes=True,
                dashboard_address=":0",  # a free port, never a clash
                silence_logs=logging.ERROR,
            )
            client = distributed.Client(cluster, set_as_default=False)
        else:
            scheme = value.split("://", 1)[0] if "://" in value else "tcp"
            if scheme not in ("tcp", "tls", "ucx", "inproc", "ws", "wss"):
                # checked before Client(): a half-built Client hangs at exit in __del__
                raise XentInputError(f"unknown Dask address scheme '{scheme}://'", file=value)
            try:
                client = distributed.Client(value, timeout=timeout, set_as_default=False)
            except Exception as e:  # refused, timed out, unresolvable host, bad scheme
                raise XentInputError(
                    f"cannot reach the Dask scheduler ({_one_line(e)})", file=value
                ) from None
        try:
            try:
                client.wait_for_workers(1, timeout=3 * timeout)
            except Exception:
                raise XentInputError(
                    f"the Dask scheduler has no workers (waited {3 * timeout:g} s)",
                    file=str(address),
                ) from None
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def host_threads(client) -> dict:
    out: dict = {}
    from distributed.comm import get_address_host

    for addr, info in client.scheduler_info(n_workers=-1)["workers"].items():
        host = get_address_host(addr)
        out[host] = out.get(host, 0) + int(info.get("nthreads", 1))
    return out


def set_task_threads(threads: int | None, host_threads: dict) -> None:
    """Numba threads for a Dask task: as asked, else this host's cores over the Dask worker
    threads running there (``host_threads``: host -> threads, from `host_threads`), so N
    workers x T threads do not oversubscribe the cores."""
    n = threads
    if n is None:
        busy = 1
        try:
            from distributed import get_worker
            from distributed.comm import get_address_host

            worker = get_worker()
            busy = host_threads.get(get_address_host(worker.address)) or worker.state.nthreads
        except (ImportError, ValueError):
            pass
        n = cpu_count() // max(1, busy)
    set_threads(max(1, int(n)), clamp=True)
