"""What the threaded and the asyncio job runners share: every decision of running iterator
jobs, without I/O.

The runner's main loop (:meth:`JobRunnerCore.serve`), its shutdown and each job's session are
generators of *effects*: a script call to send, a user method to invoke, a wait, a session to
start. An executor (:class:`~redis_batcher.job_runner.JobRunner` on threads,
:class:`~redis_batcher.job_runner_async.AsyncJobRunner` on asyncio) performs each effect and
hands back what it answered, or throws in what it raised; the generator decides what that means.
So claims, renewals, retries, outcomes and their log lines are written once for both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import ops
from .errors import ConfigError, error_text
from .job_model import (
    IteratorConfig,
    JobContext,
    JobStats,
    iterator_registry_key,
    job_config,
    log_step_exit,
    takes_job,
    worker_label,
)
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
from .jobs import JobIterator
from .models import as_text

log = logging.getLogger("redis_batcher.jobs")

T = TypeVar("T")


@dataclass
class Session:
    """A job this runner holds the lease of."""

    iterator: JobIterator
    claimed: Claimed
    config: IteratorConfig  # the iterator's settings with the job's own (job_config)
    # given back at shutdown while its step still ran: the session saves nothing more
    abandoned: bool = False
    task: Any = None  # the thread or asyncio task the executor runs it in


def session_config(it: JobIterator, claimed: Claimed) -> IteratorConfig:
    """The settings a claimed job runs with: its iterator's, with the job's own overrides
    (checked again: a stored value that no longer passes is logged, the iterator's used)."""
    if not claimed.overrides:
        return it.config
    try:
        return job_config(it.config, claimed.overrides)
    except (ConfigError, TypeError) as exc:
        log.error("%s %s: own settings refused (%s); using the iterator's", it.name, claimed.job_id, exc)
        return it.config


# -- effects: what an executor performs for the core -----------------------------------------------


@dataclass(frozen=True)
class Send:
    """Run a script call on the batcher's client (claims, lease renewals); answers its reply."""

    call: ops.Call


@dataclass(frozen=True)
class Execute:
    """Run a script call through the batcher's executor (its ``connect_retry`` policy and
    ``WAIT``; ``wait=False``: no ``WAIT``); answers its reply."""

    call: ops.Call
    wait: bool = True


@dataclass(frozen=True)
class Command:
    """Run a plain command of the batcher's client, ``client.<name>(*args, **kwargs)``."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Invoke:
    """Call a method of the user's iterator class (awaited when it is ``async def``; in a thread
    when it is a plain one on asyncio); answers what it returned, throws in what it raised."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds``, whatever happens meanwhile."""

    seconds: float


@dataclass(frozen=True)
class Pause:
    """Wait up to ``seconds``; :meth:`JobRunnerCore.stop` ends the wait."""

    seconds: float


@dataclass(frozen=True)
class Idle:
    """Wait up to ``seconds`` for news: a session ended, or :meth:`JobRunnerCore.stop`."""

    seconds: float


@dataclass(frozen=True)
class Spawn:
    """Run the session's steps (:meth:`JobRunnerCore.session`) alongside, on a thread or task of
    its own, and wake the main loop when they end."""

    session: Session


@dataclass(frozen=True)
class Cancel:
    """Stop these abandoned sessions where the executor can: an asyncio task is cancelled and
    awaited; a thread cannot be, and it saves nothing once its step returns."""

    sessions: Sequence[Session]


Effect = Send | Execute | Command | Invoke | Sleep | Pause | Idle | Spawn | Cancel
Steps = Generator[Effect, Any, T]


class Driver:
    """Steps through a generator of effects for an executor: iterate it for the effects, and
    hand each one's answer (:meth:`answer`) or error (:meth:`fail`) back before the next one.
    Leaving the ``with`` block closes the generator (a cancelled asyncio task leaves it early)."""

    def __init__(self, steps: Steps[None]) -> None:
        self._steps = steps
        self._answer: Any = None
        self._error: BaseException | None = None

    def __enter__(self) -> Driver:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._steps.close()

    def __iter__(self) -> Driver:
        return self

    def __next__(self) -> Effect:
        answer, error = self._answer, self._error
        self._answer, self._error = None, None
        try:
            return self._steps.send(answer) if error is None else self._steps.throw(error)
        except StopIteration:
            raise StopIteration from None

    def answer(self, value: Any) -> None:
        """What the effect just performed answered: sent to the steps that asked."""
        self._answer = value

    def fail(self, exc: BaseException) -> None:
        """What the effect just performed raised: thrown into the steps that asked."""
        self._error = exc


# -- the runner's decisions ------------------------------------------------------------------------


class JobRunnerCore:
    """Settings, sessions and every decision of a job runner, independent of how it does I/O.
    An executor subclass performs the effects of :meth:`serve`, :meth:`shutdown` and each
    :meth:`session`, and extends :meth:`stop` to wake what waits."""

    def __init__(
        self,
        prefix: str,
        iterators: Iterable[JobIterator],
        concurrency: int,
        poll_interval: float,
        grace_period: float,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not poll_interval > 0:
            raise ConfigError(f"poll_interval must be > 0, got {poll_interval!r}")
        self.prefix = prefix
        self.iterators = list(iterators)
        self.concurrency = concurrency
        self.poll_interval = float(poll_interval)
        self.grace_period = float(grace_period)
        self.label = worker_label()
        self.stats = JobStats()
        self.stopping = False
        # sessions run on threads of their own in the sync runner: these two are shared with them
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, str], Session] = {}  # (iterator, job id) -> its session
        self._ended: set[str] = set()  # iterators whose job just ended: a retry may be due soon
        # the iterator configs could not be written at start: retried with the lease renewals
        self.unregistered = False

    @property
    def running(self) -> int:
        """Jobs this runner is running now."""
        return len(self._sessions)

    def stop(self) -> None:
        """Stop claiming; running steps finish (up to ``grace_period``), leases are released."""
        self.stopping = True

    # -- the main loop ----------------------------------------------------------------------------

    def serve(self, burst: bool) -> Steps[None]:
        """Claim and run jobs until :meth:`stop`; ``burst=True``: until no job is running and
        none is runnable now. Run :meth:`shutdown` after it, however it ended."""
        self.stats = JobStats()
        renew_every = self._renew_every()
        next_renew = time.monotonic() + renew_every
        due_at = {it.name: 0.0 for it in self.iterators}  # when to look at each iterator again
        yield from self._register()
        while not self.stopping:
            now = time.monotonic()
            with self._lock:
                ended, self._ended = self._ended, set()
            for name in ended:
                due_at[name] = 0.0
            more = yield from self._claim_round(now, due_at)
            if burst and not more and not self._sessions:
                return
            if now >= next_renew:
                yield from self._renew()
                if self.unregistered:
                    yield from self._register_again()
                next_renew = now + renew_every
            if more and self.running < self.concurrency:
                continue
            wait = min([*due_at.values(), next_renew, now + self.poll_interval]) - now
            yield Idle(max(wait, 0.001))

    def shutdown(self) -> Steps[None]:
        """Let running steps finish (renewing their leases) for up to ``grace_period``, then
        give back the leases of those still running, so another worker resumes them at once."""
        if self._sessions:  # (a stop() or a crash of the main loop) none starts another step
            self.stop()
        renew_every = self._renew_every()
        now = time.monotonic()
        deadline, next_renew = now + self.grace_period, now + renew_every
        while self._sessions and now < deadline:
            if now >= next_renew:
                yield from self._renew()
                next_renew = now + renew_every
            yield Idle(max(min(deadline, next_renew) - now, 0.001))
            now = time.monotonic()
        with self._lock:
            leftovers = list(self._sessions.values())
            for s in leftovers:
                s.abandoned = True
            self._sessions.clear()
        if leftovers:
            yield Cancel(leftovers)
        for s in leftovers:
            yield from self.release(s, "step still running at shutdown")

    def _renew_every(self) -> float:
        return min(it.config.lease_timeout for it in self.iterators) / 3.0

    def _register(self) -> Steps[None]:
        """Publish the iterator configs: waits while Redis cannot be reached; a refusal (a
        full Redis) is retried with the lease renewals."""
        self.unregistered = False
        delay = 0.1
        while not self.stopping:
            try:
                yield self._registry_write()
                return
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("cannot reach Redis (%s); retrying in %.1fs", exc, delay)
                yield Pause(delay)
                delay = min(delay * 2, 5.0)
            except RedisError as exc:
                self._registration_refused(exc)
                return

    def _registry_write(self) -> Command:
        fields = {it.name: it.config.to_json() for it in self.iterators}
        return Command("hset", (iterator_registry_key(self.prefix),), {"mapping": fields})

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

    def _register_again(self) -> Steps[None]:
        try:
            yield self._registry_write()
        except RedisError as exc:
            log.debug("iterator configs still not registered: %s", exc)
            return
        self.unregistered = False
        log.info("iterator configs registered")

    def _claim_round(self, now: float, due_at: dict[str, float]) -> Steps[bool]:
        """Claim from iterators that may have runnable jobs, and start a session for each job
        claimed; True when more is runnable now."""
        more = False
        for it in self.iterators:
            free = self.concurrency - self.running
            if free <= 0:
                return True
            if due_at[it.name] > now or self.stopping:
                continue
            owner = ops.new_token()
            try:
                reply = yield Send(claim_call(it.keys, it.config, free, owner, self.label))
            except RedisError as exc:
                log.warning("claiming jobs of %s failed: %s", it.name, exc)
                due_at[it.name] = now + 1.0
                continue
            # look again at the next runnable job, at most poll_interval away
            next_ms, claimed = parse_claim(owner, reply)
            wait = next_ms / 1000.0 if next_ms >= 0 else self.poll_interval
            due_at[it.name] = now + min(wait, self.poll_interval)
            more = more or next_ms == 0
            for c in claimed:
                s = Session(it, c, session_config(it, c))
                with self._lock:
                    self._sessions[(it.name, c.job_id)] = s
                yield Spawn(s)
        return more

    def _renew(self) -> Steps[None]:
        with self._lock:
            sessions = [s for s in self._sessions.values() if not s.abandoned]
        for s in sessions:
            it, c = s.iterator, s.claimed
            try:
                if not (yield Send(extend_call(it.keys, it.config, c.job_id, c.owner))):
                    log.debug("%s %s: lease no longer ours", it.name, c.job_id)
            except RedisError as exc:
                log.warning("%s %s: heartbeat failed: %s", it.name, c.job_id, exc)

    # -- one job ----------------------------------------------------------------------------------

    def session(self, s: Session) -> Steps[None]:
        """A claimed job's steps, until it completes, fails, is handed back or lost."""
        try:
            yield from self._drive(s)
        except GeneratorExit:
            raise
        except BaseException:  # a bug here must not end the runner: the lease expires, another retries
            log.exception("%s %s: job runner error", s.iterator.name, s.claimed.job_id)
        finally:
            with self._lock:
                if self._sessions.get((s.iterator.name, s.claimed.job_id)) is s:
                    del self._sessions[(s.iterator.name, s.claimed.job_id)]
                self._ended.add(s.iterator.name)

    def _drive(self, s: Session) -> Steps[None]:
        it, c = s.iterator, s.claimed
        cfg = s.config
        ctx = JobContext(c.job_id, it.name, c.params, c.cursor, c.processed, c.retries, cfg.batch_size)
        exhausted = c.exhausted
        step = 0
        try:
            instance = it()
            with_job = takes_job(instance.next_batch)
        except BaseException as exc:
            yield from self._failed(s, exc)
            return
        while True:
            if s.abandoned:
                return
            if self.stopping:
                yield from self.release(s, "worker stopping")
                return
            if exhausted:
                yield from self._complete(s, instance, ctx)
                return
            args = (ctx.cursor, cfg.batch_size, ctx) if with_job else (ctx.cursor, cfg.batch_size)
            try:
                page = check_page((yield Invoke(instance.next_batch, args)))
                items = list(page.items)
                if items:
                    yield Invoke(instance.process, (items, ctx))
            except GeneratorExit:
                raise
            except BaseException as exc:  # a step may raise anything, sys.exit() too: retried
                yield from self._failed(s, exc)
                return
            if s.abandoned:
                return
            step += 1
            reply = yield from self._write(
                s, commit_call(it.keys, cfg, c.job_id, c.owner, page.cursor, len(items), page.done, step)
            )
            if not step_saved(self.stats, it.name, c.job_id, reply, len(items)):
                return
            ctx.cursor, ctx.processed, ctx.retry_count = page.cursor, ctx.processed + len(items), 0
            if page.done:
                exhausted = True
                continue
            if cfg.delay_between_batches > 0:
                yield Pause(cfg.delay_between_batches)
                # stopping: the loop head gives the lease back
                if not self.stopping and not (yield from self._still_ours(s)):
                    return

    def _write(self, s: Session, call: ops.Call) -> Steps[Any]:
        """Run a step's script, retrying through Redis errors while the lease lasts; None when it
        could not be recorded (the lease will expire and the step will run again)."""
        delay = 0.05
        deadline = time.monotonic() + s.iterator.config.lease_timeout
        while True:
            try:
                return (yield Execute(call))
            except RedisError as exc:
                if time.monotonic() > deadline:
                    log.error("%s %s: cannot record progress (%s)", call.script.name, s.claimed.job_id, exc)
                    return None
            yield Sleep(delay)
            delay = min(delay * 2, 2.0)

    def release(self, s: Session, why: str) -> Steps[None]:
        """Give the job's lease back, so that another worker resumes it at once."""
        it, c = s.iterator, s.claimed
        try:
            released = yield Execute(owner_call("job_release", it.keys, c.job_id, c.owner), wait=False)
        except RedisError as exc:
            log.warning("%s %s: could not release (%s); its lease will expire", it.name, c.job_id, exc)
            return
        if released:
            self.stats.released += 1
            log.info("%s %s: lease released (%s)", it.name, c.job_id, why)

    def _still_ours(self, s: Session) -> Steps[bool]:
        """After delay_between_batches: False (the lease given back) when the job was paused or
        cancelled during the wait, so no further step runs; False when the lease is gone."""
        it, c = s.iterator, s.claimed
        try:
            status, owner = yield Command("hmget", (it.keys.job(c.job_id), ["status", "owner"]))
        except RedisError:
            return True  # the step's commit will find out
        if owner is None or as_text(owner) != c.owner:
            log.warning("%s %s: lease lost; another worker runs the job now", it.name, c.job_id)
            self.stats.lease_lost += 1
            return False
        if status is not None and as_text(status) != "running":
            yield from self.release(s, f"job {as_text(status)}")
            return False
        return True

    def _complete(self, s: Session, instance: Any, ctx: JobContext) -> Steps[None]:
        it, c = s.iterator, s.claimed
        on_complete = getattr(instance, "on_complete", None)
        if on_complete is not None:
            try:
                yield Invoke(on_complete, (ctx,))
            except GeneratorExit:
                raise
            except BaseException as exc:
                yield from self._failed(s, exc)
                return
        reply = yield from self._write(s, owner_call("job_finish", it.keys, c.job_id, c.owner))
        if reply is not None and as_text(reply) == "completed":
            self.stats.completed += 1
            log.info("%s %s: completed, %d items", it.name, c.job_id, ctx.processed)

    def _failed(self, s: Session, exc: BaseException) -> Steps[None]:
        it, c = s.iterator, s.claimed
        self.stats.failures += 1
        log_step_exit(it.name, c.job_id, exc)
        reply = yield from self._write(s, fail_call(it.keys, s.config, c.job_id, c.owner, error_text(exc)))
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
            log.error(
                "%s %s: failed after %d tries: %s", it.name, c.job_id, retries, error_text(exc), exc_info=exc
            )
        elif outcome == "retry":
            log.warning(
                "%s %s: step failed (%s); retry %d in %.1fs",
                it.name,
                c.job_id,
                error_text(exc),
                retries,
                delay_ms / 1000.0,
                exc_info=exc,
            )
