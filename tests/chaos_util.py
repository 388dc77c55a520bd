"""Helpers of the chaos suite: worker processes that can be killed and restarted, producer
processes, the ledger reader and the delivery report (lost / duplicates / violations)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import redis

from redis_batcher import wake
from redis_batcher.testing import RedisServer
from tests.apps import chaos
from tests.conftest import ROOT, cli_command, subprocess_env


@contextmanager
def own_server(**kwargs: Any) -> Iterator[RedisServer]:
    """A redis-server only this test uses (it may kill or restart it); always stopped."""
    server = RedisServer(**kwargs)
    try:
        server.start()
        yield server
    finally:
        server.close()


def wait_until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> float:
    """Poll ``cond`` until true; returns the seconds it took (AssertionError on timeout)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - t0


class Workers:
    """``redis-batcher worker`` subprocesses in their own process groups, one log per slot
    (appended to across restarts)."""

    def __init__(
        self,
        url: str,
        app: str,
        count: int,
        log_dir: Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.app = app
        self.args = list(args)
        self.env = {**subprocess_env(url), **(env or {})}
        self.logs = [log_dir / f"worker{i}.log" for i in range(count)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.all_pids: set[int] = set()
        self.killed_pids: set[int] = set()
        self.kills = 0
        self.restarts = 0

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def start(self, i: int) -> subprocess.Popen[bytes]:
        assert self.procs[i] is None or self.procs[i].poll() is not None  # type: ignore[union-attr]
        if self.procs[i] is not None:
            self.restarts += 1
        with self.logs[i].open("ab") as log:
            p = subprocess.Popen(
                cli_command("worker", self.app, "--redis-url", self.url, *self.args),
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.procs[i] = p
        self.all_pids.add(p.pid)
        return p

    def start_all(self) -> None:
        for i in range(len(self.procs)):
            self.start(i)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def slot_of(self, pid: int) -> int:
        for i, p in enumerate(self.procs):
            if p is not None and p.pid == pid:
                return i
        raise KeyError(pid)

    def signal(self, i: int, sig: int) -> None:
        p = self.procs[i]
        assert p is not None
        if p.poll() is None:
            os.killpg(p.pid, sig)

    def kill(self, i: int) -> None:
        """SIGKILL slot ``i`` and reap it."""
        p = self.procs[i]
        assert p is not None
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
            self.kills += 1
            self.killed_pids.add(p.pid)

    def assert_alive(self) -> None:
        for i, p in enumerate(self.procs):
            assert p is not None and p.poll() is None, (
                f"worker {i} exited with {None if p is None else p.returncode}:\n{self.log_tail(i)}"
            )

    def log_tail(self, i: int, chars: int = 4000) -> str:
        try:
            return self.logs[i].read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs if log.exists())

    def terminate_all(self, timeout: float = 20.0) -> list[int | None]:
        """Warm shutdown: SIGTERM every live worker (SIGCONT first, in case one is stopped) and
        wait; returns the exit codes."""
        for p in self.procs:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
        codes: list[int | None] = []
        for p in self.procs:
            if p is None:
                codes.append(None)
                continue
            try:
                codes.append(p.wait(timeout))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def kill_all(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)


def wait_for_subscribers(
    client: redis.Redis, channel: str, count: int, workers: Workers, timeout: float = 30
) -> None:
    """Wait until ``count`` workers listen on the wake-up channel (they are serving)."""

    def ready() -> bool:
        workers.assert_alive()
        return wake.subscribers(client, channel) >= count

    wait_until(ready, timeout, f"{count} subscribers on {channel}", step=0.05)


class Producers:
    """``chaos.produce`` in spawned processes; results read back from files."""

    def __init__(
        self,
        url: str,
        count: int,
        total: int,
        batch_ids: int,
        out_dir: Path,
        seed: int = 1000,
        max_seconds: float = 120.0,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.paths = [out_dir / f"producer{i}.msgpack" for i in range(count)]
        self.start_barrier = ctx.Barrier(count)
        self.stop_event = ctx.Event()
        self.procs = [
            ctx.Process(
                target=chaos.produce,
                args=(
                    i,
                    url,
                    total,
                    batch_ids,
                    seed + i,
                    str(self.paths[i]),
                    self.start_barrier,
                    self.stop_event,
                    max_seconds,
                ),
                name=f"chaos-producer-{i}",
            )
            for i in range(count)
        ]
        self.returned: dict[int, float] = {}
        self.uncertain: set[int] = set()
        self.errors = 0

    def __enter__(self) -> Producers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def running(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        assert [p.exitcode for p in self.procs] == [0] * len(self.procs), [p.exitcode for p in self.procs]
        for path in self.paths:
            data = msgpack.unpackb(path.read_bytes(), raw=False)
            self.returned.update(zip(data["returned"], data["times"], strict=True))
            self.uncertain.update(data["uncertain"])
            self.errors += data["errors"]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join(5)


class Ledger:
    """Reads ``chaos:ledger`` incrementally."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.records: list[chaos.Record] = []
        self.delivered: set[Any] = set()

    def poll(self) -> list[chaos.Record]:
        raw = self.client.lrange(chaos.LEDGER_KEY, len(self.records), -1)
        new = [chaos.decode_record(r) for r in raw]
        self.records.extend(new)
        for rec in new:
            self.delivered.update(rec.items)
        return new

    def grew(self, seen: int) -> bool:
        """True once more than ``seen`` records exist."""
        self.poll()
        return len(self.records) > seen

    def delivered_count(self) -> int:
        """Distinct items delivered so far."""
        self.poll()
        return len(self.delivered)

    def covers(self, ids: Iterable[Any]) -> bool:
        self.poll()
        return self.delivered.issuperset(ids)


@dataclass
class Report:
    """What the ledger says about a run."""

    name: str
    delivered: int = 0  # item deliveries recorded (with duplicates)
    unique: int = 0
    duplicates: int = 0  # deliveries beyond the first, all allowed or not
    lost: int = 0  # returned ids never delivered
    flushes: int = 0  # ledger records
    kills: int = 0
    uncertain: int = 0  # ids whose add raised (may or may not have been applied)
    uncertain_delivered: int = 0
    redelivered_flushes: int = 0  # flush ids recorded more than once
    lost_ids: list[Any] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # disallowed duplicates, phantoms, ...
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        return (
            f"\nchaos[{self.name}]: delivered={self.delivered} unique={self.unique} "
            f"duplicates={self.duplicates} lost={self.lost} flushes={self.flushes} kills={self.kills} "
            f"uncertain={self.uncertain} (delivered {self.uncertain_delivered}) "
            f"redelivered_flushes={self.redelivered_flushes} violations={len(self.violations)}{extra}"
        )


def analyze(
    name: str,
    records: Sequence[chaos.Record],
    returned: Iterable[Any],
    uncertain: Iterable[Any] = (),
    kills: int = 0,
    max_batch_size: int | None = None,
    producer_of: Callable[[Any], Any] | None = None,
) -> Report:
    """Lost = returned ids never recorded. A duplicate is allowed only when every record that
    holds the item shares one flush_id (a redelivery of the same flush). Violations: an item
    twice in one record or in records of different flush ids, an item never added, a flush
    over ``max_batch_size``, two records of one flush_id with different items, and (with
    ``producer_of``) one producer's items out of add order within a flush or across the
    sequences of a batch id."""
    returned_set = set(returned)
    uncertain_set = set(uncertain)
    flush_ids: dict[Any, set[str]] = defaultdict(set)
    counts: dict[Any, int] = defaultdict(int)
    per_flush: dict[str, list[chaos.Record]] = defaultdict(list)
    report = Report(name, kills=kills, flushes=len(records), uncertain=len(uncertain_set))
    for rec in records:
        per_flush[rec.flush_id].append(rec)
        if max_batch_size is not None and len(rec.items) > max_batch_size:
            report.violations.append(f"flush {rec.flush_id} holds {len(rec.items)} > {max_batch_size} items")
        if len(set(rec.items)) != len(rec.items):
            report.violations.append(f"flush {rec.flush_id} holds an item twice")
        for item in rec.items:
            counts[item] += 1
            flush_ids[item].add(rec.flush_id)
    report.delivered = sum(counts.values())
    report.unique = len(counts)
    report.duplicates = report.delivered - report.unique
    report.redelivered_flushes = sum(1 for recs in per_flush.values() if len(recs) > 1)
    lost = returned_set.difference(counts)
    report.lost = len(lost)
    report.lost_ids = sorted(lost)[:20]
    report.uncertain_delivered = len(uncertain_set.intersection(counts))
    for item, ids in flush_ids.items():
        if len(ids) > 1:
            report.violations.append(f"item {item!r} delivered by {len(ids)} different flushes {sorted(ids)}")
    phantoms = set(counts).difference(returned_set, uncertain_set)
    if phantoms:
        report.violations.append(f"{len(phantoms)} delivered items were never added: {sorted(phantoms)[:10]}")
    for flush_id, recs in per_flush.items():
        # a redelivery carries the same items or a part of them (bisection halves, the items a
        # PartialFailure named) -- always of the same sequence. The first delivery itself may be
        # missing from the ledger (it failed), so only the sequence is compared here; that no
        # item reaches the handler under two flush_ids is checked above.
        if any((r.batch_id, r.sequence) != (recs[0].batch_id, recs[0].sequence) for r in recs):
            report.violations.append(f"flush {flush_id} was delivered for different sequences")
    if producer_of is not None:
        # highest / lowest item of each producer in each sequence of each batch id
        spans: dict[tuple[str, Any], list[tuple[int, Any, Any]]] = defaultdict(list)
        for recs in per_flush.values():
            rec = recs[0]
            mine: dict[Any, list[Any]] = defaultdict(list)
            for item in rec.items:
                mine[producer_of(item)].append(item)
            for prod, items in mine.items():
                if items != sorted(items):
                    report.violations.append(f"flush {rec.flush_id}: producer {prod} items out of add order")
                spans[(rec.batch_id, prod)].append((rec.sequence, items[0], items[-1]))
        for (bid, prod), seqs in spans.items():
            seqs.sort()
            for a, b in itertools.pairwise(seqs):
                if b[1] <= a[2]:
                    report.violations.append(
                        f"{bid}: producer {prod} items of sequence {b[0]} precede those of {a[0]}"
                    )
    return report


def due_count(client: redis.Redis, pfx: str) -> int:
    return int(client.zcard(f"{pfx}due"))


def leftovers(client: redis.Redis, pfx: str) -> list[bytes]:
    """Item and sequence keys still in the batcher layout (none once everything is acked)."""
    return sorted(
        [*client.scan_iter(match=f"{pfx}i:*", count=1000), *client.scan_iter(match=f"{pfx}s:*", count=1000)]
    )
