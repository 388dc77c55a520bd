"""What ``redis-batcher top`` shows, as a typed snapshot: for each registered processor its
backlog (sequences due now that no worker holds), how long the oldest has been overdue, its
dead letters, whether it is paused, the live workers serving it and their flushes and failures
per second; and each live worker's own rates. From Python::

    from redis_batcher import Batcher, top

    batcher = Batcher("redis://127.0.0.1:6379/0", prefix="rb")
    snap = top.snapshot(batcher)
    ...
    snap = top.snapshot(batcher, snap)  # rates between the workers' heartbeats since then

A snapshot reads a fixed number of Redis commands per partition and two for the workers,
however many batch ids are active (:func:`redis_batcher.overview.processor_overview`, one
``ZCOUNT`` per partition, :meth:`Batcher.workers <redis_batcher.Batcher.workers>`).

The rates come from the delivered and failed counters the workers write at each heartbeat
(:mod:`redis_batcher.worker_registry`): between the two last beats a snapshot saw of a worker,
or, on the first snapshot (``top --once``), averaged since the worker started. A worker serving
several processors counts its flushes together: a processor it serves shows them all, marked
``shared``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from . import overview
from .batcher import Batcher
from .worker_registry import WorkerInfo


@dataclass(frozen=True)
class WorkerRates:
    """One live worker as :func:`snapshot` saw it: its last heartbeat record (``info``) and its
    delivered and failed flushes per second (None: not known yet)."""

    info: WorkerInfo
    flushes_per_s: float | None
    failures_per_s: float | None


@dataclass(frozen=True)
class ProcessorTop:
    """One registered processor: ``backlog``, its sequences due now that no worker holds;
    ``queued``, every sequence in its delay queues (waiting for an interval, a retry or a
    lease too); ``oldest_overdue``, seconds since the oldest of the backlog was due (None:
    none); ``workers``, the live workers serving it, and their flushes and failures per second
    (None: no rate known; ``shared``: some of them serve other processors too, whose flushes
    the rates include)."""

    name: str
    backlog: int
    queued: int
    oldest_overdue: float | None
    dead_letters: int
    paused: bool
    workers: int
    flushes_per_s: float | None
    failures_per_s: float | None
    shared: bool


@dataclass(frozen=True)
class TopSnapshot:
    """What ``redis-batcher top`` shows at ``taken``: the processors by name, the live
    workers by id."""

    prefix: str
    taken: datetime
    processors: list[ProcessorTop]
    workers: list[WorkerRates]

    @property
    def flushes_per_s(self) -> float:
        """Flushes delivered per second by all live workers whose rate is known."""
        return sum(w.flushes_per_s or 0.0 for w in self.workers)

    @property
    def failures_per_s(self) -> float:
        """Failed flushes per second of all live workers whose rate is known."""
        return sum(w.failures_per_s or 0.0 for w in self.workers)


def worker_rates(info: WorkerInfo, before: WorkerRates | None) -> WorkerRates:
    """``info``'s rates: between its beat ``before`` and this one (the rates ``before`` had if
    it has not beaten since), or, without ``before``, averaged since it started."""
    if before is None:
        since, delivered, failed = info.started, 0, 0
    elif info.last_beat <= before.info.last_beat:
        return WorkerRates(info, before.flushes_per_s, before.failures_per_s)
    else:
        since, delivered, failed = before.info.last_beat, before.info.delivered, before.info.failed
    seconds = (info.last_beat - since).total_seconds()
    if seconds <= 0:
        return WorkerRates(info, None, None)
    return WorkerRates(
        info, max(info.delivered - delivered, 0) / seconds, max(info.failed - failed, 0) / seconds
    )


def _sum(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def processor_top(batcher: Batcher, name: str, workers: list[WorkerRates]) -> ProcessorTop:
    """The row of processor ``name`` (registered under ``batcher``'s prefix); ``workers``:
    every live worker of the prefix."""
    proc = batcher.remote(name)
    seen = overview.processor_overview(proc)
    backlog = batcher.executor.drive(overview.due_now_steps(proc, int(time.time() * 1000)))
    serving = [w for w in workers if name in w.info.processors]
    return ProcessorTop(
        name=name,
        backlog=backlog,
        queued=seen.queued_sequences,
        oldest_overdue=seen.oldest_overdue,
        dead_letters=seen.dead_letters,
        paused=seen.paused,
        workers=len(serving),
        flushes_per_s=_sum(w.flushes_per_s for w in serving),
        failures_per_s=_sum(w.failures_per_s for w in serving),
        shared=any(len(w.info.processors) > 1 for w in serving),
    )


def snapshot(
    batcher: Batcher, previous: TopSnapshot | None = None, names: Iterable[str] | None = None
) -> TopSnapshot:
    """The processors named (default: every one registered) and the live workers of
    ``batcher``'s prefix now; ``previous``, the last snapshot, gives the rates between the
    workers' heartbeats since (see the module's text)."""
    before = {w.info.id: w for w in previous.workers} if previous is not None else {}
    workers = [worker_rates(info, before.get(info.id)) for info in batcher.workers()]
    chosen = sorted(overview.registry(batcher).configs if names is None else set(names))
    rows = [processor_top(batcher, name, workers) for name in chosen]
    return TopSnapshot(batcher.prefix, datetime.now(timezone.utc), rows, workers)
