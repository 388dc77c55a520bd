"""flush_idle (issue #25, debounce): a sequence is due once no add came for flush_idle, never
later than flush_interval after its first item nor past max_batch_size. The bookkeeping on the
sync and asyncio clients (real redis-server and fakeredis), what an add runs on the wire, and
real workers (threads and asyncio) delivering bursts and trickles."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import redis

import redis_batcher as rb
import redis_batcher.asyncio as aio
from redis_batcher import Batcher, Worker
from redis_batcher.keys import PartitionKeys
from redis_batcher.testing import RedisServer

from .clients import ClientApi, ProcessorApi
from .test_worker import running


def make(api: ClientApi, **kw: Any) -> tuple[ProcessorApi, list[rb.Flush]]:
    got: list[rb.Flush] = []
    kw.setdefault("name", "idle")
    kw.setdefault("max_batch_size", 100)
    kw.setdefault("flush_interval", 30.0)
    kw.setdefault("flush_idle", 0.3)
    return api.processor(**kw)(api.recorder(got)), got


def server_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def wait_past(client: Any, ms: float) -> None:
    """Until Redis' clock (the scripts' clock) is past ``ms``."""
    deadline = time.monotonic() + 10
    while server_ms(client) <= ms:
        assert time.monotonic() < deadline, "Redis' clock did not move"
        time.sleep(0.02)


def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def header(client: Any, part: PartitionKeys, base: str) -> tuple[int, int, int, int]:
    """The open list's header: sequence, last add (ms), max_batch_size, flush_idle cap."""
    raw = client.lindex(part.open_items(base), 0).decode()
    seq, rest = raw.split(":")
    last, size, cap = rest.split("/")
    return int(seq), int(last), int(size), int(cap)


def due_ms(client: Any, part: PartitionKeys, member: str) -> int:
    score = client.zscore(part.due, member)
    assert score is not None
    return int(score)


# -- options --------------------------------------------------------------------------------------


def test_flush_idle_is_checked_when_the_processor_is_defined(real_batcher: Batcher) -> None:
    def handler(flush: rb.Flush) -> None:
        pass

    for bad in (0, -1, "1s", float("nan"), 30.0, 31):
        with pytest.raises(rb.ConfigError, match="flush_idle"):
            real_batcher.processor(name="bad", flush_interval=30.0, flush_idle=bad)(handler)
    with pytest.raises(rb.ConfigError, match="less than flush_interval"):
        real_batcher.processor(name="bad", flush_interval=1.0, flush_idle=timedelta(seconds=1))(handler)
    ok = real_batcher.processor(name="ok", flush_interval=None, flush_idle=timedelta(milliseconds=250))(
        handler
    )
    assert (ok.config.flush_idle, ok.config.flush_interval) == (0.25, None)
    off = real_batcher.processor(name="off")(handler)
    assert off.config.flush_idle is None and " 250 " not in off.add_config
    assert ok.add_config == "100 -1 -1 250 "
    assert real_batcher.client.keys("*") == []  # defining writes nothing
    assert rb.ProcessorConfig.from_json(ok.config.to_json()) == ok.config


# -- bookkeeping, on the four clients -------------------------------------------------------------


def test_each_add_moves_the_due_entry_to_flush_idle_after_it(api: ClientApi) -> None:
    proc, got = make(api, flush_idle=0.3)
    client, part = api.backend.sync, proc.keys.for_base("u")
    proc.add("u", "a")
    seq, last, size, cap = header(client, part, "u")
    created = int(client.hget(part.meta("u", 0), "created_at"))
    assert (seq, size, last, cap) == (0, 100, created, created + 30_000)
    assert client.hget(part.meta("u", 0), "idle") == b"300"
    assert due_ms(client, part, "u::0") == last + 300
    for items in (["b"], ["c", "d"]):  # the single-item branch, then the general path
        time.sleep(0.01)
        proc.add_many("u", items) if len(items) > 1 else proc.add("u", items[0])
        _, last, _, cap_now = header(client, part, "u")
        assert cap_now == cap and due_ms(client, part, "u::0") == last + 300
    wait_past(client, due_ms(client, part, "u::0"))
    api.burst()
    assert [(f.items, f.reason, f.sequence) for f in got] == [(["a", "b", "c", "d"], "idle", 0)]
    history = proc.history("u")
    assert [(h.item_count, h.reason, h.success) for h in history] == [(4, "idle", True)]


def test_an_add_after_the_quiet_period_but_before_a_claim_starts_another(api: ClientApi) -> None:
    """Due-ness is decided by the claim: an item added once the sequence was due, but before a
    worker took it, joins it and starts a new quiet period; nothing is delivered twice."""
    proc, got = make(api, flush_idle=0.2)
    client, part = api.backend.sync, proc.keys.for_base("u")
    proc.add("u", 1)
    first = due_ms(client, part, "u::0")
    wait_past(client, first)
    assert proc.add("u", 2) == rb.AddResult("u", 0, 1, 2, False, "accumulating", 0)
    _, last, _, _ = header(client, part, "u")
    assert due_ms(client, part, "u::0") == last + 200 > first
    [info] = proc.sequences("u")
    assert (info.status, info.item_count) == ("accumulating", 2)
    wait_past(client, due_ms(client, part, "u::0"))
    api.burst()
    assert [(f.items, f.reason) for f in got] == [([1, 2], "idle")]
    proc.add("u", 3)  # the next sequence, debounced on its own
    assert header(client, part, "u")[0] == 1


def test_flush_interval_caps_the_debounce(api: ClientApi) -> None:
    proc, got = make(api, flush_interval=0.5, flush_idle=0.4)
    client, part = api.backend.sync, proc.keys.for_base("u")
    proc.add("u", 1)
    created = int(client.hget(part.meta("u", 0), "created_at"))
    time.sleep(0.15)  # the next add's quiet period would end after the interval's deadline
    proc.add("u", 2)
    assert due_ms(client, part, "u::0") == created + 500
    proc.add_many("u", [3, 4])
    assert due_ms(client, part, "u::0") == created + 500  # where the cap holds it
    wait_past(client, created + 500)
    api.burst()
    assert [(f.items, f.reason) for f in got] == [([1, 2, 3, 4], "interval")]


def test_without_flush_interval_only_the_quiet_period_and_the_size_count(api: ClientApi) -> None:
    proc, got = make(api, flush_interval=None, flush_idle=0.2, max_batch_size=3)
    client, part = api.backend.sync, proc.keys.for_base("u")
    proc.add("u", 1)
    assert header(client, part, "u")[3] == 0  # no cap
    time.sleep(0.05)
    proc.add("u", 2)
    assert due_ms(client, part, "u::0") == header(client, part, "u")[1] + 200
    assert proc.add("u", 3).status == "flushing"  # max_batch_size still seals, at once
    assert due_ms(client, part, "u::0") <= server_ms(client)
    proc.add("u", 4)
    wait_past(client, due_ms(client, part, "u::1"))
    api.burst()
    assert sorted((f.sequence, tuple(f.items), f.reason) for f in got) == [
        (0, (1, 2, 3), "size"),
        (1, (4,), "idle"),
    ]


def test_add_many_and_max_pending_take_the_general_path_with_one_due_update(api: ClientApi) -> None:
    proc, got = make(api, flush_idle=0.3, max_batch_size=4, max_pending=100)
    client, part = api.backend.sync, proc.keys.for_base("u")
    r = proc.add_many("u", list(range(10)))  # seals 0 and 1, opens 2 with two items
    assert (r.sequence, r.pending, r.sealed) == (2, 2, 2)
    _, last, size, cap = header(client, part, "u")
    assert due_ms(client, part, "u::2") == last + 300 and size == 4
    created = int(client.hget(part.meta("u", 2), "created_at"))
    assert cap == created + 30_000
    time.sleep(0.01)
    proc.add("u", 10)  # max_pending: the general path
    _, last, _, _ = header(client, part, "u")
    assert due_ms(client, part, "u::2") == last + 300
    wait_past(client, last + 300)
    api.burst()
    assert sorted((f.sequence, f.reason, len(f.items)) for f in got) == [
        (0, "size", 4),
        (1, "size", 4),
        (2, "idle", 3),
    ]


def test_processors_without_it_keep_their_timer_where_it_was_set(api: ClientApi) -> None:
    """The others' adds are unchanged: no cap in the header, no idle field, a due entry that
    no add moves."""
    proc, _ = make(api, flush_idle=None, flush_interval=5.0)
    client, part = api.backend.sync, proc.keys.for_base("u")
    proc.add("u", 1)
    created = int(client.hget(part.meta("u", 0), "created_at"))
    time.sleep(0.01)
    proc.add("u", 2)
    proc.add_many("u", [3, 4])
    raw = client.lindex(part.open_items("u"), 0).decode()
    assert raw.count("/") == 1 and raw.endswith("/100")
    assert client.hget(part.meta("u", 0), "idle") is None
    assert due_ms(client, part, "u::0") == created + 5000


def test_mixed_producers_keep_each_sequences_own_rule(real_client: redis.Redis) -> None:
    """During a deploy that turns flush_idle on, producers with and without it meet the same
    sequences: one opened with it keeps its cap (and is not moved by the others), one opened
    without it is not debounced by anyone."""
    old, new = Batcher(real_client, prefix="t"), Batcher(real_client, prefix="t")
    plain = old.processor(name="p", flush_interval=5.0)(lambda f: None)
    idle = new.processor(name="p", flush_interval=5.0, flush_idle=0.3)(lambda f: None)
    part = plain.keys.for_base("u")
    plain.add("u", 1)
    created = int(real_client.hget(part.meta("u", 0), "created_at"))
    time.sleep(0.01)
    idle.add("u", 2)
    idle.add_many("u", [3, 4])
    assert due_ms(real_client, part, "u::0") == created + 5000
    assert real_client.lindex(part.open_items("u"), 0).decode().count("/") == 1
    plain.flush("u")
    idle.add("v", 1)
    vpart = idle.keys.for_base("v")
    _, _, _, cap = header(real_client, vpart, "v")
    before = due_ms(real_client, vpart, "v::0")
    time.sleep(0.01)
    plain.add("v", 2)  # the non-idle producer keeps the cap and leaves the due entry
    plain.add_many("v", [3])
    assert header(real_client, vpart, "v")[3] == cap and due_ms(real_client, vpart, "v::0") == before
    idle.add("v", 4)
    assert due_ms(real_client, vpart, "v::0") == header(real_client, vpart, "v")[1] + 300
    assert len(idle.sequences("v")) == 1 and idle.sequences("v")[0].item_count == 4


# -- on the wire -----------------------------------------------------------------------------------


def lua_commands(client: redis.Redis, action: Callable[[], Any]) -> list[str]:
    """The commands the scripts ran (MONITOR) while ``action`` ran."""
    seen: list[str] = []
    ready = threading.Event()
    watcher = redis.Redis(host="127.0.0.1", port=client.connection_pool.connection_kwargs["port"])

    def watch() -> None:
        with watcher.monitor() as m:
            ready.set()
            for event in m.listen():
                if event.get("client_type") == "lua":
                    seen.append(event["command"].split(" ")[0].upper())
                elif event["command"] == "GET idle:end":
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(10)
    time.sleep(0.1)
    action()
    client.get("idle:end")
    thread.join(10)
    watcher.close()
    return seen


def test_an_add_costs_one_zadd_with_flush_idle_and_nothing_more_without(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    idle = real_batcher.processor(name="i", flush_idle=0.3)(lambda f: None)
    plain = real_batcher.processor(name="p")(lambda f: None)
    idle.add("u", 0)
    plain.add("u", 0)
    assert lua_commands(real_client, lambda: plain.add("u", 1)) == ["TIME", "LINDEX", "RPUSH", "LSET"]
    assert lua_commands(real_client, lambda: idle.add("u", 1)) == ["TIME", "LINDEX", "RPUSH", "LSET", "ZADD"]
    many = lua_commands(real_client, lambda: idle.add_many("u", [2, 3]))
    assert many.count("ZADD") == 1
    assert lua_commands(real_client, lambda: plain.add_many("u", [2, 3])).count("ZADD") == 0


# -- real workers -----------------------------------------------------------------------------------


@contextmanager
def serving(batcher: Batcher) -> Iterator[Worker]:
    with running(Worker(batcher, grace_period=5.0)) as worker:
        yield worker


def recorder() -> tuple[list[rb.Flush], Callable[[rb.Flush], None]]:
    got: list[rb.Flush] = []
    return got, got.append


def test_worker_delivers_a_burst_once_it_is_quiet_and_a_trickle_per_gap(real_batcher: Batcher) -> None:
    got, handler = recorder()
    proc = real_batcher.processor(name="b", max_batch_size=1000, flush_interval=30.0, flush_idle=0.5)(handler)
    with serving(real_batcher):
        for i in range(20):  # faster than flush_idle
            proc.add("burst", i)
        wait_until(lambda: len(got) == 1, what="the burst's flush")
        assert (got[0].items, got[0].reason) == (list(range(20)), "idle")
        for i in range(3):  # each add spaced more than flush_idle: one flush each
            proc.add("trickle", i)
            wait_until(lambda i=i: len(got) == 2 + i, what=f"trickle flush {i}")
    assert [(f.batch_id, f.sequence, f.items, f.reason) for f in got[1:]] == [
        ("trickle", 0, [0], "idle"),
        ("trickle", 1, [1], "idle"),
        ("trickle", 2, [2], "idle"),
    ]


def test_worker_caps_a_constant_trickle_at_flush_interval(real_batcher: Batcher) -> None:
    got, handler = recorder()
    proc = real_batcher.processor(name="t", max_batch_size=1000, flush_interval=0.6, flush_idle=0.4)(handler)
    with serving(real_batcher):
        sent = 0
        while not got:  # an add every 50 ms: never quiet for flush_idle
            assert sent < 400, "no flush while the trickle went on"
            proc.add("u", sent)
            sent += 1
            time.sleep(0.05)
        assert got[0].reason == "interval" and len(got[0].items) >= 2
        wait_until(lambda: sum(len(f.items) for f in got) == sent, what="the rest")
    assert [i for f in got for i in f.items] == list(range(sent))


def test_worker_still_seals_at_max_batch_size(real_batcher: Batcher) -> None:
    got, handler = recorder()
    proc = real_batcher.processor(name="m", max_batch_size=5, flush_interval=30.0, flush_idle=0.4)(handler)
    with serving(real_batcher):
        for i in range(12):
            proc.add("u", i)
        wait_until(lambda: len(got) == 3, what="three flushes")
    assert sorted((f.sequence, f.reason, tuple(f.items)) for f in got) == [
        (0, "size", (0, 1, 2, 3, 4)),
        (1, "size", (5, 6, 7, 8, 9)),
        (2, "idle", (10, 11)),
    ]


def test_a_failing_idle_flush_is_retried_then_dead_lettered(real_batcher: Batcher) -> None:
    """The same guarantees as any flush: it keeps its flush_id across attempts, and its items
    go to the dead-letter store once max_attempts is spent."""
    attempts: list[tuple[int, str, str]] = []

    def handler(flush: rb.Flush) -> None:
        attempts.append((flush.attempt, flush.flush_id, flush.reason))
        raise ConnectionError("crm away")

    proc = real_batcher.processor(
        name="f", flush_idle=0.2, max_attempts=3, retry_backoff=0.05, retry_backoff_max=0.1
    )(handler)
    with serving(real_batcher):
        proc.add_many("u", ["a", "b"])
        proc.add("u", "c")
        wait_until(lambda: len(proc.dead_letters()) == 1, what="the dead letter")
    [dead] = proc.dead_letters()
    assert (dead.item_count, dead.reason, dead.attempts) == (3, "max_attempts", 3)
    assert proc.dead_letter(dead.id).items == ["a", "b", "c"]  # type: ignore[union-attr]
    assert [a for a, _, _ in attempts] == [1, 2, 3]
    assert len({fid for _, fid, _ in attempts}) == 1 and {r for _, _, r in attempts} == {"idle"}


def test_async_worker_delivers_a_burst_once_quiet_and_seals_at_size(redis_server: RedisServer) -> None:
    got: list[rb.Flush] = []

    async def handler(flush: rb.Flush) -> None:
        got.append(flush)

    async def main() -> None:
        ab = aio.Batcher(redis_server.url, prefix="t")
        await ab.client.flushall()
        proc = ab.processor(name="a", max_batch_size=5, flush_interval=30.0, flush_idle=0.4)(handler)
        worker = aio.Worker(ab, grace_period=5.0)
        task = asyncio.ensure_future(worker.run())
        try:
            await asyncio.gather(*(proc.add("burst", i) for i in range(3)))
            for i in range(7):
                await proc.add("sized", i)
            deadline = time.monotonic() + 15
            while len(got) < 3:
                assert time.monotonic() < deadline, "timed out waiting for the flushes"
                await asyncio.sleep(0.01)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)
            await ab.aclose()

    asyncio.run(main())
    assert sorted((f.batch_id, f.sequence, f.reason, tuple(sorted(f.items))) for f in got) == [
        ("burst", 0, "idle", (0, 1, 2)),
        ("sized", 0, "size", (0, 1, 2, 3, 4)),
        ("sized", 1, "idle", (5, 6)),
    ]
