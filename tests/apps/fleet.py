"""One processor whose handler records each flush in a Redis list, for the worker registry,
health and recycling tests (``redis-batcher worker tests.apps.fleet:batcher``)."""

from __future__ import annotations

import os

import redis_batcher

PREFIX = "fleet"
PROCESSOR = "ping"
DONE_KEY = "fleet-test:done"  # LIST: one entry per flush delivered

# the connection is lazy, and rebound by --redis-url
batcher = redis_batcher.Batcher(os.environ.get("REDIS_URL") or "redis://127.0.0.1:1/0", prefix=PREFIX)


@batcher.processor(name=PROCESSOR, max_batch_size=1, flush_interval=None)
def ping(flush: redis_batcher.Flush) -> None:
    batcher.client.rpush(DONE_KEY, flush.batch_id)
