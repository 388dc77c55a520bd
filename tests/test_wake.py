"""Wake-ups on one server: each partition's channel ``<pfx>wake``, sharded pub/sub (SPUBLISH,
SSUBSCRIBE) on Redis 7+, plain PUBLISH/SUBSCRIBE on Redis < 7 and fakeredis; the sync and
asyncio workers woken either way. (Redis Cluster: tests/test_cluster.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

from redis_batcher import Batcher, Flush, Worker, wake
from redis_batcher import asyncio as aio
from redis_batcher.keys import partition_of
from redis_batcher.testing import RedisServer

from .test_full_redis import redis_binary
from .test_worker import wait_for


@pytest.fixture(params=["redis7", "redis6", "fakeredis"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    """(kind, how to make a sync client, how to make an async one) of a fresh server."""
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        yield "fakeredis", (
            lambda: fakeredis.FakeRedis(server=server),
            lambda: fakeredis.FakeAsyncRedis(server=server),
        )
        return
    binary = redis_binary(flags=request.param == "redis7")
    if binary is None:
        pytest.skip(f"no redis-server for {request.param}")
    with RedisServer(binary=binary) as srv:
        yield request.param, (
            lambda: redis.Redis(host="127.0.0.1", port=srv.port),
            lambda: aioredis.Redis(host="127.0.0.1", port=srv.port),
        )


def test_scripts_wake_each_partition_on_its_own_channel(backend: tuple[str, Any]) -> None:
    """A size seal (add.lua) and a manual flush (flush.lua) publish the partition's prefix on
    that partition's channel, SPUBLISH on Redis 7 (a plain subscriber of the same name hears
    nothing) and PUBLISH elsewhere; the other partitions' channels stay quiet."""
    kind, (make, _) = backend
    client = make()
    assert wake.sharded(client) == (kind == "redis7")
    batcher = Batcher(client, prefix="s")
    proc = batcher.processor(name="p", partitions=2, max_batch_size=3, flush_interval=None)(lambda f: None)
    part = proc.keys.parts[0]
    assert part.wake == part.pfx + "wake" and part.wake.startswith("s:{p:0")
    assert proc.keys.channels == [pk.pfx + "wake" for pk in proc.keys.parts]
    bid = next(f"id{i}" for i in range(100) if partition_of(f"id{i}", 2) == 0)
    listener = make()
    sharded = listener.pubsub(ignore_subscribe_messages=True)
    plain = listener.pubsub(ignore_subscribe_messages=True)
    if kind == "redis7":
        sharded.ssubscribe(*proc.keys.channels)
        plain.subscribe(*proc.keys.channels)
    else:
        sharded.subscribe(*proc.keys.channels)

    def heard(pubsub: Any) -> list[tuple[str, bytes, bytes]]:
        """What ``pubsub`` gets within 0.3 s (a None may be a confirmation it skipped)."""
        got = []
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            if (msg := pubsub.get_message(timeout=0.05)) is not None:
                got.append((msg["type"], msg["channel"], msg["data"]))
        return got

    heard(sharded)
    expected = ("smessage" if kind == "redis7" else "message", part.wake.encode(), part.pfx.encode())
    proc.add_many(bid, [1, 2, 3])  # sealed by size
    assert heard(sharded) == [expected]
    client.delete(part.pfx + "woke")  # as a claim would: the next wake-up is not held back
    proc.add(bid, 4)
    assert proc.flush(bid).flushed
    assert heard(sharded) == [expected]
    if kind == "redis7":
        assert heard(plain) == []
    for c in (sharded, plain):
        c.close()
    listener.close()
    client.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_idle_worker_is_woken(backend: tuple[str, Any], mode: str) -> None:
    """A size-sealed batch is delivered at once by a worker whose timed check is 30 s away,
    listening the server's way: SSUBSCRIBE on Redis 7, SUBSCRIBE on Redis < 7 and fakeredis."""
    kind, (make, make_async) = backend
    got: list[tuple[Flush, float]] = []

    def handler(flush: Flush) -> None:
        got.append((flush, time.monotonic()))

    probe = make()
    batcher = Batcher(probe, prefix="w")
    proc = batcher.processor(name="p", partitions=2, max_batch_size=2, flush_interval=None)(handler)
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            if mode == "sync":
                worker = Worker(proc.batcher, max_idle_wait=30)
                threading.Thread(target=lambda: (stop.wait(), worker.stop()), daemon=True).start()
                worker.run()
                return

            async def main() -> None:
                ab = aio.Batcher(make_async(), prefix="w", definitions=proc.batcher)
                worker = aio.Worker(ab, max_idle_wait=30)
                run = asyncio.ensure_future(worker.run())
                while not stop.is_set():
                    await asyncio.sleep(0.02)
                worker.stop()
                await run
                await ab.aclose()

            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        channels = proc.keys.channels
        wait_for(lambda: all(wake.subscribers(probe, ch) == 1 for ch in channels) or bool(errors))
        assert not errors, errors
        if kind == "redis7":
            assert probe.execute_command("PUBSUB", "NUMSUB", *channels)[1::2] == [0, 0]  # all sharded
        time.sleep(0.3)  # the first claims are over: asleep for 30 s
        for k in (0, 1):
            bid = next(f"id{i}" for i in range(100) if partition_of(f"id{i}", 2) == k)
            t0 = time.monotonic()
            proc.add_many(bid, [k, k])
            wait_for(lambda: len(got) > k, timeout=5)  # noqa: B023
            assert got[k][1] - t0 < 2.0
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not thread.is_alive() and not errors, errors
    assert [f.items for f, _ in got] == [[0, 0], [1, 1]]
    if kind != "fakeredis":  # whose async pubsub leaves its registry to the garbage collector
        assert all(wake.subscribers(probe, ch) == 0 for ch in proc.keys.channels)
    probe.close()


@pytest.mark.parametrize("workers", [2, 6])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_each_wake_up_makes_about_one_claim_and_a_burst_is_spread(
    backend: tuple[str, Any], mode: str, workers: int
) -> None:
    """Idle workers (one slot each, timed checks 30 s away) all hear each wake-up, but a
    wake-up is a token (``<pfx>woke``) that one of them takes: each sealed batch is delivered at
    once for about one claim, not one per worker. A burst of seals, one wake-up for all of
    them, is still spread: a claim that leaves more due than its worker has slots for sends
    the token out again, to a worker with a free slot. Nothing is left behind."""
    kind, (make, make_async) = backend
    got: list[tuple[str, float]] = []
    lock = threading.Lock()
    slow = threading.Event()

    def handler(flush: Flush) -> None:
        if slow.is_set():
            time.sleep(0.05)  # a burst: a worker's one slot stays busy a while
        with lock:
            got.append((flush.batch_id, time.monotonic()))

    probe = make()
    batcher = Batcher(probe, prefix="t")
    proc = batcher.processor(name="p", partitions=2, max_batch_size=2, flush_interval=None)(handler)
    batcher.register()  # stamps the layout before workers start together (each checks it)
    stop = threading.Event()
    errors: list[BaseException] = []
    pool: list[Any] = []

    def run(worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    def serve() -> None:
        try:
            if mode == "sync":
                pool.extend(Worker(proc.batcher, concurrency=1, max_idle_wait=30) for _ in range(workers))
                threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in pool]
                for t in threads:
                    t.start()
                stop.wait()
                for w in pool:
                    w.stop()
                for t in threads:
                    t.join(timeout=10)
                return

            async def main() -> None:
                ab = aio.Batcher(make_async(), prefix="t", definitions=proc.batcher)
                pool.extend(aio.Worker(ab, concurrency=1, max_idle_wait=30) for _ in range(workers))
                runs = [asyncio.ensure_future(w.run()) for w in pool]
                while not stop.is_set():
                    await asyncio.sleep(0.02)
                for w in pool:
                    w.stop()
                await asyncio.gather(*runs)
                await ab.aclose()

            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    def claims() -> int:
        return sum(w.stats.claims for w in pool)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        channels = proc.keys.channels
        wait_for(lambda: all(wake.subscribers(probe, ch) == workers for ch in channels) or bool(errors))
        assert not errors, errors
        # the first claims are over: all asleep for 30 s (fakeredis refuses the scripts' flags
        # line at first: those claims fail, and are tried again a second later)
        time.sleep(1.3 if kind == "fakeredis" else 0.3)
        ids = [next(f"id{i}" for i in range(100) if partition_of(f"id{i}", 2) == k) for k in (0, 1)]
        proc.add_many("warm-up", [0, 0])  # the producer's first call loads its scripts
        wait_for(lambda: len(got) == 1, timeout=5)
        time.sleep(0.05)
        before, latencies = claims(), []
        for n in range(1, 11):
            t0 = time.monotonic()
            proc.add_many(ids[n % 2], [n, n])  # sealed: one wake-up
            wait_for(lambda: len(got) > n, timeout=5)  # noqa: B023
            latencies.append(got[n][1] - t0)
            time.sleep(0.05)  # every worker idle again
        per_flush = (claims() - before) / 10
        print(f"{kind} {mode} {workers} workers: {per_flush:.2f} claims per flush, {max(latencies):.4f} s")
        assert max(latencies) < 1.0, latencies
        assert per_flush <= 1.2, per_flush

        # a burst: 12 sequences sealed by one add, one wake-up for all of them
        slow.set()
        delivered = [w.stats.delivered for w in pool]
        proc.add_many(ids[0], list(range(24)))
        wait_for(lambda: len(got) == 23, timeout=10)  # all of them, well before any timed check
        wait_for(lambda: proc.status(ids[0]) is None)  # and acknowledged: nothing left behind

        def busy() -> list[int]:
            return [w.stats.delivered - d for w, d in zip(pool, delivered, strict=True)]

        wait_for(lambda: sum(busy()) == 12)
        assert sum(1 for b in busy() if b) > 1, busy()  # spread over several workers
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not thread.is_alive() and not errors, errors
    probe.close()
