"""The worker: claims due sequences, runs handlers in a pool of threads, acknowledges or
retries them.

A worker never busy-polls. It claims what is due, then sleeps until the earliest entry of its
delay queues is due, a slot frees up, or a pub/sub message says a sequence was sealed. The
scheduling and bookkeeping live in :mod:`redis_batcher.worker_core` and the steps of one
delivery in :mod:`redis_batcher.delivery`, shared with the asyncio worker; how the handler
threads are paced in :mod:`redis_batcher.worker_pace`. This module is the threaded driver.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from redis.exceptions import RedisError

from . import ops, wake
from .batcher import Batcher
from .delivery import (
    Outcome,
    SettleRetry,
    backoff_seconds,
    classify,
    decode_window,
    drain_ranges,
    log_handler_exit,
    make_flush,
)
from .errors import NotReplicated, error_text
from .instrument import traced
from .job_runner import JobRunner
from .jobs import JobIterator
from .models import WorkerStats
from .worker_beat import beat_thread
from .worker_pace import Pacing, Running

__all__ = ["Worker", "WorkerStats", "backoff_seconds"]

log = logging.getLogger("redis_batcher.worker")

SETTLE_WAIT = 2.0  # seconds a stopping worker still waits for results being recorded
# Saturated: a handler thread waits for a CPU (/proc/thread-self/schedstat) at least this many
# times as long as it runs; without /proc the limit never applies.
CROWDED = 0.5
CROWD_WINDOW = 0.5  # seconds between a thread's run-queue readings


def sched_times() -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of the calling thread, from
    ``/proc/thread-self/schedstat`` (Linux); None where that cannot be read."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class Worker(Pacing):
    """Delivers due batches of a :class:`Batcher`'s processors to their handlers.

    ``concurrency`` handlers run at once, in a pool of threads (while handlers compute rather
    than wait, a flush due during a handler that started under 2 ms ago is left to that
    handler's thread; and on a saturated machine a backlog of such handlers is worked through by
    at most two threads: see :mod:`redis_batcher.worker_pace`).
    ``prefetch_multiplier``: the worker claims up to ``concurrency * prefetch_multiplier``
    flushes (as Celery's setting of that name); above 1, flushes wait claimed for a free thread,
    so bursts of small flushes need fewer claim round trips. Their leases are renewed while they
    wait, and a stopping worker releases the ones not started at once; but if the worker process
    dies, each claimed flush is charged a death (``max_deaths``, bisection), started or not.
    Default 1. ``processors`` limits the worker to some processor names. ``max_idle_wait``
    bounds how long an idle worker sleeps between full checks of its delay queues when no
    wake-up message arrives (a safety net; wake-ups are instant). ``grace_period``: on
    shutdown, how long in-flight handlers may still run; the leases of those still running
    after it are released at once so another worker takes them. ``iterators`` limits the
    iterator jobs it runs to those iterator names (``[]``: none). ``max_flushes``,
    ``max_idle``, ``beat_interval``, ``observer``: see :class:`~redis_batcher.worker_core.WorkerCore`.
    """

    def definitions_of(self, batcher: Batcher) -> Batcher:
        return batcher

    def setup(self, iterators: list[JobIterator]) -> None:
        self._inflight: dict[str, Running] = {}
        self._tasks: queue.SimpleQueue[tuple[str, Running] | None] = queue.SimpleQueue()
        self._threads = 0  # live pool threads
        self._recording = 0  # threads recording a result or handing a flush back (see _settling)
        self._surplus = 0  # threads started to replace handlers abandoned at their timeout
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._until = 0.0  # when the main loop wakes by itself (see _sleep)
        self._full = False  # it waits for a free slot
        self._burst = False
        self._cpu_share = 1.0  # measured as handlers run (see Pacing)
        self._crowded = False  # measured by _measure_crowding (see Pacing)
        self._sched = threading.local()  # each handler thread's last schedstat reading
        self._stopping = threading.Event()
        self._done = threading.Event()
        self.ready = threading.Event()  # set once the worker has started claiming
        # iterator jobs run in a runner thread of their own (redis_batcher.job_runner)
        self.jobs = (
            JobRunner(self.batcher, iterators, concurrency=self.concurrency, grace_period=self.grace_period)
            if iterators
            else None
        )

    # -- public ----------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> WorkerStats:
        """Serve until :meth:`stop`, SIGTERM or SIGINT, then finish in-flight flushes (up to
        ``grace_period``, releasing the rest) and return.

        With ``burst=True``, deliver everything that is due now and return once nothing due is
        left and no handler is running (for tests and cron jobs); a Redis still unreachable
        after ``connect_retry`` raises :class:`~redis_batcher.NotSentError` rather than waiting.
        """
        self._stopping.clear()
        self._done.clear()
        self.reset()
        restore = self._install_signals()
        threads = [threading.Thread(target=self._heartbeat, name="rb-heartbeat", daemon=True)]
        for _ in range(self.concurrency if self.processors else 0):
            self._spawn()
        if not self.processors:  # iterator jobs only
            threads = []
        elif not burst:
            threads.append(threading.Thread(target=self._listen, name="rb-wake", daemon=True))
        beats = (self, functools.partial(self.batcher.register, self.processors), self._done)
        threads.append(threading.Thread(target=beat_thread, args=beats, name="rb-registry", daemon=True))
        try:
            self._register(burst)
            for t in threads:
                t.start()
            if not self._stopping.is_set():  # a signal during registration: never started
                self.log_start(burst)
            if self.jobs is not None:
                self.jobs.start(burst)
            self.ready.set()
            if self.processors:
                self._loop(burst)
            if self.jobs is not None:
                self.jobs.wait()  # burst: until no job is runnable; else until stop()
        finally:
            self.ready.clear()
            self._stopping.set()
            if self.jobs is not None:
                self.jobs.stop()
            self._finish_inflight()
            self._stop_pool()
            if self.jobs is not None:
                self.jobs.wait()
            self._done.set()
            for t in threads:
                if t.ident is not None:  # started (not when the start was refused)
                    t.join(timeout=5)
            restore()
            self.log_stop()
        return self.stats

    def stop(self) -> None:
        """Stop claiming; :meth:`run` returns once in-flight handlers have finished."""
        self._stopping.set()
        self._wake.set()
        if self.jobs is not None:
            self.jobs.stop()

    @property
    def inflight(self) -> int:
        """Flushes whose handlers are running now (claimed ones waiting for a thread excluded)."""
        with self._lock:
            return sum(1 for r in self._inflight.values() if r.started is not None and not r.abandoned)

    # -- main loop -------------------------------------------------------------------------------

    def _register(self, burst: bool) -> None:
        """Check Redis' memory policy and data layout (an
        :class:`~redis_batcher.EvictionPolicyError` or :class:`~redis_batcher.LayoutMismatch`
        ends :meth:`run`) and publish the processor configs. Waits while Redis cannot be reached
        (a burst run raises the error instead); any other refusal (a full Redis) is retried
        later, never a reason not to serve."""
        delay = 0.1
        while not self._stopping.is_set():
            try:
                self.batcher.check_memory_policy()
                self.batcher.check_layout()
                self.batcher.register(self.processors)
                return
            except RedisError as exc:
                if not self.registration_failed(exc, delay, burst):
                    return
            self._stopping.wait(delay)
            delay = min(delay * 2, 5.0)

    def _register_again(self) -> None:
        try:
            self.batcher.register(self.processors)
            self.registration_retried(None)
        except RedisError as exc:
            self.registration_retried(exc)

    def _measure_crowding(self, now: float) -> None:
        """At most every CROWD_WINDOW seconds per handler thread: did this thread wait for a CPU
        at least CROWDED times as long as it ran since its last reading?"""
        local = self._sched
        since: float | None = getattr(local, "since", None)
        if since is not None and now - since < CROWD_WINDOW:
            return
        times = sched_times()
        if times is None:
            return
        last: tuple[int, int] | None = getattr(local, "times", None)
        local.since, local.times = now, times
        if last is not None and times[0] > last[0]:
            self._crowded = times[1] - last[1] >= CROWDED * (times[0] - last[0])

    def _loop(self, burst: bool) -> None:
        self._burst = burst
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.monotonic()
            if self.register_due(now):
                self._register_again()
            self._take_tokens()
            hold = self._hold_until(now)
            if hold > now:
                self._sleep(hold)  # a handler that started moments ago will take it
                continue
            more = self._claim_round(now)
            if burst and not more and not self._inflight:
                return
            if self.idle_expired(time.monotonic(), more or bool(self._inflight)):
                return
            if more and len(self._inflight) < self._slots():
                continue
            self._sleep(None)

    def _sleep(self, until: float | None) -> None:
        """Wait until ``until`` (None: the next due time, or the next full check when no slot is
        free) unless woken: by a wake-up message, stop(), or a handler thread that freed a slot
        the loop waits for or learnt of an earlier due time (see _needs_look)."""
        with self._lock:
            now = time.monotonic()
            free = self._slots() - len(self._inflight)
            if until is None:
                until = now + self.sleep_time(now, free)
            self._until = until
            self._full = free <= 0
        self._wake.wait(max(until - now, 0.0))

    def _needs_look(self) -> bool:
        """A handler thread got free with nothing to run next: must the main loop look now?
        Yes while it waits for a free slot, when something is due before it would wake anyway,
        and in burst mode (it returns once nothing is in flight). Otherwise waking it would
        cost two context switches to find nothing to do."""
        with self._lock:
            return self._full or self._burst or min(self.due_at) < self._until

    def _take_tokens(self) -> None:
        """Try to take the token of each wake-up heard, with a slot free (see
        :meth:`WorkerCore.on_wake`): a plain ``DEL`` on a key of the partition's slot."""
        with self._lock:
            free = self._slots() - len(self._inflight)
        for idx in self.tokens_wanted(free):
            try:
                taken = bool(self.client.delete(self.parts[idx][1].woke))
            except RedisError as exc:
                taken = self.token_unknown(idx, exc)
            self.token_tried(idx, taken)

    def _claim_round(self, now: float) -> bool:
        """Claim from the partitions that may have due entries. True when more is due than was
        claimed (or slots ran out first)."""
        more = False
        for idx in self.begin_round(now):
            if self._stopping.is_set():
                break
            free = self._slots() - len(self._inflight)
            if free <= 0:
                return True
            owner, call, seen = self.claim_call(idx, free)
            try:
                claimed, due_now = self.claimed(idx, owner, self.batcher.executor.run_once(call), now, seen)
            except RedisError as exc:
                claimed, due_now = self.claim_failed(idx, now, exc)
            more = more or due_now
            for c in claimed:
                self._submit(c)
        return more

    def _submit(self, c: ops.Claimed) -> None:
        key = c.part.pfx + c.member
        running = Running(c)
        with self._lock:
            self._inflight[key] = running
        self._tasks.put((key, running))

    # -- the handler pool ------------------------------------------------------------------------

    def _spawn(self) -> None:
        with self._lock:
            self._threads += 1
        threading.Thread(target=self._pool_main, name="rb-handler", daemon=True).start()

    def _pool_main(self) -> None:
        """A pool thread: run claimed flushes until told to stop. A thread whose handler was
        abandoned at its timeout was replaced meanwhile; when it gets free it leaves."""
        while True:
            task = self._tasks.get()
            if task is None:
                break
            try:
                self._execute(*task)
            except BaseException:  # a bug here must not end a pool thread
                log.exception("handler thread error")
            with self._lock:
                if self._surplus > 0:
                    self._surplus -= 1
                    break
        with self._lock:
            self._threads -= 1

    def _stop_pool(self) -> None:
        with self._lock:
            n = self._threads
        for _ in range(n):
            self._tasks.put(None)

    def _running_handlers(self) -> int:
        with self._lock:
            return sum(1 for r in self._inflight.values() if r.started is not None and not r.settling)

    def _finish_inflight(self) -> None:
        """Shutdown: wait up to grace_period for running handlers, release the others' leases
        (claimed flushes that never started are released at once)."""
        deadline = time.monotonic() + self.grace_period
        if running := self._running_handlers():
            log.info("waiting up to %.0fs for %d in-flight flush(es) to finish", self.grace_period, running)
        while time.monotonic() < deadline and (self._running_handlers() or self._settling()):
            self._wake.wait(0.05)
            self._wake.clear()
        self._release_all()
        # a result being recorded past the grace period may bring the next flush along, which
        # its thread then hands back: give it a moment (a round trip or two), the process may
        # exit right after run() returns
        deadline = time.monotonic() + SETTLE_WAIT
        while self._settling() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _settling(self) -> bool:
        """Some thread is recording a result (and handing back what its ack brought along)."""
        with self._lock:
            return self._recording > 0

    def _release_all(self) -> None:
        with self._lock:
            leftovers = [r for r in self._inflight.values() if not r.settling and not r.abandoned]
            for r in leftovers:
                r.abandoned = True
        for r in leftovers:
            self._release(r)

    def _release(self, r: Running) -> None:
        """Give up the lease of a flush this worker will not finish (marked abandoned by the
        caller), so another worker takes it now rather than after the lease runs out."""
        c = r.claimed
        try:
            self.released(c, self.batcher.executor.execute(ops.release_call(c), wait=False))
        except RedisError as exc:
            self.released(c, exc=exc)
        with self._lock:
            self._inflight.pop(c.part.pfx + c.member, None)

    # -- one flush -------------------------------------------------------------------------------

    def _deliver(self, c: ops.Claimed) -> Outcome:
        raw = c.raw
        if raw is None:  # a window too large to come inline with the claim
            raw = []
            for start, stop in drain_ranges(c.cutoff):
                raw.extend(self.client.lrange(ops.items_key(c), start, stop))
        items, bad = decode_window(c, raw)
        if bad is not None:
            return bad
        try:
            result = c.processor.handler(make_flush(c, items))
            if result is not None and inspect.isawaitable(result):  # an async handler, sync worker
                result = asyncio.run(_awaited(result))
        except Exception as exc:  # a handler may raise anything: record it and retry later
            return classify(len(items), exc=exc)
        except BaseException as exc:  # sys.exit() in a handler ends neither the thread nor the flush
            log_handler_exit(c, exc)
            return classify(len(items), exc=exc)
        return classify(len(items), result)

    def _execute(self, key: str, r: Running) -> None:
        """Run a flush; then, while each ack brings the partition's next due flush along, run
        that one too (in this thread, in the slot it already holds)."""
        task: tuple[str, Running] | None = (key, r)
        while task is not None:
            task = self._execute_one(*task)

    def _execute_one(self, key: str, r: Running) -> tuple[str, Running] | None:
        c = r.claimed
        with self._lock:
            if r.abandoned:
                return None
            hand_back = self._stopping.is_set()
            if hand_back:
                r.abandoned = True  # never started: handed back now (not by _release_all)
                self._recording += 1  # so that shutdown waits for the release to be sent
            else:
                r.started = time.monotonic()
        if hand_back:
            try:
                self._release(r)
            finally:
                with self._lock:
                    self._recording -= 1
            return None
        started = time.time()
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        try:
            outcome = traced(c, self._deliver)
        except BaseException as exc:  # Redis unreachable while draining, ...: keep the items
            outcome = Outcome("fail", error_text(exc), [], c.cutoff, exc)
        elapsed = time.perf_counter() - t0
        duration_ms = elapsed * 1000.0
        if elapsed > 0:  # what share of its time the handler computed (moving average)
            self._cpu_share += ((time.thread_time() - cpu0) / elapsed - self._cpu_share) / 8
        self._measure_crowding(t0 + elapsed)
        with self._lock:
            if r.abandoned:
                log.warning(
                    "%s %s: handler finished after its timeout or release; result ignored",
                    c.processor.name,
                    c.member,
                )
                return None
            r.settling = True
            self._recording += 1
        # ask for the partition's next flush with the ack, unless stopping, flushes claimed
        # ahead (prefetch) are already waiting for a thread, or more are in flight than the
        # spread limit now allows (this thread then leaves the work to the others)
        follow = None
        if not self._stopping.is_set() and self._tasks.empty() and len(self._inflight) <= self._slots():
            follow = self.next_flush_owner(c, outcome)
        nxt: list[ops.Claimed] = []
        more = False
        try:
            now = time.monotonic()
            reply = self._record(c, outcome, started, duration_ms, follow[0] if follow else None)
            if follow is not None:
                nxt, more = self.claimed_next(c, follow[0], follow[1], reply, now)
        finally:
            task = None
            with self._lock:
                self._inflight.pop(key, None)
                for n in nxt:  # at most one
                    task = (n.part.pfx + n.member, Running(n, chained=True))
                    self._inflight[task[0]] = task[1]
            if follow is None:
                self.mark_due(c.part.pfx)
            try:
                if task is not None and self._stopping.is_set():
                    with self._lock:
                        task[1].abandoned = True  # never started: handed back now
                    self._release(task[1])
                    task = None
            finally:
                with self._lock:
                    self._recording -= 1
            if (more and len(self._inflight) < self._slots() and self._spread(task)) or (
                task is None and self._needs_look()
            ):
                self._wake.set()  # more is due than this thread takes, or see _needs_look
        return task

    def _record(
        self, c: ops.Claimed, outcome: Outcome, started: float, duration_ms: float, owner: str | None = None
    ) -> Any:
        reply = self._settle(c, self.settle_call(c, outcome, started, duration_ms, owner))
        self.settled(c, outcome, reply, duration_ms)
        return reply

    def _settle(self, c: ops.Claimed, call: ops.Call) -> Any:
        """Run an ack/nack, retrying through errors while the lease lasts. Returns the reply, or
        None when the result could not be recorded (the flush will be delivered again). An ack
        that asked for the next flush is retried as a plain ack (ops.without_claim)."""
        retry = SettleRetry(c, call)
        while True:
            try:
                return self.reply_code(c, self.batcher.executor.execute(retry.call))
            except (NotReplicated, RedisError) as exc:  # connection trouble, a server still loading, ...
                wait = retry.failed(exc)
                if wait is None:
                    return retry.reply
                time.sleep(wait)

    # -- background threads ----------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Renew leases every third of the shortest lease timeout; enforce handler timeouts."""
        renew_every, tick, timeouts = self.heartbeat_tick()
        next_renew = time.monotonic() + renew_every
        while not self._done.wait(tick):
            if timeouts:
                self._enforce_timeouts()
            if time.monotonic() < next_renew:
                continue
            next_renew = time.monotonic() + renew_every
            with self._lock:
                running = [r.claimed for r in self._inflight.values() if not r.abandoned]
            for c in running:
                try:
                    if not self.batcher.executor.run_once(ops.extend_call(c)) and self._still_running(c):
                        self.lease_trouble(c)
                except RedisError as exc:
                    self.lease_trouble(c, exc)

    def _still_running(self, c: ops.Claimed) -> bool:
        """False once the flush was settled (an extend that raced with its ack is no news)."""
        with self._lock:
            r = self._inflight.get(c.part.pfx + c.member)
            return r is not None and not r.settling and not r.abandoned

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        expired: list[Running] = []
        with self._lock:
            for key, r in list(self._inflight.items()):
                limit = r.claimed.processor.config.handler_timeout
                if (
                    limit
                    and r.started is not None
                    and not r.settling
                    and not r.abandoned
                    and now - r.started > limit
                ):
                    r.abandoned = True
                    expired.append(r)
                    del self._inflight[key]
                    # its thread stays in the handler: a new one takes its place in the pool
                    self._surplus += 1
        for _ in expired:
            self._spawn()
        for r in expired:
            c = r.claimed
            assert r.started is not None
            elapsed = now - r.started
            self._record(c, self.timeout_outcome(c), time.time() - elapsed, elapsed * 1000.0)
            self.mark_due(c.part.pfx)
            self._wake.set()

    def _listen(self) -> None:
        """Wake the main loop when a producer makes something due in a partition served here
        (pub/sub, see :mod:`redis_batcher.wake`; a lost message only delays work until the
        next full check)."""
        heard, ready = self.wake_callbacks(self._wake.set)
        wake.listen(self.client, self.channels, heard, ready, self._stopping)

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            action = self.on_stop_signal(signum, self._stopping.is_set())
            if action == "force":
                self._release_all()
                os._exit(1)
            if action == "stop":
                self.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore
