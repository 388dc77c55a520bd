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

import sys
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import redis.asyncio as aioredis
from redis.backoff import NoBackoff

from . import batcher as sync_batcher
from . import calls, dead_ops, ops, pause_ops
from .batcher import default_url
from .codec import Codec, encode_item
from .connection import ClusterNodePool
from .errors import (
    ConfigError,
    UnknownProcessor,
)
from .executor_async import AsyncExecutor
from .executor_core import ExecutorAttributes, check_client, client_from_url
from .job_model import JobStatus
from .jobs_async import AsyncJobIterator, list_jobs
from .keys import parse_batch_id, validate_name
from .models import (
    AddResult,
    BatchInfo,
    BatchStatus,
    DeadLetter,
    DeleteResult,
    FlushRecord,
    FlushResult,
    WorkerStats,
)
from .options import ProcessorOptions
from .processor import ADD_CHUNK, Processor
from .worker_async import Worker
from .worker_registry import WorkerInfo, workers_steps

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no runtime dependency: annotations are not evaluated
    from typing_extensions import Unpack

__all__ = ["AsyncProcessor", "Batcher", "Worker", "WorkerStats"]

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
            client: Any = client_from_url(factory, connection, redis_options)
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

    async def workers(self) -> list[WorkerInfo]:
        """As :meth:`redis_batcher.Batcher.workers`, awaited: the live workers of the prefix."""
        return await self.executor.drive(workers_steps(self.prefix))

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
        """Seal the accumulating sequence now and retry the ones waiting for a retry (see
        :meth:`redis_batcher.Processor.flush`)."""
        base, seq = parse_batch_id(batch_id)
        await self.batcher.executor.ensure_registered(self.definition)
        return ops.parse_flush(
            batch_id, base, await self.batcher.executor.execute(ops.flush_call(self.definition, base, seq))
        )

    async def retry(self, batch_id: str) -> FlushResult:
        """Make the sequences waiting for a retry due now, attempt counts kept (see
        :meth:`redis_batcher.Processor.retry`)."""
        base, seq = parse_batch_id(batch_id)
        await self.batcher.executor.ensure_registered(self.definition)
        return ops.parse_flush(
            batch_id, base, await self.batcher.executor.execute(ops.retry_call(self.definition, base, seq))
        )

    async def pause(self) -> bool:
        """Stop the workers from claiming this processor's flushes until :meth:`resume` (see
        :meth:`redis_batcher.Processor.pause`); False when it was paused already."""
        return await self.batcher.executor.drive(pause_ops.pause_steps(self.definition, True))

    async def resume(self) -> bool:
        """Let the workers claim again, waking them; False when it was not paused."""
        return await self.batcher.executor.drive(pause_ops.pause_steps(self.definition, False))

    async def paused(self) -> bool:
        """Whether the processor (any of its partitions) is paused."""
        return await self.batcher.executor.drive(pause_ops.paused_steps(self.definition))

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

    async def history(self, batch_id: str, limit: int | None = 20) -> list[FlushRecord]:
        """Flush attempts, newest first: the newest ``limit``, or every one kept with ``None``."""
        key, start, stop = ops.history_range(self.definition, parse_batch_id(batch_id)[0], limit)
        client = self.batcher.client
        with calls.reading(key):
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
            with calls.reading(part.ids):
                found = [raw async for raw in self.batcher.client.sscan_iter(part.ids, count=500)]
            for raw in found:
                yield raw.decode() if isinstance(raw, bytes) else raw

    # -- dead letters (the sync Processor's, awaited: the same steps, from redis_batcher.ops) ----

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead letters of this processor, newest first (without their items)."""
        return await self.batcher.executor.drive(dead_ops.dead_letters_steps(self.definition, limit))

    async def dead_letter(self, dead_id: str) -> DeadLetter:
        """One dead letter with its items (entries the codec cannot read stay ``bytes``)."""
        return await self.batcher.executor.drive(dead_ops.dead_letter_steps(self.definition, dead_id))

    async def replay_dead(self, dead_id: str) -> int:
        """Put a dead letter's items back into its batch id as a new sequence, due now; returns
        the new sequence number."""
        return await self.batcher.executor.drive(dead_ops.replay_dead_steps(self.definition, dead_id))

    async def purge_dead(self, dead_id: str | None = None) -> int:
        """Delete one dead letter, or all of them with ``None``; returns how many were deleted."""
        return await self.batcher.executor.drive(dead_ops.purge_dead_steps(self.definition, dead_id))
