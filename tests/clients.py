"""The clients the API tests run on: a Redis server reachable by sync and async clients
(:class:`Backend`), and :func:`arun`, which runs an async test body in an event loop that fails
the test on errors it reports but nobody awaited.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import fakeredis
import redis
import redis.asyncio as aioredis

from redis_batcher import asyncio as aio

T = TypeVar("T")
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
