"""A full Redis (``maxmemory`` with ``noeviction``): adds are refused with a clear error, and a
worker that starts on it (sync or asyncio, with iterator jobs) serves what is stored instead of
waiting for its registration to be accepted.

Each test starts its own redis-server: a Redis 7 binary ($REDIS_SERVER, then every
redis-server on PATH: a virtualenv may put an older one first)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

import redis_batcher as rb
from redis_batcher import asyncio as aio
from redis_batcher.embedded import RedisServer, find_redis_server

from .test_async_api import arun
from .test_worker import wait_for

ITEM = "x" * 1000  # about 1 KB encoded
ROOM = 2_000_000  # bytes of headroom above what a fresh server uses


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def redis_binary(flags: bool) -> str | None:
    """A redis-server that understands script flags (Redis >= 7), or with ``flags=False`` one
    that does not."""
    seen: list[str] = []
    for candidate in (
        os.environ.get("REDIS_SERVER"),
        *(os.path.join(d, "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep) if d),
        find_redis_server(),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            path = os.path.abspath(candidate)  # not resolved: the binary reads its name
            if path not in seen:
                seen.append(path)
                if (_version(path) >= (7, 0)) == flags:
                    return path
    return None


@pytest.fixture
def server7() -> Iterator[RedisServer]:
    binary = redis_binary(flags=True)
    if binary is None:
        pytest.skip("no redis-server >= 7.0 (script flags) found")
    with RedisServer(binary=binary) as server:
        yield server


def limit_memory(client: redis.Redis) -> int:
    """Cap the server at what it uses now plus ROOM, refusing writes when full; the cap."""
    cap = int(client.info("memory")["used_memory"]) + ROOM
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", cap)
    return cap


def tighten(client: redis.Redis) -> None:
    """Lower the cap below what is used now, so Redis stays full until a good part of the data
    is gone (memory used hovers around the cap: a client's buffers shrink, and so on)."""
    client.config_set("maxmemory", used(client) - ROOM // 10)


def is_full(client: redis.Redis) -> bool:
    try:
        client.set("probe", "x")
    except OutOfMemoryError:
        return True
    client.delete("probe")
    return False


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def fill(proc: rb.Processor, prefix: str = "fill") -> tuple[int, OutOfMemoryError]:
    """Sealed sequences of 20 items until an add is refused: (sequences, the refusal)."""
    n = 0
    while True:
        try:
            proc.add_many(f"{prefix}{n}", [ITEM] * 20)
        except OutOfMemoryError as exc:
            return n, exc
        n += 1
        assert n < 10_000, "Redis never refused an add"


def run_guarded(target: Callable[[], Any], timeout: float = 30.0) -> Any:
    """``target()`` in a thread; fails instead of hanging when it does not return in time."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(target()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not return within {timeout:.0f}s"
    return out[0]


def counting_iterator(batcher: rb.Batcher) -> list[int]:
    seen: list[int] = []

    @batcher.iterator(name="walk", delay_between_batches=0.0)
    class Walk:
        def next_batch(self, cursor: str | None, batch_size: int) -> rb.Page:
            return rb.Page([1, 2], "end", True)

        def process(self, items: list[int], job: rb.JobContext) -> None:
            seen.extend(items)

    return seen


# -- a fresh worker drains a full Redis ------------------------------------------------------------


def test_a_fresh_worker_starts_and_drains_a_full_redis(
    server7: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    producer = rb.Batcher(server7.url, prefix="oom")
    proc = producer.processor(name="sink", max_batch_size=20, flush_interval=None)(lambda f: None)
    limit_memory(producer.client)
    stored, refused = fill(proc)
    # the processor registry is gone too (as if the producers had registered elsewhere): the
    # new worker's registration is refused while Redis is full
    producer.client.delete("oom:processors")
    more, refused = fill(proc, "again")
    stored += more
    tighten(producer.client)
    assert "maxmemory" in str(refused)  # redis-py's OutOfMemoryError, Redis' own words
    assert stored > 50 and is_full(producer.client)
    full = used(producer.client)

    worker_batcher = rb.Batcher(server7.url, prefix="oom")
    got: list[int] = []
    worker_batcher.processor(name="sink", max_batch_size=20, flush_interval=None)(
        lambda f: got.append(len(f.items))
    )
    seen = counting_iterator(worker_batcher)
    caplog.set_level(logging.INFO, logger="redis_batcher")
    w = rb.Worker(worker_batcher, concurrency=2, max_idle_wait=0.2)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(got) == stored, timeout=30)
        # once memory is free again, the registration refused at start is made
        wait_for(lambda: producer.client.hexists("oom:processors", "sink"), timeout=10)
    finally:
        w.stop()
        t.join(30)
    assert not t.is_alive()
    assert got == [20] * stored and w.stats.delivered == stored
    assert used(producer.client) < full - ROOM // 2
    assert not is_full(producer.client)
    assert seen == []  # no job was started: the runner got past its registration all the same
    assert "Redis is out of memory" in caplog.text
    assert "cannot reach Redis" not in caplog.text
    producer.close()
    worker_batcher.close()


def test_a_burst_worker_with_iterators_returns_on_a_full_redis(server7: RedisServer) -> None:
    b = rb.Batcher(server7.url, prefix="oom")
    got: list[int] = []
    proc = b.processor(name="sink", max_batch_size=20, flush_interval=None)(
        lambda f: got.append(len(f.items))
    )
    counting_iterator(b)
    limit_memory(b.client)
    b.client.delete("oom:processors")
    stored, _ = fill(proc)
    tighten(b.client)
    stats = run_guarded(lambda: rb.Worker(b, concurrency=2).run(burst=True))
    assert stats.delivered == stored and got == [20] * stored
    b.close()


def test_a_fresh_async_worker_starts_and_drains_a_full_redis(
    server7: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    producer = rb.Batcher(server7.url, prefix="oom")
    proc = producer.processor(name="sink", max_batch_size=20, flush_interval=None)(lambda f: None)
    limit_memory(producer.client)
    producer.client.delete("oom:processors")
    stored, _ = fill(proc)
    tighten(producer.client)
    full = used(producer.client)
    got: list[int] = []

    async def body() -> rb.WorkerStats:
        ab = aio.Batcher(aioredis.Redis(host="127.0.0.1", port=server7.port), prefix="oom")

        @ab.processor(name="sink", max_batch_size=20, flush_interval=None)
        async def sink(flush: rb.Flush) -> None:
            got.append(len(flush.items))

        @ab.iterator(name="walk")
        class Walk:
            async def next_batch(self, cursor: str | None, batch_size: int) -> rb.Page:
                return rb.Page([], "end", True)

            async def process(self, items: list[int], job: rb.JobContext) -> None:
                pass

        try:
            return await aio.Worker(ab, concurrency=2).run(burst=True)
        finally:
            await ab.aclose()

    caplog.set_level(logging.INFO, logger="redis_batcher")
    stats = arun(body, timeout=30)
    assert stats.delivered == stored and got == [20] * stored
    assert used(producer.client) < full - ROOM // 2
    assert "Redis is out of memory" in caplog.text and "cannot reach Redis" not in caplog.text
    producer.close()


def test_a_worker_still_waits_while_redis_cannot_be_reached(caplog: pytest.LogCaptureFixture) -> None:
    """A connection failure at start is no refusal: the worker waits, and says why."""
    with RedisServer() as server:
        url = server.url
    b = rb.Batcher(url, prefix="gone", connect_retry=0)
    b.processor(name="sink", flush_interval=None)(lambda f: None)
    w = rb.Worker(b)
    t = threading.Thread(target=w.run, kwargs={"burst": True}, daemon=True)
    t.start()
    try:
        wait_for(lambda: "cannot reach Redis" in caplog.text, timeout=10)
        assert t.is_alive() and not w.ready.is_set()
    finally:
        w.stop()
        t.join(10)
    assert not t.is_alive()
    assert "out of memory" not in caplog.text
