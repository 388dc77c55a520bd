"""Processors served by the benchmark worker processes (``benchmarks.apps:batcher``).

Handlers record timings in Redis lists under ``bench:stats:`` (outside the batcher's layout).
"""

from __future__ import annotations

import os
import time

import redis

import redis_batcher

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
batcher = redis_batcher.Batcher(URL, prefix="bench")
stats = redis.Redis.from_url(URL)


@batcher.processor(name="idle", max_batch_size=1000, flush_interval=3600.0)
def idle(flush: redis_batcher.Flush) -> None:
    """Never due during a benchmark: these ids only make the delay queue large."""


@batcher.processor(name="wake", max_batch_size=10, flush_interval=None)
def wake(flush: redis_batcher.Flush) -> None:
    """Seal -> handler start: the sealing add's client timestamp is the last item."""
    stats.rpush("bench:stats:seal_ms", (time.time() - flush.items[-1]["t"]) * 1000.0)


@batcher.processor(name="interval", max_batch_size=1000, flush_interval=1.0)
def interval(flush: redis_batcher.Flush) -> None:
    """Interval lateness: handler start minus (first item's add time + 1 s)."""
    stats.rpush("bench:stats:late_ms", (time.time() - flush.items[0]["t"] - 1.0) * 1000.0)
