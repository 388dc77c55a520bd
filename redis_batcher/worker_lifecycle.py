"""What a worker does around its deliveries, shared by the sync and asyncio workers without
I/O: stop signals, its record in the worker registry, recycling (``max_flushes``, ``max_idle``)
and registering its processor configs."""

from __future__ import annotations

import logging
import signal
import time
from abc import ABC, abstractmethod

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .models import WorkerStats
from .worker_registry import WorkerIdentity

log = logging.getLogger("redis_batcher.worker")

# the same stop signal again this soon is one signal delivered twice (GNU timeout signals both
# its child and the child's process group), not an operator asking for a cold shutdown
SIGNAL_ECHO = 1.0


class WorkerLifecycle(ABC):
    """The lifecycle half of :class:`~redis_batcher.worker_core.WorkerCore` (which sets these
    attributes up)."""

    identity: WorkerIdentity
    stats: WorkerStats
    beat_failing: bool
    beat_interval: float
    last_work: float
    max_idle: float | None
    recycling: str | None
    unregistered: bool
    full_check_at: float
    first_signal: tuple[int, float] | None
    grace_period: float

    @property
    @abstractmethod
    def inflight(self) -> int: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def summarize(self, final: bool = False) -> None: ...

    def on_stop_signal(self, signum: int, stopping: bool) -> str:
        """What a SIGTERM/SIGINT means, logged: ``"stop"`` (a warm shutdown), ``"force"`` (a
        second one while stopping: release the leases at once) or ``"echo"`` (the same signal
        again within :data:`SIGNAL_ECHO` seconds of the first: ignored)."""
        now = time.monotonic()
        name = signal.Signals(signum).name
        first = self.first_signal
        if first is None:
            self.first_signal = (signum, now)
        if not stopping:
            log.info(
                "%s: warm shutdown, finishing %d in-flight flush(es) (grace %.0fs)",
                name,
                self.inflight,
                self.grace_period,
            )
            return "stop"
        if first is not None and first[0] == signum and now - first[1] < SIGNAL_ECHO:
            log.info("%s again within %.0fs: taken as the same signal", name, SIGNAL_ECHO)
            return "echo"
        log.warning("second signal: releasing unfinished flushes and exiting now")
        return "force"

    def beat_record(self) -> tuple[str, int]:
        """(this worker's registry record now, the time of the beat in ms)."""
        now_ms = int(time.time() * 1000)
        record = self.identity.record(now_ms, self.inflight, self.stats.delivered, self.stats.failed)
        return record, now_ms

    def beat_done(self, exc: Exception | None = None) -> None:
        """Record a heartbeat written (``exc``: one that failed). A failure is logged once
        until a beat succeeds again (a full Redis refuses every one)."""
        self.summarize()
        if exc is None:
            if self.beat_failing:
                log.info("worker registry record written again")
            self.beat_failing = False
            return
        if not self.beat_failing:
            every = self.beat_interval
            log.warning("cannot write the worker registry record (retried every %gs): %s", every, exc)
        self.beat_failing = True

    def idle_expired(self, now: float, busy: bool) -> bool:
        """After a claim round: True (and the worker is stopped) once ``max_idle`` seconds
        passed without a flush claimed or running (``busy``: one is)."""
        if busy:
            self.last_work = now
        if self.max_idle is None or busy or now - self.last_work < self.max_idle:
            return False
        self.recycle(f"idle for {self.max_idle:g}s (max_idle)")
        return True

    def recycle(self, reason: str) -> None:
        """Stop by itself, once (max_flushes, max_idle)."""
        if self.recycling is None:
            self.recycling = reason
            log.info("worker recycling: %s", reason)
            self.stop()

    def registration_refused(self, exc: RedisError) -> None:
        """Redis answered the registry write with an error (not a connection failure). The
        worker serves anyway: a full Redis refuses that write but still runs claims and acks,
        which free memory; the write is retried at each full check (register_due)."""
        self.unregistered = True
        if isinstance(exc, OutOfMemoryError):
            log.warning(
                "Redis is out of memory (%s); serving what is stored (deliveries free memory), "
                "the processor configs are registered once Redis accepts writes again",
                exc,
            )
        else:
            log.warning("cannot register the processor configs (%s); serving anyway, retrying later", exc)

    def registration_failed(self, exc: RedisError, delay: float, burst: bool) -> bool:
        """The first registration failed: True to try again in ``delay`` seconds (Redis cannot
        be reached); False to serve anyway (see :meth:`registration_refused`). A burst run
        raises ``exc`` instead of waiting for Redis: it already retried for ``connect_retry``
        seconds, and a cron job or CI step must end (as rq's ``--burst`` does)."""
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            if burst:
                raise exc
            log.warning("cannot reach Redis (%s); retrying in %.1fs", exc, delay)
            return True
        self.registration_refused(exc)
        return False

    def register_due(self, now: float) -> bool:
        """Retry a refused registration now: it was refused and a full check is due."""
        return self.unregistered and now >= self.full_check_at

    def registration_retried(self, exc: RedisError | None) -> None:
        """Record a retried registration (``exc``: still refused)."""
        if exc is None:
            self.unregistered = False
            log.info("processor configs registered")
        else:
            log.debug("processor configs still not registered: %s", exc)
