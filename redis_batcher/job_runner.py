"""The threaded runner of iterator jobs inside a sync worker: claims runnable jobs, runs their
steps on threads of its own, renews their leases and saves each step."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import ops
from .errors import (
    ConfigError,
    error_text,
)
from .job_model import JobContext, JobStats, iterator_registry_key, log_step_exit, takes_job, worker_label
from .job_ops import (
    Claimed,
    check_page,
    claim_call,
    commit_call,
    extend_call,
    fail_call,
    owner_call,
    parse_claim,
    step_saved,
)
from .jobs import JobIterator, JobsHost
from .models import as_text

log = logging.getLogger("redis_batcher.jobs")


# -- the threaded runner ---------------------------------------------------------------------------


@dataclass
class _Session:
    """A job this runner holds the lease of."""

    iterator: JobIterator
    claimed: Claimed
    thread: threading.Thread | None = None
    abandoned: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class JobRunnerBase:
    """Settings and bookkeeping the sync and asyncio job runners share."""

    def __init__(
        self,
        batcher: Any,
        iterators: Iterable[JobIterator],
        concurrency: int,
        poll_interval: float,
        grace_period: float,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not poll_interval > 0:
            raise ConfigError(f"poll_interval must be > 0, got {poll_interval!r}")
        self.batcher = batcher
        self.iterators = list(iterators)
        self.concurrency = concurrency
        self.poll_interval = float(poll_interval)
        self.grace_period = float(grace_period)
        self.label = worker_label()
        self.stats = JobStats()
        self._ended: set[str] = set()  # iterators whose job just ended: a retry may be due soon
        self._sessions: dict[tuple[str, str], Any] = {}  # (iterator, job id) -> its session
        # the iterator configs could not be written at start: retried with the lease renewals
        self.unregistered = False

    def _registry_fields(self) -> dict[str, str]:
        """The iterator registry's fields (name -> config JSON) this runner writes."""
        return {it.name: it.config.to_json() for it in self.iterators}

    def _registration_refused(self, exc: RedisError) -> None:
        """Redis refused the registry write (not a connection failure): the runner serves
        anyway and retries the write with its lease renewals."""
        self.unregistered = True
        if isinstance(exc, OutOfMemoryError):
            log.warning(
                "Redis is out of memory (%s); running jobs anyway, the iterator configs are "
                "registered once Redis accepts writes again",
                exc,
            )
        else:
            log.warning("cannot register the iterator configs (%s); running jobs anyway, retrying later", exc)

    @property
    def running(self) -> int:
        """Jobs this runner is running now."""
        return len(self._sessions)

    def _claimed(
        self, it: JobIterator, owner: str, reply: Any, now: float, due_at: dict[str, float]
    ) -> tuple[list[Claimed], bool]:
        """Record a claim reply: (jobs to run, more runnable now); schedules the next look at
        the iterator (at the next runnable job, at most poll_interval away)."""
        next_ms, claimed = parse_claim(owner, reply)
        wait = next_ms / 1000.0 if next_ms >= 0 else self.poll_interval
        due_at[it.name] = now + min(wait, self.poll_interval)
        return claimed, next_ms == 0

    @staticmethod
    def _claim_failed(it: JobIterator, exc: BaseException, now: float, due_at: dict[str, float]) -> None:
        log.warning("claiming jobs of %s failed: %s", it.name, exc)
        due_at[it.name] = now + 1.0


class JobRunner(JobRunnerBase):
    """Runs the jobs of a batcher's iterators: claims runnable jobs (``concurrency`` at a time,
    one thread each), renews their leases, and on :meth:`stop` lets each finish its step, then
    releases its lease so another worker resumes it at once. The :class:`~redis_batcher.Worker`
    starts one when its batcher has iterators."""

    def __init__(
        self,
        batcher: JobsHost,
        iterators: Iterable[JobIterator] | None = None,
        *,
        concurrency: int = 4,
        poll_interval: float = 1.0,
        grace_period: float = 30.0,
    ) -> None:
        chosen = iterators if iterators is not None else batcher.iterators.values()
        super().__init__(batcher, chosen, concurrency, poll_interval, grace_period)
        self.batcher: JobsHost = batcher
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control ----------------------------------------------------------------------------------

    def start(self, burst: bool = False) -> threading.Thread:
        """Run in a thread of its own (:meth:`wait` joins it)."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self.run, args=(burst,), name="rb-jobs", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop claiming; running steps finish (up to ``grace_period``), leases are released."""
        self._stopping.set()
        self._wake.set()

    def wait(self) -> None:
        """Block until the runner thread has ended (signals are still handled meanwhile)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.2)

    # -- main loop --------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> JobStats:
        """Serve until :meth:`stop`; ``burst=True``: return once no job is running and none is
        runnable now."""
        self.stats = JobStats()
        renew_every = min(it.config.lease_timeout for it in self.iterators) / 3.0
        next_renew = time.monotonic() + renew_every
        due_at = {it.name: 0.0 for it in self.iterators}
        try:
            self._register()
            while not self._stopping.is_set():
                self._wake.clear()
                now = time.monotonic()
                with self._lock:
                    ended, self._ended = self._ended, set()
                for name in ended:
                    due_at[name] = 0.0
                more = self._claim_round(now, due_at)
                if burst and not more and not self._sessions:
                    return self.stats
                if now >= next_renew:
                    self._renew()
                    if self.unregistered:
                        self._register_again()
                    next_renew = now + renew_every
                wait = min([*due_at.values(), next_renew, now + self.poll_interval]) - now
                if more and self.running < self.concurrency:
                    continue
                self._wake.wait(max(wait, 0.001))
        finally:
            self._shutdown(renew_every)
        return self.stats

    def _register(self) -> None:
        """Publish the iterator configs: waits while Redis cannot be reached; a refusal (a
        full Redis) is retried later."""
        self.unregistered = False
        delay = 0.1
        while not self._stopping.is_set():
            try:
                self._write_registry()
                return
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("cannot reach Redis (%s); retrying in %.1fs", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            except RedisError as exc:
                self._registration_refused(exc)
                return

    def _write_registry(self) -> None:
        self.batcher.client.hset(iterator_registry_key(self.batcher.prefix), mapping=self._registry_fields())

    def _register_again(self) -> None:
        try:
            self._write_registry()
        except RedisError as exc:
            log.debug("iterator configs still not registered: %s", exc)
            return
        self.unregistered = False
        log.info("iterator configs registered")

    def _claim_round(self, now: float, due_at: dict[str, float]) -> bool:
        """Claim from iterators that may have runnable jobs; True when more is runnable now."""
        more = False
        for it in self.iterators:
            free = self.concurrency - self.running
            if free <= 0:
                return True
            if due_at[it.name] > now or self._stopping.is_set():
                continue
            owner = ops.new_token()
            try:
                reply = claim_call(it.keys, it.config, free, owner, self.label).run(self.batcher.client)
            except RedisError as exc:
                self._claim_failed(it, exc, now, due_at)
                continue
            claimed, due_now = self._claimed(it, owner, reply, now, due_at)
            more = more or due_now
            for c in claimed:
                self._begin(it, c)
        return more

    def _begin(self, it: JobIterator, c: Claimed) -> None:
        session = _Session(it, c)
        with self._lock:
            self._sessions[(it.name, c.job_id)] = session
        session.thread = threading.Thread(target=self._session, args=(session,), name="rb-job", daemon=True)
        session.thread.start()

    def _renew(self) -> None:
        with self._lock:
            sessions = [s for s in self._sessions.values() if not s.abandoned]
        for s in sessions:
            it, c = s.iterator, s.claimed
            try:
                if not extend_call(it.keys, it.config, c.job_id, c.owner).run(self.batcher.client):
                    log.debug("%s %s: lease no longer ours", it.name, c.job_id)
            except RedisError as exc:
                log.warning("%s %s: heartbeat failed: %s", it.name, c.job_id, exc)

    def _shutdown(self, renew_every: float) -> None:
        deadline = time.monotonic() + self.grace_period
        next_renew = time.monotonic() + renew_every
        while self._sessions and time.monotonic() < deadline:
            self._wake.wait(0.05)
            self._wake.clear()
            if time.monotonic() >= next_renew:
                self._renew()
                next_renew = time.monotonic() + renew_every
        with self._lock:
            leftovers = list(self._sessions.values())
            for s in leftovers:
                s.abandoned = True
            self._sessions.clear()
        for s in leftovers:
            self._release(s, "step still running at shutdown")

    # -- one job ----------------------------------------------------------------------------------

    def _write(self, session: _Session, call: ops.Call) -> Any:
        """Run a step's script, retrying through Redis errors while the lease lasts; None when it
        could not be recorded (the lease will expire and the step will run again)."""
        delay = 0.05
        deadline = time.monotonic() + session.iterator.config.lease_timeout
        while True:
            try:
                return self.batcher.executor.execute(call)
            except RedisError as exc:
                if time.monotonic() > deadline:
                    log.error(
                        "%s %s: cannot record progress (%s)", call.script.name, session.claimed.job_id, exc
                    )
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _release(self, s: _Session, why: str) -> None:
        it, c = s.iterator, s.claimed
        try:
            release = owner_call("job_release", it.keys, c.job_id, c.owner)
            if self.batcher.executor.execute(release, wait=False):
                self.stats.released += 1
                log.info("%s %s: lease released (%s)", it.name, c.job_id, why)
        except RedisError as exc:
            log.warning("%s %s: could not release (%s); its lease will expire", it.name, c.job_id, exc)

    def _session(self, s: _Session) -> None:
        try:
            self._drive(s)
        except BaseException:  # a bug here must not kill the runner: the lease expires, another retries
            log.exception("%s %s: job runner error", s.iterator.name, s.claimed.job_id)
        finally:
            with self._lock:
                if self._sessions.get((s.iterator.name, s.claimed.job_id)) is s:
                    del self._sessions[(s.iterator.name, s.claimed.job_id)]
                self._ended.add(s.iterator.name)
            s.done.set()
            self._wake.set()

    def _drive(self, s: _Session) -> None:
        it, c = s.iterator, s.claimed
        cfg = it.config
        ctx = JobContext(c.job_id, it.name, c.params, c.cursor, c.processed, c.retries, cfg.batch_size)
        exhausted = c.exhausted
        step = 0
        try:
            instance = it()
            with_job = takes_job(instance.next_batch)
        except BaseException as exc:
            self._failed(s, exc)
            return
        while True:
            if s.abandoned:
                return
            if self._stopping.is_set():
                self._release(s, "worker stopping")
                return
            if exhausted:
                self._complete(s, instance, ctx)
                return
            try:
                args = (ctx.cursor, cfg.batch_size, ctx) if with_job else (ctx.cursor, cfg.batch_size)
                page = check_page(instance.next_batch(*args))
                items = list(page.items)
                if items:
                    instance.process(items, ctx)
            except BaseException as exc:  # a step may raise anything, sys.exit() too: retried
                self._failed(s, exc)
                return
            if s.abandoned:
                return
            step += 1
            reply = self._write(
                s, commit_call(it.keys, cfg, c.job_id, c.owner, page.cursor, len(items), page.done, step)
            )
            if not step_saved(self.stats, it.name, c.job_id, reply, len(items)):
                return
            ctx.cursor, ctx.processed, ctx.retry_count = page.cursor, ctx.processed + len(items), 0
            if page.done:
                exhausted = True
                continue
            if cfg.delay_between_batches > 0:
                if self._stopping.wait(cfg.delay_between_batches):
                    continue  # stopping: the loop head releases the lease
                if not self._still_ours(s):
                    return

    def _still_ours(self, s: _Session) -> bool:
        """After delay_between_batches: False (the lease given back) when the job was paused or
        cancelled during the wait, so no further step runs; False when the lease is gone."""
        it, c = s.iterator, s.claimed
        try:
            status, owner = self.batcher.client.hmget(it.keys.job(c.job_id), ["status", "owner"])
        except RedisError:
            return True  # the step's commit will find out
        if owner is None or as_text(owner) != c.owner:
            log.warning("%s %s: lease lost; another worker runs the job now", it.name, c.job_id)
            self.stats.lease_lost += 1
            return False
        if status is not None and as_text(status) != "running":
            self._release(s, f"job {as_text(status)}")
            return False
        return True

    def _complete(self, s: _Session, instance: Any, ctx: JobContext) -> None:
        it, c = s.iterator, s.claimed
        on_complete = getattr(instance, "on_complete", None)
        if on_complete is not None:
            try:
                on_complete(ctx)
            except BaseException as exc:
                self._failed(s, exc)
                return
        reply = self._write(s, owner_call("job_finish", it.keys, c.job_id, c.owner))
        if reply is not None and as_text(reply) == "completed":
            self.stats.completed += 1
            log.info("%s %s: completed, %d items", it.name, c.job_id, ctx.processed)

    def _failed(self, s: _Session, exc: BaseException) -> None:
        it, c = s.iterator, s.claimed
        self.stats.failures += 1
        log_step_exit(it.name, c.job_id, exc)
        reply = self._write(s, fail_call(it.keys, it.config, c.job_id, c.owner, error_text(exc)))
        if reply is None:
            return
        outcome, retries, delay_ms = as_text(reply[0]), int(reply[1]), int(reply[2])
        if outcome == "corrupt":
            log.error(
                "%s %s: its keys hold data this library did not write; failure not recorded",
                it.name,
                c.job_id,
            )
        elif outcome == "failed":
            self.stats.failed += 1
            log.error("%s %s: failed after %d tries: %s", it.name, c.job_id, retries, error_text(exc))
        elif outcome == "retry":
            log.warning(
                "%s %s: step failed (%s); retry %d in %.1fs",
                it.name,
                c.job_id,
                error_text(exc),
                retries,
                delay_ms / 1000.0,
            )
