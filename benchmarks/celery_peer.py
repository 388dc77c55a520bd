"""The celery-batches peer of the end-to-end benchmark (Redis broker).

Producers call ``collect.delay(batch_id, item)``; one worker started by the benchmark::

    E2E_REDIS_URL=URL celery -A benchmarks.celery_peer worker --pool solo --concurrency 1 \\
        -Q e2e-celery --without-gossip --without-mingle --without-heartbeat

buffers the messages and runs ``collect`` with up to ``flush_every=100`` requests, or with what
it has every ``flush_interval=1`` s. celery-batches has no per-key grouping: ``batch_id`` is only
carried along, so a batch mixes batch ids. Prefetching is unlimited (``worker_prefetch_multiplier
= 0``), as celery-batches needs to ever see ``flush_every`` messages at once.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery_batches import Batches, SimpleRequest

from benchmarks.e2e_common import URL_ENV, record

QUEUE = "e2e-celery"
WARMUP_QUEUE = "e2e-celery-warmup"  # producers open their connection here; nobody consumes it
FLUSH_EVERY = 100
FLUSH_INTERVAL = 1.0

URL = os.environ.get(URL_ENV) or "redis://127.0.0.1:6379/0"
app = Celery("e2e_celery", broker=URL, set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_prefetch_multiplier=0,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
)
@app.task(  # type: ignore[untyped-decorator]
    base=Batches, name="e2e.collect", flush_every=FLUSH_EVERY, flush_interval=FLUSH_INTERVAL
)
def collect(requests: list[SimpleRequest]) -> None:
    """The batch handler: the same no-op-plus-bookkeeping as redis-batcher's."""
    items: list[Any] = [req.args[1] for req in requests]
    record([item["id"] for item in items])
