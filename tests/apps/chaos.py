"""Processors for the chaos suite (``tests/test_chaos.py``).

Every handler records each flush it completes in a Redis list outside the batcher's key layout
(``chaos:ledger``), with one MULTI/EXEC, through its own client (``$REDIS_URL``, no automatic
retries). A handler that is told to fail raises *before* recording anything, so the ledger holds
exactly the deliveries whose handler returned. A record is msgpack
``[flush_id, attempt, batch_id, sequence, items, pid, started, ended]`` (times: ``time.time()``).

Processors (serve one with ``redis-batcher worker tests.apps.chaos:batcher --processor NAME``):

- ``chaos``: the ledger handler; fails a random ``$CHAOS_FAIL_RATE`` of calls and sleeps a random
  0..``$CHAOS_HANDLER_SLEEP`` seconds before and after recording (so SIGKILLs land mid-handler). On its first
  attempt a flush of a batch id starting with ``hold`` sets ``chaos:hold:<batch_id>`` (the pid)
  and sleeps ``HOLD_SECONDS`` before recording, so a test can break Redis mid-handler.
- ``lease``: on its first attempt, sequence 0 of a batch id starting with ``stop`` sets
  ``chaos:started:<batch_id>:<sequence>:<attempt>`` (the pid) and sleeps ``STOP_SECONDS``, so a
  test can SIGSTOP the worker past its lease; ``stopboth*`` ids do it on every attempt.
- ``race``: records start and end of every handler; an item < 0 makes the handler run
  ``SLOW_SECONDS`` (longer than its lease: only the heartbeat keeps it).

:func:`produce` is the body of one producer process (multiprocessing "spawn" context).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

import redis_batcher

PREFIX = "chaos"
LEDGER_KEY = "chaos:ledger"
COUNT_KEY = "chaos:items"  # items recorded so far (INCRBY in the same transaction)
HOLD_KEY = "chaos:hold:"
STARTED_KEY = "chaos:started:"

MAX_BATCH_SIZE = 50
FLUSH_INTERVAL = 0.2
LEASE_TIMEOUT = 1.0
RETRY_BACKOFF = 0.05
RETRY_BACKOFF_MAX = 0.4
HOLD_SECONDS = 0.8
STOP_SECONDS = 3.0
RACE_BATCH_SIZE = 20
RACE_LEASE = 2.0
SLOW_SECONDS = 2.6  # > RACE_LEASE
NEVER_DEAD = 1_000_000  # max_attempts / max_deaths that a test never reaches
ID_SPACE = 10_000_000  # item id = producer index * ID_SPACE + counter

FAIL_RATE = float(os.environ.get("CHAOS_FAIL_RATE") or 0.0)
HANDLER_SLEEP = float(os.environ.get("CHAOS_HANDLER_SLEEP") or 0.0)  # max random handler time (s)


@dataclass(frozen=True)
class Record:
    """One ledger entry: a handler that returned."""

    flush_id: str
    attempt: int
    batch_id: str
    sequence: int
    items: list[Any]
    pid: int
    started: float
    ended: float


def ledger_client(url: str | None = None) -> redis.Redis:
    """A client that never re-sends a command after a connection error (a lost EXEC reply
    must make the handler fail, not record the flush twice behind its back)."""
    return redis.Redis.from_url(
        url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
        retry=Retry(NoBackoff(), 0),
        socket_timeout=10,
        socket_connect_timeout=2,
    )


def record(client: redis.Redis, flush: redis_batcher.Flush, started: float) -> None:
    entry = msgpack.packb(
        [
            flush.flush_id,
            flush.attempt,
            flush.batch_id,
            flush.sequence,
            list(flush.items),
            os.getpid(),
            started,
            time.time(),
        ],
        use_bin_type=True,
    )
    pipe = client.pipeline(transaction=True)
    pipe.rpush(LEDGER_KEY, entry)
    pipe.incrby(COUNT_KEY, len(flush.items))
    pipe.execute()


def decode_record(raw: bytes) -> Record:
    flush_id, attempt, batch_id, sequence, items, pid, started, ended = msgpack.unpackb(raw, raw=False)
    return Record(flush_id, attempt, batch_id, sequence, items, pid, started, ended)


def make(
    connection: str | redis.Redis | None,
) -> tuple[redis_batcher.Batcher, dict[str, redis_batcher.Processor]]:
    """The chaos batcher and its processors; the handlers' ledger client is created lazily from
    ``$REDIS_URL`` in the process that runs them."""
    batcher = redis_batcher.Batcher(connection, prefix=PREFIX)
    clients: dict[int, redis.Redis] = {}

    def ledger() -> redis.Redis:
        pid = os.getpid()
        if pid not in clients:
            clients[pid] = ledger_client()
        return clients[pid]

    @batcher.processor(
        name="chaos",
        max_batch_size=MAX_BATCH_SIZE,
        flush_interval=FLUSH_INTERVAL,
        lease_timeout=LEASE_TIMEOUT,
        retry_backoff=RETRY_BACKOFF,
        retry_backoff_max=RETRY_BACKOFF_MAX,
        # random kills and 20 % failures must never dead-letter anything in these tests
        max_attempts=NEVER_DEAD,
        max_deaths=NEVER_DEAD,
    )
    def chaos(flush: redis_batcher.Flush) -> None:
        started = time.time()
        if FAIL_RATE and random.random() < FAIL_RATE:
            raise RuntimeError("chaos: injected handler failure")
        if HANDLER_SLEEP:
            time.sleep(random.uniform(0, HANDLER_SLEEP))
        client = ledger()
        if flush.attempt == 1 and flush.batch_id.startswith("hold"):
            client.set(HOLD_KEY + flush.batch_id, os.getpid())
            time.sleep(HOLD_SECONDS)
        record(client, flush, started)
        if HANDLER_SLEEP:  # a kill now loses the ack of a recorded flush: a redelivery
            time.sleep(random.uniform(0, HANDLER_SLEEP))

    @batcher.processor(
        name="lease",
        max_batch_size=MAX_BATCH_SIZE,
        flush_interval=None,
        lease_timeout=LEASE_TIMEOUT,
        retry_backoff=RETRY_BACKOFF,
        retry_backoff_max=RETRY_BACKOFF_MAX,
    )
    def lease(flush: redis_batcher.Flush) -> None:
        started = time.time()
        client = ledger()
        if flush.sequence == 0 and (
            (flush.attempt == 1 and flush.batch_id.startswith("stop"))
            or flush.batch_id.startswith("stopboth")
        ):
            client.set(f"{STARTED_KEY}{flush.batch_id}:{flush.sequence}:{flush.attempt}", os.getpid())
            time.sleep(STOP_SECONDS)
        record(client, flush, started)

    @batcher.processor(
        name="race",
        max_batch_size=RACE_BATCH_SIZE,
        flush_interval=FLUSH_INTERVAL,
        lease_timeout=RACE_LEASE,
        retry_backoff=RETRY_BACKOFF,
        retry_backoff_max=RETRY_BACKOFF_MAX,
    )
    def race(flush: redis_batcher.Flush) -> None:
        started = time.time()
        time.sleep(SLOW_SECONDS if any(i < 0 for i in flush.items) else 0.02)
        record(ledger(), flush, started)

    return batcher, {"chaos": chaos, "lease": lease, "race": race}


# the connection is lazy: nothing is contacted at import time
batcher, processors = make(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")


def produce(
    idx: int,
    url: str,
    total: int,
    batch_ids: int,
    seed: int,
    out_path: str,
    start: Any = None,
    stop: Any = None,
    max_seconds: float = 120.0,
) -> None:
    """Add up to ``total`` unique int items (``idx * ID_SPACE + n``) over ``batch_ids`` ids
    ``b0..``, in chunks of 1-120 items alternately as single ``add()`` calls and one
    ``add_many()``, until ``total``, the ``stop`` event or ``max_seconds``.

    A call that raises is not retried with the same items (it may have been applied): its ids
    are recorded as *uncertain* and production goes on with new ids after a short sleep. Writes
    msgpack ``{"returned": [...], "times": [...], "uncertain": [...], "errors": n}`` to
    ``out_path``: ``returned`` are the ids whose call returned, ``times`` when it returned.
    """
    own, procs = make(url)
    proc = procs["chaos"]
    rng = random.Random(seed)
    returned: list[int] = []
    times: list[float] = []
    uncertain: list[int] = []
    errors = 0
    n = 0
    single = idx % 2 == 0
    try:
        if start is not None:
            start.wait(30)
        deadline = time.monotonic() + max_seconds
        while n < total and not (stop is not None and stop.is_set()) and time.monotonic() < deadline:
            k = min(rng.randint(1, 120), total - n)
            bid = f"b{rng.randrange(batch_ids)}"
            ids = [idx * ID_SPACE + n + i for i in range(k)]
            n += k
            if single:
                for item in ids:
                    try:
                        proc.add(bid, item)
                    except (RedisError, OSError):
                        uncertain.append(item)
                        errors += 1
                        time.sleep(0.05)
                        continue
                    returned.append(item)
                    times.append(time.time())
            else:
                try:
                    proc.add_many(bid, ids)
                except (RedisError, OSError):
                    uncertain.extend(ids)
                    errors += 1
                    time.sleep(0.05)
                else:
                    returned.extend(ids)
                    now = time.time()
                    times.extend([now] * k)
            single = not single
    finally:
        with open(out_path, "wb") as f:
            f.write(
                msgpack.packb(
                    {"returned": returned, "times": times, "uncertain": uncertain, "errors": errors},
                    use_bin_type=True,
                )
            )
        own.close()
