"""A processor whose handler takes ~1.5 s and leaves markers, to test the warm shutdown."""

from __future__ import annotations

import os
import time

import redis

import redis_batcher

PREFIX = "slow"
PROCESSOR = "slow"
STARTED_KEY = "slow-test:started"
FINISHED_KEY = "slow-test:finished"
HANDLER_SECONDS = 1.5


def make(
    connection: str | redis.Redis | None,
) -> tuple[redis_batcher.Batcher, redis_batcher.Processor]:
    batcher = redis_batcher.Batcher(connection, prefix=PREFIX)

    @batcher.processor(name=PROCESSOR, max_batch_size=100, flush_interval=None)
    def slow(flush: redis_batcher.Flush) -> None:
        batcher.client.set(STARTED_KEY, f"{flush.batch_id}::{flush.sequence}:{len(flush.items)}")
        time.sleep(HANDLER_SECONDS)
        batcher.client.set(FINISHED_KEY, f"{flush.batch_id}::{flush.sequence}:{len(flush.items)}")

    return batcher, slow


batcher, processor = make(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
