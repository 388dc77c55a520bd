"""What every system of ``benchmarks.end_to_end`` shares: the items, the batch ids and the
handler's bookkeeping.

Each handler (redis-batcher's, the WATCH/MULTI consumer's, the celery-batches task's) calls
:func:`record` once per batch: one pipelined round trip that counts the items and batches,
appends the batch's item ids (packed, 4 bytes each) to one string, and keeps the latest
handling time (``ZADD GT``, so concurrent handlers keep the maximum). The benchmark reads the
ids back once at the end (:func:`handled_ids`) for exact counts: lost = items whose id never
came back, duplicates = ids handled more than once. This costs the handler a few arguments per
batch, not one per item (a ``SADD`` of every id cost the handlers more CPU than the systems
measured).
"""

from __future__ import annotations

import array
import collections
import time
from typing import Any

import redis

STATS = "e2e:stats:"
HANDLED = STATS + "handled"  # STRING: items handled (duplicates included)
CALLS = STATS + "calls"  # STRING: handler calls (batches delivered)
IDS = STATS + "ids"  # STRING: item ids handled, uint32 little endian, appended per batch
LAST = STATS + "last"  # ZSET: member "t" scored with the latest handling time (epoch seconds)
STATS_KEYS = (HANDLED, CALLS, IDS, LAST)

N_BATCH_IDS = 20
BATCH_IDS = [f"b{i:02d}" for i in range(N_BATCH_IDS)]

URL_ENV = "E2E_REDIS_URL"


def make_item(item_id: int) -> dict[str, Any]:
    """A small event (~100 bytes as msgpack, like benchmarks.add_path's) with a unique id."""
    return {
        "id": item_id,
        "user": "user:000042",
        "type": "click",
        "page": "/products/12345?ref=home",
        "ts": 1795876429.123,
        "session": "9f8e7d6c5b4a",
    }


def batch_id_for(call: int, producer: int) -> str:
    """Batch id of a producer's ``call``-th add: round robin, producers offset from each other."""
    return BATCH_IDS[(call + producer * (N_BATCH_IDS // 4)) % N_BATCH_IDS]


def pack_ids(ids: list[int]) -> bytes:
    packed = array.array("I", ids)
    if packed.itemsize != 4:  # pragma: no cover - every platform we run on has a 4-byte uint
        raise RuntimeError("array('I') is not 4 bytes here")
    return packed.tobytes()


def record(client: redis.Redis, ids: list[int]) -> None:
    """A handler's whole bookkeeping for one batch, in one round trip."""
    if not ids:
        return
    pipe = client.pipeline(transaction=False)
    pipe.incrby(HANDLED, len(ids))
    pipe.incr(CALLS)
    pipe.append(IDS, pack_ids(ids))
    pipe.zadd(LAST, {"t": time.time()}, gt=True)
    pipe.execute()


def handled_ids(client: redis.Redis, expected: int) -> tuple[int, int, int]:
    """(handled, unique, duplicates) among the ids 0..expected-1 handled so far."""
    raw: Any = client.get(IDS)
    ids = array.array("I")
    ids.frombytes(raw or b"")
    counts = collections.Counter(ids)
    unique = sum(1 for i in counts if i < expected)
    return len(ids), unique, len(ids) - unique
