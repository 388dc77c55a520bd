"""The worker registry: each running worker keeps a heartbeat record in Redis, so that
``redis-batcher workers`` and ``health`` (and :meth:`Batcher.workers
<redis_batcher.Batcher.workers>`) can tell which workers are alive and what they serve.

Two keys per prefix, sharing the hash tag ``{workers}`` (one Cluster slot, so a listing is one
``ZRANGE`` and one ``MGET`` however many workers there are)::

    rb:{workers}                       ZSET   worker id -> when its record expires (ms)
    rb:{workers}:<worker id>           STRING JSON record of one worker (expires with PX)

A worker writes its record every ``beat_interval`` seconds with a time to live of
:data:`MISSED_BEATS` intervals: a worker that dies (``kill -9``, a lost host) disappears once
that runs out; a clean stop deletes the record at once. Each beat also prunes the index of
workers whose records expired. The writes are plain commands in a non-transactional pipeline
(no script): a beat cut in half leaves at worst an index entry without a record, which the
listing skips and the next beat prunes.

No I/O happens here: the drivers execute the pipelines :func:`beat` and :func:`leave` queue on
their own client, and the listing runs as :data:`~redis_batcher.calls.Steps`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from operator import methodcaller
from typing import Any

from .calls import Read, Steps
from .errors import ConfigError
from .models import as_text

BEAT_INTERVAL = 5.0  # seconds between two beats of a worker's record (default)
MISSED_BEATS = 3  # a record lives this many beat intervals after its last beat
WORKERS_TAG = "workers"


def _package_version() -> str:
    try:
        return metadata.version("redis-batcher")
    except metadata.PackageNotFoundError:  # run from a source tree without installing it
        return "unknown"


VERSION = _package_version()


def workers_key(prefix: str) -> str:
    """The ZSET indexing the live workers of ``prefix`` (id -> record expiry, ms)."""
    return f"{prefix}:{{{WORKERS_TAG}}}"


def worker_key(prefix: str, worker_id: str) -> str:
    """The STRING holding the heartbeat record of one worker (same slot as :func:`workers_key`)."""
    return f"{prefix}:{{{WORKERS_TAG}}}:{worker_id}"


def new_worker_id() -> str:
    """A worker id readable by an operator: ``<host>.<pid>.<6 hex digits>``."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def check_beat_interval(value: object) -> float:
    """``value`` as a beat interval in seconds (raises :class:`ConfigError` unless > 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"beat_interval must be a number > 0, got {value!r}")
    return float(value)


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc)


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker, as its last heartbeat recorded it: ``kind`` is ``"sync"`` or
    ``"asyncio"``; ``inflight``, the flushes whose handlers were running; ``delivered`` and
    ``failed``, the flushes it delivered and those that failed since it started; ``ttl``, the
    seconds its record lives after a beat (it is dead once that many pass without one)."""

    id: str
    host: str
    pid: int
    version: str
    kind: str
    prefix: str
    processors: list[str]
    iterators: list[str]
    concurrency: int
    started: datetime
    last_beat: datetime
    inflight: int
    delivered: int
    failed: int
    ttl: float


@dataclass
class WorkerIdentity:
    """What a worker's record says that does not change while it runs."""

    id: str
    kind: str
    prefix: str
    processors: list[str]
    iterators: list[str]
    concurrency: int
    beat_interval: float
    started_ms: int
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @property
    def ttl_ms(self) -> int:
        return int(self.beat_interval * MISSED_BEATS * 1000)

    def record(self, now_ms: int, inflight: int, delivered: int, failed: int) -> str:
        """The JSON record of a beat at ``now_ms``."""
        return json.dumps(
            {
                "id": self.id,
                "host": self.host,
                "pid": self.pid,
                "version": VERSION,
                "kind": self.kind,
                "prefix": self.prefix,
                "processors": self.processors,
                "iterators": self.iterators,
                "concurrency": self.concurrency,
                "started": self.started_ms,
                "last_beat": now_ms,
                "inflight": inflight,
                "delivered": delivered,
                "failed": failed,
                "ttl": self.ttl_ms / 1000.0,
            },
            separators=(",", ":"),
        )


def beat(client: Any, who: WorkerIdentity, record: str, now_ms: int) -> Any:
    """A pipeline of ``client`` (sync or asyncio; not a transaction) with one beat queued, to
    execute: the record with its time to live, its index entry, the pruning of expired ones."""
    index = workers_key(who.prefix)
    pipe = client.pipeline(transaction=False)
    pipe.set(worker_key(who.prefix, who.id), record, px=who.ttl_ms)
    pipe.zadd(index, {who.id: now_ms + who.ttl_ms})
    pipe.zremrangebyscore(index, "-inf", now_ms)
    return pipe


def leave(client: Any, who: WorkerIdentity) -> Any:
    """A pipeline of ``client`` with the removal of the worker's record and index entry (a
    clean stop) queued, to execute."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(worker_key(who.prefix, who.id))
    pipe.zrem(workers_key(who.prefix), who.id)
    return pipe


def parse_record(raw: Any) -> WorkerInfo | None:
    """A worker record read from Redis, or None when it is not one (skipped by listings)."""
    try:
        data = json.loads(as_text(raw))
        return WorkerInfo(
            id=str(data["id"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            version=str(data["version"]),
            kind=str(data["kind"]),
            prefix=str(data["prefix"]),
            processors=[str(p) for p in data["processors"]],
            iterators=[str(i) for i in data["iterators"]],
            concurrency=int(data["concurrency"]),
            started=_utc(int(data["started"])),
            last_beat=_utc(int(data["last_beat"])),
            inflight=int(data["inflight"]),
            delivered=int(data["delivered"]),
            failed=int(data["failed"]),
            ttl=float(data["ttl"]),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def workers_steps(prefix: str) -> Steps[list[WorkerInfo]]:
    """The live workers of ``prefix``, by id: two reads however many there are (the index,
    then every record at once); index entries whose record expired are skipped."""
    index = workers_key(prefix)
    ids: Sequence[Any] = yield Read(index, methodcaller("zrange", index, 0, -1))
    if not ids:
        return []
    keys = [worker_key(prefix, as_text(i)) for i in ids]
    raws: Sequence[Any] = yield Read(index, methodcaller("mget", keys))
    found = [parse_record(raw) for raw in raws if raw is not None]
    return sorted((w for w in found if w is not None), key=lambda w: w.id)


def unserved(workers: Sequence[WorkerInfo], processors: Sequence[str]) -> list[str]:
    """The processors of ``processors`` that no worker of ``workers`` serves."""
    served = {p for w in workers for p in w.processors}
    return [p for p in processors if p not in served]


@dataclass(frozen=True)
class Health:
    """The answer of a health probe: ``ok`` (exit status 0) and the line that says why."""

    ok: bool
    message: str


def assess(
    workers: Sequence[WorkerInfo],
    prefix: str,
    *,
    worker_id: str | None = None,
    pid: int | None = None,
    host: str | None = None,
    processors: Sequence[str] = (),
) -> Health:
    """A health probe over the live ``workers`` of ``prefix``. With ``worker_id``, or ``pid``
    (on ``host``, default this one): that worker is alive, its heartbeat fresh (liveness).
    Otherwise: at least one worker is alive and, for each of ``processors``, one serves it
    (readiness)."""
    if worker_id is not None or pid is not None:
        where = host or socket.gethostname()
        for w in workers:
            if (worker_id is not None and w.id == worker_id) or (
                worker_id is None and w.pid == pid and w.host == where
            ):
                return Health(True, f"worker {w.id} alive (last beat {w.last_beat.isoformat()})")
        what = f"worker {worker_id}" if worker_id is not None else f"worker pid {pid} on {where}"
        return Health(False, f"{what}: no fresh heartbeat under prefix {prefix!r}")
    if not workers:
        return Health(False, f"no live workers under prefix {prefix!r}")
    missing = unserved(workers, processors)
    if missing:
        return Health(False, f"no live worker serves {', '.join(missing)} under prefix {prefix!r}")
    return Health(True, f"{len(workers)} live worker(s) under prefix {prefix!r}")
