"""The worker: claims due sequences, runs handlers, acknowledges or retries them.

A worker never busy-polls. It claims what is due, then sleeps until the earliest entry of its
delay queues is due, a slot frees up, or a pub/sub message says a sequence was sealed.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import ops
from .batcher import Batcher
from .codec import decode_item
from .errors import ConfigError, DecodeError, NotReplicated, PartialFailure
from .keys import PartitionKeys
from .models import Flush
from .processor import Processor

log = logging.getLogger("redis_batcher.worker")

MAX_ERROR_CHARS = 2000
DRAIN_CHUNK = 10_000


@dataclass
class WorkerStats:
    """Counters of one :meth:`Worker.run`."""

    delivered: int = 0
    failed: int = 0
    items: int = 0
    lease_lost: int = 0
    dead_lettered: int = 0
    partial: int = 0
    timed_out: int = 0
    released: int = 0
    quarantined: int = 0


@dataclass
class _Running:
    """A claimed flush this worker is working on."""

    claimed: ops.Claimed
    started: float  # time.monotonic()
    abandoned: bool = False  # timed out or released: whatever the thread does next is ignored
    settling: bool = False  # the thread is recording its result; the watchdog leaves it alone


def backoff_seconds(proc: Processor, attempt: int) -> float:
    """``retry_backoff * 2**(attempt-1)`` capped at ``retry_backoff_max``, with 50-100% jitter."""
    cfg = proc.config
    raw = min(cfg.retry_backoff_max, cfg.retry_backoff * (2 ** min(max(attempt - 1, 0), 62)))
    return float(raw * random.uniform(0.5, 1.0))


class Worker:
    """Delivers due batches of a :class:`Batcher`'s processors to their handlers.

    ``concurrency`` handlers run at once (threads). ``processors`` limits the worker to some
    processor names. ``max_idle_wait`` bounds how long an idle worker sleeps between full checks
    of its delay queues when no wake-up message arrives (a safety net; wake-ups are instant).
    ``grace_period``: on shutdown, how long in-flight handlers may still run; the leases of those
    still running after it are released at once so another worker takes them.
    """

    def __init__(
        self,
        batcher: Batcher,
        *,
        concurrency: int = 4,
        processors: Iterable[str] | None = None,
        max_idle_wait: float = 5.0,
        grace_period: float = 30.0,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not max_idle_wait > 0:
            raise ConfigError(f"max_idle_wait must be > 0, got {max_idle_wait!r}")
        if not grace_period >= 0:
            raise ConfigError(f"grace_period must be >= 0, got {grace_period!r}")
        self.batcher = batcher
        self.client: Any = batcher.client
        self.concurrency = concurrency
        self.max_idle_wait = float(max_idle_wait)
        self.grace_period = float(grace_period)
        names = list(processors) if processors is not None else list(batcher.processors)
        self.processors = [batcher.get_processor(n) for n in names]
        if not self.processors:
            raise ConfigError("the worker has no processors to serve")
        self.parts: list[tuple[Processor, PartitionKeys]] = [
            (p, part) for p in self.processors for part in p.keys.parts
        ]
        self.stats = WorkerStats()
        self._inflight: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self.ready = threading.Event()  # set once the worker has started claiming
        self._rr = 0
        # monotonic time at which each partition may next have something due (0 = check now)
        self._due_at: list[float] = [0.0] * len(self.parts)
        self._part_index = {part.pfx: i for i, (_, part) in enumerate(self.parts)}
        self._full_check_at = 0.0

    # -- public ----------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> WorkerStats:
        """Serve until :meth:`stop`, SIGTERM or SIGINT, then finish in-flight flushes (up to
        ``grace_period``, releasing the rest) and return.

        With ``burst=True``, deliver everything that is due now and return once nothing due is
        left and no handler is running (for tests and cron jobs).
        """
        self._stopping.clear()
        self._done.clear()
        self.stats = WorkerStats()
        self._full_check_at = 0.0
        restore = self._install_signals()
        threads = [threading.Thread(target=self._heartbeat, name="rb-heartbeat", daemon=True)]
        if not burst:
            threads.append(threading.Thread(target=self._listen, name="rb-wake", daemon=True))
        try:
            self._register()
            for t in threads:
                t.start()
            log.info(
                "worker serving %s (concurrency %d%s)",
                ", ".join(p.name for p in self.processors),
                self.concurrency,
                ", burst" if burst else "",
            )
            self.ready.set()
            self._loop(burst)
        finally:
            self.ready.clear()
            self._stopping.set()
            self._finish_inflight()
            self._done.set()
            for t in threads:
                t.join(timeout=5)
            restore()
            log.info(
                "worker stopped: %d delivered, %d failed, %d dead-lettered, %d items",
                self.stats.delivered,
                self.stats.failed,
                self.stats.dead_lettered,
                self.stats.items,
            )
        return self.stats

    def stop(self) -> None:
        """Stop claiming; :meth:`run` returns once in-flight handlers have finished."""
        self._stopping.set()
        self._wake.set()

    @property
    def inflight(self) -> int:
        """Flushes whose handlers are running now."""
        return len(self._inflight)

    # -- main loop -------------------------------------------------------------------------------

    def _register(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            try:
                for proc in self.processors:
                    self.batcher._registered.discard(proc.name)
                    self.batcher._ensure_registered(proc)
                return
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("cannot reach Redis (%s); retrying in %.1fs", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)

    def _loop(self, burst: bool) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.monotonic()
            if now >= self._full_check_at:
                # safety net for due entries nobody announced (another worker's retry, an expired
                # lease of a dead worker, a lost pub/sub message): look at every partition
                self._due_at = [0.0] * len(self.parts)
                self._full_check_at = now + self.max_idle_wait
            more = self._claim_round(now)
            free = self.concurrency - len(self._inflight)
            if burst and not more and not self._inflight:
                return
            if more and free > 0:
                continue
            now = time.monotonic()
            wait = self._full_check_at - now
            if free > 0:
                wait = min(wait, min(self._due_at) - now)
            # a finished flush, a wake-up message or stop() sets the event
            self._wake.wait(max(wait, 0.001))

    def _claim_round(self, now: float) -> bool:
        """Claim from the partitions that may have due entries, round-robin.

        Returns True when more is due than was claimed (or slots ran out first)."""
        more = False
        n = len(self.parts)
        start, self._rr = self._rr, (self._rr + 1) % n
        for i in range(n):
            idx = (start + i) % n
            if self._stopping.is_set():
                break
            if self._due_at[idx] > now:
                continue
            free = self.concurrency - len(self._inflight)
            if free <= 0:
                return True
            proc, part = self.parts[idx]
            owner = ops.new_token()
            try:
                reply = ops.claim_call(proc, part, free, owner).run(self.client)
            except RedisError as exc:
                log.warning("claim on %s failed: %s", part.pfx, exc)
                self._due_at[idx] = now + 1.0
                continue
            next_due, claimed = ops.parse_claim(proc, part, owner, reply)
            for c in claimed:
                self._submit(c)
            if next_due == 0:
                self._due_at[idx] = 0.0
                more = True
            else:
                self._due_at[idx] = now + next_due / 1000.0 if next_due > 0 else math.inf
        return more

    def _submit(self, c: ops.Claimed) -> None:
        key = c.part.pfx + c.member
        running = _Running(c, time.monotonic())
        with self._lock:
            self._inflight[key] = running
        # one thread per flush: a handler past its handler_timeout can be abandoned without
        # holding one of the `concurrency` slots
        threading.Thread(target=self._execute, args=(key, running), name="rb-flush", daemon=True).start()

    def _finish_inflight(self) -> None:
        """Shutdown: wait up to grace_period for running handlers, release the others' leases."""
        deadline = time.monotonic() + self.grace_period
        if self._inflight:
            log.info(
                "waiting up to %.0fs for %d in-flight flush(es) to finish",
                self.grace_period,
                len(self._inflight),
            )
        while self._inflight and time.monotonic() < deadline:
            self._wake.wait(0.05)
            self._wake.clear()
        self._release_all()

    def _release_all(self) -> None:
        with self._lock:
            leftovers = [r for r in self._inflight.values() if not r.settling and not r.abandoned]
            for r in leftovers:
                r.abandoned = True
        for r in leftovers:
            c = r.claimed
            try:
                if self.batcher._execute(ops.release_call(c), wait=False):
                    self.stats.released += 1
                    log.warning(
                        "%s %s: released unfinished flush for another worker", c.processor.name, c.member
                    )
            except RedisError as exc:
                log.warning(
                    "%s %s: could not release (%s); its lease will expire", c.processor.name, c.member, exc
                )
            with self._lock:
                self._inflight.pop(c.part.pfx + c.member, None)

    # -- one flush -------------------------------------------------------------------------------

    def _drain(self, c: ops.Claimed) -> list[bytes]:
        key = ops.items_key(c)
        raw: list[bytes] = []
        while len(raw) < c.cutoff:
            stop = min(c.cutoff, len(raw) + DRAIN_CHUNK) - 1
            chunk = self.client.lrange(key, len(raw), stop)
            if not chunk:
                break
            raw.extend(chunk)
        if len(raw) != c.cutoff:
            log.warning("%s: expected %d items, found %d", c.member, c.cutoff, len(raw))
        return raw

    def _run_handler(self, c: ops.Claimed) -> tuple[str, str | None, list[int], int]:
        """Returns (mode, error, indices, item count); mode is ack, fail, partial or decode."""
        proc = c.processor
        raw = self._drain(c)
        items: list[Any] = []
        bad: list[int] = []
        errors: list[str] = []
        for i, data in enumerate(raw):
            try:
                items.append(decode_item(proc.codec, data, i))
            except DecodeError as exc:
                bad.append(i)
                errors.append(str(exc))
        if bad:
            return "decode", "; ".join(errors[:3])[:MAX_ERROR_CHARS], bad, len(raw)
        flush = Flush(proc.name, c.base, c.sequence, items, c.attempt, c.flush_id, c.reason)
        try:
            result = proc.handler(flush)
            if isinstance(result, PartialFailure):
                raise result
        except PartialFailure as pf:
            failed = [i for i in pf.failed if 0 <= i < len(items)]
            if len(failed) != len(pf.failed):
                error = f"PartialFailure named indices outside 0..{len(items) - 1}: {pf.failed}"
                return "fail", error, [], len(items)
            if not failed:
                return "ack", None, [], len(items)
            return "partial", f"PartialFailure: {pf.message}"[:MAX_ERROR_CHARS], failed, len(items)
        except Exception as exc:  # a handler may raise anything: record it and retry later
            log.debug("handler traceback", exc_info=True)
            return "fail", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS], [], len(items)
        return "ack", None, [], len(items)

    def _execute(self, key: str, r: _Running) -> None:
        c = r.claimed
        started = time.time()
        t0 = time.perf_counter()
        try:
            mode, error, indices, count = self._run_handler(c)
        except Exception as exc:  # Redis unreachable while draining, ...: keep the items
            mode, error, indices, count = (
                "fail",
                f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS],
                [],
                c.cutoff,
            )
        duration_ms = (time.perf_counter() - t0) * 1000.0
        with self._lock:
            if r.abandoned:
                log.warning(
                    "%s %s: handler finished after its timeout or release; result ignored",
                    c.processor.name,
                    c.member,
                )
                return
            r.settling = True
        try:
            self._record(c, mode, error, indices, count, started, duration_ms)
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            self._due_at[self._part_index[c.part.pfx]] = 0.0  # a retry or remainder may be due
            self._wake.set()

    def _record(
        self,
        c: ops.Claimed,
        mode: str,
        error: str | None,
        indices: list[int],
        count: int,
        started: float,
        duration_ms: float,
    ) -> None:
        proc = c.processor
        entry = ops.history_entry(c, int(started * 1000), duration_ms, mode == "ack", error)
        if mode == "ack":
            if self._settle(c, ops.ack_call(c, entry)) is not None:
                self.stats.delivered += 1
                self.stats.items += count
                log.info(
                    "%s %s: %d items in %.1f ms (attempt %d, %s)",
                    proc.name,
                    c.member,
                    count,
                    duration_ms,
                    c.attempt,
                    c.reason or "size",
                )
            return
        assert error is not None
        delay = backoff_seconds(proc, c.attempt)
        reply = self._settle(c, ops.nack_call(c, entry, int(delay * 1000), error, mode, indices))
        if reply is None:
            return
        outcome = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if mode == "decode":
            self.stats.quarantined += len(indices)
            log.error(
                "%s %s: %s; %d entries quarantined as dead letters", proc.name, c.member, error, len(indices)
            )
            return
        self.stats.failed += 1
        if mode == "partial":
            self.stats.partial += 1
            self.stats.items += count - len(indices)
        if outcome == "dead":
            self.stats.dead_lettered += 1
            log.error(
                "%s %s attempt %d failed: %s; moved to the dead-letter store (max_attempts=%d)",
                proc.name,
                c.member,
                c.attempt,
                error,
                proc.config.max_attempts,
            )
        elif outcome == "bisect":
            log.warning(
                "%s %s attempt %d failed: %s; retrying the first %s items alone",
                proc.name,
                c.member,
                c.attempt,
                error,
                int(reply[1]),
            )
        else:
            log.warning(
                "%s %s attempt %d failed: %s; retry in %.1fs", proc.name, c.member, c.attempt, error, delay
            )

    def _settle(self, c: ops.Claimed, call: ops.Call) -> Any:
        """Run an ack/nack, retrying through connection errors while the lease lasts.

        Returns the script reply, or None when the result could not be recorded (lease lost)."""
        delay = 0.05
        deadline = time.monotonic() + c.processor.config.lease_timeout
        while True:
            try:
                reply = self.batcher._execute(call)
            except NotReplicated as exc:
                log.warning("%s %s: result recorded on the primary only: %s", c.processor.name, c.member, exc)
                return ["ok"]
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() > deadline:
                    log.error(
                        "%s %s: cannot record the result (%s); the lease will expire and the flush "
                        "will be delivered again",
                        c.processor.name,
                        c.member,
                        exc,
                    )
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except RedisError as exc:  # e.g. the server is loading after a restart
                if time.monotonic() > deadline:
                    log.error("%s %s: cannot record the result: %s", c.processor.name, c.member, exc)
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            code = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if code == "lease_lost":
                self.stats.lease_lost += 1
                log.warning(
                    "%s %s: lease lost before the result was recorded; another worker owns it now",
                    c.processor.name,
                    c.member,
                )
                return None
            return reply

    # -- background threads ----------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Renew leases every third of the shortest lease timeout; enforce handler timeouts."""
        renew_every = min(p.config.lease_timeout for p in self.processors) / 3.0
        timeouts = [p.config.handler_timeout for p in self.processors if p.config.handler_timeout]
        tick = min([renew_every, *(t / 4 for t in timeouts), 0.5] if timeouts else [renew_every])
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
                    if not ops.extend_call(c).run(self.client):
                        log.warning("%s %s: lease lost during the handler", c.processor.name, c.member)
                except RedisError as exc:
                    log.warning("%s %s: heartbeat failed: %s", c.processor.name, c.member, exc)

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        expired: list[_Running] = []
        with self._lock:
            for key, r in list(self._inflight.items()):
                limit = r.claimed.processor.config.handler_timeout
                if limit and not r.settling and not r.abandoned and now - r.started > limit:
                    r.abandoned = True
                    expired.append(r)
                    del self._inflight[key]
        for r in expired:
            c = r.claimed
            limit = c.processor.config.handler_timeout
            self.stats.timed_out += 1
            error = f"HandlerTimeout: handler still running after {limit:g}s"
            started = time.time() - (now - r.started)
            self._record(c, "fail", error, [], c.cutoff, started, (now - r.started) * 1000.0)
            self._due_at[self._part_index[c.part.pfx]] = 0.0
            self._wake.set()

    def _listen(self) -> None:
        """Wake the main loop when a producer seals a sequence (pub/sub; a lost message only
        delays work until the next timed check)."""
        channels = sorted({p.keys.channel for p in self.processors})
        delay = 0.1
        while not self._stopping.is_set():
            pubsub = None
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(*channels)
                # (re)subscribed: wake-ups sent while we were not listening are lost, so look
                # at every partition once
                self._due_at = [0.0] * len(self.parts)
                self._wake.set()
                delay = 0.1
                while not self._stopping.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        data = msg.get("data")
                        pfx = data.decode() if isinstance(data, bytes) else str(data)
                        idx = self._part_index.get(pfx)
                        if idx is None:  # not ours (or an old publisher): check everything
                            self._due_at = [0.0] * len(self.parts)
                        else:
                            self._due_at[idx] = 0.0
                        self._wake.set()
            except Exception as exc:  # reconnect with backoff whatever went wrong
                log.debug("wake-up subscription failed: %s", exc)
                self._wake.set()
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _install_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self._stopping.is_set():
                log.warning("second signal: releasing unfinished flushes and exiting now")
                self._release_all()
                os._exit(1)
            log.info(
                "%s: warm shutdown, finishing %d in-flight flush(es) (grace %.0fs)",
                signal.Signals(signum).name,
                len(self._inflight),
                self.grace_period,
            )
            self.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore
