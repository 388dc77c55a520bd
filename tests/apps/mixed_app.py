"""A batcher with one processor and two iterators, for the worker's --processor/--iterator
selection (tests/test_cli_jobs.py runs ``redis-batcher worker tests.apps.mixed_app:batcher``)."""

from __future__ import annotations

import redis_batcher
from redis_batcher import Flush, JobContext, Page

batcher = redis_batcher.Batcher("redis://127.0.0.1:1/0", prefix="mixed")  # rebound by --redis-url
delivered: list[object] = []
walked: list[str] = []


@batcher.processor(name="events", max_batch_size=1)
def events(flush: Flush) -> None:
    delivered.extend(flush.items)


def _one_page(name: str) -> type:
    class OnePage:
        def next_batch(self, cursor: str | None, batch_size: int) -> Page:
            return Page([name], "end", True)

        def process(self, items: list[str], job: JobContext) -> None:
            walked.append(f"{name}:{job.job_id}")

    return OnePage


alpha = batcher.iterator(name="alpha", delay_between_batches=0.0)(_one_page("alpha"))
beta = batcher.iterator(name="beta", delay_between_batches=0.0)(_one_page("beta"))
