"""The asyncio runner of iterator jobs inside an asyncio worker, one task per running job.
``async def`` methods of an iterator class are awaited on the event loop; plain ones run in a
thread so they cannot block it."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import ops
from .errors import error_text
from .job_model import (
    JobContext,
    JobStats,
    iterator_registry_key,
    log_step_exit,
    takes_job,
)
from .job_ops import (
    Claimed,
    check_page,
    claim_call,
    commit_call,
    extend_call,
    fail_call,
    owner_call,
    step_saved,
)
from .job_runner import JobRunnerBase
from .jobs import JobIterator
from .jobs_async import AsyncJobsHost
from .models import as_text

log = logging.getLogger("redis_batcher.jobs")


async def _call_user(fn: Any, *args: Any) -> Any:
    """Await an ``async def`` method; run a plain one in a thread (it may block)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        result = await result
    return result


@dataclass
class _Session:
    iterator: JobIterator
    claimed: Claimed
    task: asyncio.Task[None] | None = None


class AsyncJobRunner(JobRunnerBase):
    """The asyncio job runner (one task per running job); see :class:`redis_batcher.jobs.JobRunner`."""

    def __init__(
        self,
        batcher: AsyncJobsHost,
        iterators: Iterable[JobIterator] | None = None,
        *,
        concurrency: int = 4,
        poll_interval: float = 1.0,
        grace_period: float = 30.0,
    ) -> None:
        chosen = iterators if iterators is not None else batcher.definitions.iterators.values()
        super().__init__(batcher, chosen, concurrency, poll_interval, grace_period)
        self.batcher: AsyncJobsHost = batcher
        self._stopping = False
        self._wake: asyncio.Event | None = None

    def stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    async def run(self, burst: bool = False) -> JobStats:
        """Serve until :meth:`stop`; ``burst=True``: return once nothing is running or runnable."""
        self.stats = JobStats()
        self._wake = asyncio.Event()
        renew_every = min(it.config.lease_timeout for it in self.iterators) / 3.0
        next_renew = time.monotonic() + renew_every
        due_at = {it.name: 0.0 for it in self.iterators}
        try:
            await self._register()
            while not self._stopping:
                self._wake.clear()
                now = time.monotonic()
                ended, self._ended = self._ended, set()
                for name in ended:
                    due_at[name] = 0.0
                more = await self._claim_round(now, due_at)
                if burst and not more and not self._sessions:
                    return self.stats
                if now >= next_renew:
                    await self._renew()
                    if self.unregistered:
                        await self._register_again()
                    next_renew = now + renew_every
                if more and self.running < self.concurrency:
                    continue
                wait = min([*due_at.values(), next_renew, now + self.poll_interval]) - now
                try:
                    await asyncio.wait_for(self._wake.wait(), max(wait, 0.001))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._stopping = True
            await self._shutdown(renew_every)
        return self.stats

    async def _register(self) -> None:
        """As the sync runner's: waits while Redis cannot be reached, retries a refusal later."""
        self.unregistered = False
        delay = 0.1
        while not self._stopping:
            try:
                await self.batcher.client.hset(
                    iterator_registry_key(self.batcher.prefix), mapping=self._registry_fields()
                )
                return
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("cannot reach Redis (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except RedisError as exc:
                self._registration_refused(exc)
                return

    async def _register_again(self) -> None:
        try:
            await self.batcher.client.hset(
                iterator_registry_key(self.batcher.prefix), mapping=self._registry_fields()
            )
        except RedisError as exc:
            log.debug("iterator configs still not registered: %s", exc)
            return
        self.unregistered = False
        log.info("iterator configs registered")

    async def _claim_round(self, now: float, due_at: dict[str, float]) -> bool:
        more = False
        for it in self.iterators:
            free = self.concurrency - self.running
            if free <= 0:
                return True
            if due_at[it.name] > now or self._stopping:
                continue
            owner = ops.new_token()
            call = claim_call(it.keys, it.config, free, owner, self.label)
            try:
                reply = await call.script.call_async(self.batcher.client, call.keys, call.args)
            except RedisError as exc:
                self._claim_failed(it, exc, now, due_at)
                continue
            claimed, due_now = self._claimed(it, owner, reply, now, due_at)
            more = more or due_now
            for c in claimed:
                s = _Session(it, c)
                self._sessions[(it.name, c.job_id)] = s
                s.task = asyncio.ensure_future(self._session(s))
        return more

    async def _renew(self) -> None:
        for s in list(self._sessions.values()):
            it, c = s.iterator, s.claimed
            call = extend_call(it.keys, it.config, c.job_id, c.owner)
            try:
                await call.script.call_async(self.batcher.client, call.keys, call.args)
            except RedisError as exc:
                log.warning("%s %s: heartbeat failed: %s", it.name, c.job_id, exc)

    async def _shutdown(self, renew_every: float) -> None:
        deadline = time.monotonic() + self.grace_period
        next_renew = time.monotonic() + renew_every
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            if time.monotonic() >= next_renew:
                await self._renew()
                next_renew = time.monotonic() + renew_every
        for s in list(self._sessions.values()):
            if s.task is not None:
                s.task.cancel()
        pending = [s.task for s in self._sessions.values() if s.task is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _write(self, s: _Session, call: ops.Call) -> Any:
        delay = 0.05
        deadline = time.monotonic() + s.iterator.config.lease_timeout
        while True:
            try:
                return await self.batcher.executor.execute(call)
            except RedisError as exc:
                if time.monotonic() > deadline:
                    log.error("%s %s: cannot record progress (%s)", call.script.name, s.claimed.job_id, exc)
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _release(self, s: _Session, why: str) -> None:
        it, c = s.iterator, s.claimed
        try:
            release = owner_call("job_release", it.keys, c.job_id, c.owner)
            if await self.batcher.executor.execute(release, wait=False):
                self.stats.released += 1
                log.info("%s %s: lease released (%s)", it.name, c.job_id, why)
        except RedisError as exc:
            log.warning("%s %s: could not release (%s); its lease will expire", it.name, c.job_id, exc)

    async def _session(self, s: _Session) -> None:
        try:
            await self._drive(s)
        except asyncio.CancelledError:
            # shutdown after the grace period: give the job back (its step was not saved)
            await asyncio.shield(self._release(s, "step still running at shutdown"))
        except BaseException:  # a bug here must not end the event loop: the lease expires
            log.exception("%s %s: job runner error", s.iterator.name, s.claimed.job_id)
        finally:
            self._sessions.pop((s.iterator.name, s.claimed.job_id), None)
            self._ended.add(s.iterator.name)
            if self._wake is not None:
                self._wake.set()

    async def _drive(self, s: _Session) -> None:
        it, c = s.iterator, s.claimed
        cfg = it.config
        ctx = JobContext(c.job_id, it.name, c.params, c.cursor, c.processed, c.retries, cfg.batch_size)
        exhausted = c.exhausted
        step = 0
        try:
            instance = it()
            with_job = takes_job(instance.next_batch)
        except BaseException as exc:
            await self._failed(s, exc)
            return
        while True:
            if self._stopping:
                await self._release(s, "worker stopping")
                return
            if exhausted:
                await self._complete(s, instance, ctx)
                return
            try:
                args = (ctx.cursor, cfg.batch_size, ctx) if with_job else (ctx.cursor, cfg.batch_size)
                page = check_page(await _call_user(instance.next_batch, *args))
                items = list(page.items)
                if items:
                    await _call_user(instance.process, items, ctx)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # sys.exit() in a step too: a failed step, the loop goes on
                await self._failed(s, exc)
                return
            step += 1
            reply = await self._write(
                s, commit_call(it.keys, cfg, c.job_id, c.owner, page.cursor, len(items), page.done, step)
            )
            if not step_saved(self.stats, it.name, c.job_id, reply, len(items)):
                return
            ctx.cursor, ctx.processed, ctx.retry_count = page.cursor, ctx.processed + len(items), 0
            if page.done:
                exhausted = True
                continue
            if cfg.delay_between_batches > 0:
                await self._sleep(cfg.delay_between_batches)
                if not self._stopping and not await self._still_ours(s):
                    return

    async def _still_ours(self, s: _Session) -> bool:
        """As :meth:`redis_batcher.jobs.JobRunner._still_ours`: no further step once the job
        was paused or cancelled during delay_between_batches."""
        it, c = s.iterator, s.claimed
        try:
            status, owner = await self.batcher.client.hmget(it.keys.job(c.job_id), ["status", "owner"])
        except RedisError:
            return True
        if owner is None or as_text(owner) != c.owner:
            log.warning("%s %s: lease lost; another worker runs the job now", it.name, c.job_id)
            self.stats.lease_lost += 1
            return False
        if status is not None and as_text(status) != "running":
            await self._release(s, f"job {as_text(status)}")
            return False
        return True

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, deadline - time.monotonic()))

    async def _complete(self, s: _Session, instance: Any, ctx: JobContext) -> None:
        it, c = s.iterator, s.claimed
        on_complete = getattr(instance, "on_complete", None)
        if on_complete is not None:
            try:
                await _call_user(on_complete, ctx)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await self._failed(s, exc)
                return
        reply = await self._write(s, owner_call("job_finish", it.keys, c.job_id, c.owner))
        if reply is not None and as_text(reply) == "completed":
            self.stats.completed += 1
            log.info("%s %s: completed, %d items", it.name, c.job_id, ctx.processed)

    async def _failed(self, s: _Session, exc: BaseException) -> None:
        it, c = s.iterator, s.claimed
        self.stats.failures += 1
        log_step_exit(it.name, c.job_id, exc)
        reply = await self._write(s, fail_call(it.keys, it.config, c.job_id, c.owner, error_text(exc)))
        if reply is None:
            return
        outcome, retries = as_text(reply[0]), int(reply[1])
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
            log.warning("%s %s: step failed (%s); retry %d", it.name, c.job_id, error_text(exc), retries)
