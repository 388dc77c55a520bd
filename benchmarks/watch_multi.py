"""The baseline of the end-to-end benchmark: a batch accumulator "you would write yourself" with
WATCH/MULTI/EXEC on plain Redis, and its BLPOP consumer.

Producers (:class:`WatchMultiBatcher`): per batch id a list ``wm:acc:<id>``; an add is
``WATCH key`` -> ``LLEN key`` -> ``MULTI RPUSH key items... [RENAME key wm:batch:<id>:<uuid>,
RPUSH wm:ready <that name>] EXEC`` (three round trips), repeated from the WATCH when another
producer touched the key in between (``WatchError``). A list that reaches ``max_batch_size`` is
renamed into a ready batch whose name goes onto the ready queue. :meth:`WatchMultiBatcher.flush`
seals a partial list the same way (the tail flush).

Consumers (``python -m benchmarks.watch_multi --redis-url URL``): ``BLPOP wm:ready`` ->
``LRANGE`` the batch -> handler -> ``DEL`` the batch. No leases, retries, history or
dead letters: a consumer that dies mid-batch loses it.
"""

from __future__ import annotations

import argparse
import signal
import uuid
from collections.abc import Iterable
from types import FrameType
from typing import Any

import msgpack
import redis
from redis.client import Pipeline

from benchmarks.e2e_common import record

READY = "wm:ready"
CONSUMER_NAME = "wm-consumer"


def acc_key(batch_id: str) -> str:
    return f"wm:acc:{batch_id}"


class WatchMultiBatcher:
    """Optimistic-locking accumulator. ``retries`` counts the WatchErrors (lost races)."""

    def __init__(self, client: redis.Redis, max_batch_size: int) -> None:
        self.client = client
        self.max_batch_size = max_batch_size
        self.retries = 0

    def add(self, batch_id: str, item: Any) -> int:
        """Append one item; returns how many batches this sealed (0 or 1)."""
        return self.add_many(batch_id, [item])

    def add_many(self, batch_id: str, items: Iterable[Any]) -> int:
        """Append items in order, sealing every batch that fills up; returns how many were sealed."""
        data: list[bytes] = [msgpack.packb(item) for item in items]
        if not data:
            return 0
        key = acc_key(batch_id)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    length = int(pipe.llen(key))
                    pipe.multi()
                    sealed = 0
                    rest = data
                    while rest:
                        room = self.max_batch_size - length
                        if room <= 0:  # over-full (max_batch_size was lowered): seal it as is
                            self._seal(pipe, batch_id, key)
                            sealed, length = sealed + 1, 0
                            continue
                        chunk, rest = rest[:room], rest[room:]
                        pipe.rpush(key, *chunk)
                        length += len(chunk)
                        if length >= self.max_batch_size:
                            self._seal(pipe, batch_id, key)
                            sealed, length = sealed + 1, 0
                    pipe.execute()
                    return sealed
                except redis.WatchError:
                    self.retries += 1

    def flush(self, batch_id: str) -> bool:
        """Seal whatever accumulates under ``batch_id`` now (the tail); False when empty."""
        key = acc_key(batch_id)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    if int(pipe.llen(key)) == 0:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    self._seal(pipe, batch_id, key)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    self.retries += 1

    @staticmethod
    def _seal(pipe: Pipeline, batch_id: str, key: str) -> None:
        ready = f"wm:batch:{batch_id}:{uuid.uuid4().hex}"
        pipe.rename(key, ready)
        pipe.rpush(READY, ready)


def handle(items: list[Any]) -> None:
    """The consumer's handler: the same no-op-plus-bookkeeping as redis-batcher's."""
    record([item["id"] for item in items])


def consume(url: str) -> None:
    """Deliver ready batches until SIGTERM/SIGINT (checked at least once a second)."""
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = redis.Redis.from_url(url)
    client.client_setname(CONSUMER_NAME)
    try:
        while not stopping:
            popped = client.blpop([READY], timeout=1)
            if popped is None:
                continue
            name = popped[1]
            raw = client.lrange(name, 0, -1)
            handle([msgpack.unpackb(r) for r in raw])
            client.delete(name)
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="WATCH/MULTI baseline consumer (BLPOP wm:ready)")
    ap.add_argument("--redis-url", required=True)
    consume(ap.parse_args().redis_url)


if __name__ == "__main__":
    main()
