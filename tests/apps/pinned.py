"""An application that builds its Redis connection from its own setting, ``$APP_REDIS_URL``
(never ``$REDIS_URL``), as a service does: ``redis-batcher worker tests.apps.pinned:batcher``
(or ``:abatcher``, the asyncio twin) must serve that Redis whatever ``$REDIS_URL`` says.
``connect_retry`` is short so that a burst run against an unreachable Redis ends quickly."""

from __future__ import annotations

import os

import redis_batcher
from redis_batcher import asyncio as aio

PREFIX = "pinned"
PROCESSOR = "pinned"
MAX_BATCH_SIZE = 5
CONNECT_RETRY = 1.0
DELIVERED_KEY = "pinned-test:delivered"  # LIST of every item delivered, on the app's own Redis

# the connections are lazy: nothing is contacted at import time
URL = os.environ.get("APP_REDIS_URL") or "redis://127.0.0.1:6379/0"
batcher = redis_batcher.Batcher(URL, prefix=PREFIX, connect_retry=CONNECT_RETRY)


@batcher.processor(name=PROCESSOR, max_batch_size=MAX_BATCH_SIZE, flush_interval=None)
def record(flush: redis_batcher.Flush) -> None:
    batcher.client.rpush(DELIVERED_KEY, *flush.items)


abatcher = aio.Batcher(URL, connect_retry=CONNECT_RETRY, definitions=batcher)
