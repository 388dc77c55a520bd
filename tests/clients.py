"""The clients the API tests run on: a Redis server reachable by sync and async clients
(:class:`Backend`), and one face over the sync :class:`redis_batcher.Batcher` and the asyncio
one (:class:`ClientApi`), so that tests/test_api.py states each case once and runs it on both.

The asyncio face runs each coroutine to completion on an event loop the test owns
(:class:`OwnedLoop`), which fails the test on errors the loop reports but nobody awaited, as
:func:`arun` does for a whole async test body.
"""

from __future__ import annotations

import asyncio
import gc
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

import fakeredis
import redis
import redis.asyncio as aioredis

import redis_batcher as rb
from redis_batcher import asyncio as aio
from redis_batcher.keys import KeySpace

T = TypeVar("T")
Handler = Callable[[rb.Flush], Any]
Body = Callable[[aio.Batcher], Awaitable[None]]


# -- event loops ---------------------------------------------------------------------------------


def check_reported(reported: list[dict[str, Any]]) -> None:
    assert not reported, f"the event loop reported unhandled errors: {reported}"


def arun(body: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run ``body()`` in a fresh event loop; fail on errors the loop reports but nobody awaited
    (an exception set on a future or task that was never retrieved)."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        result = await asyncio.wait_for(body(), timeout)
        gc.collect()  # futures/tasks holding unretrieved exceptions report when collected
        await asyncio.sleep(0)
        check_reported(reported)
        return result

    return asyncio.run(main())


class OwnedLoop:
    """An event loop one test owns: :meth:`run` runs an awaitable to completion on it, so sync
    test code can call the asyncio API; :meth:`close` fails on errors the loop reported that
    nobody awaited, then closes it as ``asyncio.run`` would."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.reported: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.reported.append(context))

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(awaitable, self.timeout))

    def close(self) -> None:
        try:
            gc.collect()  # futures/tasks holding unretrieved exceptions report when collected
            self.run(asyncio.sleep(0))
            check_reported(self.reported)
        finally:
            self.loop.run_until_complete(cancel_other_tasks())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()


async def cancel_other_tasks() -> None:
    """Cancel the loop's other tasks and wait for them to end."""
    left = asyncio.all_tasks() - {asyncio.current_task()}
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)


async def alist(it: AsyncIterator[T]) -> list[T]:
    return [x async for x in it]


# -- servers -------------------------------------------------------------------------------------


@dataclass
class Backend:
    """One Redis server, real (``kind`` "real": the session's redis-server, flushed) or fake (a
    fresh fakeredis server), reachable both by a sync client (snapshots, fault injection) and
    by async clients built inside a test's event loop."""

    kind: str
    sync: Any
    port: int
    fake_server: Any = None

    @classmethod
    def open(cls, kind: str, port: int) -> Backend:
        if kind == "real":
            sync: Any = redis.Redis(host="127.0.0.1", port=port)
            sync.flushall()
            return cls("real", sync, port)
        server = fakeredis.FakeServer()
        return cls("fake", fakeredis.FakeRedis(server=server), 0, server)

    def close(self) -> None:
        self.sync.close()

    def client(self, **options: Any) -> Any:
        """A new sync client of this server."""
        if self.kind == "real":
            return redis.Redis(host="127.0.0.1", port=self.port, **options)
        return fakeredis.FakeRedis(server=self.fake_server, **options)

    def aclient(self, cls: type | None = None, **options: Any) -> Any:
        """A new async client of this server (of ``cls``, a subclass of :meth:`aclient_class`)."""
        if self.kind == "real":
            return (cls or aioredis.Redis)(host="127.0.0.1", port=self.port, **options)
        return (cls or fakeredis.FakeAsyncRedis)(server=self.fake_server, **options)

    def aclient_class(self) -> type:
        return aioredis.Redis if self.kind == "real" else fakeredis.FakeAsyncRedis

    def run(self, body: Body, *, client_cls: type | None = None, **batcher_options: Any) -> None:
        """``body(async_batcher)`` with prefix "t" on this backend, in a fresh event loop."""

        async def main() -> None:
            async with connected(self, client_cls=client_cls, **batcher_options) as ab:
                await body(ab)

        arun(main)


@asynccontextmanager
async def connected(
    backend: Backend, *, client_cls: type | None = None, **batcher_options: Any
) -> AsyncIterator[aio.Batcher]:
    batcher_options.setdefault("prefix", "t")
    ab = aio.Batcher(backend.aclient(client_cls), **batcher_options)
    try:
        yield ab
    finally:
        await ab.aclose()


# -- one face over both clients ------------------------------------------------------------------


class ProcessorApi(Protocol):
    """A processor as an API test uses it: the sync :class:`redis_batcher.Processor`'s methods."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> rb.ProcessorConfig: ...
    @property
    def keys(self) -> KeySpace: ...
    @property
    def interval_ms(self) -> int: ...
    def __call__(self, flush: rb.Flush) -> Any: ...
    def add(self, batch_id: str, item: Any) -> rb.AddResult: ...
    def add_many(self, batch_id: str, items: Iterable[Any]) -> rb.AddResult: ...
    def flush(self, batch_id: str) -> rb.FlushResult: ...
    def retry(self, batch_id: str) -> rb.FlushResult: ...
    def status(self, batch_id: str) -> rb.BatchStatus | None: ...
    def sequences(self, batch_id: str) -> list[rb.BatchInfo]: ...
    def pending(self, batch_id: str) -> int: ...
    def history(self, batch_id: str, limit: int | None = 20) -> list[rb.FlushRecord]: ...
    def delete(self, batch_id: str) -> rb.DeleteResult: ...
    def batch_ids(self) -> Iterable[str]: ...
    def pause(self) -> bool: ...
    def resume(self) -> bool: ...
    def paused(self) -> bool: ...


class ClientApi(ABC):
    """What an API test sees of a client: a batcher with prefix "t" on ``backend``, its
    processors, a burst of its worker, and ``client``, a sync client of the same server for
    looking at what Redis holds."""

    kind: str

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.client = backend.sync

    @overload
    def processor(self, fn: Handler, /) -> ProcessorApi: ...
    @overload
    def processor(self, fn: None = None, /, **options: Any) -> Callable[[Handler], ProcessorApi]: ...
    def processor(
        self, fn: Handler | None = None, /, **options: Any
    ) -> ProcessorApi | Callable[[Handler], ProcessorApi]:
        """As :meth:`redis_batcher.Batcher.processor`: a decorator, bare or with options."""
        if fn is not None:
            return self.define(fn, None)
        return lambda handler: self.define(handler, options)

    @abstractmethod
    def define(self, handler: Handler, options: dict[str, Any] | None) -> ProcessorApi:
        """A processor of ``handler``; ``None``: the bare decorator's defaults."""

    @property
    @abstractmethod
    def processors(self) -> dict[str, Any]: ...

    @abstractmethod
    def recorder(self, got: list[rb.Flush]) -> Handler:
        """A handler that appends each flush to ``got``, of the kind this client's worker runs
        natively (an ``async def`` for asyncio)."""

    @abstractmethod
    def batch_ids(self, processor: str) -> list[str]: ...

    @abstractmethod
    def burst(self, **worker_options: Any) -> rb.WorkerStats:
        """Run this client's worker until nothing is due."""

    @abstractmethod
    def batcher_of(self, connection: Any, **options: Any) -> Any:
        """A new batcher of this client's kind on ``connection`` (closed with the test)."""

    @abstractmethod
    def new_client(self, **options: Any) -> Any:
        """A new Redis client of this kind's on the backend (closed with the test)."""

    @abstractmethod
    def close(self) -> None: ...


class SyncApi(ClientApi):
    """The sync :class:`redis_batcher.Batcher` itself, on the backend's sync client."""

    kind = "sync"

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self.batcher = rb.Batcher(backend.sync, prefix="t")
        self.opened: list[Any] = []

    def define(self, handler: Handler, options: dict[str, Any] | None) -> ProcessorApi:
        if options is None:
            return self.batcher.processor(handler)
        return self.batcher.processor(**options)(handler)

    @property
    def processors(self) -> dict[str, Any]:
        return dict(self.batcher.processors)

    def recorder(self, got: list[rb.Flush]) -> Handler:
        return got.append

    def batch_ids(self, processor: str) -> list[str]:
        return list(self.batcher.batch_ids(processor))

    def burst(self, **worker_options: Any) -> rb.WorkerStats:
        return rb.Worker(self.batcher, **worker_options).run(burst=True)

    def batcher_of(self, connection: Any, **options: Any) -> rb.Batcher:
        return rb.Batcher(connection, **options)

    def new_client(self, **options: Any) -> Any:
        client = self.backend.client(**options)
        self.opened.append(client)
        return client

    def close(self) -> None:
        for client in self.opened:
            client.close()


class AsyncApi(ClientApi):
    """The asyncio :class:`redis_batcher.asyncio.Batcher` on an async client of the backend,
    each call run to completion on the test's own event loop."""

    kind = "async"

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self.loop = OwnedLoop()
        self.opened: list[Any] = []
        self.batcher = self.loop.run(self.connect())

    async def connect(self) -> aio.Batcher:
        # built inside the loop: whatever the client binds to a loop binds to this one
        return aio.Batcher(self.backend.aclient(), prefix="t")

    def define(self, handler: Handler, options: dict[str, Any] | None) -> ProcessorApi:
        if options is None:
            return AwaitedProcessor(self.batcher.processor(handler), self.loop)
        return AwaitedProcessor(self.batcher.processor(**options)(handler), self.loop)

    @property
    def processors(self) -> dict[str, Any]:
        return self.batcher.processors

    def recorder(self, got: list[rb.Flush]) -> Handler:
        async def record(flush: rb.Flush) -> None:
            got.append(flush)

        return record

    def batch_ids(self, processor: str) -> list[str]:
        return self.loop.run(alist(self.batcher.batch_ids(processor)))

    def burst(self, **worker_options: Any) -> rb.WorkerStats:
        return self.loop.run(aio.Worker(self.batcher, **worker_options).run(burst=True))

    def batcher_of(self, connection: Any, **options: Any) -> aio.Batcher:
        async def make() -> aio.Batcher:
            return aio.Batcher(connection, **options)

        return self.loop.run(make())

    def new_client(self, **options: Any) -> Any:
        client = self.backend.aclient(**options)
        self.opened.append(client)
        return client

    def close(self) -> None:
        try:
            self.loop.run(self.batcher.aclose())
            for client in self.opened:
                # redis-py 5.0.0 has no aclose(), only the awaitable close() later deprecated
                close = getattr(client, "aclose", None) or client.close
                self.loop.run(close())
        finally:
            self.loop.close()


class AwaitedProcessor:
    """An :class:`~redis_batcher.asyncio.AsyncProcessor` with the sync processor's methods:
    each runs the async one to completion on the test's loop."""

    def __init__(self, proc: aio.AsyncProcessor, loop: OwnedLoop) -> None:
        self.proc = proc
        self.run = loop.run
        self.name = proc.name
        self.config = proc.config
        self.keys = proc.keys
        self.interval_ms = proc.definition.interval_ms

    def __call__(self, flush: rb.Flush) -> Any:
        return self.proc(flush)

    def add(self, batch_id: str, item: Any) -> rb.AddResult:
        return self.run(self.proc.add(batch_id, item))

    def add_many(self, batch_id: str, items: Iterable[Any]) -> rb.AddResult:
        return self.run(self.proc.add_many(batch_id, items))

    def flush(self, batch_id: str) -> rb.FlushResult:
        return self.run(self.proc.flush(batch_id))

    def retry(self, batch_id: str) -> rb.FlushResult:
        return self.run(self.proc.retry(batch_id))

    def status(self, batch_id: str) -> rb.BatchStatus | None:
        return self.run(self.proc.status(batch_id))

    def sequences(self, batch_id: str) -> list[rb.BatchInfo]:
        return self.run(self.proc.sequences(batch_id))

    def pending(self, batch_id: str) -> int:
        return self.run(self.proc.pending(batch_id))

    def history(self, batch_id: str, limit: int | None = 20) -> list[rb.FlushRecord]:
        return self.run(self.proc.history(batch_id, limit))

    def delete(self, batch_id: str) -> rb.DeleteResult:
        return self.run(self.proc.delete(batch_id))

    def batch_ids(self) -> list[str]:
        return self.run(alist(self.proc.batch_ids()))

    def pause(self) -> bool:
        return self.run(self.proc.pause())

    def resume(self) -> bool:
        return self.run(self.proc.resume())

    def paused(self) -> bool:
        return self.run(self.proc.paused())


def open_api(kind: str, backend: Backend) -> ClientApi:
    """The face of client ``kind`` ("sync" or "async") on ``backend``."""
    return SyncApi(backend) if kind == "sync" else AsyncApi(backend)
