"""An iterator walking a SQLite table (``$JOBS_DB``) and counting every processed row id in
Redis, for the kill -9 test of iterator jobs (run with ``redis-batcher worker``)."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import redis_batcher
from redis_batcher import JobContext, Page

PREFIX = "jobsapp"
ITERATOR = "walk"
SEEN_KEY = "jobs-test:seen"  # HASH row id -> times processed
BATCH_SIZE = 100
STEP_SECONDS = 0.02


def walk_page(db: sqlite3.Connection, cursor: str | None, batch_size: int) -> Page:
    """Keyset pagination over ``rows(id)``: the ids after ``cursor``, in order."""
    rows = db.execute(
        "SELECT id FROM rows WHERE id > ? ORDER BY id LIMIT ?", (int(cursor or 0), batch_size)
    ).fetchall()
    ids = [r[0] for r in rows]
    return Page(ids, str(ids[-1]) if ids else cursor, len(ids) < batch_size)


def make(connection: Any) -> tuple[redis_batcher.Batcher, redis_batcher.JobIterator]:
    batcher = redis_batcher.Batcher(connection, prefix=PREFIX)

    @batcher.iterator(
        name=ITERATOR, batch_size=BATCH_SIZE, delay_between_batches=0.0, lease_timeout=1.0, retry_backoff=0.05
    )
    class Walk:
        def __init__(self) -> None:
            self.db = sqlite3.connect(os.environ["JOBS_DB"])

        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            return walk_page(self.db, cursor, batch_size)

        def process(self, items: list[int], job: JobContext) -> None:
            pipe = batcher.client.pipeline(transaction=False)
            for row_id in items:
                pipe.hincrby(SEEN_KEY, str(row_id), 1)
            pipe.execute()
            time.sleep(STEP_SECONDS)

    return batcher, Walk


batcher, walk = make(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
