"""End to end, side by side in one run: redis-batcher vs a hand-written WATCH/MULTI accumulator
vs celery-batches, from the first add until every item was handled.

Workload (the same for every system): 4 producer processes add unique items (~100-byte
msgpack events) round robin over 20 batch ids; a no-op handler records each batch by appending
its item ids and the time to files of its process (exact lost/duplicate counts, the latest
handling time: ``benchmarks/e2e_common.py``). Figure: items/s = items /
(last item handled - first add).

- redis-batcher: 2 real worker processes (``python -m redis_batcher worker
  benchmarks.e2e_app:batcher --concurrency C``), max_batch_size 100 and 1000, producers calling
  ``add()`` per item or ``add_many()`` with 100 items. Batches are sealed by size; once the
  producers are done the partial tail of each batch id is sealed with ``flush()``
  (``--flush-interval S`` adds a timer; a short one seals most batches by time instead).
- WATCH/MULTI (``benchmarks/watch_multi.py``): WATCH -> LLEN -> MULTI RPUSH [RENAME into a ready
  queue] EXEC, retried on WatchError; 2 BLPOP consumer processes; the same tail flush.
- celery-batches (``benchmarks/celery_peer.py``): ``task.delay(batch_id, item)`` per item, one
  solo-pool worker, Redis broker, flush_every=100, flush_interval=1 s (its timer is the tail);
  as many items as redis-batcher's add() figure.
- bare variadic ``RPUSH key <100 pre-encoded items>`` from 4 producer processes, no consumer:
  the ceiling that add_many(100) is compared with.

Every figure is the median of --runs runs (min and max shown); runs interleave the systems so
noise hits all alike. Starts its own redis-server on a free loopback port (--save ''
--appendonly no) and stops every process it started. Usage:
    python -m benchmarks.end_to_end [--quick] [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import redis

import redis_batcher
from benchmarks import report
from benchmarks.e2e_common import (
    BATCH_IDS,
    STATS_DIR_ENV,
    URL_ENV,
    Ledger,
    batch_id_for,
    make_item,
)
from redis_batcher import wake
from redis_batcher.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SUITE = "end_to_end"
PRODUCERS = 4
WORKERS = 2  # redis-batcher worker processes, and WATCH/MULTI consumer processes
MANY = 100  # items per add_many() / variadic RPUSH
PEER_SIZE = 100  # batch size of the peers (and of the redis-batcher figures they are compared with)
SIZES = (100, 1000)
STALL_SECONDS = 20.0  # no item handled for this long: give up and count the rest as lost
START_TIMEOUT = 60.0

TARGET_WATCH = "≥ 3"
TARGET_CELERY = "≥ 20"
TARGET_BARE = "≥ 0.25"


def rb_figure(mode: str, size: int) -> str:
    return f"redis-batcher {'add()' if mode == 'one' else f'add_many({MANY})'} b={size}"


WM_ONE = f"WATCH/MULTI add() b={PEER_SIZE}"
WM_MANY = f"WATCH/MULTI add_many({MANY}) b={PEER_SIZE}"
CELERY = f"celery-batches delay() flush_every={PEER_SIZE}"
BARE = f"bare RPUSH x{MANY} (producers only)"


# -- producer processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One producer's share of one measurement."""

    system: str  # rb | wm | celery | bare
    mode: str  # one (an add per item) | many (MANY items per call)
    url: str
    producer: int
    start: int  # item ids start..stop-1
    stop: int
    max_batch_size: int = PEER_SIZE
    flush_interval: float | None = None


def _prepare(job: Job) -> tuple[Callable[[], int], Callable[[], None]]:
    """Connect and build the items before the start signal. Returns (run, cleanup); run adds
    everything and returns the number of retries (WatchErrors) it needed."""
    items = [make_item(i) for i in range(job.start, job.stop)]
    chunks = [items[i : i + MANY] for i in range(0, len(items), MANY)]
    p = job.producer
    if job.system == "rb":
        from benchmarks import e2e_app

        batcher = redis_batcher.Batcher(job.url, prefix=e2e_app.PREFIX)
        proc = e2e_app.define(batcher, job.max_batch_size, job.flush_interval)
        batcher.register()  # connects, and keeps the one-time registry write out of the timing

        def run_rb() -> int:
            if job.mode == "one":
                for j, item in enumerate(items):
                    if proc.add(batch_id_for(j, p), item).added != 1:
                        raise RuntimeError("add() did not add its item")
            else:
                for j, chunk in enumerate(chunks):
                    if proc.add_many(batch_id_for(j, p), chunk).added != len(chunk):
                        raise RuntimeError("add_many() did not add every item")
            return 0

        return run_rb, batcher.close
    if job.system == "wm":
        from benchmarks.watch_multi import WatchMultiBatcher

        client = redis.Redis.from_url(job.url)
        client.ping()
        acc = WatchMultiBatcher(client, job.max_batch_size)

        def run_wm() -> int:
            if job.mode == "one":
                for j, item in enumerate(items):
                    acc.add(batch_id_for(j, p), item)
            else:
                for j, chunk in enumerate(chunks):
                    acc.add_many(batch_id_for(j, p), chunk)
            return acc.retries

        return run_wm, client.close
    if job.system == "celery":
        from benchmarks import celery_peer

        task: Any = celery_peer.collect
        # open the broker connection (and warm kombu up) on a queue nobody consumes
        task.apply_async(args=("warmup", make_item(-1)), queue=celery_peer.WARMUP_QUEUE)

        def run_celery() -> int:
            for j, item in enumerate(items):
                task.delay(batch_id_for(j, p), item)
            return 0

        return run_celery, lambda: None
    if job.system == "bare":
        client = redis.Redis.from_url(job.url)
        client.ping()
        encoded = [[msgpack.packb(item) for item in chunk] for chunk in chunks]

        def run_bare() -> int:
            for j, payloads in enumerate(encoded):
                client.rpush(f"bare:{batch_id_for(j, p)}", *payloads)
            return 0

        return run_bare, client.close
    raise ValueError(f"unknown system {job.system!r}")


def _producer_main(conn: Connection, barrier: Any) -> None:
    """A long-lived producer process: prepare a job, report ready, wait for the common start,
    run, report (start time, end time, retries)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops producers
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            run, cleanup = _prepare(job)
        except Exception:
            conn.send(("error", traceback.format_exc()))
            continue
        try:
            conn.send(("ready", None))
            try:
                barrier.wait(timeout=START_TIMEOUT)
            except threading.BrokenBarrierError:
                continue  # another producer failed to prepare: the parent gives up
            t0 = time.time()
            retries = run()
            conn.send(("done", (t0, time.time(), retries)))
        except Exception:
            conn.send(("error", traceback.format_exc()))
        finally:
            cleanup()


class ProducerPool:
    """PRODUCERS processes kept for the whole benchmark (started once: no spawn cost per run)."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(n + 1)
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        try:
            for i in range(n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_producer_main, args=(child, self.barrier), name=f"e2e-producer-{i}", daemon=True
                )
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def _recv(self, conn: Connection, timeout: float) -> tuple[str, Any]:
        try:
            if not conn.poll(timeout):
                raise TimeoutError("a producer did not answer in time")
            msg: tuple[str, Any] = conn.recv()
        except (EOFError, OSError):
            raise RuntimeError("a producer process died") from None
        return msg

    def run(self, jobs: Sequence[Job], timeout: float = 600.0) -> list[tuple[float, float, int]]:
        """Run one job per producer from a common start; (t_first_add, t_end, retries) each."""
        for conn, job in zip(self.conns, jobs, strict=True):
            conn.send(job)
        ready = [self._recv(conn, START_TIMEOUT * 2) for conn in self.conns]
        errors = [payload for kind, payload in ready if kind == "error"]
        if errors:
            self.barrier.abort()
            raise RuntimeError("producer failed to prepare:\n" + errors[0])
        self.barrier.wait(timeout=START_TIMEOUT)
        done = [self._recv(conn, timeout) for conn in self.conns]
        errors = [payload for kind, payload in done if kind == "error"]
        if errors:
            raise RuntimeError("producer failed:\n" + errors[0])
        return [payload for _, payload in done]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


# -- service subprocesses -----------------------------------------------------------------------


class Services:
    """Subprocesses of one system (workers, consumers), each in its own process group."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], extra_env: dict[str, str], quiet: bool = False) -> None:
        """Start ``cmd`` (stdout discarded when ``quiet``; stderr is passed through)."""
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env = dict(os.environ, PYTHONPATH=path, **extra_env)
        env[URL_ENV] = self.url
        self.procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if quiet else None,
                start_new_session=True,
            )
        )

    def check(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(proc.args)} exited with {proc.returncode}")  # type: ignore[arg-type]

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM each process group, then SIGKILL what is left after 15 s."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also any child left in the group
            proc.wait()
        self.procs.clear()


@contextlib.contextmanager
def services(url: str) -> Iterator[Services]:
    svc = Services(url)
    try:
        yield svc
    finally:
        svc.stop()


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Sample:
    """One system's measurement in one run."""

    rate: float  # items/s
    lost: int
    duplicates: int
    batches: int  # handler calls
    handled: int  # items handled, duplicates included
    retries: int  # WATCH/MULTI lost races
    adding: float = 0.0  # seconds from the first add until the last add returned
    drain: float = 0.0  # seconds from the last add returning until the last item was handled


@dataclass
class Figure:
    name: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [s.rate for s in self.samples]

    @property
    def median(self) -> float:
        return float(statistics.median(self.rates))


def split(system: str, mode: str, url: str, items: int, **kw: Any) -> list[Job]:
    per = -(-items // PRODUCERS)
    return [Job(system, mode, url, p, p * per, min(items, (p + 1) * per), **kw) for p in range(PRODUCERS)]


def wait_handled(ledger: Ledger, items: int) -> tuple[int, int, int]:
    """Poll until every item id was handled, or nothing moved for STALL_SECONDS:
    (handled, unique, duplicates)."""
    last_change, seen = time.monotonic(), -1
    while True:
        handled = ledger.handled()
        if handled != seen:
            if handled >= items:  # the ids are read (and counted) only when they may be complete
                counted = ledger.handled_ids(items)
                if counted[1] >= items:
                    return counted
            seen, last_change = handled, time.monotonic()
        elif time.monotonic() - last_change > STALL_SECONDS:
            return ledger.handled_ids(items)
        time.sleep(0.005)


def measure(
    client: redis.Redis,
    pool: ProducerPool,
    jobs: list[Job],
    tail: Callable[[], None] | None,
) -> Sample:
    """Run the producers, flush the tail, wait until every item was handled."""
    items = jobs[-1].stop
    ledger = Ledger(os.environ[STATS_DIR_ENV])
    ledger.clear()
    done = pool.run(jobs)
    first = min(d[0] for d in done)
    last_add = max(d[1] for d in done)
    retries = sum(d[2] for d in done)
    if jobs[0].system == "bare":
        keys = [f"bare:{b}" for b in BATCH_IDS]
        stored = sum(int(client.llen(k)) for k in keys)
        client.delete(*keys)
        return Sample(items / (last_add - first), items - stored, 0, 0, stored, 0, last_add - first)
    if tail is not None:
        tail()
    handled, unique, duplicates = wait_handled(ledger, items)
    raw_last = ledger.last()
    last = raw_last if raw_last is not None else time.time()
    calls = ledger.calls()
    return Sample(
        unique / (last - first), items - unique, duplicates, calls, handled, retries,
        last_add - first, max(0.0, last - last_add),
    )  # fmt: skip


def run_redis_batcher(
    url: str,
    client: redis.Redis,
    pool: ProducerPool,
    size: int,
    args: argparse.Namespace,
) -> dict[str, Sample]:
    from benchmarks import e2e_app

    interval = e2e_app.parse_interval(args.flush_interval)
    batcher = redis_batcher.Batcher(url, prefix=e2e_app.PREFIX)
    proc = e2e_app.define(batcher, size, interval)

    def tail() -> None:
        for batch_id in BATCH_IDS:
            with contextlib.suppress(redis_batcher.BatchNotFound):
                proc.flush(batch_id)

    out: dict[str, Sample] = {}
    try:
        with services(url) as svc:
            env = {e2e_app.SIZE_ENV: str(size), e2e_app.INTERVAL_ENV: str(args.flush_interval)}
            cmd = [
                sys.executable, "-m", "redis_batcher", "worker", "benchmarks.e2e_app:batcher",
                "--redis-url", url, "--concurrency", str(args.concurrency), "--log-level", "WARNING",
            ]  # fmt: skip
            for _ in range(WORKERS):
                svc.start(cmd, env)
            channel = proc.keys.channels[0]
            svc.wait_until(
                lambda: wake.subscribers(client, channel) >= WORKERS, "redis-batcher workers"
            )
            kw = {"max_batch_size": size, "flush_interval": interval}
            for mode, items in (("one", args.items), ("many", args.many_items)):
                out[rb_figure(mode, size)] = measure(client, pool, split("rb", mode, url, items, **kw), tail)
                svc.check()
    finally:
        batcher.close()
    return out


def run_watch_multi(
    url: str, client: redis.Redis, pool: ProducerPool, args: argparse.Namespace
) -> dict[str, Sample]:
    from benchmarks.watch_multi import CONSUMER_NAME, WatchMultiBatcher

    flusher = WatchMultiBatcher(client, PEER_SIZE)

    def tail() -> None:
        for batch_id in BATCH_IDS:
            flusher.flush(batch_id)

    def consumers() -> int:
        return sum(1 for c in client.client_list() if c.get("name") == CONSUMER_NAME)

    out: dict[str, Sample] = {}
    with services(url) as svc:
        for _ in range(WORKERS):
            svc.start([sys.executable, "-m", "benchmarks.watch_multi", "--redis-url", url], {})
        svc.wait_until(lambda: consumers() >= WORKERS, "WATCH/MULTI consumers")
        kw = {"max_batch_size": PEER_SIZE}
        for name, mode, items in ((WM_ONE, "one", args.items), (WM_MANY, "many", args.many_items)):
            out[name] = measure(client, pool, split("wm", mode, url, items, **kw), tail)
            svc.check()
    return out


def run_celery(url: str, client: redis.Redis, pool: ProducerPool, args: argparse.Namespace) -> Sample:
    from benchmarks import celery_peer

    def consuming() -> bool:
        return any(c.get("cmd") == "brpop" for c in client.client_list())

    cmd = [
        sys.executable, "-m", "celery", "-A", "benchmarks.celery_peer", "worker",
        "--pool", "solo", "--concurrency", "1", "-Q", celery_peer.QUEUE, "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with services(url) as svc:
        # quiet: its start-up banner; PYTHONWARNINGS: it warns about running as root (json only: harmless)
        svc.start(cmd, {"PYTHONWARNINGS": "ignore"}, quiet=True)
        svc.wait_until(consuming, "celery worker")
        sample = measure(client, pool, split("celery", "one", url, args.celery_items), None)
        svc.check()
    return sample


# -- output -------------------------------------------------------------------------------------


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def print_table(figures: dict[str, Figure]) -> None:
    cols = f"{'figure':<41} {'median':>9} {'min':>9} {'max':>9} {'lost':>5} {'dup':>4} {'mean batch':>10}"
    print(cols + "  notes")
    print("-" * (len(cols) + 44))
    for fig in figures.values():
        if not fig.samples:
            continue
        lost = sum(s.lost for s in fig.samples)
        dup = sum(s.duplicates for s in fig.samples)
        calls = sum(s.batches for s in fig.samples)
        mean_batch = f"{sum(s.handled for s in fig.samples) / calls:,.1f}" if calls else "-"
        notes = f"adds took {statistics.median([s.adding for s in fig.samples]):.2f} s"
        if fig.name != BARE:
            notes += f", drained {statistics.median([s.drain for s in fig.samples]) * 1000:,.0f} ms later"
        if fig.name.startswith("WATCH/MULTI"):
            notes += f", {statistics.median([s.retries for s in fig.samples]):,.0f} WatchErrors"
        print(
            f"{fig.name:<41} {fmt_rate(fig.median):>9} {fmt_rate(min(fig.rates)):>9} "
            f"{fmt_rate(max(fig.rates)):>9} {lost:>5} {dup:>4} {mean_batch:>10}  {notes}"
        )
    print(
        "(items/s from the first add to the last item handled; lost and dup summed over the runs; "
        "mean batch = items / handler calls; notes are medians)"
    )


@dataclass(frozen=True)
class Comparison:
    figure: str
    baseline: str
    target: str | None  # e.g. "≥ 3"
    json_figure: str  # a figure compared with several baselines gets one JSON record per baseline


def comparisons() -> list[Comparison]:
    rb_one, rb_many = rb_figure("one", PEER_SIZE), rb_figure("many", PEER_SIZE)
    rb_many_1000 = rb_figure("many", 1000)
    return [
        Comparison(rb_one, WM_ONE, TARGET_WATCH, rb_one),
        Comparison(rb_one, CELERY, TARGET_CELERY, f"{rb_one} (vs celery-batches)"),
        Comparison(rb_many, BARE, TARGET_BARE, rb_many),
        Comparison(rb_many_1000, BARE, TARGET_BARE, rb_many_1000),
        Comparison(rb_many, WM_MANY, None, f"{rb_many} (vs WATCH/MULTI)"),
    ]


def report_ratios(figures: dict[str, Figure]) -> list[report.Record]:
    """Print the ratio lines; return every JSON record (one per figure, one more per extra
    baseline of a figure)."""
    done: dict[str, tuple[Comparison, float]] = {}
    for cmp in comparisons():
        fig, base = figures[cmp.figure], figures[cmp.baseline]
        if not fig.samples or not base.samples:
            print(f"{cmp.figure} / {cmp.baseline}: not measured")
            continue
        ratio = fig.median / base.median
        target = f"target {cmp.target.replace('≥', '>=')}" if cmp.target else "no target"
        print(f"{cmp.figure} / {cmp.baseline} = {ratio:.2f}  ({target})")
        done[cmp.json_figure] = (cmp, ratio)
    records: list[report.Record] = []
    for fig in figures.values():
        if not fig.samples:
            continue
        lost = sum(s.lost for s in fig.samples)
        dup = sum(s.duplicates for s in fig.samples)
        extra = [name for name, (cmp, _) in done.items() if cmp.figure == fig.name and name != fig.name]
        for name in [fig.name, *extra]:
            cmp_ratio = done.get(name)
            records.append(
                report.record(
                    SUITE,
                    name,
                    fig.rates,
                    "items/s",
                    ratio=cmp_ratio[1] if cmp_ratio else None,
                    ratio_of=cmp_ratio[0].baseline if cmp_ratio else None,
                    target=cmp_ratio[0].target if cmp_ratio else None,
                    lost=lost,
                    duplicates=dup,
                )
            )
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 small run, < 30 s (asserts nothing about speed)")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median shown; at least 3)")
    ap.add_argument("--json", metavar="PATH", help="append one JSON object per figure to PATH")
    ap.add_argument("--items", type=int, default=40_000, help="items per system, add() per item")
    ap.add_argument("--many-items", type=int, default=200_000, help=f"items per system, add_many({MANY})")
    ap.add_argument(
        "--celery-items",
        type=int,
        default=None,
        help="items for celery-batches (default: --items, the same workload as redis-batcher's add())",
    )
    ap.add_argument("--bare-items", type=int, default=800_000, help="items for bare RPUSH")
    ap.add_argument("--concurrency", type=int, default=4, help="handler threads per redis-batcher worker")
    ap.add_argument(
        "--systems",
        default="rb,wm,celery,bare",
        help="comma-separated subset of rb,wm,celery,bare (default: all; ratios need both sides)",
    )
    ap.add_argument(
        "--flush-interval",
        default="none",
        help="redis-batcher flush_interval in seconds, or 'none' (default: sealed by size, tail by flush())",
    )
    args = ap.parse_args()
    if args.quick:
        args.runs = 1
        args.items, args.many_items, args.bare_items = 2_000, 10_000, 20_000
    if args.celery_items is None:
        # the same workload as add(): with fewer items celery-batches' 1 s flush timer at the end
        # weighs more (6,000 items: about 1,190 or 1,495 items/s by the timer's phase; 40,000:
        # 1,320-1,420, its steady state, bound by the solo worker)
        args.celery_items = args.items
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    systems = {s.strip() for s in args.systems.split(",") if s.strip()}
    if not systems <= {"rb", "wm", "celery", "bare"}:
        ap.error(f"--systems: unknown {sorted(systems - {'rb', 'wm', 'celery', 'bare'})}")
    have_celery = importlib.util.find_spec("celery") is not None and (
        importlib.util.find_spec("celery_batches") is not None
    )
    if "celery" in systems and not have_celery and not args.quick:
        raise SystemExit("celery / celery-batches are not installed: pip install -e '.[bench]' (or --quick)")

    figures: dict[str, Figure] = {}
    for size in SIZES:
        for mode in ("one", "many"):
            figures[rb_figure(mode, size)] = Figure(rb_figure(mode, size))
    for name in (WM_ONE, WM_MANY, CELERY, BARE):
        figures[name] = Figure(name)

    # SIGTERM (e.g. from ``python -m benchmarks``) unwinds like Ctrl-C: every finally below runs,
    # so workers, consumers, producers and redis-server are all stopped
    report.exit_on_sigterm()
    t_start = time.monotonic()
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="rb-e2e-") as stats_dir:
        url = server.url
        os.environ[URL_ENV] = url  # read at import by benchmarks.celery_peer in the producers
        os.environ[STATS_DIR_ENV] = stats_dir  # where handlers record (passed on to services)
        client = redis.Redis.from_url(url)
        pool = ProducerPool(PRODUCERS)
        try:
            print(
                f"redis-server {client.info()['redis_version']}, {PRODUCERS} producer processes, "
                f"{WORKERS} worker/consumer processes (redis-batcher --concurrency {args.concurrency}), "
                f"{len(BATCH_IDS)} batch ids, {args.runs} run(s), median shown",
                flush=True,
            )
            print(
                f"items per run: add() {args.items:,}, add_many({MANY}) {args.many_items:,}, "
                f"celery-batches {args.celery_items:,}, bare RPUSH {args.bare_items:,}; "
                f"redis-batcher flush_interval={args.flush_interval}",
                flush=True,
            )
            if "celery" in systems and not have_celery:
                print("note: celery / celery-batches not installed: celery-batches skipped", flush=True)
            for run in range(args.runs):
                got: dict[str, Sample] = {}
                for size in SIZES if "rb" in systems else ():
                    client.flushall()
                    got.update(run_redis_batcher(url, client, pool, size, args))
                if "wm" in systems:
                    client.flushall()
                    got.update(run_watch_multi(url, client, pool, args))
                if "celery" in systems and have_celery:
                    client.flushall()
                    got[CELERY] = run_celery(url, client, pool, args)
                if "bare" in systems:
                    client.flushall()
                    got[BARE] = measure(client, pool, split("bare", "many", url, args.bare_items), None)
                client.flushall()
                for name, sample in got.items():
                    figures[name].samples.append(sample)
                print(
                    f"run {run + 1}/{args.runs}: "
                    + ", ".join(f"{n} {fmt_rate(s.rate)}" for n, s in got.items())
                    + f"  [{time.monotonic() - t_start:.0f} s]",
                    flush=True,
                )
        finally:
            pool.close()
            client.close()

    print()
    print_table(figures)
    print()
    report.append_json(args.json, report_ratios(figures))
    print(f"total {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
