"""Poison items for the dead-letter chaos test (written against the dead-letter API:
``max_attempts``, ``max_deaths``, ``bisect_on_error``, ``redis_batcher.PartialFailure``).

- ``bisect`` (``bisect_on_error=True``): a flush holding ``RAISE`` raises; a flush holding
  ``KILL`` kills its worker process (``os._exit(1)``); otherwise it is recorded in the chaos
  ledger (``tests/apps/chaos.py``).
- ``partial``: records every item but ``RAISE`` and reports the ``RAISE`` positions with
  ``PartialFailure(failed=[...])``.
- ``afterdeath`` (``bisect_on_error=True``): records the flush, then, the first time only (a
  ``SETNX`` marker), kills its worker before the ack: a death *after* the side effects.

Serve with ``redis-batcher worker tests.apps.chaos_dead:batcher``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import redis

import redis_batcher
from tests.apps import chaos

PREFIX = "chaosdl"
DIED_KEY = "chaos:died:"
RAISE = -1
KILL = -2
MAX_BATCH_SIZE = 20
FLUSH_INTERVAL = 0.2
LEASE_TIMEOUT = 1.0
RETRY_BACKOFF = 0.1
RETRY_BACKOFF_MAX = 0.2
MAX_ATTEMPTS = 3
MAX_DEATHS = 2


def _record(client: redis.Redis, flush: redis_batcher.Flush, items: list[Any], started: float) -> None:
    entry = msgpack.packb(
        [
            flush.flush_id,
            flush.attempt,
            flush.batch_id,
            flush.sequence,
            items,
            os.getpid(),
            started,
            time.time(),
        ],
        use_bin_type=True,
    )
    pipe = client.pipeline(transaction=True)
    pipe.rpush(chaos.LEDGER_KEY, entry)
    pipe.incrby(chaos.COUNT_KEY, len(items))
    pipe.execute()


def make(
    connection: str | redis.Redis | None,
) -> tuple[redis_batcher.Batcher, dict[str, redis_batcher.Processor]]:
    batcher = redis_batcher.Batcher(connection, prefix=PREFIX)
    clients: dict[int, redis.Redis] = {}

    def ledger() -> redis.Redis:
        pid = os.getpid()
        if pid not in clients:
            clients[pid] = chaos.ledger_client()
        return clients[pid]

    options: dict[str, Any] = {
        "max_batch_size": MAX_BATCH_SIZE,
        "flush_interval": FLUSH_INTERVAL,
        "lease_timeout": LEASE_TIMEOUT,
        "retry_backoff": RETRY_BACKOFF,
        "retry_backoff_max": RETRY_BACKOFF_MAX,
        "max_attempts": MAX_ATTEMPTS,
        "max_deaths": MAX_DEATHS,
    }

    @batcher.processor(name="bisect", bisect_on_error=True, **options)
    def bisect(flush: redis_batcher.Flush) -> None:
        started = time.time()
        if KILL in flush.items:
            os._exit(1)
        if RAISE in flush.items:
            raise ValueError("poison item")
        _record(ledger(), flush, list(flush.items), started)

    @batcher.processor(name="partial", **options)
    def partial(flush: redis_batcher.Flush) -> None:
        started = time.time()
        failed = [i for i, item in enumerate(flush.items) if item == RAISE]
        good = [item for item in flush.items if item != RAISE]
        if good:
            _record(ledger(), flush, good, started)
        if failed:
            raise redis_batcher.PartialFailure(failed=failed)  # type: ignore[attr-defined,unused-ignore]

    @batcher.processor(name="afterdeath", bisect_on_error=True, **{**options, "max_deaths": 100})
    def afterdeath(flush: redis_batcher.Flush) -> None:
        started = time.time()
        client = ledger()
        _record(client, flush, list(flush.items), started)
        if client.set(DIED_KEY + flush.batch_id, os.getpid(), nx=True):
            os._exit(1)

    return batcher, {"bisect": bisect, "partial": partial, "afterdeath": afterdeath}


batcher, processors = make(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
