"""The asyncio twin of redis-batcher: ``Batcher``, its processors, and ``Worker``.

Mirrors ``redis.asyncio``: the same processor API, awaited. It runs the same Lua scripts
(:mod:`redis_batcher.scripts`) through the same call builders (:mod:`redis_batcher.ops`) as the
sync client, on the same key layout, and its worker shares the sync worker's scheduling and
bookkeeping (:mod:`redis_batcher.worker_core`). Processor *definitions* are kept on a sync
:class:`redis_batcher.Batcher`: pass a connected one as ``definitions=`` to use the same
processors from sync code too; by default a connectionless one holds them
(:meth:`redis_batcher.Batcher.definitions_only`) and everything goes through the async client.

Group commit: ``add()`` calls made by many coroutines in the same event-loop iteration are sent
together -- one EVALSHA per batch id, pipelined -- and each call returns only after Redis ran
*its* items, with its own :class:`~redis_batcher.AddResult` (or its own exception).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from . import batcher as sync_batcher
from . import ops, wake
from .batcher import default_url
from .codec import Codec, encode_item
from .connection import ClusterNodePool
from .errors import (
    ConfigError,
    NotReplicated,
    UnknownProcessor,
    error_text,
)
from .executor_async import AsyncExecutor
from .executor_core import ExecutorAttributes, check_client
from .job_model import JobStatus
from .job_runner_async import AsyncJobRunner
from .jobs import select_iterators
from .jobs_async import AsyncJobIterator, list_jobs
from .keys import parse_batch_id, validate_name
from .models import AddResult, BatchInfo, BatchStatus, DeadLetter, DeleteResult, FlushRecord, FlushResult
from .options import ProcessorOptions
from .processor import ADD_CHUNK, Processor
from .worker_core import (
    HandlerExit,
    Outcome,
    WorkerCore,
    WorkerStats,
    classify,
    decode_window,
    drain_ranges,
    log_handler_exit,
    make_flush,
    select_processors,
)

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no runtime dependency: annotations are not evaluated
    from typing_extensions import Unpack

__all__ = ["AsyncProcessor", "Batcher", "Worker", "WorkerStats"]

log = logging.getLogger("redis_batcher.worker")
T = TypeVar("T")


async def _aclose(resource: Any) -> None:
    """Close a ``redis.asyncio`` client or pubsub: ``aclose()`` since redis-py 5.0.1, the
    (since deprecated) awaitable ``close()`` before it."""
    close = getattr(resource, "aclose", None)
    await (close() if close is not None else resource.close())


class Batcher(ExecutorAttributes):
    """Async batcher: a ``redis.asyncio`` client, a key prefix and processors.

    ``connection``: a URL, a ``redis.asyncio.Redis`` / ``redis.asyncio.RedisCluster`` client (or
    fakeredis' async client), or ``None`` for ``$REDIS_URL``. ``definitions``: a sync
    :class:`redis_batcher.Batcher` whose processors (and prefix) this batcher shares; without
    it, a :meth:`~redis_batcher.Batcher.definitions_only` one (no connection: the processors'
    ``definition`` cannot be used from sync code). Other options as for the sync batcher;
    ``prefix`` defaults to the definitions' prefix, else "rb".
    """

    executor: AsyncExecutor

    def __init__(
        self,
        connection: str | Any | None = None,
        *,
        prefix: str | None = None,
        cluster: bool = False,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        connect_retry: float = 10.0,
        allow_eviction: bool = False,
        definitions: sync_batcher.Batcher | None = None,
        **redis_options: Any,
    ) -> None:
        # the I/O: script calls, retries, WAIT, group commit and the checks before the first
        # write (its prefix is set below, once known)
        self.executor = AsyncExecutor.from_options(
            prefix="",
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
            connect_retry=connect_retry,
            allow_eviction=allow_eviction,
        )
        self.connect(connection, cluster=cluster, **redis_options)
        if definitions is None:
            # the definitions need a sync Batcher but no connection of their own: everything
            # this batcher does goes through its async client
            definitions = sync_batcher.Batcher.definitions_only(prefix=prefix or "rb")
        elif prefix is not None and validate_name("prefix", prefix) != definitions.prefix:
            raise ConfigError(
                f"prefix {prefix!r} differs from the definitions' prefix {definitions.prefix!r}"
            )
        self.definitions = definitions
        self.prefix = definitions.prefix
        if self.is_cluster and wait_replicas and not ClusterNodePool.supports(aioredis.cluster.ClusterNode):
            # WAIT must follow the script on its connection: a connection of the node's own
            raise ConfigError("wait_replicas on an asyncio Redis Cluster needs redis-py 6 or later")
        self.executor.prefix = self.prefix

    def connect(
        self, connection: str | Any | None = None, *, cluster: bool = False, **redis_options: Any
    ) -> None:
        """(Re)bind to a URL or an async client; the CLI uses this for ``--redis-url``."""
        if connection is None:
            connection = default_url()
        if isinstance(connection, str):
            # never re-send a command after a connection error (see the sync Batcher)
            redis_options.setdefault("retry", aioredis.retry.Retry(NoBackoff(), 0))
            # redis-py 8's default 5 s socket timeout wraps every read and write in timeout
            # machinery; like the sync client, wait for replies without one unless asked to.
            redis_options.setdefault("socket_timeout", None)
            factory = aioredis.RedisCluster if cluster else aioredis.Redis
            client: Any = factory.from_url(connection, **redis_options)
            self.url: str | None = connection
        else:
            client, self.url = connection, None
        check_client(client)
        self.executor.bind(client)

    def __repr__(self) -> str:
        return f"<async Batcher prefix={self.prefix!r} processors={sorted(self.definitions.processors)}>"

    # -- processors ------------------------------------------------------------------------------

    @overload
    def processor(self, fn: Callable[..., Any], /) -> AsyncProcessor: ...

    @overload
    def processor(
        self, fn: None = None, /, **options: Unpack[ProcessorOptions]
    ) -> Callable[[Callable[..., Any]], AsyncProcessor]: ...

    def processor(
        self, fn: Callable[..., Any] | None = None, /, **options: Unpack[ProcessorOptions]
    ) -> AsyncProcessor | Callable[[Callable[..., Any]], AsyncProcessor]:
        """Decorator, as :meth:`redis_batcher.Batcher.processor` (handlers may be ``async def``);
        returns an :class:`AsyncProcessor`."""
        define = self.definitions.processor(**options)
        if fn is not None:
            return self.use(define(fn))
        return lambda handler: self.use(define(handler))

    def use(self, proc: Processor | str) -> AsyncProcessor:
        """The async face of a processor defined on the definitions batcher (or its name)."""
        if isinstance(proc, str):
            proc = self.definitions.get_processor(proc)
        if self.definitions.processors.get(proc.name) is not proc:
            raise UnknownProcessor(f"processor {proc.name!r} is not defined on this batcher's definitions")
        return AsyncProcessor(self, proc)

    @property
    def processors(self) -> dict[str, AsyncProcessor]:
        return {name: AsyncProcessor(self, p) for name, p in self.definitions.processors.items()}

    def get_processor(self, name: str) -> Processor:
        return self.definitions.get_processor(name)

    # -- iterator jobs (redis_batcher.jobs_async) ---------------------------------------------------

    def iterator(self, *, name: str, **options: Any) -> Callable[[type], AsyncJobIterator]:
        """Class decorator, as :meth:`redis_batcher.Batcher.iterator` (methods may be
        ``async def``); returns an :class:`~redis_batcher.jobs_async.AsyncJobIterator`."""
        define = self.definitions.iterator(name=name, **options)
        return lambda cls: AsyncJobIterator(self, define(cls))

    def use_iterator(self, name: str) -> AsyncJobIterator:
        """The async face of an iterator defined on the definitions batcher."""
        return AsyncJobIterator(self, self.definitions.iterators[name])

    async def jobs(self, status: str | None = None, limit: int = 50) -> list[JobStatus]:
        """As :meth:`redis_batcher.Batcher.jobs`, awaited."""
        return await list_jobs(self, status, limit)

    async def batch_ids(self, processor: str) -> AsyncIterator[str]:
        """Active base ids of a processor (SSCAN over each partition, never KEYS)."""
        async for bid in self.use(processor).batch_ids():
            yield bid

    async def register(self, processors: Iterable[Processor] | None = None) -> None:
        """Publish processor configs to ``<prefix>:processors`` (the CLI reads it)."""
        for proc in processors if processors is not None else list(self.definitions.processors.values()):
            self.executor.registered.discard(proc.name)
            await self.executor.ensure_registered(proc)

    async def check_layout(self) -> int:
        """As :meth:`redis_batcher.Batcher.check_layout`, awaited: raises
        :class:`~redis_batcher.LayoutMismatch` when Redis holds another version's data layout
        under the prefix."""
        return await self.executor.check_layout()

    async def check_memory_policy(self) -> None:
        """As :meth:`redis_batcher.Batcher.check_memory_policy`, awaited: raises
        :class:`~redis_batcher.EvictionPolicyError` when Redis (any primary of a cluster) may
        evict queued items, unless ``allow_eviction=True``."""
        await self.executor.check_memory_policy()

    async def aclose(self) -> None:
        """Close the connection pool and the lone-add connections."""
        await self.executor.close_links()
        await _aclose(self.client)


class AsyncProcessor:
    """A processor used from asyncio: the sync :class:`~redis_batcher.Processor` API, awaited."""

    def __init__(self, batcher: Batcher, definition: Processor) -> None:
        self.batcher = batcher
        self.definition = definition
        self.name = definition.name
        self.config = definition.config
        self.keys = definition.keys

    def __repr__(self) -> str:
        return f"<AsyncProcessor {self.name!r}>"

    def __call__(self, flush: Any) -> Any:
        return self.definition.handler(flush)

    @property
    def codec(self) -> Codec:
        return self.definition.codec

    @property
    def handler(self) -> Callable[..., Any]:
        return self.definition.handler

    def encode(self, items: Iterable[Any]) -> list[bytes]:
        """Encode items, raising before anything is written if one is invalid."""
        return self.definition.encode(items)

    async def add(self, batch_id: str, item: Any) -> AddResult:
        """Append one item. Concurrent calls are coalesced (group commit); this one returns when
        Redis has run its item, with its own result (or raises its own error)."""
        base, _ = parse_batch_id(batch_id)
        data = encode_item(self.codec, item, self.config.max_item_bytes)
        return await self.batcher.executor.add(self.definition, base, [data])

    async def add_many(self, batch_id: str, items: Iterable[Any]) -> AddResult:
        """Append many items in order (group-committed like :meth:`add`; above 10,000 items in
        atomic chunks of 10,000)."""
        base, _ = parse_batch_id(batch_id)
        encoded = self.definition.encode(items)
        if not encoded:
            return AddResult(base, None, 0, 0, False, None, 0)
        if len(encoded) <= ADD_CHUNK:
            return await self.batcher.executor.add(self.definition, base, encoded)
        results = [
            await self.batcher.executor.add(self.definition, base, encoded[i : i + ADD_CHUNK])
            for i in range(0, len(encoded), ADD_CHUNK)
        ]
        return ops.combine_adds(base, results)

    async def flush(self, batch_id: str) -> FlushResult:
        """Seal the accumulating sequence now (see :meth:`redis_batcher.Processor.flush`)."""
        base, seq = parse_batch_id(batch_id)
        await self.batcher.executor.ensure_registered(self.definition)
        return ops.parse_flush(
            batch_id, base, await self.batcher.executor.execute(ops.flush_call(self.definition, base, seq))
        )

    async def _snapshot(self, batch_id: str) -> tuple[str, list[BatchInfo], BatchInfo | None]:
        base, _ = parse_batch_id(batch_id)
        reply = await self.batcher.executor.execute(ops.status_call(self.definition, base), wait=False)
        active, done = ops.parse_status(base, reply)
        return base, active, done

    async def status(self, batch_id: str) -> BatchStatus | None:
        """Active sequences with counts and times, or ``None``."""
        base, active, done = await self._snapshot(batch_id)
        return BatchStatus(base, active, self.config, done) if active else None

    async def sequences(self, batch_id: str) -> list[BatchInfo]:
        """The last completed sequence (if kept) and the active ones."""
        _, active, done = await self._snapshot(batch_id)
        return ([done] if done else []) + active

    async def pending(self, batch_id: str) -> int:
        """Items of the base id not yet delivered."""
        st = await self.status(batch_id)
        return 0 if st is None else st.pending

    async def history(self, batch_id: str, limit: int = 20) -> list[FlushRecord]:
        """Flush attempts, newest first."""
        if not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive int, got {limit!r}")
        base, _ = parse_batch_id(batch_id)
        key, start, stop = ops.history_range(self.definition, base, limit)
        client = self.batcher.client
        with ops.reading(key):
            raw = await self.batcher.executor.command(key, lambda: client.lrange(key, start, stop))
        return ops.parse_history(raw, key)

    async def delete(self, batch_id: str) -> DeleteResult:
        """Delete a base id or one ``base::N`` (refused while flushing or pending)."""
        base, seq = parse_batch_id(batch_id)
        await self.batcher.executor.first_write()
        reply = await self.batcher.executor.execute(ops.delete_call(self.definition, base, seq))
        return ops.parse_delete(reply)

    async def batch_ids(self) -> AsyncIterator[str]:
        """Active base ids (SSCAN over each partition, never KEYS)."""
        for part in self.keys.parts:
            with ops.reading(part.ids):
                found = [raw async for raw in self.batcher.client.sscan_iter(part.ids, count=500)]
            for raw in found:
                yield raw.decode() if isinstance(raw, bytes) else raw

    # -- dead letters (the sync Processor's, awaited: the same steps, from redis_batcher.ops) ----

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead letters of this processor, newest first (without their items)."""
        return await self.batcher.executor.drive(ops.dead_letters_steps(self.definition, limit))

    async def dead_letter(self, dead_id: str) -> DeadLetter:
        """One dead letter with its items (entries the codec cannot read stay ``bytes``)."""
        return await self.batcher.executor.drive(ops.dead_letter_steps(self.definition, dead_id))

    async def replay_dead(self, dead_id: str) -> int:
        """Put a dead letter's items back into its batch id as a new sequence, due now; returns
        the new sequence number."""
        return await self.batcher.executor.drive(ops.replay_dead_steps(self.definition, dead_id))

    async def purge_dead(self, dead_id: str | None = None) -> int:
        """Delete one dead letter, or all of them with ``None``; returns how many were deleted."""
        return await self.batcher.executor.drive(ops.purge_dead_steps(self.definition, dead_id))


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


class Worker(WorkerCore):
    """The asyncio worker: ``async def`` handlers run on the event loop (``concurrency`` at a
    time), sync handlers in a thread pool. Claims, heartbeats, acks and retries are the sync
    worker's (shared :class:`~redis_batcher.worker_core.WorkerCore`); ``handler_timeout``
    cancels an async handler's task. ``prefetch_multiplier``: flushes claimed ahead, as in the
    sync :class:`~redis_batcher.Worker`. ``await worker.run()`` until :meth:`stop` (or
    SIGTERM/SIGINT when run in the main thread); ``run(burst=True)`` delivers what is due and
    returns. ``processors`` / ``iterators`` limit what it serves, as on the sync worker."""

    def __init__(
        self,
        batcher: Batcher,
        *,
        concurrency: int = 4,
        processors: Iterable[str] | None = None,
        max_idle_wait: float = 5.0,
        grace_period: float = 30.0,
        prefetch_multiplier: int = 1,
        iterators: Iterable[str] | None = None,
    ) -> None:
        chosen = select_iterators(batcher.definitions.iterators, iterators)
        super().__init__(
            select_processors(batcher.definitions, processors),
            concurrency=concurrency,
            max_idle_wait=max_idle_wait,
            grace_period=grace_period,
            jobs=bool(chosen),
            prefetch_multiplier=prefetch_multiplier,
            wait_replicas=batcher.wait_replicas,
        )
        self._slots: asyncio.Semaphore | None = None
        self.batcher = batcher
        self.client: Any = batcher.client
        self._inflight: dict[str, _Running] = {}
        # iterator jobs run as tasks of their own runner (redis_batcher.jobs_async)
        self.jobs = (
            AsyncJobRunner(batcher, chosen, concurrency=concurrency, grace_period=grace_period)
            if chosen
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
        ``grace_period``, releasing the rest). ``burst=True``: deliver what is due, return."""
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
        try:
            await self._register()
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
            for s in signals:
                loop.remove_signal_handler(s)
            self.log_stop()
        return self.stats

    async def _register(self) -> None:
        """As the sync worker's: checks the memory policy, waits while Redis cannot be
        reached, serves anyway when it refuses the write (a full Redis), retrying at the full
        checks."""
        delay = 0.1
        while not self._stopping:
            try:
                await self.batcher.check_memory_policy()
                await self.batcher.check_layout()
                await self.batcher.register(self.processors)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("cannot reach Redis (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except RedisError as exc:
                self.registration_refused(exc)
                return

    async def _register_again(self) -> None:
        try:
            await self.batcher.register(self.processors)
        except RedisError as exc:
            self.registration_retried(exc)
        else:
            self.registration_retried(None)

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
            except RedisError as exc:  # claim anyway: the claim reports and retries a failure
                log.debug("wake-up token of %s: %s", self.parts[idx][1].pfx, exc)
                taken = True
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
            except RedisError as exc:
                self.claim_failed(idx, now, exc)
                continue
            claimed, due_now = self.claimed(idx, owner, reply, now, seen)
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
            log.debug("handler traceback", exc_info=True)
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
                outcome = await self._deliver(c)
            except asyncio.CancelledError:
                return None  # released at shutdown: the lease was given back
            except BaseException as exc:  # Redis unreachable while draining, ...: keep the items
                outcome = Outcome("fail", error_text(exc), [], c.cutoff)
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
        delay = 0.05
        deadline = time.monotonic() + c.processor.config.lease_timeout
        while True:
            try:
                return self.reply_code(c, await self.batcher.executor.execute(call))
            except NotReplicated as exc:
                log.warning("%s %s: result recorded on the primary only: %s", c.processor.name, c.member, exc)
                return [b"ok"]
            except RedisError as exc:
                if time.monotonic() > deadline:
                    log.error(
                        "%s %s: cannot record the result (%s); it will be redelivered",
                        c.processor.name,
                        c.member,
                        exc,
                    )
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                call = ops.without_claim(call)

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
        try:
            if await self.batcher.executor.execute(ops.release_call(r.claimed), wait=False):
                self.stats.released += 1
                log.warning("%s %s: released unfinished flush", r.claimed.processor.name, r.claimed.member)
        except RedisError as exc:
            log.warning("%s: could not release (%s); its lease will expire", r.claimed.member, exc)
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
                        log.warning("%s %s: lease lost during the handler", c.processor.name, c.member)
                except RedisError as exc:
                    log.warning("%s %s: heartbeat failed: %s", c.processor.name, c.member, exc)

    async def _listen(self) -> None:
        """As the sync worker's: wake-ups of the partitions served here (redis_batcher.wake)."""

        def heard(data: Any) -> None:
            self.on_wake(data)
            self._poke()

        def ready() -> None:
            self.on_subscribed()
            self._poke()

        await wake.alisten(self.client, self.channels, heard, ready)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed: list[int] = []

        def on_signal(signum: int) -> None:
            if self._stopping:
                log.warning("second signal: releasing unfinished flushes and exiting now")
                self.forced = True
                self.grace_period = 0.0
                self._poke()
                return
            log.info("%s: warm shutdown (grace %.0fs)", signal.Signals(signum).name, self.grace_period)
            self.stop()

        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(s, functools.partial(on_signal, s))
                installed.append(s)
            except (NotImplementedError, RuntimeError):
                pass
        return installed
