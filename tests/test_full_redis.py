"""A full Redis (``maxmemory`` with ``noeviction``): adds are refused with a clear error, and
the workers still start, drain what is stored and keep their bookkeeping (heartbeats, nacks,
releases) going, through the scripts' ``allow-oom`` flag (Redis 7). Also the fallback for
servers that cannot read script flags (Redis < 7, fakeredis), and the round trips on Redis 7.

Each test starts its own redis-server; those that need script flags look for a Redis 7 binary
($REDIS_SERVER, then every redis-server on PATH: a virtualenv may put an older one first)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

import redis_batcher as rb
from redis_batcher import asyncio as aio
from redis_batcher import dead_ops, ops
from redis_batcher.connection import Arg, AsyncLink, Link
from redis_batcher.job_ops import claim_call as job_claim_call
from redis_batcher.job_ops import extend_call as job_extend_call
from redis_batcher.job_ops import fail_call as job_fail_call
from redis_batcher.job_ops import owner_call
from redis_batcher.job_ops import parse_claim as parse_job_claim
from redis_batcher.scripts import Script, flags_unsupported, scripts
from redis_batcher.testing import RedisServer, find_redis_server

from .clients import arun
from .test_worker import wait_for

ITEM = "x" * 1000  # about 1 KB encoded
ROOM = 2_000_000  # bytes of headroom above what a fresh server uses


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def redis_binary(flags: bool) -> str | None:
    """A redis-server that understands script flags (Redis >= 7), or with ``flags=False`` one
    that does not."""
    seen: list[str] = []
    for candidate in (
        os.environ.get("REDIS_SERVER"),
        *(os.path.join(d, "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep) if d),
        find_redis_server(),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            path = os.path.abspath(candidate)  # not resolved: the binary reads its name
            if path not in seen:
                seen.append(path)
                if (_version(path) >= (7, 0)) == flags:
                    return path
    return None


def _server(flags: bool) -> Iterator[RedisServer]:
    binary = redis_binary(flags=flags)
    if binary is None:
        pytest.skip("no redis-server >= 7.0 (script flags) found" if flags else "no redis-server < 7.0 found")
    with RedisServer(binary=binary) as server:
        yield server


@pytest.fixture
def server7() -> Iterator[RedisServer]:
    yield from _server(flags=True)


@pytest.fixture
def server6() -> Iterator[RedisServer]:
    yield from _server(flags=False)


def limit_memory(client: redis.Redis) -> int:
    """Cap the server at what it uses now plus ROOM, refusing writes when full; the cap."""
    cap = int(client.info("memory")["used_memory"]) + ROOM
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", cap)
    return cap


def tighten(client: redis.Redis) -> None:
    """Lower the cap below what is used now, so Redis stays full until a good part of the data
    is gone (memory used hovers around the cap: a client's buffers shrink, and so on)."""
    client.config_set("maxmemory", used(client) - ROOM // 10)


def is_full(client: redis.Redis) -> bool:
    try:
        client.set("probe", "x")
    except OutOfMemoryError:
        return True
    client.delete("probe")
    return False


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def data_used(client: redis.Redis) -> int:
    """``used`` without the script cache: a fresh worker's first calls cache its scripts (tens
    of KB, growing with every comment and helper) after a test measured a full Redis, which is
    not what draining frees."""
    info = client.info("memory")
    return int(info["used_memory"]) - int(info.get("used_memory_scripts", 0))


def fill(proc: rb.Processor, prefix: str = "fill") -> tuple[int, OutOfMemoryError]:
    """Sealed sequences of 20 items until an add is refused: (sequences, the refusal)."""
    n = 0
    while True:
        try:
            proc.add_many(f"{prefix}{n}", [ITEM] * 20)
        except OutOfMemoryError as exc:
            return n, exc
        n += 1
        assert n < 10_000, "Redis never refused an add"


def fill_with_other_data(client: redis.Redis) -> None:
    """Fill Redis (capped by limit_memory) with data no worker frees."""
    try:
        for _ in range(ROOM // (len(ITEM) * 50) * 4):
            client.rpush("filler", *[ITEM] * 50)
    except OutOfMemoryError:
        tighten(client)
        return
    raise AssertionError("Redis never refused a write: no maxmemory set?")


def run_guarded(target: Callable[[], Any], timeout: float = 30.0) -> Any:
    """``target()`` in a thread; fails instead of hanging when it does not return in time."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(target()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not return within {timeout:.0f}s"
    return out[0]


def counting_iterator(batcher: rb.Batcher) -> list[int]:
    seen: list[int] = []

    @batcher.iterator(name="walk", delay_between_batches=0.0)
    class Walk:
        def next_batch(self, cursor: str | None, batch_size: int) -> rb.Page:
            return rb.Page([1, 2], "end", True)

        def process(self, items: list[int], job: rb.JobContext) -> None:
            seen.extend(items)

    return seen


# -- a fresh worker drains a full Redis ------------------------------------------------------------


def test_a_fresh_worker_starts_and_drains_a_full_redis(
    server7: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    producer = rb.Batcher(server7.url, prefix="oom")
    proc = producer.processor(name="sink", max_batch_size=20, flush_interval=None)(lambda f: None)
    limit_memory(producer.client)
    stored, refused = fill(proc)
    # the processor registry is gone too (as if the producers had registered elsewhere): the
    # new worker's registration is refused while Redis is full
    producer.client.delete("oom:processors")
    more, refused = fill(proc, "again")
    stored += more
    tighten(producer.client)
    assert "maxmemory" in str(refused)  # redis-py's OutOfMemoryError, Redis' own words
    assert stored > 50 and is_full(producer.client)
    full = data_used(producer.client)

    worker_batcher = rb.Batcher(server7.url, prefix="oom")
    got: list[int] = []
    worker_batcher.processor(name="sink", max_batch_size=20, flush_interval=None)(
        lambda f: got.append(len(f.items))
    )
    seen = counting_iterator(worker_batcher)
    caplog.set_level(logging.INFO, logger="redis_batcher")
    w = rb.Worker(worker_batcher, concurrency=2, max_idle_wait=0.2)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(got) == stored, timeout=30)
        # once memory is free again, the registration refused at start is made
        wait_for(lambda: producer.client.hexists("oom:processors", "sink"), timeout=10)
    finally:
        w.stop()
        t.join(30)
    assert not t.is_alive()
    assert got == [20] * stored and w.stats.delivered == stored
    # the items are gone; what stays is each id's head and history, kept for `retention`
    assert not list(producer.client.scan_iter(match="oom:*:[io]:*"))
    assert data_used(producer.client) < full - ROOM // 2
    assert not is_full(producer.client)
    assert seen == []  # no job was started: the runner got past its registration all the same
    assert "Redis is out of memory" in caplog.text
    assert "cannot reach Redis" not in caplog.text
    producer.close()
    worker_batcher.close()


def test_a_burst_worker_with_iterators_returns_on_a_full_redis(server7: RedisServer) -> None:
    b = rb.Batcher(server7.url, prefix="oom")
    got: list[int] = []
    proc = b.processor(name="sink", max_batch_size=20, flush_interval=None)(
        lambda f: got.append(len(f.items))
    )
    counting_iterator(b)
    limit_memory(b.client)
    b.client.delete("oom:processors")
    stored, _ = fill(proc)
    tighten(b.client)
    stats = run_guarded(lambda: rb.Worker(b, concurrency=2).run(burst=True))
    assert stats.delivered == stored and got == [20] * stored
    b.close()


def test_a_fresh_async_worker_starts_and_drains_a_full_redis(
    server7: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    producer = rb.Batcher(server7.url, prefix="oom")
    proc = producer.processor(name="sink", max_batch_size=20, flush_interval=None)(lambda f: None)
    limit_memory(producer.client)
    producer.client.delete("oom:processors")
    stored, _ = fill(proc)
    tighten(producer.client)
    full = data_used(producer.client)
    got: list[int] = []

    async def body() -> rb.WorkerStats:
        ab = aio.Batcher(aioredis.Redis(host="127.0.0.1", port=server7.port), prefix="oom")

        @ab.processor(name="sink", max_batch_size=20, flush_interval=None)
        async def sink(flush: rb.Flush) -> None:
            got.append(len(flush.items))

        @ab.iterator(name="walk")
        class Walk:
            async def next_batch(self, cursor: str | None, batch_size: int) -> rb.Page:
                return rb.Page([], "end", True)

            async def process(self, items: list[int], job: rb.JobContext) -> None:
                pass

        try:
            return await aio.Worker(ab, concurrency=2).run(burst=True)
        finally:
            await ab.aclose()

    caplog.set_level(logging.INFO, logger="redis_batcher")
    stats = arun(body, timeout=30)
    assert stats.delivered == stored and got == [20] * stored
    # the items are gone; what stays is each id's head and history, kept for `retention`
    assert not list(producer.client.scan_iter(match="oom:*:[io]:*"))
    assert data_used(producer.client) < full - ROOM // 2
    assert "Redis is out of memory" in caplog.text and "cannot reach Redis" not in caplog.text
    producer.close()


def test_a_worker_still_waits_while_redis_cannot_be_reached(caplog: pytest.LogCaptureFixture) -> None:
    """A connection failure at start is no refusal: the worker waits, and says why."""
    with RedisServer() as server:
        url = server.url
    b = rb.Batcher(url, prefix="gone", connect_retry=0)
    b.processor(name="sink", flush_interval=None)(lambda f: None)
    w = rb.Worker(b)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: "cannot reach Redis" in caplog.text, timeout=10)
        assert t.is_alive() and not w.ready.is_set()
    finally:
        w.stop()
        t.join(10)
    assert not t.is_alive()
    assert "out of memory" not in caplog.text


def test_a_burst_worker_gives_up_when_redis_cannot_be_reached(caplog: pytest.LogCaptureFixture) -> None:
    """A burst run (a cron job, a CI step) must end: once connect_retry has passed, it raises."""
    with RedisServer() as server:
        url = server.url
    b = rb.Batcher(url, prefix="gone", connect_retry=0.3)
    b.processor(name="sink", flush_interval=None)(lambda f: None)
    began = time.monotonic()
    with pytest.raises(rb.NotSentError, match="Connection refused"):
        rb.Worker(b).run(burst=True)
    assert 0.1 <= time.monotonic() - began < 5  # retried (pauses of 50 ms, 100 ms), then gave up
    assert "retrying in" not in caplog.text


# -- bookkeeping while Redis is full -----------------------------------------------------------------


def bookkeeping_processor(batcher: Any, calls: dict[str, int], gate: threading.Event) -> Any:
    """'slow' outlives its lease without heartbeats, 'bad' raises, 'stuck' runs until released."""
    options: dict[str, Any] = {
        "name": "book",
        "max_batch_size": 5,
        "flush_interval": None,
        "lease_timeout": 1.2,
        "retry_backoff": 30.0,
    }

    def handler(flush: rb.Flush) -> None:
        calls[flush.batch_id] = calls.get(flush.batch_id, 0) + 1
        if flush.batch_id == "slow":
            time.sleep(2.0)
        elif flush.batch_id == "bad":
            raise ValueError("boom")
        elif flush.batch_id == "stuck":
            gate.wait(20)

    return batcher.processor(**options)(handler)


def check_bookkeeping(client: redis.Redis, stats: rb.WorkerStats, calls: dict[str, int], log: str) -> None:
    b = rb.Batcher(client, prefix="oom")
    proc = b.remote("book")
    assert calls == {"slow": 1, "bad": 1, "stuck": 1}
    # extend: the slow handler kept its lease, its ack was accepted
    assert stats.lease_lost == 0 and "heartbeat failed" not in log
    assert proc.status("slow") is None
    assert [(h.attempt, h.success) for h in proc.history("slow")] == [(1, True)]
    # nack: the failure is recorded and a retry scheduled; the items stay
    bad = proc.status("bad")
    assert bad is not None
    [seq] = bad.batches
    assert seq.attempt == 1 and seq.last_error == "ValueError: boom" and seq.next_attempt_at is not None
    assert seq.item_count == 5
    assert [(h.success, h.error) for h in proc.history("bad")] == [(False, "ValueError: boom")]
    assert "cannot record the result" not in log
    # release: handed back at shutdown, due again at once, the attempt not counted
    [stuck] = proc.status("stuck").batches  # type: ignore[union-attr]
    assert stats.released == 1 and stuck.attempt == 0 and stuck.item_count == 5
    assert "could not release" not in log
    assert is_full(client)  # all of that while Redis refused writes


def test_heartbeats_nacks_and_releases_work_while_redis_is_full(
    server7: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    b = rb.Batcher(server7.url, prefix="oom")
    calls: dict[str, int] = {}
    gate = threading.Event()
    proc = bookkeeping_processor(b, calls, gate)
    for bid in ("slow", "bad", "stuck"):
        proc.add_many(bid, list(range(5)))
    limit_memory(b.client)
    fill_with_other_data(b.client)
    caplog.set_level(logging.INFO, logger="redis_batcher")
    w = rb.Worker(b, concurrency=3, grace_period=0)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: w.stats.delivered == 1 and w.stats.failed == 1 and calls.get("stuck") == 1, 15)
    finally:
        w.stop()
        t.join(15)
        gate.set()
    assert not t.is_alive()
    check_bookkeeping(b.client, w.stats, calls, caplog.text)
    b.close()


def test_async_heartbeats_nacks_and_releases_work_while_redis_is_full(
    server7: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis(host="127.0.0.1", port=server7.port)
    calls: dict[str, int] = {}
    gate = threading.Event()

    async def body() -> rb.WorkerStats:
        ab = aio.Batcher(aioredis.Redis(host="127.0.0.1", port=server7.port), prefix="oom")
        proc = bookkeeping_processor(ab, calls, gate)
        for bid in ("slow", "bad", "stuck"):
            await proc.add_many(bid, list(range(5)))
        limit_memory(client)
        fill_with_other_data(client)
        w = aio.Worker(ab, concurrency=3, grace_period=0)
        task = asyncio.ensure_future(w.run())
        try:
            deadline = time.monotonic() + 15
            while not (w.stats.delivered == 1 and w.stats.failed == 1 and calls.get("stuck") == 1):
                assert time.monotonic() < deadline, "the handlers did not run"
                await asyncio.sleep(0.02)
        finally:
            w.stop()
            stats = await asyncio.wait_for(task, 15)
            gate.set()
            await ab.aclose()
        return stats

    caplog.set_level(logging.INFO, logger="redis_batcher")
    stats = arun(body, timeout=40)
    check_bookkeeping(client, stats, calls, caplog.text)
    client.close()


def test_job_heartbeats_failures_and_releases_work_while_redis_is_full(server7: RedisServer) -> None:
    b = rb.Batcher(server7.url, prefix="oom")

    @b.iterator(name="walk", retry_backoff=30.0)
    class Walk:
        def next_batch(self, cursor: str | None, batch_size: int) -> rb.Page:
            return rb.Page([], None, True)

        def process(self, items: list[int], job: rb.JobContext) -> None:
            pass

    keys, cfg = Walk.keys, Walk.config
    Walk.start("a")
    Walk.start("b")
    owner = ops.new_token()
    _, claimed = parse_job_claim(owner, job_claim_call(keys, cfg, 2, owner, "w").run(b.client))
    assert sorted(c.job_id for c in claimed) == ["a", "b"]
    limit_memory(b.client)
    fill_with_other_data(b.client)
    assert job_extend_call(keys, cfg, "a", owner).run(b.client) == 1
    outcome, retries, _ = job_fail_call(keys, cfg, "a", owner, "E: x").run(b.client)
    assert (outcome, retries) == (b"retry", 1)
    assert owner_call("job_release", keys, "b", owner).run(b.client) == 1
    assert is_full(b.client)
    a = Walk.status("a")
    assert a is not None and (a.retry_count, a.error) == (1, "E: x")
    assert b.client.hget(keys.job("b"), "owner") == b""  # released: any worker may resume it
    b.close()


# -- servers without script flags ------------------------------------------------------------------


def exercise(batcher: rb.Batcher) -> None:
    """Every flagged script's path of a batcher: claim, ack, nack, extend, release, purge."""
    proc = batcher.processor(name="f", max_batch_size=2, flush_interval=None, retry_backoff=0.01)(
        lambda f: None
    )
    proc.add_many("a", [1, 2, 3, 4])
    part = proc.keys.for_base("a")
    owner = ops.new_token()
    reply = batcher.executor.run_once(ops.claim_call(proc, part, 2, owner))
    _, claimed = ops.parse_claim(proc, part, owner, reply)
    first, second = claimed
    assert batcher.executor.run_once(ops.extend_call(first)) == 1
    assert batcher.executor.execute(ops.release_call(first)) == 1
    entry = ops.history_entry(second, 0, 1.0, False, "E: x")
    assert batcher.executor.execute(ops.nack_call(second, entry, 10, "E: x", "fail", []))[0] == b"retry"
    assert batcher.executor.execute(dead_ops.purge_call(part, ["none"])) == 0
    stats = rb.Worker(batcher).run(burst=True)
    assert stats.delivered >= 1


def test_scripts_fall_back_to_their_plain_variant_on_fakeredis() -> None:
    fake = fakeredis.FakeRedis()
    other = fakeredis.FakeRedis()
    exercise(rb.Batcher(fake, prefix="fb"))
    assert flags_unsupported(fake)
    assert not flags_unsupported(other)  # remembered per client (pool), not for the process
    # a plain call goes straight to the plain variant now: one EVALSHA, no new attempt
    t = scripts()
    assert t.extend.variant(fake) is t.extend.plain and t.extend.variant(other) is t.extend.best


def test_scripts_fall_back_on_redis_before_7_and_keep_flags_on_redis_7(
    server6: RedisServer, server7: RedisServer
) -> None:
    old = rb.Batcher(server6.url, prefix="fb")
    new = rb.Batcher(server7.url, prefix="fb")
    assert old.executor.link is not None  # the link's path too
    exercise(old)
    exercise(new)
    assert flags_unsupported(old.client) and flags_unsupported(old.executor.link)  # one pool
    assert not flags_unsupported(new.client) and not flags_unsupported(new.executor.link)
    t = scripts()
    assert new.client.script_exists(t.claim.sha, t.ack.sha, t.extend.sha) == [True, True, True]
    assert t.claim.sha != t.claim.plain.sha
    # the redis-py client and the WAIT pipeline fall back too (fresh pools)
    cases: list[tuple[Script, list[str], list[Arg]]] = [
        (t.extend, ["k"], ["p", "m", "o", 1000]),
        (t.purge, ["d"], ["p", "x"]),
    ]
    for script, keys, args in cases:
        fresh = redis.Redis(port=server6.port)
        assert script(fresh, keys, args) == 0 and flags_unsupported(fresh)
        fresh = redis.Redis(port=server6.port)
        assert script.call_and_wait(fresh, keys, args, 0, 10) == (0, 0) and flags_unsupported(fresh)
    old.close()
    new.close()


def test_async_scripts_fall_back_on_redis_before_7(server6: RedisServer) -> None:
    t = scripts()
    keys: list[str] = ["k"]
    args: list[Arg] = ["p", "m", "o", 1000]

    async def body() -> None:
        client = aioredis.Redis(host="127.0.0.1", port=server6.port)
        assert await t.extend.call_async(client, keys, args) == 0 and flags_unsupported(client)
        client2 = aioredis.Redis(host="127.0.0.1", port=server6.port)
        link = AsyncLink(client2)
        assert await t.extend.call_async_direct(link, keys, args) == 0 and flags_unsupported(link)
        assert flags_unsupported(client2)  # the link shares its client's pool
        ab = aio.Batcher(aioredis.Redis(host="127.0.0.1", port=server6.port), prefix="fb")
        # group commit's pipeline (also WAIT's): EVALSHA, EVAL, then EVAL without the shebang
        replies = await ab.executor.pipeline([ops.Call(t.extend, ("k",), ("p", "m", "o", 1000))])
        assert replies == [0]
        await link.close()
        for c in (client, client2):
            await c.aclose()
        await ab.aclose()

    arun(body)


def test_a_sync_direct_link_falls_back_on_its_own(server6: RedisServer) -> None:
    client = redis.Redis(port=server6.port)
    link = Link(client)
    t = scripts()
    assert t.release.call_direct(link, ["k"], ["p", "m", "o", "c"]) == 0
    assert flags_unsupported(link) and flags_unsupported(client)
    link.close()
    client.close()
    # the script call and WAIT in one write (wait_replicas) fall back alike
    client = redis.Redis(port=server6.port)
    link = Link(client)
    assert t.extend.call_and_wait_direct(link, ["k"], ["p", "m", "o", 1000], 0, 10) == (0, 0)
    assert flags_unsupported(link)
    link.close()
    client.close()


# -- round trips on Redis 7 --------------------------------------------------------------------------


def script_stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(calls, failed calls) of EVAL and EVALSHA since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    out: dict[str, tuple[int, int]] = {}
    for c in ("eval", "evalsha"):
        entry = stats.get(f"cmdstat_{c}", {})
        out[c] = (int(entry.get("calls", 0)), int(entry.get("failed_calls", 0)))
    return out


def test_one_evalsha_per_add_claim_and_ack_on_redis_7(server7: RedisServer) -> None:
    b = rb.Batcher(server7.url, prefix="rt")
    proc = b.processor(name="rt", max_batch_size=1, flush_interval=None)(lambda f: None)
    proc.add("warm", 0)
    rb.Worker(b, concurrency=1).run(burst=True)  # every script used once: cached on the server
    b.client.config_resetstat()
    for i in range(20):
        proc.add(f"b{i}", i)
    assert script_stats(b.client) == {"eval": (0, 0), "evalsha": (20, 0)}
    b.client.config_resetstat()
    stats = rb.Worker(b, concurrency=1).run(burst=True)
    assert stats.delivered == 20
    calls = script_stats(b.client)
    # 20 acks, each claiming the next flush, and a claim or two: no EVAL, no failed call
    assert calls["eval"] == (0, 0) and 20 <= calls["evalsha"][0] <= 23 and calls["evalsha"][1] == 0
    b.close()


def test_the_plain_variant_costs_one_evalsha_once_learnt(server6: RedisServer) -> None:
    b = rb.Batcher(server6.url, prefix="rt")
    proc = b.processor(name="rt", max_batch_size=1, flush_interval=None)(lambda f: None)
    proc.add("warm", 0)
    rb.Worker(b, concurrency=1).run(burst=True)
    for i in range(10):
        proc.add(f"b{i}", i)
    b.client.config_resetstat()
    assert rb.Worker(b, concurrency=1).run(burst=True).delivered == 10
    calls = script_stats(b.client)
    assert calls["eval"][0] == 0 and 10 <= calls["evalsha"][0] <= 13
    b.close()
