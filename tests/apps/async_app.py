"""An asyncio app for ``redis-batcher worker tests.apps.async_app:abatcher``: an ``async def``
handler that takes ~1.5 s, leaves start/finish markers and records every flush it completes
in a ledger list, through the async batcher's own client (rebound by ``--redis-url``)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgpack
import redis

import redis_batcher
from redis_batcher import asyncio as aio

PREFIX = "async-app"
PROCESSOR = "aslow"
STARTED_KEY = "async-app-test:started"
FINISHED_KEY = "async-app-test:finished"
LEDGER_KEY = "async-app-test:ledger"  # LIST of msgpack [batch_id, sequence, flush_id, items]
HANDLER_SECONDS = 1.5


def make(connection: str | Any | None) -> tuple[aio.Batcher, aio.AsyncProcessor]:
    abatcher = aio.Batcher(connection, prefix=PREFIX)

    @abatcher.processor(name=PROCESSOR, max_batch_size=100, flush_interval=None)
    async def handle(flush: redis_batcher.Flush) -> None:
        marker = f"{flush.batch_id}::{flush.sequence}:{len(flush.items)}"
        await abatcher.client.set(STARTED_KEY, marker)
        await asyncio.sleep(HANDLER_SECONDS)
        entry = msgpack.packb(
            [flush.batch_id, flush.sequence, flush.flush_id, flush.items], use_bin_type=True
        )
        await abatcher.client.rpush(LEDGER_KEY, entry)
        await abatcher.client.set(FINISHED_KEY, marker)

    return abatcher, handle


def read_ledger(client: redis.Redis) -> list[tuple[str, int, str, list[Any]]]:
    out = []
    for raw in client.lrange(LEDGER_KEY, 0, -1):
        batch_id, sequence, flush_id, items = msgpack.unpackb(raw, raw=False)
        out.append((batch_id, sequence, flush_id, items))
    return out


# the connections are lazy: nothing is contacted at import time
abatcher, processor = make(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
