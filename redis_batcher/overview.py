"""What a prefix holds, read without the application's code: the processor registry, each
registered processor's counts, where its partitions live, the dead letters of every processor
and the data layout's stamp, as typed results. ``redis-batcher ls``, ``dead ls`` and ``layout``
show these; from Python::

    from redis_batcher import Batcher, overview

    batcher = Batcher("redis://127.0.0.1:6379/0", prefix="rb")
    for row in overview.processors(batcher):
        print(row.name, row.active_batch_ids, row.queued_sequences, row.dead_letters)

The functions take a sync :class:`~redis_batcher.Batcher`; their reads go through its executor
(the ``connect_retry`` policy, a key of another type raised as :class:`CorruptData`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from operator import methodcaller

from .batcher import Batcher
from .calls import Read, Steps
from .definition import ProcessorDef
from .keys import LAYOUT, key_slot, registry_key
from .models import DeadLetter, ProcessorConfig
from .processor import Processor

_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Registry:
    """The processor registry of a prefix (``key``): the configs by name, and the entries that
    are not processor configs (name -> why), which the other functions here skip."""

    key: str
    configs: dict[str, ProcessorConfig]
    unreadable: dict[str, str]

    def skipped(self) -> list[str]:
        """One line per unreadable entry, by name: what the CLI prints on stderr."""
        return [
            f"skipped registry entry {name} of {self.key}: {reason}"
            for name, reason in sorted(self.unreadable.items())
        ]


@dataclass(frozen=True)
class ProcessorOverview:
    """One registered processor: its config, how many base ids have an active sequence, how
    many sequences wait in its queues (for a worker, an interval, a retry or a lease to run
    out) and how many dead letters it keeps; how long its oldest overdue entry has been due
    (seconds, by this machine's clock; None when nothing is overdue: due in the past and no
    worker holding it) and whether it is paused."""

    name: str
    config: ProcessorConfig
    active_batch_ids: int
    queued_sequences: int
    dead_letters: int
    oldest_overdue: float | None = None
    paused: bool = False


@dataclass(frozen=True)
class PartitionInfo:
    """One partition of a processor: its key prefix (with the hash tag), the cluster slot of
    that tag, the server holding it (``host:port``, or the socket path) and the sequences
    queued there."""

    processor: str
    partition: int
    key_prefix: str
    slot: int
    node: str
    queued_sequences: int


@dataclass(frozen=True)
class LayoutReport:
    """The data layout under a prefix: ``found``, the version stamped (None: no stamp; a str:
    a stamp that is not a version); ``legacy``, data without a stamp (layout 1, written before
    layouts were stamped); ``current``, the layout this version writes."""

    found: int | str | None
    legacy: bool
    current: int = LAYOUT

    @property
    def matches(self) -> bool:
        """This version can work on the prefix: its own layout, or no data yet."""
        return not self.legacy and self.found in (None, self.current)


def registry(batcher: Batcher) -> Registry:
    """The processor registry under ``batcher``'s prefix."""
    configs, unreadable = batcher.registry_entries()
    return Registry(registry_key(batcher.prefix), configs, unreadable)


def _names(batcher: Batcher, names: Iterable[str] | None) -> list[str]:
    return sorted(registry(batcher).configs if names is None else names)


def counts_steps(proc: ProcessorDef) -> Steps[tuple[int, int, int]]:
    """(base ids with an active sequence, queued sequences, dead letters) of ``proc``, summed
    over its partitions."""
    active = queued = dead = 0
    for part in proc.keys.parts:
        active += yield Read(part.ids, methodcaller("scard", part.ids))
        queued += yield Read(part.due, methodcaller("zcard", part.due))
        dead += yield Read(part.dead, methodcaller("zcard", part.dead))
    return active, queued, dead


def earliest_due_steps(proc: ProcessorDef) -> Steps[tuple[float | None, bool]]:
    """(the earliest score in ``proc``'s delay queues, epoch ms, None when they are empty;
    whether any partition is paused): two commands per partition, whatever their size. A
    worker's lease scores its entry in the future, so a score in the past is overdue."""
    earliest: float | None = None
    paused = False
    for part in proc.keys.parts:
        first = yield Read(part.due, methodcaller("zrange", part.due, 0, 0, withscores=True))
        if first and (earliest is None or first[0][1] < earliest):
            earliest = float(first[0][1])
        paused = bool((yield Read(part.paused, methodcaller("exists", part.paused)))) or paused
    return earliest, paused


def overdue_age(earliest_ms: float | None, now: float) -> float | None:
    """Seconds since ``earliest_ms`` (epoch ms) at ``now`` (epoch s), or None when it is not in
    the past (nothing overdue)."""
    if earliest_ms is None or earliest_ms >= now * 1000:
        return None
    return now - earliest_ms / 1000


@dataclass(frozen=True)
class Backlog:
    """What a scrape reads of one processor (:func:`backlogs`): base ids with an active
    sequence; sequences due now that no worker holds (``due_now``); the others queued
    (``scheduled``: waiting for their interval or a retry's backoff, or held by a worker's
    lease); dead letters kept; seconds its oldest overdue entry has been due (None: none);
    whether it is paused; ``pending_items``, the items of its sealed sequences not yet
    delivered (due, waiting for a retry or in a worker's hands: items still accumulating are
    counted once their sequence is sealed, so that ``add()`` writes no counter)."""

    active_batch_ids: int
    due_now: int
    scheduled: int
    dead_letters: int
    oldest_overdue: float | None
    paused: bool
    pending_items: int = 0


def due_now_steps(proc: ProcessorDef, now_ms: int) -> Steps[int]:
    """Sequences of ``proc`` due at ``now_ms`` (epoch ms) and held by no worker (a lease
    scores its entry in the future): one ``ZCOUNT`` per partition."""
    due = 0
    for part in proc.keys.parts:
        due += yield Read(part.due, methodcaller("zcount", part.due, "-inf", now_ms))
    return due


def pending_items_steps(proc: ProcessorDef) -> Steps[int]:
    """Items of ``proc``'s sealed sequences not yet delivered: one ``GET`` per partition of the
    count the scripts keep (a value that is not a count reads as 0)."""
    total = 0
    for part in proc.keys.parts:
        raw = yield Read(part.pending, methodcaller("get", part.pending))
        try:
            total += max(int(raw or 0), 0)
        except ValueError:
            pass
    return total


def backlog_steps(proc: ProcessorDef, now: float) -> Steps[Backlog]:
    """The :class:`Backlog` of ``proc`` at ``now`` (epoch s): seven commands per partition,
    however many batch ids it holds."""
    active, queued, dead = yield from counts_steps(proc)
    earliest, paused = yield from earliest_due_steps(proc)
    due = yield from due_now_steps(proc, int(now * 1000))
    pending = yield from pending_items_steps(proc)
    # ZCARD and ZCOUNT are separate reads: a claim between them may make the difference negative
    scheduled = max(queued - due, 0)
    return Backlog(active, due, scheduled, dead, overdue_age(earliest, now), paused, pending)


def backlogs(batcher: Batcher, names: Iterable[str] | None = None) -> dict[str, Backlog]:
    """The :class:`Backlog` of each processor named (default: every readable registry entry), by
    name: what :class:`redis_batcher.metrics.RedisCollector` exports at each scrape."""
    now = time.time()
    return {
        name: batcher.executor.drive(backlog_steps(batcher.remote(name), now))
        for name in _names(batcher, names)
    }


def processor_overview(proc: Processor) -> ProcessorOverview:
    """The counts of one processor (a local one, or one of :meth:`Batcher.remote`)."""
    active, queued, dead = proc.batcher.executor.drive(counts_steps(proc))
    earliest, paused = proc.batcher.executor.drive(earliest_due_steps(proc))
    age = overdue_age(earliest, time.time())
    return ProcessorOverview(proc.name, proc.config, active, queued, dead, age, paused)


def processors(batcher: Batcher, names: Iterable[str] | None = None) -> list[ProcessorOverview]:
    """The overview of each processor named (default: every readable registry entry), by name."""
    return [processor_overview(batcher.remote(name)) for name in _names(batcher, names)]


def node_of(batcher: Batcher, key: str) -> str:
    """``host:port`` of the server holding ``key`` (on a cluster: the primary serving its slot,
    as the client's slot table has it), or the socket path of a unix-socket connection."""
    client = batcher.client
    if batcher.is_cluster:
        return str(client.get_node_from_key(key).name)
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def partitions(batcher: Batcher, names: Iterable[str] | None = None) -> list[PartitionInfo]:
    """Every partition of each processor named (default: every readable registry entry), by
    processor name then partition."""
    out: list[PartitionInfo] = []
    for name in _names(batcher, names):
        for k, part in enumerate(batcher.remote(name).keys.parts):
            queued = batcher.executor.drive(_zcard(part.due))
            node = node_of(batcher, part.due)
            out.append(PartitionInfo(name, k, part.pfx, key_slot(part.due), node, queued))
    return out


def _zcard(key: str) -> Steps[int]:
    count: int = yield Read(key, methodcaller("zcard", key))
    return count


def partitions_per_node(parts: Iterable[PartitionInfo]) -> dict[str, int]:
    """How many of ``parts`` each server holds, by server."""
    per_node: dict[str, int] = {}
    for part in parts:
        per_node[part.node] = per_node.get(part.node, 0) + 1
    return dict(sorted(per_node.items()))


def dead_letters(batcher: Batcher, limit: int = 50, names: Iterable[str] | None = None) -> list[DeadLetter]:
    """The newest ``limit`` dead letters of the processors named (default: every readable
    registry entry), newest first, without their items."""
    found: list[DeadLetter] = []
    for name in _names(batcher, names):
        found.extend(batcher.remote(name).dead_letters(limit=limit))
    found.sort(key=lambda d: d.dead_at or _OLDEST, reverse=True)
    return found[:limit]


def replay_dead_letters(proc: Processor, dead_ids: Sequence[str] | None = None) -> Iterator[tuple[str, int]]:
    """Replay the dead letters named (default: every dead letter of ``proc``), one by one,
    yielding (dead letter id, the new sequence number) after each; an error stops it there."""
    ids = [d.id for d in proc.dead_letters(limit=1_000_000)] if dead_ids is None else list(dead_ids)
    for dead_id in ids:
        yield dead_id, proc.replay_dead(dead_id)


def layout_report(batcher: Batcher) -> LayoutReport:
    """The layout stamped under ``batcher``'s prefix, read without stamping anything."""
    found = batcher.layout()
    return LayoutReport(found, found is None and bool(batcher.registry_entries()[0]))
