"""The asyncio worker: the twin of :mod:`redis_batcher.worker` for an asyncio
:class:`~redis_batcher.asyncio.Batcher` (public as ``redis_batcher.asyncio.Worker``).

``async def`` handlers run on the event loop, sync ones in threads of their own. The scheduling
and bookkeeping are the sync worker's (:mod:`redis_batcher.worker_core`); this module is the
asyncio driver. It sees its batcher through :class:`AsyncWorkerHost`, so it does not import the
asyncio API built on top of it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from . import ops, wake
from .batcher import Batcher as SyncBatcher
from .delivery import (
    HandlerExit,
    Outcome,
    SettleRetry,
    classify,
    decode_window,
    drain_ranges,
    log_handler_exit,
    make_flush,
)
from .errors import NotReplicated, error_text
from .instrument import traced_async
from .job_runner_async import AsyncJobRunner
from .jobs import JobIterator
from .jobs_async import AsyncJobsHost
from .models import WorkerStats
from .processor import Processor
from .worker_beat import beat_task, leave
from .worker_core import WorkerCore

__all__ = ["AsyncWorkerHost", "Worker"]

log = logging.getLogger("redis_batcher.worker")


class AsyncWorkerHost(AsyncJobsHost, Protocol):
    """What the asyncio worker needs of an asyncio :class:`~redis_batcher.asyncio.Batcher`:
    what its iterator jobs need (:class:`~redis_batcher.jobs_async.AsyncJobsHost`), the sync
    batcher holding the ``definitions``, ``wait_replicas``, the ``target`` it logs, and its
    awaited checks and registration."""

    @property
    def definitions(self) -> SyncBatcher: ...

    @property
    def wait_replicas(self) -> int: ...

    @property
    def target(self) -> str: ...

    async def check_memory_policy(self) -> None: ...

    async def check_layout(self) -> int: ...

    async def register(self, processors: Iterable[Processor] | None = None) -> None: ...


async def _guarded(awaitable: Any) -> Any:
    """Await a handler's awaitable, its non-Exception BaseExceptions (but cancellation) raised
    as :class:`HandlerExit` (asyncio would let SystemExit out through the event loop)."""
    try:
        return await awaitable
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise HandlerExit(exc) from exc


def _in_thread(fn: Callable[[Any], Any], arg: Any) -> asyncio.Future[Any]:
    """Run a sync handler in a thread of its own. Unlike a bounded pool, a handler abandoned
    after its handler_timeout cannot hold back the retries."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = fn(arg)
        except Exception as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        except BaseException as exc:  # sys.exit() in the handler: see HandlerExit
            loop.call_soon_threadsafe(settle, None, HandlerExit(exc))
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name="rb-sync-handler", daemon=True).start()
    return future


@dataclass
class _Running:
    claimed: ops.Claimed
    task: asyncio.Task[None] | None = None
    settling: bool = False
    started: bool = False  # the handler got a slot (claimed flushes wait for one)
    released: bool = False  # handed back at shutdown


class Worker(WorkerCore[AsyncWorkerHost]):
    """The asyncio worker: ``async def`` handlers run on the event loop (``concurrency`` at a
    time), sync handlers in a thread pool. Claims, heartbeats, acks and retries are the sync
    worker's (shared :class:`~redis_batcher.worker_core.WorkerCore`); ``handler_timeout``
    cancels an async handler's task. ``prefetch_multiplier``: flushes claimed ahead, as in the
    sync :class:`~redis_batcher.Worker`. ``await worker.run()`` until :meth:`stop` (or
    SIGTERM/SIGINT when run in the main thread); ``run(burst=True)`` delivers what is due and
    returns. ``processors`` / ``iterators`` limit what it serves, and ``max_flushes``,
    ``max_idle``, ``beat_interval`` and ``observer`` work, as on the sync worker."""

    KIND = "asyncio"

    def definitions_of(self, batcher: AsyncWorkerHost) -> SyncBatcher:
        return batcher.definitions

    def setup(self, iterators: list[JobIterator]) -> None:
        self._slots: asyncio.Semaphore | None = None
        self._inflight: dict[str, _Running] = {}
        # iterator jobs run as tasks of their own runner (redis_batcher.job_runner_async)
        self.jobs = (
            AsyncJobRunner(
                self.batcher, iterators, concurrency=self.concurrency, grace_period=self.grace_period
            )
            if iterators
            else None
        )
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self.forced = False  # a second signal: leases released at once, exit non-zero
        self.ready: asyncio.Event | None = None

    @property
    def inflight(self) -> int:
        """Flushes whose handlers are running now (claimed ones waiting for a slot excluded)."""
        return sum(1 for r in self._inflight.values() if r.started)

    def stop(self) -> None:
        """Stop claiming; :meth:`run` returns once in-flight handlers have finished."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self.jobs is not None:
            self.jobs.stop()

    async def run(self, burst: bool = False) -> WorkerStats:
        """Serve until :meth:`stop` (or a signal), then finish in-flight flushes (up to
        ``grace_period``, releasing the rest). ``burst=True``: deliver what is due, return (an
        unreachable Redis raises, as in the sync worker)."""
        self.reset()
        self._stopping = False
        self._wake = asyncio.Event()
        self.ready = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        loop = asyncio.get_running_loop()
        signals = self._install_signals(loop)
        background = [asyncio.ensure_future(self._heartbeat())] if self.processors else []
        if not burst and self.processors:
            background.append(asyncio.ensure_future(self._listen()))
        jobs = None
        beating = False
        try:
            await self._register(burst)
            register = functools.partial(self.batcher.register, self.processors)
            background.append(asyncio.ensure_future(beat_task(self, register, lambda: self._stopping)))
            beating = True
            if not self._stopping:  # a signal during registration: never started
                self.log_start(burst)
            if self.jobs is not None:
                jobs = asyncio.ensure_future(self.jobs.run(burst))
            self.ready.set()
            if self.processors:
                await self._loop(burst)
            if jobs is not None:
                await asyncio.shield(jobs)  # burst: until no job is runnable; else until stop()
        finally:
            self._stopping = True
            if self.jobs is not None:
                self.jobs.stop()
            await self._finish_inflight()
            if jobs is not None:
                await asyncio.gather(jobs, return_exceptions=True)
            for t in background:
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if beating:
                await leave(self)
            for s in signals:
                loop.remove_signal_handler(s)
            self.log_stop()
        return self.stats

    async def _register(self, burst: bool) -> None:
        """As the sync worker's: checks the memory policy, waits while Redis cannot be
        reached (a burst run raises the error), serves anyway when it refuses the write (a
        full Redis), retrying at the full checks."""
        delay = 0.1
        while not self._stopping:
            try:
                await self.batcher.check_memory_policy()
                await self.batcher.check_layout()
                await self.batcher.register(self.processors)
                return
            except RedisError as exc:
                if not self.registration_failed(exc, delay, burst):
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _register_again(self) -> None:
        try:
            await self.batcher.register(self.processors)
            self.registration_retried(None)
        except RedisError as exc:
            self.registration_retried(exc)

    async def _loop(self, burst: bool) -> None:
        assert self._wake is not None
        while not self._stopping:
            self._wake.clear()
            if self.register_due(time.monotonic()):
                await self._register_again()
            await self._take_tokens()
            more = await self._claim_round(time.monotonic())
            free = self.capacity - len(self._inflight)
            if burst and not more and not self._inflight:
                return
            if self.idle_expired(time.monotonic(), more or bool(self._inflight)):
                return
            if more and free > 0:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self.sleep_time(time.monotonic(), free))
            except asyncio.TimeoutError:
                pass

    async def _take_tokens(self) -> None:
        """As the sync worker's: try to take the token of each wake-up heard, with a slot free."""
        for idx in self.tokens_wanted(self.capacity - len(self._inflight)):
            try:
                taken = bool(await self.client.delete(self.parts[idx][1].woke))
            except RedisError as exc:
                taken = self.token_unknown(idx, exc)
            self.token_tried(idx, taken)

    async def _claim_round(self, now: float) -> bool:
        more = False
        for idx in self.begin_round(now):
            if self._stopping:
                break
            free = self.capacity - len(self._inflight)
            if free <= 0:
                return True
            owner, call, seen = self.claim_call(idx, free)
            try:
                reply = await call.script.call_async(self.client, call.keys, call.args)
                claimed, due_now = self.claimed(idx, owner, reply, now, seen)
            except RedisError as exc:
                claimed, due_now = self.claim_failed(idx, now, exc)
            more = more or due_now
            for c in claimed:
                key = c.part.pfx + c.member
                running = _Running(c)
                self._inflight[key] = running
                running.task = asyncio.ensure_future(self._execute(key, running))
        return more

    async def _deliver(self, c: ops.Claimed) -> Outcome:
        raw = c.raw
        if raw is None:  # a window too large to come inline with the claim
            raw = []
            for start, stop in drain_ranges(c.cutoff):
                raw.extend(await self.client.lrange(ops.items_key(c), start, stop))
        items, bad = decode_window(c, raw)
        if bad is not None:
            return bad
        handler = c.processor.handler
        flush = make_flush(c, items)
        limit = c.processor.config.handler_timeout
        try:
            if inspect.iscoroutinefunction(handler):
                result = await asyncio.wait_for(_guarded(handler(flush)), limit)
            else:
                result = await asyncio.wait_for(_in_thread(handler, flush), limit)
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(_guarded(result), limit)
        except asyncio.TimeoutError:
            return self.timeout_outcome(c)
        except asyncio.CancelledError:
            raise
        except HandlerExit as exc:  # sys.exit() in a handler ends neither the worker nor the flush
            log_handler_exit(c, exc.exc)
            return classify(len(items), exc=exc.exc)
        except Exception as exc:  # a handler may raise anything: record it and retry later
            return classify(len(items), exc=exc)
        return classify(len(items), result)

    async def _execute(self, key: str, r: _Running) -> None:
        """Wait for one of the ``concurrency`` slots, then deliver (unless stopping by then:
        :meth:`_finish_inflight` hands a flush that never started back at once)."""
        assert self._slots is not None
        async with self._slots:
            task: tuple[str, _Running] | None = (key, r)
            # while each ack brings the partition's next due flush along, run it in this slot
            while task is not None and not self._stopping:
                task[1].started = True
                task[1].task = asyncio.current_task()  # what a shutdown cancels past its grace
                task = await self._run(*task)
            if task is not None and task[1] is not r:
                # the flush an ack brought along, not run because the worker is stopping:
                # hand it back now (the shutdown may have released the others already)
                await self._release(*task)

    async def _run(self, key: str, r: _Running) -> tuple[str, _Running] | None:
        c = r.claimed
        started = time.time()
        t0 = time.perf_counter()
        follow = None
        nxt: list[ops.Claimed] = []
        more = False
        try:
            try:
                outcome = await traced_async(c, self._deliver)
            except asyncio.CancelledError:
                return None  # released at shutdown: the lease was given back
            except BaseException as exc:  # Redis unreachable while draining, ...: keep the items
                outcome = Outcome("fail", error_text(exc), [], c.cutoff, exc)
            r.settling = True
            duration_ms = (time.perf_counter() - t0) * 1000.0
            # ask for the partition's next flush with the ack, unless stopping or flushes
            # claimed ahead (prefetch) are already waiting for a slot
            if not self._stopping and all(x.started for x in self._inflight.values()):
                follow = self.next_flush_owner(c, outcome)
            call = self.settle_call(c, outcome, started, duration_ms, follow[0] if follow else None)
            now = time.monotonic()
            reply = await self._settle(c, call)
            self.settled(c, outcome, reply, duration_ms)
            if follow is not None:
                nxt, more = self.claimed_next(c, follow[0], follow[1], reply, now)
        finally:
            self._inflight.pop(key, None)
            task = None
            for n in nxt:  # at most one
                task = (n.part.pfx + n.member, _Running(n))
                self._inflight[task[0]] = task[1]
            if follow is None:
                self.mark_due(c.part.pfx)
            if (task is None or (more and len(self._inflight) < self.capacity)) and self._wake is not None:
                self._wake.set()  # a slot is free, or more is due than this task can take
        return task

    async def _settle(self, c: ops.Claimed, call: ops.Call) -> Any:
        """As the sync worker's: the reply of the ack/nack, retried while the lease lasts."""
        retry = SettleRetry(c, call)
        while True:
            try:
                return self.reply_code(c, await self.batcher.executor.execute(retry.call))
            except (NotReplicated, RedisError) as exc:
                wait = retry.failed(exc)
                if wait is None:
                    return retry.reply
                await asyncio.sleep(wait)

    async def _finish_inflight(self) -> None:
        deadline = time.monotonic() + self.grace_period
        while (
            any(r.started for r in self._inflight.values())
            and time.monotonic() < deadline
            and not self.forced
        ):
            await asyncio.sleep(0.02)
        for key, r in list(self._inflight.items()):
            if r.settling or r.released:
                continue
            if r.task is not None:
                r.task.cancel()
            await self._release(key, r)
        pending = [r.task for r in self._inflight.values() if r.task is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _release(self, key: str, r: _Running) -> None:
        """Give up the lease of a flush this worker will not run (once)."""
        if r.released:
            return
        r.released = True
        c = r.claimed
        try:
            self.released(c, await self.batcher.executor.execute(ops.release_call(c), wait=False))
        except RedisError as exc:
            self.released(c, exc=exc)
        self._inflight.pop(key, None)

    async def _heartbeat(self) -> None:
        renew_every, _, _ = self.heartbeat_tick()
        while True:
            await asyncio.sleep(renew_every)
            for r in list(self._inflight.values()):
                c = r.claimed
                try:
                    call = ops.extend_call(c)
                    ok = await call.script.call_async(self.client, call.keys, call.args)
                    key = c.part.pfx + c.member
                    if not ok and key in self._inflight and not self._inflight[key].settling:
                        self.lease_trouble(c)
                except RedisError as exc:
                    self.lease_trouble(c, exc)

    async def _listen(self) -> None:
        """As the sync worker's: wake-ups of the partitions served here (redis_batcher.wake)."""
        heard, ready = self.wake_callbacks(self._poke)
        await wake.alisten(self.client, self.channels, heard, ready)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed: list[int] = []

        def on_signal(signum: int) -> None:
            action = self.on_stop_signal(signum, self._stopping)
            if action == "force":
                self.forced = True
                self.grace_period = 0.0
                self._poke()
            elif action == "stop":
                self.stop()

        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(s, functools.partial(on_signal, s))
                installed.append(s)
            except (NotImplementedError, RuntimeError):
                pass
        return installed
