"""A processor whose handler calls ``sys.exit(3)`` for the batch id "bad" (a handler that
ends the process the wrong way): ``redis-batcher worker tests.apps.exiting:batcher --burst``
must count it as a failed attempt and return."""

from __future__ import annotations

import os
import sys

import redis

import redis_batcher

PREFIX = "exiting"
PROCESSOR = "exiting"
MAX_ATTEMPTS = 2


def make(
    connection: str | redis.Redis | None,
) -> tuple[redis_batcher.Batcher, redis_batcher.Processor]:
    batcher = redis_batcher.Batcher(connection, prefix=PREFIX)

    @batcher.processor(
        name=PROCESSOR, max_batch_size=2, flush_interval=None, max_attempts=MAX_ATTEMPTS, retry_backoff=0.01
    )
    def handler(flush: redis_batcher.Flush) -> None:
        if flush.batch_id == "bad":
            sys.exit(3)

    return batcher, handler


batcher, processor = make(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
