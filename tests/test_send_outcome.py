"""Connection failures tell whether the command ran: NotSent (connecting or writing failed:
retried within connect_retry, then raised) versus OutcomeUnknown (sent, reply lost: never
retried). Every test runs a real redis-server of its own, stopped, or paused with SIGSTOP so
that a command is sent and its reply times out, then resumed to show that the script ran."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

import redis_batcher as rb
from redis_batcher import Batcher, connection
from redis_batcher import asyncio as aio
from redis_batcher.testing import RedisServer
from tests.conftest import held_items

KINDS = ["link", "custom", "wait"]  # from a URL, a custom connection class, EVALSHA+WAIT


class Plain(redis.Connection):
    """A connection class of the application's own, in a pool it built: the link takes its
    connections from that pool."""


class AsyncPlain(aioredis.Connection):
    """The same for redis.asyncio."""


@pytest.fixture(autouse=True)
def check_idle_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The links check every connection before sending (not only those idle for a second):
    a request sent on a connection the server closed a moment ago has an unknown outcome."""
    monkeypatch.setattr(connection, "RECHECK_IDLE", 0.0)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(persistence=True) as s:  # a stopped server keeps what it had
        yield s


def sync_batcher(server: RedisServer, kind: str, **options: Any) -> Batcher:
    options.setdefault("connect_retry", 0.5)
    if kind == "custom":
        pool = redis.ConnectionPool(
            connection_class=Plain,
            port=server.port,
            socket_timeout=options.pop("socket_timeout", None),
            retry=Retry(NoBackoff(), 0),
        )
        batcher = Batcher(redis.Redis(connection_pool=pool), prefix="t", **options)
        assert batcher.executor.link is not None
        return batcher
    if kind == "wait":
        options.update(wait_replicas=1, wait_timeout=0.01)  # no replica: NotReplicated, but written
    return Batcher(server.url, prefix="t", **options)


def add(proc: rb.Processor, batch_id: str, item: Any) -> None:
    try:
        proc.add(batch_id, item)
    except rb.NotReplicated:
        pass  # the "wait" kind: the write happened on the primary


@contextmanager
def paused(server: RedisServer) -> Iterator[None]:
    """The server stopped by SIGSTOP: connections stay open, requests wait in its socket
    buffer and run once it is resumed."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def stored(server: RedisServer, proc: rb.Processor, base: str) -> list[Any]:
    """The items of ``base``'s sequence 0 as stored in Redis (decoded)."""
    probe = redis.Redis(port=server.port)
    try:
        return [proc.codec.decode(i) for i in held_items(probe, proc.keys.for_base(base), base, 0)]
    finally:
        probe.close()


@pytest.mark.parametrize("kind", KINDS)
def test_server_down_raises_not_sent_after_connect_retry(server: RedisServer, kind: str) -> None:
    batcher = sync_batcher(server, kind, connect_retry=0.5)
    proc = batcher.processor(name="p", max_batch_size=100, flush_interval=None)(lambda f: None)
    add(proc, "a", 1)
    server.stop()
    calls: list[Callable[[], Any]] = [
        lambda: proc.add("a", 2),
        lambda: proc.add_many("a", [3, 4]),
        lambda: proc.flush("a"),
        lambda: proc.delete("a::0"),
        lambda: proc.status("a"),
    ]
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(rb.NotSentConnectionError) as raised:
            call()
        # retried with backoff until connect_retry was over, then raised
        assert 0.3 < time.monotonic() - t0 < 3
        exc = raised.value
        assert isinstance(exc, redis.ConnectionError) and isinstance(exc, rb.BatcherError)
        assert isinstance(exc, rb.NotSentError) and not isinstance(exc, rb.OutcomeUnknownError)
        assert isinstance(exc.__cause__, redis.ConnectionError)
        assert not isinstance(exc.__cause__, rb.NotSentError)
    server.start()
    assert stored(server, proc, "a") == [1]  # nothing of the failed calls was written
    batcher.close()


@pytest.mark.parametrize("kind", KINDS)
def test_reply_lost_after_the_script_ran_is_outcome_unknown(server: RedisServer, kind: str) -> None:
    batcher = sync_batcher(server, kind, socket_timeout=0.3, connect_retry=5.0)
    proc = batcher.processor(name="p", max_batch_size=100, flush_interval=None)(lambda f: None)
    add(proc, "a", 1)  # registered, memory policy checked
    with pytest.raises((rb.BatchNotFound, rb.NotReplicated)):
        proc.flush("none")  # the flush script is in the server's cache (no NOSCRIPT below)
    calls: list[Callable[[], Any]] = [
        lambda: proc.add("a", 2),
        lambda: proc.add_many("a", [3, 4]),
        lambda: proc.flush("a"),
    ]
    for call in calls:
        # connections that answered just now (the link's, the pool's): the request goes out
        batcher.client.ping()
        proc.status("a")
        with paused(server):
            t0 = time.monotonic()
            with pytest.raises(rb.OutcomeUnknownTimeoutError) as raised:
                call()
            assert time.monotonic() - t0 < 2  # one socket timeout: never retried
            exc = raised.value
            assert isinstance(exc, redis.TimeoutError) and isinstance(exc, rb.OutcomeUnknownError)
            assert isinstance(exc.__cause__, redis.TimeoutError)
    # a new connection meets a paused server while connecting: nothing of the add was sent
    other = sync_batcher(server, kind, socket_timeout=0.2, connect_retry=0.1)
    other_proc = other.processor(name="p", max_batch_size=100, flush_interval=None)(lambda f: None)
    with paused(server):
        with pytest.raises(rb.NotSentTimeoutError):
            other_proc.add("b", 0)
    other.close()
    # the scripts ran once the server resumed: what the caller was told may have run, did
    wait_for(lambda: [b.status for b in proc.sequences("a")] == ["flushing"], timeout=3)
    assert proc.sequences("a")[0].item_count == 4
    assert stored(server, proc, "b") == []
    batcher.close()


def test_first_add_waits_for_redis_within_connect_retry(server: RedisServer) -> None:
    """The first add registers the processor and checks the memory policy: both go through
    connect_retry, so a producer started while Redis is briefly down does not fail."""
    server.stop()
    batcher = Batcher(server.url, prefix="t", connect_retry=8.0)
    proc = batcher.processor(name="p", max_batch_size=100, flush_interval=None)(lambda f: None)
    outcome: list[Any] = []
    t0 = time.monotonic()

    def producer() -> None:
        try:
            outcome.append(proc.add("a", 1))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(1.0)
    server.start()
    thread.join(timeout=15)
    assert len(outcome) == 1 and isinstance(outcome[0], rb.AddResult), outcome
    assert 1.0 <= time.monotonic() - t0 < 8.0
    assert set(batcher.registered()) == {"p"}
    batcher.close()


# -- asyncio ---------------------------------------------------------------------------------------


def async_batcher(server: RedisServer, kind: str, **options: Any) -> aio.Batcher:
    options.setdefault("connect_retry", 0.5)
    if kind == "custom":
        pool = aioredis.ConnectionPool(
            connection_class=AsyncPlain,
            port=server.port,
            socket_timeout=options.pop("socket_timeout", None),
            retry=aioredis.retry.Retry(NoBackoff(), 0),
        )
        ab = aio.Batcher(aioredis.Redis(connection_pool=pool), prefix="t", **options)
        assert ab.executor.link is not None
        return ab
    if kind == "wait":
        options.update(wait_replicas=1, wait_timeout=0.01)
    return aio.Batcher(server.url, prefix="t", **options)


async def aadd(proc: aio.AsyncProcessor, batch_id: str, item: Any) -> None:
    try:
        await proc.add(batch_id, item)
    except rb.NotReplicated:
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_async_server_down_raises_not_sent_after_connect_retry(server: RedisServer, kind: str) -> None:
    async def main() -> rb.Processor:
        ab = async_batcher(server, kind, connect_retry=0.5)
        proc = ab.processor(name="p", max_batch_size=100, flush_interval=None)(lambda f: None)
        await aadd(proc, "a", 1)
        server.stop()
        await asyncio.sleep(0.05)  # the event loop sees the connections closed
        t0 = time.monotonic()
        with pytest.raises(rb.NotSentConnectionError) as raised:
            await proc.add("a", 2)
        assert 0.3 < time.monotonic() - t0 < 3
        assert isinstance(raised.value.__cause__, redis.ConnectionError)
        # the group commit: concurrent adds share one round trip and its outcome
        group = await asyncio.gather(*(proc.add(f"g{i}", i) for i in range(5)), return_exceptions=True)
        assert all(isinstance(e, rb.NotSentConnectionError) for e in group), group
        with pytest.raises(rb.NotSentConnectionError):
            await proc.flush("a")
        with pytest.raises(rb.NotSentConnectionError):
            await proc.history("a")
        server.start()
        await ab.aclose()
        return proc.definition

    proc = asyncio.run(main())
    assert stored(server, proc, "a") == [1]  # nothing of the failed calls was written


@pytest.mark.parametrize("kind", KINDS)
def test_async_reply_lost_after_the_script_ran_is_outcome_unknown(server: RedisServer, kind: str) -> None:
    async def main() -> rb.Processor:
        ab = async_batcher(server, kind, socket_timeout=0.3, connect_retry=5.0)
        proc = ab.processor(name="p", max_batch_size=100, flush_interval=None)(lambda f: None)
        await aadd(proc, "a", 1)
        with paused(server):
            t0 = time.monotonic()
            with pytest.raises(rb.OutcomeUnknownError) as raised:
                await proc.add("a", 2)
            assert time.monotonic() - t0 < 2
            assert isinstance(raised.value, redis.TimeoutError | redis.ConnectionError)
        # the group commit's pipeline: every caller in it is told the outcome is unknown
        # a fresh connection after the lost one; two adds together, so that the batcher
        # collects each iteration's adds (a lone caller's would go at once, ahead of the rest)
        await asyncio.gather(aadd(proc, "a", 3), aadd(proc, "b", 0))
        with paused(server):
            group = await asyncio.gather(*(proc.add("a", 4 + i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(e, rb.OutcomeUnknownError) for e in group), group
        await ab.aclose()
        return proc.definition

    proc = asyncio.run(main())
    wait_for(lambda: stored(server, proc, "a") == [1, 2, 3, 4, 5, 6])
