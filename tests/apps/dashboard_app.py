"""The app of the dashboard's browser test (``tests/test_dashboard_browser.py``), for
``redis-batcher worker`` and ``redis-batcher dashboard tests.apps.dashboard_app:batcher``:
``orders`` delivers what it gets, ``crm`` fails while ``FAIL_KEY`` exists (so its flushes become
dead letters until the test deletes it), and the ``walk`` iterator takes a slow step at a time."""

from __future__ import annotations

import os
import time

import redis_batcher
from redis_batcher import JobContext, Page

PREFIX = "dashapp"
FAIL_KEY = "dashapp-test:fail"

batcher = redis_batcher.Batcher(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0", prefix=PREFIX)


@batcher.processor(name="orders", max_batch_size=100, flush_interval=None)
def orders(flush: redis_batcher.Flush) -> None:
    pass


@batcher.processor(name="crm", max_batch_size=1, flush_interval=None, max_attempts=1)
def crm(flush: redis_batcher.Flush) -> None:
    if batcher.client.exists(FAIL_KEY):
        raise RuntimeError(f"crm rejected {flush.batch_id}")


@batcher.iterator(name="walk", batch_size=10, delay_between_batches=0.5)
class Walk:
    def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
        start = int(cursor or 0)
        return Page(list(range(start, start + batch_size)), str(start + batch_size), False)

    def process(self, items: list[int], job: JobContext) -> None:
        time.sleep(0.05)
