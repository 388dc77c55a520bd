"""A processor whose handler fails any flush holding the item ``"bad"``, for the metrics tests
(``redis-batcher worker tests.apps.metered:batcher --metrics-port PORT``)."""

from __future__ import annotations

import os

import redis_batcher

PREFIX = "metered"
PROCESSOR = "metered"

# the connection is lazy, and rebound by --redis-url
batcher = redis_batcher.Batcher(os.environ.get("REDIS_URL") or "redis://127.0.0.1:1/0", prefix=PREFIX)


@batcher.processor(
    name=PROCESSOR, max_batch_size=2, flush_interval=None, max_attempts=2, retry_backoff=0.05, partitions=2
)
def handle(flush: redis_batcher.Flush) -> None:
    if "bad" in flush.items:
        raise ValueError("bad item")
