"""A processor whose handler records every flush it receives in a Redis list outside the
batcher's key layout, so a test can check exactly-once delivery and per-batch ordering.

``redis-batcher worker tests.apps.ledger:batcher --redis-url URL`` serves it; :func:`produce`
is the body of one producer process (run with the multiprocessing "spawn" context).
"""

from __future__ import annotations

import os
import random
from typing import Any

import msgpack
import redis

import redis_batcher

PREFIX = "ledger"
PROCESSOR = "ledger"
MAX_BATCH_SIZE = 50
FLUSH_INTERVAL = 0.2
LEDGER_KEY = "ledger-test:flushes"  # LIST of msgpack [batch_id, sequence, flush_id, attempt, items]
COUNT_KEY = "ledger-test:items"  # items recorded so far (INCRBY in the same transaction)


def make(
    connection: str | redis.Redis | None,
) -> tuple[redis_batcher.Batcher, redis_batcher.Processor]:
    """A batcher with the ledger processor; the handler writes through the batcher's client,
    which the CLI rebinds with ``--redis-url`` before the worker starts."""
    batcher = redis_batcher.Batcher(connection, prefix=PREFIX)

    @batcher.processor(name=PROCESSOR, max_batch_size=MAX_BATCH_SIZE, flush_interval=FLUSH_INTERVAL)
    def record(flush: redis_batcher.Flush) -> None:
        entry = msgpack.packb(
            [flush.batch_id, flush.sequence, flush.flush_id, flush.attempt, flush.items], use_bin_type=True
        )
        pipe = batcher.client.pipeline(transaction=True)
        pipe.rpush(LEDGER_KEY, entry)
        pipe.incrby(COUNT_KEY, len(flush.items))
        pipe.execute()

    return batcher, record


# the connection is lazy: nothing is contacted at import time
batcher, processor = make(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")


def read_ledger(client: redis.Redis) -> list[tuple[str, int, str, int, list[Any]]]:
    """Every recorded flush, in the order the handlers ran."""
    out = []
    for raw in client.lrange(LEDGER_KEY, 0, -1):
        batch_id, sequence, flush_id, attempt, items = msgpack.unpackb(raw, raw=False)
        out.append((batch_id, sequence, flush_id, attempt, items))
    return out


def produce(idx: int, url: str, total: int, batch_ids: int, seed: int, start: Any = None) -> None:
    """Add ``total`` items ``{"p": idx, "n": counter, "b": batch_id}`` over ``batch_ids`` ids.

    Chunks of 1-120 items go to a random batch id, alternately as single ``add()`` calls and as
    one ``add_many()`` call (which may span several sequences). ``n`` counts per (producer,
    batch id), in add order. ``start`` is an optional barrier to start all producers together.
    """
    own, proc = make(url)
    rng = random.Random(seed)
    counters = [0] * batch_ids
    single = idx % 2 == 0
    sent = 0
    try:
        if start is not None:
            start.wait(30)
        while sent < total:
            k = min(rng.randint(1, 120), total - sent)
            b = rng.randrange(batch_ids)
            bid = f"b{b}"
            items = [{"p": idx, "n": counters[b] + i, "b": bid} for i in range(k)]
            counters[b] += k
            if single:
                for item in items:
                    proc.add(bid, item)
            else:
                proc.add_many(bid, items)
            single = not single
            sent += k
    finally:
        own.close()
