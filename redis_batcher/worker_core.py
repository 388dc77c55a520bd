"""What the sync and asyncio workers share: scheduling, claim bookkeeping, building the ack/nack
calls and recording their results (one delivery's own steps are in :mod:`redis_batcher.delivery`).
No I/O happens here; each worker runs the :class:`~redis_batcher.ops.Call` objects on its own
client.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from redis.exceptions import RedisError

from . import ops
from .delivery import Outcome, backoff_seconds
from .errors import ConfigError, CorruptData
from .instrument import WorkerObserver, reply_code
from .jobs import JobIterator, select_iterators
from .keys import PartitionKeys
from .logs import FlushSummary
from .models import WorkerStats
from .processor import Processor
from .worker_lifecycle import WorkerLifecycle
from .worker_registry import BEAT_INTERVAL, WorkerIdentity, check_beat_interval, new_worker_id

if TYPE_CHECKING:
    from .batcher import Batcher

log = logging.getLogger("redis_batcher.worker")

CORRUPT_RETRY = 5.0  # seconds before a partition whose own keys are corrupt is claimed from again
CORRUPT_LOG_EVERY = 60.0  # seconds between reports of one such partition


class WorkerHost(Protocol):
    """What a worker needs of its batcher, sync or asyncio, to be built and to say at start
    what it serves (``target``: the server, password hidden; ``prefix``)."""

    @property
    def client(self) -> Any: ...

    @property
    def wait_replicas(self) -> int: ...

    @property
    def target(self) -> str: ...

    @property
    def prefix(self) -> str: ...


H = TypeVar("H", bound=WorkerHost)


class WorkerCore(WorkerLifecycle, ABC, Generic[H]):
    """Scheduling state and bookkeeping of a worker, independent of how it does I/O.

    A driver says where its batcher keeps the definitions (:meth:`definitions_of`) and sets up
    its own state, its iterator-job runner included, in :meth:`setup`.

    ``max_flushes`` / ``max_idle`` recycle the worker as rq's ``--max-jobs`` and ``--max-idle-time``
    or Celery's ``--max-tasks-per-child`` do: :meth:`run` stops (as by :meth:`stop`) once it has
    handled that many flushes (delivered or failed), or once that many seconds passed without a
    flush claimed or running; a supervisor then starts a fresh process. ``beat_interval``:
    seconds between two heartbeats of the worker's record in the worker registry
    (:mod:`redis_batcher.worker_registry`); the record expires after three missed beats.
    ``observer``: told of every result recorded (:class:`~redis_batcher.metrics.WorkerMetrics`)."""

    KIND = "sync"  # what the worker's registry record calls this driver

    def __init__(
        self,
        batcher: H,
        *,
        concurrency: int = 4,
        processors: Iterable[str] | None = None,
        max_idle_wait: float = 5.0,
        grace_period: float = 30.0,
        prefetch_multiplier: int = 1,
        iterators: Iterable[str] | None = None,
        max_flushes: int | None = None,
        max_idle: float | None = None,
        beat_interval: float = BEAT_INTERVAL,
        observer: WorkerObserver | None = None,
    ) -> None:
        definitions = self.definitions_of(batcher)
        chosen = select_iterators(definitions.iterators, iterators)
        served = select_processors(definitions, processors)
        for name, value in (("concurrency", concurrency), ("prefetch_multiplier", prefetch_multiplier)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not max_idle_wait > 0:
            raise ConfigError(f"max_idle_wait must be > 0, got {max_idle_wait!r}")
        if not grace_period >= 0:
            raise ConfigError(f"grace_period must be >= 0, got {grace_period!r}")
        if not served and not chosen:  # iterator jobs only (redis_batcher.jobs)
            raise ConfigError("the worker has no processors or iterators to serve")
        if max_flushes is not None and (
            isinstance(max_flushes, bool) or not isinstance(max_flushes, int) or max_flushes < 1
        ):
            raise ConfigError(f"max_flushes must be an int >= 1 or None, got {max_flushes!r}")
        if max_idle is not None and (
            isinstance(max_idle, bool) or not isinstance(max_idle, (int, float)) or not max_idle > 0
        ):
            raise ConfigError(f"max_idle must be a number > 0 or None, got {max_idle!r}")
        self.beat_interval = check_beat_interval(beat_interval)
        self.observer = observer
        self.max_flushes = max_flushes
        self.max_idle = None if max_idle is None else float(max_idle)
        self.last_work = 0.0  # monotonic time of the last flush claimed or settled (max_idle)
        self.recycling: str | None = None  # why the worker stops by itself (max_flushes, max_idle)
        self.beat_failing = False  # the last heartbeat failed (logged once, see beat_done)
        self.identity = WorkerIdentity(
            id=new_worker_id(),
            kind=self.KIND,
            prefix=definitions.prefix,
            processors=[p.name for p in served],
            iterators=[it.name for it in chosen],
            concurrency=concurrency,
            beat_interval=self.beat_interval,
            started_ms=0,
        )
        self.batcher = batcher
        self.client: Any = batcher.client
        self.processors = served
        self.concurrency = concurrency
        self.prefetch_multiplier = prefetch_multiplier
        self.capacity = concurrency * prefetch_multiplier  # claimed flushes, waiting or running
        self.wait_replicas = batcher.wait_replicas  # acks are confirmed by replicas
        self.max_idle_wait = float(max_idle_wait)
        self.grace_period = float(grace_period)
        self.parts: list[tuple[Processor, PartitionKeys]] = [
            (p, part) for p in self.processors for part in p.keys.parts
        ]
        # the wake-up channel of each partition served (redis_batcher.wake)
        self.channels = [channel for p in self.processors for channel in p.keys.channels]
        self.stats = WorkerStats()
        self.summary = FlushSummary()  # the periodic INFO line (see summarize)
        # monotonic time at which each partition may next have something due (0 = check now)
        self.due_at: list[float] = [0.0] * len(self.parts)
        # bumped whenever a partition is announced due: a claim reply read after such news must
        # not push that partition's due time back (see claimed())
        self.wakes: list[int] = [0] * len(self.parts)
        # a wake-up was heard whose token is still to be tried (see on_wake)
        self.heard: list[bool] = [False] * len(self.parts)
        # the last claim of each partition left a backlog due (see ops.BACKLOG_DUE)
        self.backlog: list[bool] = [False] * len(self.parts)
        self.part_index = {part.pfx: i for i, (_, part) in enumerate(self.parts)}
        self.corrupt_logged: dict[int, float] = {}  # partition -> when its keys were last reported
        self.full_check_at = 0.0
        # the processor configs could not be written at start (Redis out of memory, ...):
        # written again at each full check until that succeeds (see registration_refused)
        self.unregistered = False
        self._rr = 0
        self.setup(chosen)

    @abstractmethod
    def definitions_of(self, batcher: H) -> Batcher:
        """The sync batcher holding the processor and iterator definitions."""

    @abstractmethod
    def setup(self, iterators: list[JobIterator]) -> None:
        """The driver's own state, and its runner of ``iterators`` (none: no iterator jobs)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop claiming; ``run`` returns once in-flight handlers have finished."""

    @property
    @abstractmethod
    def inflight(self) -> int:
        """Flushes whose handlers are running now."""

    @property
    def worker_id(self) -> str:
        """This worker's id in the worker registry (``<host>.<pid>.<hex>``)."""
        return self.identity.id

    def reset(self) -> None:
        self.stats = WorkerStats()
        self.full_check_at = 0.0
        self.due_at = [0.0] * len(self.parts)
        self.heard = [False] * len(self.parts)
        self.unregistered = False
        self.last_work = time.monotonic()
        self.summary.reset(self.last_work)
        self.recycling = None
        self.identity.started_ms = int(time.time() * 1000)
        self.first_signal: tuple[int, float] | None = None

    # -- scheduling ------------------------------------------------------------------------------

    def begin_round(self, now: float) -> list[int]:
        """Partitions worth a claim now, round-robin. Every max_idle_wait all of them: the
        safety net for due entries nobody announced (another worker's retry, a dead worker's
        expired lease, a lost pub/sub message)."""
        if now >= self.full_check_at:
            self.due_at = [0.0] * len(self.parts)
            self.full_check_at = now + self.max_idle_wait
        n = len(self.parts)
        start, self._rr = self._rr, (self._rr + 1) % n
        order = [(start + i) % n for i in range(n)]
        return [idx for idx in order if self.due_at[idx] <= now]

    def claim_call(self, idx: int, free: int) -> tuple[str, ops.Call, int]:
        """(owner token, the claim call, the partition's wake count to pass to claimed())."""
        proc, part = self.parts[idx]
        owner = ops.new_token()
        self.stats.claims += 1
        return owner, ops.claim_call(proc, part, free, owner), self.wakes[idx]

    def claimed(
        self, idx: int, owner: str, reply: Sequence[Any], now: float, seen: int
    ) -> tuple[list[ops.Claimed], bool]:
        """Record a claim reply: (flushes to run, more due now than was claimed). ``seen``: the
        partition's wake count read before the claim was sent; if a wake-up came meanwhile, the
        partition stays marked due (the reply may predate what the wake-up announced)."""
        proc, part = self.parts[idx]
        quarantined: list[ops.Quarantined] = []
        try:
            next_due, claimed = ops.parse_claim(proc, part, owner, reply, quarantined)
        except CorruptData as exc:
            # the partition's own keys hold something else: report it now and then, retry later;
            # the other partitions go on
            if now - self.corrupt_logged.get(idx, -math.inf) >= CORRUPT_LOG_EVERY:
                self.corrupt_logged[idx] = now
                log.error("%s: %s", proc.name, exc)
            self.due_at[idx] = now + CORRUPT_RETRY
            return [], False
        if claimed:
            self.last_work = now
        for q in quarantined:
            self.stats.quarantined += 1
            if self.observer is not None:
                self.observer.flush_quarantined(proc.name, q.member)
            log.error(
                "%s %s cannot be delivered (%s); moved to dead letter %s (reason quarantine)",
                proc.name,
                q.member,
                q.error,
                q.dead_id,
            )
        self.backlog[idx] = next_due == ops.BACKLOG_DUE
        if self.backlog[idx]:
            next_due = 0
        if next_due == 0 or self.wakes[idx] != seen:
            self.due_at[idx] = 0.0
            return claimed, next_due == 0
        self.due_at[idx] = now + next_due / 1000.0 if next_due > 0 else math.inf
        return claimed, False

    def next_flush_owner(self, c: ops.Claimed, outcome: Outcome) -> tuple[str, int] | None:
        """Whether to ask for the partition's next due flush with this flush's ack (one round trip
        per flush instead of an ack and a claim): (owner token, wake count) or None. Only
        successful acks, and not while results must be confirmed by replicas (a NotReplicated
        reply would drop the claim)."""
        if outcome.mode != "ack" or self.wait_replicas:
            return None
        idx = self.part_index[c.part.pfx]
        return ops.new_token(), self.wakes[idx]

    def claimed_next(
        self, c: ops.Claimed, owner: str, seen: int, reply: Any, now: float
    ) -> tuple[list[ops.Claimed], bool]:
        """Record the claim part of an ack that asked for the next flush (see next_flush_owner):
        (the flush to run next, if any; more is due now). When more is due, the caller wakes
        its main loop if it has free slots: producers hold back wake-ups while one is
        unanswered (add.lua), and an ack's claim does not answer one."""
        part = ops.claim_part(reply) if reply is not None else None
        idx = self.part_index[c.part.pfx]
        if part is None:  # refused (lease lost) or not recorded: let the main loop look
            self.mark_due(c.part.pfx)
            return [], True
        return self.claimed(idx, owner, part, now, seen)

    def claim_failed(self, idx: int, now: float, exc: BaseException) -> tuple[list[ops.Claimed], bool]:
        """A claim Redis did not answer: nothing claimed; the partition is tried again in a second."""
        log.warning("claim on %s failed: %s", self.parts[idx][1].pfx, exc)
        self.due_at[idx] = now + 1.0
        return [], False

    def sleep_time(self, now: float, free: int) -> float:
        wait = self.full_check_at - now
        if free > 0:
            wait = min(wait, min(self.due_at) - now)
        if self.max_idle is not None:
            wait = min(wait, self.last_work + self.max_idle - now)
        return max(wait, 0.001)

    def mark_due(self, pfx: str) -> None:
        """A retry or a remainder of this partition may be due now."""
        idx = self.part_index[pfx]
        self.wakes[idx] += 1
        self.due_at[idx] = 0.0

    def on_wake(self, data: Any) -> None:
        """A wake-up message (its payload is a partition prefix). A wake-up is a token: the
        script that sent it set the partition's ``woke`` key, and of the workers woken only the
        one that deletes it claims (:meth:`tokens_wanted`, :meth:`token_tried`); the others go
        back to waiting. So each wake-up costs one claim, not one per idle worker."""
        pfx = data.decode() if isinstance(data, bytes) else str(data)
        idx = self.part_index.get(pfx)
        if idx is None:  # not ours (or an old publisher): check everything
            self.on_subscribed()
        else:
            self.heard[idx] = True

    def tokens_wanted(self, free: int) -> list[int]:
        """The partitions whose wake-up token to try to take now (a ``DEL`` of
        ``PartitionKeys.woke`` each; pass what it answered to :meth:`token_tried`). None while
        no slot is free: the token is left to a worker that has one, and the wake-up is kept for
        when a slot frees here (by then an ack's claim or another worker has usually answered
        it: the DEL finds nothing)."""
        if free <= 0 or not any(self.heard):
            return []
        wanted = [idx for idx, heard in enumerate(self.heard) if heard]
        for idx in wanted:
            self.heard[idx] = False
        return wanted

    def token_unknown(self, idx: int, exc: RedisError) -> bool:
        """Redis failed the ``DEL`` of a wake-up token: claim anyway (True; the claim reports
        and retries a failure)."""
        log.debug("wake-up token of %s: %s", self.parts[idx][1].pfx, exc)
        return True

    def token_tried(self, idx: int, taken: bool) -> None:
        """This worker took the partition's wake-up token (or could not tell, Redis failed):
        it claims there. Otherwise another worker did, or a claim since answered the wake-up."""
        if taken:
            self.mark_due(self.parts[idx][1].pfx)

    def on_subscribed(self) -> None:
        """(Re)subscribed: wake-ups sent while nobody listened are lost; check everything."""
        for pfx in self.part_index:
            self.mark_due(pfx)

    def wake_callbacks(self, poke: Callable[[], None]) -> tuple[Callable[[Any], None], Callable[[], None]]:
        """A wake-up listener's callbacks (:mod:`redis_batcher.wake`): record a wake-up heard
        (:meth:`on_wake`) or a (re)subscription (:meth:`on_subscribed`), then ``poke`` the
        main loop."""

        def heard(data: Any) -> None:
            self.on_wake(data)
            poke()

        def ready() -> None:
            self.on_subscribed()
            poke()

        return heard, ready

    def heartbeat_tick(self) -> tuple[float, float, bool]:
        """(seconds between lease renewals, seconds between timeout checks, any timeouts)."""
        renew_every = min(p.config.lease_timeout for p in self.processors) / 3.0
        timeouts = [p.config.handler_timeout for p in self.processors if p.config.handler_timeout]
        tick = min([renew_every, *(t / 4 for t in timeouts), 0.5]) if timeouts else renew_every
        return renew_every, tick, bool(timeouts)

    # -- settling --------------------------------------------------------------------------------

    def settle_call(
        self,
        c: ops.Claimed,
        outcome: Outcome,
        started: float,
        duration_ms: float,
        claim_owner: str | None = None,
    ) -> ops.Call:
        """The ack or nack of a delivery; an ack with ``claim_owner`` also claims the next flush."""
        entry = ops.history_entry(c, int(started * 1000), duration_ms, outcome.mode == "ack", outcome.error)
        if outcome.mode == "ack":
            return ops.ack_call(c, entry, claim_owner)
        assert outcome.error is not None
        delay_ms = int(backoff_seconds(c.processor, c.attempt) * 1000)
        return ops.nack_call(c, entry, delay_ms, outcome.error, outcome.mode, outcome.indices)

    def settled(self, c: ops.Claimed, outcome: Outcome, reply: Any, duration_ms: float) -> None:
        """Count and log a recorded result (``reply`` None: it could not be recorded)."""
        self.last_work = time.monotonic()
        if reply is None:
            return
        self._count(c, outcome, reply, duration_ms)
        if self.observer is not None:
            self.observer.flush_settled(c, outcome, reply_code(reply), duration_ms / 1000.0)
        if self.max_flushes is not None and self.stats.delivered + self.stats.failed >= self.max_flushes:
            self.recycle(f"{self.max_flushes} flushes handled (max_flushes)")

    def _count(self, c: ops.Claimed, outcome: Outcome, reply: Any, duration_ms: float) -> None:
        proc = c.processor
        if outcome.mode == "ack":
            self.stats.delivered += 1
            self.stats.items += outcome.count
            log.debug(
                "%s %s: %d items in %.1f ms (attempt %d, %s)",
                proc.name,
                c.member,
                outcome.count,
                duration_ms,
                c.attempt,
                c.reason or "size",
            )
            return
        code = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if code == "moving":
            self.stats.failed += outcome.mode != "decode"
            log.warning(
                "%s %s: %s; moving items of its %d in steps (the next claims go on with it)",
                proc.name,
                c.member,
                outcome.error,
                outcome.count,
                exc_info=outcome.exc,
            )
            return
        if outcome.mode == "missing":
            log.error("%s %s: %s; not delivered", proc.name, c.member, outcome.error)
            return
        if outcome.mode == "decode":
            self.stats.quarantined += len(outcome.indices)
            log.error(
                "%s %s: %s; %d entries quarantined as dead letters",
                proc.name,
                c.member,
                outcome.error,
                len(outcome.indices),
            )
            return
        self.stats.failed += 1
        if outcome.mode == "partial":
            self.stats.partial += 1
            self.stats.items += outcome.count - len(outcome.indices)
        if code == "dead":
            self.stats.dead_lettered += 1
            then = f"moved to the dead-letter store (max_attempts={proc.config.max_attempts})"
            level = logging.ERROR
        elif code == "bisect":
            level, then = logging.WARNING, f"retrying the first {int(reply[1])} items alone"
        else:
            level, then = logging.WARNING, "retry scheduled"
        log.log(
            level,
            "%s %s attempt %d failed: %s; %s",
            proc.name,
            c.member,
            c.attempt,
            outcome.error,
            then,
            exc_info=outcome.exc,
        )

    def released(self, c: ops.Claimed, reply: Any = None, exc: RedisError | None = None) -> None:
        """Count and log the release of a flush's lease (``exc``: it failed)."""
        if exc is not None:
            log.warning(
                "%s %s: could not release (%s); its lease will expire", c.processor.name, c.member, exc
            )
        elif reply:
            self.stats.released += 1
            log.warning("%s %s: released unfinished flush for another worker", c.processor.name, c.member)

    def lease_trouble(self, c: ops.Claimed, exc: RedisError | None = None) -> None:
        """Log a lease renewal Redis refused while the handler ran (the lease was lost), or one
        that failed (``exc``)."""
        if exc is None:
            log.warning("%s %s: lease lost during the handler", c.processor.name, c.member)
        else:
            log.warning("%s %s: heartbeat failed: %s", c.processor.name, c.member, exc)

    def reply_code(self, c: ops.Claimed, reply: Any) -> Any:
        """The reply, or None (counted, logged) when the lease was lost before recording, or the
        sequence's keys were found holding something else (the next claim quarantines it once its
        lease runs out)."""
        code = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if code == "corrupt":
            what = reply[1].decode(errors="replace") if isinstance(reply[1], bytes) else str(reply[1])
            log.error("%s %s: result not recorded: %s", c.processor.name, c.member, what)
            return None
        if code == "lease_lost":
            self.stats.lease_lost += 1
            log.warning(
                "%s %s: lease lost before the result was recorded; another worker owns it now",
                c.processor.name,
                c.member,
            )
            return None
        return reply

    def timeout_outcome(self, c: ops.Claimed) -> Outcome:
        self.stats.timed_out += 1
        limit = c.processor.config.handler_timeout
        return Outcome("fail", f"HandlerTimeout: handler still running after {limit:g}s", [], c.cutoff)

    def log_start(self, burst: bool) -> None:
        log.info(
            "worker serving %s (concurrency %d%s) at %s, prefix %r",
            ", ".join(p.name for p in self.processors),
            self.concurrency,
            ", burst" if burst else "",
            self.batcher.target,
            self.batcher.prefix,
        )

    def summarize(self, final: bool = False) -> None:
        """Log the periodic summary when due (every ``summary.interval`` seconds, checked at
        each heartbeat; ``final``: at stop) and something happened since the last one."""
        if line := self.summary.line(self.stats, time.monotonic(), final):
            log.info("%s", line)

    def log_stop(self) -> None:
        self.summarize(final=True)
        log.info(
            "worker stopped: %d delivered, %d failed, %d dead-lettered, %d items",
            self.stats.delivered,
            self.stats.failed,
            self.stats.dead_lettered,
            self.stats.items,
        )


def select_processors(batcher: Batcher, names: Iterable[str] | None) -> list[Processor]:
    """The processors a worker serves: those called ``names``, or all of the batcher's."""
    return [
        batcher.get_processor(n) for n in (list(names) if names is not None else list(batcher.processors))
    ]
