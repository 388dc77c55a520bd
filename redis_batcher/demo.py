"""``redis-batcher demo``: producers, a worker and a live report, on a throwaway redis-server.

The processor lives at module level so a real worker process can serve it exactly as an operator
would::

    REDIS_BATCHER_DEMO_URL=redis://127.0.0.1:7000/0 \\
        python -m redis_batcher worker redis_batcher.demo:batcher --redis-url redis://127.0.0.1:7000/0

Its batching rules come from environment variables read at import time (``run_demo`` sets them
for its own process, so the spawned producers see them, and for the worker subprocess).

The handler keeps its statistics under ``rb-demo:stats:`` (outside the batcher's key layout): a
hash of counters, a set of delivered item ids (exact loss and duplicate counts) and a list of
end-to-end latency samples in milliseconds.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from rich.console import Console
from rich.live import Live

from . import wake
from .batcher import Batcher, default_url
from .demo_report import Progress, Summary, render_progress, summary_table
from .models import Flush
from .testing import RedisServer, RedisServerError

PREFIX = "rb-demo"
PROCESSOR_NAME = "demo.events"
STATS_PREFIX = f"{PREFIX}:stats:"
COUNTERS_KEY = STATS_PREFIX + "counters"  # HASH items, flushes
IDS_KEY = STATS_PREFIX + "ids"  # SET of delivered item ids
LATENCY_KEY = STATS_PREFIX + "latency_ms"  # LIST of end-to-end latency samples (ms)
DEMO_KEYS_PATTERN = f"{PREFIX}:*"  # every key of the demo: batcher layout and stats

ENV_URL = "REDIS_BATCHER_DEMO_URL"
ENV_MAX_BATCH_SIZE = "REDIS_BATCHER_DEMO_MAX_BATCH_SIZE"
ENV_FLUSH_INTERVAL = "REDIS_BATCHER_DEMO_FLUSH_INTERVAL"
ENV_SAMPLE_EVERY = "REDIS_BATCHER_DEMO_SAMPLE_EVERY"

DEFAULT_MAX_BATCH_SIZE = 100
DEFAULT_FLUSH_INTERVAL = 0.5
MAX_LATENCY_SAMPLES = 200_000
WORKER_CONCURRENCY = 4
REFRESH_PER_SECOND = 4
POLL_SECONDS = 0.05
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if not raw else int(raw)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if not raw else float(raw)


# Connects lazily (redis-py opens a connection on the first command): importing needs no server.
batcher = Batcher(os.environ.get(ENV_URL) or default_url(), prefix=PREFIX)
SAMPLE_EVERY = max(1, _env_int(ENV_SAMPLE_EVERY, 1))


@batcher.processor(
    name=PROCESSOR_NAME,
    max_batch_size=_env_int(ENV_MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_SIZE),
    flush_interval=_env_float(ENV_FLUSH_INTERVAL, DEFAULT_FLUSH_INTERVAL),
)
def deliver(flush: Flush) -> None:
    """Record the flush: item and flush counters, delivered ids and latency samples (one
    MULTI/EXEC, so the counters and the id set always agree)."""
    now = time.time()
    ids = [int(item["id"]) for item in flush.items]
    if not ids:
        return
    samples = [
        f"{(now - float(item['ts'])) * 1000.0:.3f}"
        for item in flush.items
        if int(item["id"]) % SAMPLE_EVERY == 0
    ]
    pipe = batcher.client.pipeline(transaction=True)
    pipe.hincrby(COUNTERS_KEY, "items", len(ids))
    pipe.hincrby(COUNTERS_KEY, "flushes", 1)
    pipe.sadd(IDS_KEY, *ids)
    if samples:
        pipe.rpush(LATENCY_KEY, *samples)
    pipe.execute()


# -- producers ----------------------------------------------------------------------------------


def _item(item_id: int, ts: float, producer: int, kind: str) -> dict[str, Any]:
    """A small event: a unique id and the client-side time it was created (for the latency)."""
    return {"id": item_id, "ts": ts, "producer": producer, "kind": kind}


def _produce(
    index: int,
    start: int,
    stop: int,
    batch_ids: int,
    url: str,
    max_batch_size: int,
    flush_interval: float,
    ready: Any,
    go: Any,
    added: Any,
) -> None:
    """One producer process: add ids ``start..stop-1`` with alternating ``add`` and ``add_many``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops producers on Ctrl-C
    config = deliver.config
    if (config.max_batch_size, config.flush_interval) != (max_batch_size, flush_interval):
        raise RuntimeError(
            f"producer {index} imported max_batch_size={config.max_batch_size}, "
            f"flush_interval={config.flush_interval}; expected {max_batch_size}, {flush_interval} "
            f"(${ENV_MAX_BATCH_SIZE} / ${ENV_FLUSH_INTERVAL} were not passed on)"
        )
    batcher.connect(url)
    batcher.client.ping()
    with ready.get_lock():
        ready.value += 1
    go.wait()
    rng = random.Random(index)
    next_id = start
    single = True
    while next_id < stop:
        tenant = f"tenant:{rng.randrange(batch_ids)}"
        if single:
            n = 1
            result = deliver.add(tenant, _item(next_id, time.time(), index, "click"))
        else:
            n = min(rng.randint(10, 50), stop - next_id)
            ts = time.time()
            batch = [_item(i, ts, index, "view") for i in range(next_id, next_id + n)]
            result = deliver.add_many(tenant, batch)
        if result.added != n:
            raise RuntimeError(f"producer {index}: added {result.added} of {n} items to {tenant}")
        next_id += n
        added[index] = next_id - start
        single = not single
    batcher.close()


# -- main process -------------------------------------------------------------------------------


class DemoError(Exception):
    """A demo run that cannot finish; the message says what went wrong."""


def delete_demo_keys(client: Any) -> int:
    """Delete the demo's keys only (SCAN MATCH ``rb-demo:*``; never FLUSHDB/FLUSHALL)."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=DEMO_KEYS_PATTERN, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


def _read_progress(client: Any, added: Any, started: float | None) -> Progress:
    pipe = client.pipeline(transaction=False)
    pipe.hmget(COUNTERS_KEY, "items", "flushes")
    pipe.scard(IDS_KEY)
    (items, flushes), unique = pipe.execute()
    return Progress(
        added=sum(added[:]),
        delivered=int(items or 0),
        unique=int(unique),
        flushes=int(flushes or 0),
        elapsed=0.0 if started is None else time.monotonic() - started,
    )


def redact(url: str) -> str:
    """The URL with its password masked, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _stop_worker(proc: subprocess.Popen[bytes] | None) -> int | None:
    """SIGTERM (graceful: in-flight flushes finish), then SIGKILL after STOP_TIMEOUT."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _stop_producers(procs: list[SpawnProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
        p.close()


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for this process (spawned producers inherit them), then restore."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so a terminated demo still stops its children."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Block SIGINT while child processes are started: they inherit the blocked signal, so Ctrl-C
    (sent to the whole foreground process group) reaches only this process, which then stops the
    producers, the worker (gracefully, while Redis is still up) and the server, in that order.
    SIGTERM still stops every child. A Ctrl-C pressed meanwhile is delivered on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait_for_worker(client: Any, worker: subprocess.Popen[bytes]) -> None:
    """Wait until the worker has subscribed to its wake-up channels (it is then claiming)."""
    channel = batcher.get_processor(PROCESSOR_NAME).keys.parts[0].wake
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if worker.poll() is not None:
            raise DemoError(f"the worker exited with code {worker.returncode} before it was ready")
        if wake.subscribers(client, channel) > 0:
            return
        if time.monotonic() > deadline:
            raise DemoError(f"the worker did not subscribe to {channel} within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(POLL_SECONDS)


def _wait_for_producers(ready: Any, procs: list[SpawnProcess]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while ready.value < len(procs):
        failed = [i for i, p in enumerate(procs) if p.exitcode is not None]
        if failed:
            raise DemoError(f"producer(s) {failed} exited before starting (see the traceback above)")
        if time.monotonic() > deadline:
            raise DemoError(
                f"only {ready.value} of {len(procs)} producers started within {STARTUP_TIMEOUT:.0f} s"
            )
        time.sleep(POLL_SECONDS)


def _pending_in_redis(client: Any) -> int:
    """Items still held in the batcher's sequences (for the timeout message)."""
    part = batcher.get_processor(PROCESSOR_NAME).keys.parts[0]
    total = 0
    for key in client.scan_iter(match=part.pfx + "i:*", count=1000):
        total += int(client.llen(key))
    for key in client.scan_iter(match=part.pfx + "o:*", count=1000):  # an open list's header
        total += max(int(client.llen(key)) - 1, 0)
    return total


@_sigterm_interrupts()  # a context manager as a decorator: around each call
def run_demo(
    *,
    redis_url: str | None = None,
    items: int = 20_000,
    producers: int = 4,
    batch_ids: int = 20,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    console: Console | None = None,
    timeout: float | None = None,
) -> int:
    """Run the demo and print its summary. Returns the exit code (0 when every item arrived).

    Without ``redis_url`` a throwaway redis-server is started on a free loopback port and stopped
    at the end; with it, only the demo's own keys (``rb-demo:*``) are deleted, before and after.
    """
    console = console or Console()
    producers = min(producers, items)
    if timeout is None:
        timeout = max(60.0, items / 1000.0)
    server: RedisServer | None = None
    client: Any = None
    worker: subprocess.Popen[bytes] | None = None
    procs: list[SpawnProcess] = []
    workdir = Path(tempfile.mkdtemp(prefix="redis-batcher-demo-"))
    log_path = workdir / "worker.log"
    keep_workdir = False
    try:
        if redis_url is None:
            try:
                with _children_ignore_sigint():
                    server = RedisServer().start()
            except RedisServerError as exc:
                console.print(f"[red]cannot start a redis-server:[/] {exc}")
                return 1
            url = server.url
            where = f"throwaway redis-server {url}"
        else:
            url = redis_url
            where = f"{redact(url)} (keys {DEMO_KEYS_PATTERN})"
        client = redis.Redis.from_url(url)
        try:
            client.ping()
        except redis.RedisError as exc:
            console.print(f"[red]cannot reach Redis at {redact(url)}:[/] {exc}")
            return 1
        delete_demo_keys(client)

        env = {
            ENV_URL: url,
            ENV_MAX_BATCH_SIZE: str(max_batch_size),
            ENV_FLUSH_INTERVAL: repr(flush_interval),
            ENV_SAMPLE_EVERY: str(max(1, math.ceil(items / MAX_LATENCY_SAMPLES))),
        }
        header = (
            f"{where}\n{producers} producers, {batch_ids} batch ids, worker concurrency "
            f"{WORKER_CONCURRENCY}, batches of {max_batch_size} or every {flush_interval:g} s"
        )
        # the worker runs as an operator would run it; a URL with a password goes through the
        # environment ($REDIS_URL feeds the same --redis-url option), not the visible command line
        command = [sys.executable, "-m", "redis_batcher", "worker", f"{__name__}:batcher"]
        command += ["--concurrency", str(WORKER_CONCURRENCY)]
        worker_env = {"PYTHONUNBUFFERED": "1"}
        if urlsplit(url).password is None:
            command += ["--redis-url", url]
        else:
            worker_env["REDIS_URL"] = url
        with _environ(env), _children_ignore_sigint():
            with open(log_path, "wb") as log_file:
                worker = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **worker_env},
                    cwd=workdir,
                )
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Value("i", 0)
            go = ctx.Event()
            added = ctx.Array("q", producers)
            for i in range(producers):
                start, stop = i * items // producers, (i + 1) * items // producers
                p = ctx.Process(
                    target=_produce,
                    args=(i, start, stop, batch_ids, url, max_batch_size, flush_interval, ready, go, added),
                    name=f"rb-demo-producer-{i}",
                    daemon=True,
                )
                p.start()
                procs.append(p)

        try:
            _wait_for_worker(client, worker)
            _wait_for_producers(ready, procs)
        except DemoError as exc:
            keep_workdir = True
            console.print(f"[red]demo failed:[/] {exc}")
            console.print(f"worker log {log_path}:\n{_log_tail(log_path)}", markup=False)
            return 1

        started = time.monotonic()
        go.set()
        error: str | None = None
        with Live(
            render_progress(Progress(), items, header), console=console, refresh_per_second=REFRESH_PER_SECOND
        ) as live:
            while True:
                progress = _read_progress(client, added, started)
                live.update(render_progress(progress, items, header))
                producers_done = all(p.exitcode is not None for p in procs)
                if producers_done and progress.unique >= progress.added:
                    break
                if worker.poll() is not None:
                    error = f"the worker exited with code {worker.returncode}"
                    break
                if progress.elapsed > timeout:
                    error = (
                        f"timed out after {timeout:.0f} s: {progress.unique:,} of {items:,} items delivered "
                        f"({items - progress.unique:,} missing; {progress.added:,} added, "
                        f"{_pending_in_redis(client):,} still held in Redis)"
                    )
                    break
                time.sleep(POLL_SECONDS)
        wall_time = time.monotonic() - started
        if not console.is_terminal:
            console.line()  # a non-terminal Live leaves its last line open

        failed = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed and error is None:
            error = f"producer(s) {failed} failed (see the traceback above)"
        worker_code = _stop_worker(worker)
        if error is None and worker_code != 0:
            error = f"the worker exited with code {worker_code} after SIGTERM"

        counters = client.hmget(COUNTERS_KEY, "items", "flushes")
        summary = Summary(
            items=items,
            added=sum(added[:]),
            delivered=int(counters[0] or 0),
            unique=int(client.scard(IDS_KEY)),
            flushes=int(counters[1] or 0),
            wall_time=wall_time,
            latencies=[float(v) for v in client.lrange(LATENCY_KEY, 0, -1)],
        )
        console.print(summary_table(summary))
        if error is None and summary.lost:
            error = f"{summary.lost:,} item(s) lost"
        if error is not None:
            keep_workdir = True
            console.print(f"[red]demo failed:[/] {error}")
            console.print(f"worker log {log_path}:\n{_log_tail(log_path)}", markup=False)
            return 1
        console.print(
            f"[green]demo OK:[/] {summary.unique:,} of {items:,} items delivered "
            f"in {summary.flushes:,} flushes, lost 0, duplicates {summary.duplicates:,}"
        )
        return 0
    except KeyboardInterrupt:
        if not console.is_terminal:
            console.line()
        console.print("[yellow]interrupted: stopping the producers, the worker and the server[/]")
        return 130
    except redis.RedisError as exc:
        keep_workdir = True
        console.print(f"[red]demo failed: Redis error:[/] {exc}")
        console.print(f"worker log {log_path}:\n{_log_tail(log_path)}", markup=False)
        return 1
    finally:
        _stop_producers(procs)
        _stop_worker(worker)
        if client is not None:
            if server is None:
                try:
                    delete_demo_keys(client)
                except redis.RedisError:
                    pass
            client.close()
        if server is not None:
            server.close()
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
