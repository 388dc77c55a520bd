"""A garbage entry in a history list or in the processor registry (written by hand, by another
program, by a broken version) is skipped and reported; readers never crash on it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import fakeredis
import pytest
import redis.asyncio
from click.testing import CliRunner

import redis_batcher as rb
from redis_batcher import Batcher, Worker, ops
from redis_batcher import asyncio as aio
from redis_batcher.cli import main
from redis_batcher.testing import RedisServer

GARBAGE = [b"\xff\xfe", b"{not json", b"5", b'{"seq": 1}', b'{"seq": 1, "items": 2, "started_at": null}']


def test_history_skips_and_reports_unreadable_entries(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    batcher = Batcher(client, prefix="g")
    proc = batcher.processor(name="p", max_batch_size=2, flush_interval=None)(lambda f: None)
    proc.add_many("a", [1, 2])
    Worker(batcher).run(burst=True)
    key, _, _ = ops.history_range(proc, "a", 20)
    for entry in GARBAGE:
        client.lpush(key, entry)
    client.rpush(key, b"\xff")
    caplog.set_level(logging.WARNING, logger="redis_batcher")
    records = proc.history("a")
    assert [(r.sequence, r.item_count, r.success) for r in records] == [(0, 2, True)]
    (warning,) = [r.getMessage() for r in caplog.records if "history" in r.getMessage()]
    assert key in warning and "6" in warning

    if isinstance(client, fakeredis.FakeRedis):
        return
    port = client.connection_pool.connection_kwargs["port"]

    async def main_() -> list[rb.FlushRecord]:
        ab = aio.Batcher(redis.asyncio.Redis(port=port), definitions=batcher)
        try:
            return await ab.use(proc).history("a")
        finally:
            await ab.aclose()

    caplog.clear()
    assert [r.sequence for r in asyncio.run(main_())] == [0]
    assert any(key in r.getMessage() for r in caplog.records)


def test_registry_readers_skip_and_report_unreadable_entries(
    redis_server: RedisServer, real_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    batcher = Batcher(redis_server.url, prefix="g")
    proc = batcher.processor(name="good", max_batch_size=7, flush_interval=None)(lambda f: None)
    proc.add("a", 1)
    real_client.hset("g:processors", "bad", "{not json")
    real_client.hset("g:processors", "half", '{"name": "half"}')
    real_client.hset("g:processors", b"\xff\xfe", b"\xff")
    caplog.set_level(logging.WARNING, logger="redis_batcher")
    reader = Batcher(redis_server.url, prefix="g")
    assert set(reader.registered()) == {"good"}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "bad" in warned and "half" in warned and "g:processors" in warned
    assert reader.remote("good").config.max_batch_size == 7
    for name in ("bad", "half"):
        with pytest.raises(
            rb.UnknownProcessor, match=f"registry entry of processor '{name}'.*cannot be read"
        ):
            reader.remote(name)
    with pytest.raises(rb.UnknownProcessor, match="not registered"):
        reader.remote("nobody")

    result = CliRunner().invoke(main, ["ls", "--redis-url", redis_server.url, "--prefix", "g"])
    assert result.exit_code == 0, result.output
    assert "good" in result.stdout and "Traceback" not in result.output
    skipped = result.stderr.strip().splitlines()
    assert len(skipped) == 3 and all(line.startswith("skipped registry entry") for line in skipped)
    assert any("bad" in line and "not JSON" in line for line in skipped)
    result = CliRunner().invoke(
        main, ["status", "a", "-p", "bad", "--redis-url", redis_server.url, "--prefix", "g"]
    )
    assert result.exit_code == 2 and "cannot be read" in result.output
