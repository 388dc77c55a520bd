"""Producers and workers refuse a Redis whose maxmemory-policy may evict queued items (real
redis-servers started with such a policy; fakeredis, which cannot tell, is not refused)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from click.testing import CliRunner

import redis_batcher as rb
from redis_batcher import Batcher, Worker
from redis_batcher import asyncio as aio
from redis_batcher.cli import main
from redis_batcher.testing import RedisClusterServers, RedisServer


@pytest.fixture(scope="module")
def lru_server() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--maxmemory-policy", "allkeys-lru"]) as s:
        yield s


@pytest.fixture
def lru(lru_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=lru_server.port)
    client.flushall()
    client.config_set("maxmemory-policy", "allkeys-lru")
    yield client
    client.close()


def make(batcher: Batcher) -> rb.Processor:
    return batcher.processor(name="p", max_batch_size=10, flush_interval=None)(lambda f: None)


def test_a_producer_refuses_an_evicting_policy_and_writes_nothing(
    lru_server: RedisServer, lru: redis.Redis
) -> None:
    batcher = Batcher(lru_server.url, prefix="m")
    proc = make(batcher)
    with pytest.raises(rb.EvictionPolicyError) as raised:
        proc.add("a", 1)
    text = str(raised.value)
    assert "maxmemory-policy is 'allkeys-lru'" in text and "noeviction" in text and "allow_eviction" in text
    assert isinstance(raised.value, rb.ConfigError) and raised.value.policy == "allkeys-lru"
    for call in (lambda: proc.add_many("a", [1, 2]), lambda: proc.flush("a"), batcher.check_memory_policy):
        with pytest.raises(rb.EvictionPolicyError):
            call()
    assert lru.dbsize() == 0  # nothing written: no item, no registry entry

    allowed = Batcher(lru_server.url, prefix="m", allow_eviction=True)
    assert make(allowed).add("a", 1).pending == 1
    allowed.check_memory_policy()
    batcher.close()
    allowed.close()


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru", "volatile-ttl"])
def test_noeviction_and_volatile_policies_are_accepted(
    lru_server: RedisServer, lru: redis.Redis, policy: str
) -> None:
    lru.config_set("maxmemory-policy", policy)
    batcher = Batcher(lru_server.url, prefix="m")
    assert make(batcher).add("a", 1).pending == 1
    batcher.close()


def test_the_policy_is_read_once_per_batcher(lru_server: RedisServer, lru: redis.Redis) -> None:
    lru.config_set("maxmemory-policy", "noeviction")
    batcher = Batcher(lru_server.url, prefix="m")
    proc = make(batcher)
    proc.add("a", 1)
    lru.config_set("maxmemory-policy", "allkeys-lru")
    assert proc.add("a", 2).pending == 2  # checked at the first write, not on every call
    with pytest.raises(rb.EvictionPolicyError):
        batcher.check_memory_policy()  # an explicit check reads it again
    batcher.close()


def test_a_worker_with_an_evicting_policy_exits_with_the_error(
    lru_server: RedisServer, lru: redis.Redis
) -> None:
    batcher = Batcher(lru_server.url, prefix="m")
    make(batcher)
    with pytest.raises(rb.EvictionPolicyError):
        Worker(batcher).run(burst=True)
    # a serving worker too: it exits instead of retrying
    outcome: list[BaseException] = []

    def serve() -> None:
        try:
            Worker(batcher, max_idle_wait=0.1).run()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], rb.EvictionPolicyError)
    assert lru.dbsize() == 0
    # the CLI: one line naming the setting, exit status 1
    result = CliRunner().invoke(
        main, ["worker", "tests.apps.slow:batcher", "--burst", "--redis-url", lru_server.url]
    )
    assert result.exit_code == 1, result.output
    assert "maxmemory-policy is 'allkeys-lru'" in result.output and "Traceback" not in result.output
    batcher.close()


def test_async_producer_and_worker_refuse_an_evicting_policy(
    lru_server: RedisServer, lru: redis.Redis
) -> None:
    async def main_() -> None:
        ab = aio.Batcher(lru_server.url, prefix="m")
        proc = ab.processor(name="p", max_batch_size=10, flush_interval=None)(lambda f: None)
        with pytest.raises(rb.EvictionPolicyError):
            await proc.add("a", 1)
        many = await asyncio.gather(*(proc.add(f"g{i}", i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(e, rb.EvictionPolicyError) for e in many), many
        with pytest.raises(rb.EvictionPolicyError):
            await ab.check_memory_policy()
        with pytest.raises(rb.EvictionPolicyError):
            await aio.Worker(ab).run(burst=True)
        assert lru.dbsize() == 0
        allowed = aio.Batcher(lru_server.url, prefix="m", allow_eviction=True)
        aproc = allowed.processor(name="p", max_batch_size=10, flush_interval=None)(lambda f: None)
        assert (await aproc.add("a", 1)).pending == 1
        await ab.aclose()
        await allowed.aclose()

    asyncio.run(main_())


def test_a_server_that_cannot_tell_is_not_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="redis_batcher")
    batcher = Batcher(fakeredis.FakeRedis(), prefix="m")  # no INFO, no CONFIG
    proc = make(batcher)
    assert proc.add("a", 1).pending == 1
    batcher.check_memory_policy()
    said = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG

    async def main_() -> None:
        ab = aio.Batcher(fakeredis.FakeAsyncRedis(), prefix="m")
        aproc = ab.processor(name="p", max_batch_size=10, flush_interval=None)(lambda f: None)
        assert (await aproc.add("a", 1)).pending == 1
        await ab.aclose()

    asyncio.run(main_())


def test_cluster_checks_every_primary(redis_cluster: RedisClusterServers) -> None:
    last = redis.Redis(port=redis_cluster.startup_nodes[-1][1])
    last.config_set("maxmemory-policy", "allkeys-lfu")
    try:
        batcher = Batcher(redis_cluster.url, prefix="mc", cluster=True)
        with pytest.raises(rb.EvictionPolicyError) as raised:
            batcher.check_memory_policy()
        assert raised.value.policy == "allkeys-lfu" and str(redis_cluster.startup_nodes[-1][1]) in str(
            raised.value
        )
        batcher.close()

        async def main_() -> Any:
            ab = aio.Batcher(redis_cluster.url, prefix="mc", cluster=True)
            try:
                await ab.check_memory_policy()
            finally:
                await ab.aclose()

        with pytest.raises(rb.EvictionPolicyError):
            asyncio.run(main_())
    finally:
        last.config_set("maxmemory-policy", "noeviction")
        last.close()
    ok = Batcher(redis_cluster.url, prefix="mc", cluster=True)
    ok.check_memory_policy()
    ok.close()
