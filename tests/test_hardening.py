"""Data this library did not write: keys of another type, malformed delay-queue members, fields
that are not numbers, damaged headers, vanished items. One bad key never stops a processor,
and no script stops half-way (what it refuses, it refuses before writing anything)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import redis_batcher as rb
from redis_batcher import Batcher, Worker, ops
from redis_batcher.testing import RedisServer

from .conftest import snapshot

NO_TIMER = {"flush_interval": None, "retry_backoff": 0.01, "retry_backoff_max": 0.02}


def quarantined(proc: rb.Processor) -> dict[str, rb.DeadLetter]:
    return {d.batch_id: d for d in proc.dead_letters() if d.reason == "quarantine"}


def test_a_bad_due_member_is_quarantined_and_every_other_id_keeps_flowing(
    batcher: Batcher, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[tuple[str, list[Any]]] = []
    proc = batcher.processor(name="ev", max_batch_size=3, **NO_TIMER)(
        lambda f: got.append((f.batch_id, f.items))
    )
    part = proc.keys.for_base("x")
    for i in range(200):
        proc.add_many(f"id{i}", [i, i + 1, i + 2])
    # a state hash replaced by a string, named by the delay queue
    client.set(part.meta("x", 0), "junk")
    client.zadd(part.due, {"x::0": 0})
    # a sealed sequence's list replaced by a string
    proc.add_many("y", [1, 2, 3])
    client.delete(part.items("y", 0))
    client.set(part.items("y", 0), "junk")
    # a state field that is not a number
    proc.add_many("z", [4, 5, 6])
    client.hset(part.meta("z", 0), "attempt", "zz")
    # members naming no sequence, or one without state (its items are kept)
    client.zadd(part.due, {"nosep": 0, "ghost::0": 0, "orph::0": 0})
    client.rpush(part.items("orph", 0), proc.codec.encode("kept"))
    # a garbage score works as it always did: -inf is due now
    proc.add_many("early", [7, 8, 9])
    client.zadd(part.due, {"early::0": float("-inf")})

    with caplog.at_level(logging.ERROR, logger="redis_batcher.worker"):
        for _ in range(3):
            Worker(batcher, concurrency=2).run(burst=True)
    assert len(got) == 201 and sorted(b for b, _ in got) == sorted([f"id{i}" for i in range(200)] + ["early"])
    q = quarantined(proc)
    assert sorted(q) == ["ghost", "nosep", "orph", "x", "y", "z"]
    assert "s:x::0 is a string, not a hash" in q["x"].error
    assert "i:y::0 is a string, not a list" in q["y"].error and q["y"].item_count == 0
    assert 'field attempt is "zz"' in q["z"].error and q["z"].item_count == 3
    assert proc.dead_letter(q["z"].id).items == [4, 5, 6]
    assert proc.dead_letter(q["orph"].id).items == ["kept"]
    assert "names no sequence" in q["nosep"].error and q["nosep"].sequence == -1
    assert "has no state" in q["ghost"].error
    # each logged once, out of the queue, the rest of the id's bookkeeping cleared
    logged = [r.getMessage() for r in caplog.records if "reason quarantine" in r.getMessage()]
    assert len(logged) == 6
    assert client.zcard(part.due) == 0
    assert proc.status("y") is None and proc.status("z") is None
    assert client.get(part.meta("x", 0)) == b"junk"  # left for the operator to inspect
    # the numbers those keys hold are skipped: "x" opens sequence 1, never writes over the junk
    assert proc.add("x", 1).sequence == 1
    # a quarantined dead letter with items can be replayed like any other
    proc.replay_dead(q["z"].id)
    got.clear()
    Worker(batcher).run(burst=True)
    assert got == [("z", [4, 5, 6])]


def test_a_corrupt_partition_key_stops_that_partition_only(
    real_batcher: Batcher, real_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[str] = []
    bad = real_batcher.processor(name="bad", max_batch_size=1, **NO_TIMER)(lambda f: got.append(f.batch_id))
    good = real_batcher.processor(name="good", max_batch_size=1, **NO_TIMER)(lambda f: got.append(f.batch_id))
    bad.add("a", 1)
    good.add("b", 1)
    part = bad.keys.parts[0]
    real_client.delete(part.dead)
    real_client.set(part.dead, "junk")
    before = snapshot(real_client)
    with caplog.at_level(logging.ERROR, logger="redis_batcher.worker"):
        Worker(real_batcher).run(burst=True)
    assert got == ["b"]
    assert [r for r in caplog.records if "dead is a string, not a zset" in r.getMessage()]
    after = snapshot(real_client)
    assert {k: v for k, v in after.items() if part.pfx.encode() in k} == {
        k: v for k, v in before.items() if part.pfx.encode() in k
    }
    with pytest.raises(rb.CorruptData, match="dead holds a value of another type"):
        bad.purge_dead()


def test_a_damaged_header_never_costs_an_add_or_an_item(batcher: Batcher, client: Any) -> None:
    got: list[list[Any]] = []
    proc = batcher.processor(name="hb", max_batch_size=10, flush_interval=0.05)(lambda f: got.append(f.items))
    part = proc.keys.for_base("hb")
    proc.add_many("hb", [1, 2])
    proc.add("hb", 3)
    client.lset(part.open_items("hb"), 0, "garbage")
    # the hot path reads the header before it writes: the add goes the general way and works
    assert proc.add("hb", 4) == rb.AddResult("hb", 0, 1, 4, False, "accumulating", 0)
    assert client.lindex(part.open_items("hb"), 0).startswith(b"0:")
    client.lset(part.open_items("hb"), 0, "garbage")
    assert proc.status("hb").batches[0].item_count == 4  # type: ignore[union-attr]
    time.sleep(0.1)
    Worker(batcher).run(burst=True)  # the interval seal
    assert got == [[1, 2, 3, 4]]
    assert proc.status("hb") is None and client.exists(part.open_items("hb")) == 0


def test_a_quarantined_accumulating_sequence_takes_its_open_items_along(
    batcher: Batcher, client: Any
) -> None:
    got: list[list[Any]] = []
    proc = batcher.processor(name="acc", max_batch_size=10, flush_interval=0.01)(
        lambda f: got.append(f.items)
    )
    part = proc.keys.for_base("u")
    proc.add_many("u", [1, 2, 3])
    client.hset(part.meta("u", 0), "max", "ten")
    time.sleep(0.05)
    Worker(batcher).run(burst=True)
    [letter] = proc.dead_letters()
    assert (letter.reason, letter.item_count) == ("quarantine", 3) and "field max" in letter.error
    assert proc.dead_letter(letter.id).items == [1, 2, 3]
    assert client.exists(part.open_items("u")) == 0 and proc.status("u") is None
    # the id goes on with its next sequence
    proc.add("u", 4)
    time.sleep(0.05)
    Worker(batcher).run(burst=True)
    assert got == [[4]]


def test_entries_an_open_list_holds_already_go_with_the_next_sequence(batcher: Batcher, client: Any) -> None:
    # an open list left behind without an accumulating sequence (never by the scripts): the next
    # sequence of that id keeps its entries first, and they are delivered
    got: list[list[Any]] = []
    proc = batcher.processor(name="orph", max_batch_size=10, flush_interval=0.01)(
        lambda f: got.append(f.items)
    )
    part = proc.keys.for_base("u")
    enc = proc.codec.encode
    client.rpush(part.open_items("u"), enc("left"), enc("behind"))
    assert proc.add("u", "new").pending == 3
    time.sleep(0.05)
    Worker(batcher).run(burst=True)
    assert got == [["left", "behind", "new"]]
    assert client.exists(part.open_items("u")) == 0


@pytest.mark.parametrize("key", ["head", "open", "due", "ids", "meta"])
def test_an_add_into_keys_of_another_type_is_refused_before_anything_is_written(
    batcher: Batcher, client: Any, key: str
) -> None:
    proc = batcher.processor(name="w", max_batch_size=3, flush_interval=1.0)(lambda f: None)
    part = proc.keys.for_base("u")
    proc.add_many("u", [1, 2])  # accumulating: the next add seals it
    name = {
        "head": part.head("u"),
        "open": part.open_items("u"),
        "due": part.due,
        "ids": part.ids,
        "meta": part.meta("u", 0),
    }[key]
    client.delete(name)
    client.set(name, "junk")
    if key == "ids":  # sealing never writes the ids set: only opening a sequence does
        assert proc.add("u", 3).status == "flushing"
    before = snapshot(client)
    for add in (lambda: proc.add("u", 3), lambda: proc.add_many("u", [3, 4])):
        with pytest.raises(rb.CorruptData, match=f"{name.replace('{', '.').replace('}', '.')} is a string"):
            add()
        assert snapshot(client) == before


def corrupt_cases() -> list[tuple[str, str]]:
    keys = ["head_a", "open_a", "meta_a", "due", "ids", "dead", "head_s", "meta_s", "items_s", "hist_s"]
    keys += ["dmeta", "ditems", "pending_a", "cutoff_s"]
    return [(op, key) for op in OPS for key in keys]


def _setup(b: Batcher) -> tuple[rb.Processor, ops.Claimed, str, dict[str, tuple[str, str | None]]]:
    proc = b.processor(name="m", max_batch_size=3, flush_interval=None, max_attempts=1, retry_backoff=0.01)(
        lambda f: None
    )
    part = proc.keys.for_base("a")
    assert part is proc.keys.for_base("s")
    client = b.client
    proc.add_many("d", [9, 9, 9])  # one dead letter: claimed, failed for good
    owner = ops.new_token()
    _, [cd] = ops.parse_claim(proc, part, owner, ops.claim_call(proc, part, 1, owner).run(client))
    ops.nack_call(cd, "{}", 0, "no").run(client)
    [letter] = proc.dead_letters()
    proc.add_many("a", [1, 2])  # accumulating
    proc.add_many("s", [1, 2, 3])  # sealed, then claimed
    owner = ops.new_token()
    _, [cs] = ops.parse_claim(proc, part, owner, ops.claim_call(proc, part, 1, owner).run(client))
    # what each case corrupts: a key replaced by a string, or a field
    where: dict[str, tuple[str, str | None]] = {
        "head_a": (part.head("a"), None),
        "open_a": (part.open_items("a"), None),
        "meta_a": (part.meta("a", 0), None),
        "due": (part.due, None),
        "ids": (part.ids, None),
        "dead": (part.dead, None),
        "head_s": (part.head("s"), None),
        "meta_s": (part.meta("s", 0), None),
        "items_s": (part.items("s", 0), None),
        "hist_s": (part.history("s"), None),
        "dmeta": (part.dead_meta(letter.id), None),
        "ditems": (part.dead_items(letter.id), None),
        "pending_a": (part.head("a"), "pending"),
        "cutoff_s": (part.meta("s", 0), "cutoff"),
    }
    return proc, cs, letter.id, where


def _run(client: Any, call: ops.Call) -> Any:
    return call.run(client)


OPS: dict[str, Callable[[rb.Processor, ops.Claimed, str], Any]] = {
    "add": lambda p, c, d: p.add("a", 3),
    "add_many": lambda p, c, d: p.add_many("a", [3, 4, 5, 6]),
    "add_new": lambda p, c, d: p.add("n", 1),
    "flush": lambda p, c, d: p.flush("a"),
    "flush_s": lambda p, c, d: p.flush("s"),
    "retry": lambda p, c, d: p.retry("s"),
    "retry_a": lambda p, c, d: p.retry("a"),
    "status": lambda p, c, d: p.status("a"),
    "status_s": lambda p, c, d: p.status("s"),
    "delete": lambda p, c, d: p.delete("a"),
    "replay": lambda p, c, d: p.replay_dead(d),
    "purge": lambda p, c, d: p.purge_dead(d),
    "ack": lambda p, c, d: _run(p.batcher.client, ops.ack_call(c, "{}", ops.new_token())),
    "nack": lambda p, c, d: _run(p.batcher.client, ops.nack_call(c, "{}", 0, "x")),
    "partial": lambda p, c, d: _run(p.batcher.client, ops.nack_call(c, "{}", 0, "x", "partial", [1])),
    "decode": lambda p, c, d: _run(p.batcher.client, ops.nack_call(c, "{}", 0, "x", "decode", [0])),
    "extend": lambda p, c, d: _run(p.batcher.client, ops.extend_call(c)),
    "release": lambda p, c, d: _run(p.batcher.client, ops.release_call(c)),
    "claim": lambda p, c, d: _run(p.batcher.client, ops.claim_call(p, c.part, 5, ops.new_token())),
}


def _refused(result: Any) -> bool:
    """A script reply that says the keys hold something else (nothing written)."""
    if isinstance(result, list) and result:
        head = result[0]
        return head in (b"corrupt", ops.CORRUPT_DUE) or (isinstance(head, int) and head == ops.CORRUPT_DUE)
    return result == 0


@pytest.mark.parametrize(("op", "key"), corrupt_cases())
def test_no_operation_stops_half_way_on_data_it_did_not_write(
    real_batcher: Batcher, real_client: redis.Redis, op: str, key: str
) -> None:
    # every operation, against each key it may touch holding something else: it succeeds, or it
    # is refused with nothing written -- never a script error after a write
    proc, claimed, dead_id, where = _setup(real_batcher)
    name, field = where[key]
    if field is None:
        real_client.delete(name)
        real_client.set(name, "junk")
    else:
        real_client.hset(name, field, "x1")
    before = snapshot(real_client)
    try:
        result = OPS[op](proc, claimed, dead_id)
    except rb.CorruptData:
        assert snapshot(real_client) == before
        return
    except redis.ResponseError as exc:  # a script error: it may have stopped half-way
        pytest.fail(f"{op} with {key} corrupted: {exc}")
    if _refused(result) and op not in ("claim",):
        assert snapshot(real_client) == before


@pytest.mark.parametrize("action", ["pause", "cancel", "delete", "resume"])
def test_job_scripts_refuse_keys_of_another_type(
    real_batcher: Batcher, real_client: redis.Redis, action: str
) -> None:
    @real_batcher.iterator(name="walk")
    class Walk:
        def next_batch(self, cursor: str | None, batch_size: int) -> rb.Page:
            return rb.Page([], None)

        def process(self, items: list[Any], job: rb.JobContext) -> None:
            pass

    Walk.start("j1")
    real_client.delete(Walk.keys.samples("j1"))
    real_client.set(Walk.keys.samples("j1"), "junk")
    Walk.start("j2")
    real_client.hset(Walk.keys.job("j2"), "status", "bogus")
    before = snapshot(real_client)
    with pytest.raises(rb.CorruptData, match="is a string"):
        getattr(Walk, action)("j1")
    assert snapshot(real_client) == before
    with pytest.raises(rb.CorruptData):
        Walk.start("j1")
    with pytest.raises(rb.CorruptData, match='status is "bogus"'):
        getattr(Walk, action)("j2")
    assert snapshot(real_client) == before


def test_a_sequence_keeps_the_size_it_was_opened_with(batcher: Batcher, client: Any) -> None:
    # two deploys of one processor: max_batch_size 10, then 3 -- a sequence opened under 10 is
    # sealed at 10 by either, and delivered whole by a worker configured with 3
    got: list[list[Any]] = []
    proc10 = batcher.processor(name="sz", max_batch_size=10, flush_interval=None)(lambda f: None)
    other = Batcher(client, prefix=batcher.prefix)
    proc3 = other.processor(name="sz", max_batch_size=3, flush_interval=None)(lambda f: got.append(f.items))
    assert proc10.add_many("m", [1, 2, 3]).status == "accumulating"
    assert proc3.add_many("m", [4, 5, 6]) == rb.AddResult("m", 0, 3, 6, False, "accumulating", 0)
    assert proc3.add("m", 7).status == "accumulating"  # the single-add path reads its header
    result = proc3.add_many("m", [8, 9, 10, 11])
    assert (result.sealed, result.sequence, result.pending) == (1, 1, 1)  # 11 opens a size-3 one
    assert [b.item_count for b in proc3.status("m").batches] == [10, 1]  # type: ignore[union-attr]
    Worker(other).run(burst=True)
    assert got == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    # and the other way round: opened under 3, sealed at 3 by the max-10 producer
    proc10.add("m", 12)
    assert proc10.add("m", 13).status == "flushing"


def test_dead_letters_are_capped_and_expire(batcher: Batcher, client: Any) -> None:
    proc = batcher.processor(name="dl", max_batch_size=1, max_attempts=1, max_dead_letters=3, **NO_TIMER)(
        lambda f: 1 / 0
    )
    for i in range(5):
        proc.add(f"id{i}", i)
        Worker(batcher).run(burst=True)
    assert sorted(d.batch_id for d in proc.dead_letters()) == ["id2", "id3", "id4"]  # the oldest dropped
    part = proc.keys.parts[0]
    assert client.zcard(part.dead) == 3 and len(client.keys(part.pfx + "d*:*")) == 6
    ttl = batcher.processor(name="ttl", max_batch_size=1, max_attempts=1, dead_letter_ttl=0.5, **NO_TIMER)(
        lambda f: 1 / 0
    )
    ttl.add("a", 1)
    Worker(batcher).run(burst=True)
    [letter] = ttl.dead_letters()
    tpart = ttl.keys.parts[0]
    assert 0 < client.pttl(tpart.dead_meta(letter.id)) <= 500
    assert 0 < client.pttl(tpart.dead_items(letter.id)) <= 500
    ttl.add("b", 1)
    Worker(batcher).run(burst=True)
    [second] = [d for d in ttl.dead_letters() if d.batch_id == "b"]
    ttl.replay_dead(second.id)  # replayed items are live again: they never expire
    replayed = [k for k in client.keys(tpart.pfx + "i:*")]
    assert replayed and all(client.pttl(k) == -1 for k in replayed)
    time.sleep(0.6)
    assert ttl.dead_letters() == []
    ttl.add("c", 1)  # a new dead letter prunes the expired ones from the index
    Worker(batcher).run(burst=True)
    assert client.zrange(tpart.dead, 0, -1) != [] and len(ttl.dead_letters()) == 2  # b again, and c
    with pytest.raises(rb.ConfigError):
        batcher.processor(name="bad", max_dead_letters=0)(lambda f: None)
    with pytest.raises(rb.ConfigError):
        batcher.processor(name="bad2", dead_letter_ttl=-1)(lambda f: None)


@pytest.mark.parametrize("left", [0, 2])
def test_items_that_vanished_are_a_dead_letter_never_an_empty_delivery(
    batcher: Batcher, client: Any, left: int
) -> None:
    # what an evicting maxmemory-policy does to a sealed sequence's list (allow_eviction=True)
    got: list[list[Any]] = []
    proc = batcher.processor(name="ev", max_batch_size=5, **NO_TIMER)(lambda f: got.append(f.items))
    part = proc.keys.for_base("u")
    proc.add_many("u", [1, 2, 3, 4, 5])
    proc.add_many("fine", [6, 7, 8, 9, 10])
    client.ltrim(part.items("u", 0), 5 - left, -1)  # a list left empty is deleted
    Worker(batcher).run(burst=True)
    assert got == [[6, 7, 8, 9, 10]]
    [letter] = proc.dead_letters()
    assert (letter.batch_id, letter.reason, letter.item_count) == ("u", "items_missing", left)
    assert f"{5 - left} of 5 items are missing" in letter.error
    if left:
        assert proc.dead_letter(letter.id).items == [4, 5]
    assert proc.status("u") is None


def test_a_short_read_is_given_back_not_delivered(real_batcher: Batcher, real_client: redis.Redis) -> None:
    # a window too large to come with the claim is read afterwards; if items vanished meanwhile
    # the handler never sees a short batch
    got: list[int] = []
    n = ops.INLINE_MAX + 10
    proc = real_batcher.processor(name="big", max_batch_size=n, **NO_TIMER)(
        lambda f: got.append(len(f.items))
    )
    part = proc.keys.for_base("u")
    proc.add_many("u", range(n))
    owner = ops.new_token()
    _, [c] = ops.parse_claim(proc, part, owner, ops.claim_call(proc, part, 1, owner).run(real_client))
    assert c.raw is None
    real_client.ltrim(part.items("u", 0), 10, -1)  # evicted between the claim and the read
    w = Worker(real_batcher)
    w._execute_one(c.part.pfx + c.member, _running(c))
    assert got == []
    assert real_client.hget(part.meta("u", 0), "attempt") == b"0"  # not a delivery
    Worker(real_batcher).run(burst=True)
    [letter] = proc.dead_letters()
    assert letter.reason == "items_missing" and letter.item_count == n - 10


def _running(c: ops.Claimed) -> Any:
    from redis_batcher.worker_pace import Running

    return Running(c)


BIG = 1_000_000
SLOW_US = 250_000  # the longest a script call may block Redis


def _big(b: Batcher, name: str, **options: Any) -> tuple[rb.Processor, ops.Claimed]:
    """A sealed sequence of BIG items (0..BIG-1), claimed."""
    proc = b.processor(name=name, max_batch_size=BIG, flush_interval=None, **options)(lambda f: None)
    proc.add_many("k", range(BIG))
    part = proc.keys.for_base("k")
    owner = ops.new_token()
    _, [c] = ops.parse_claim(proc, part, owner, ops.claim_call(proc, part, 1, owner).run(b.client))
    assert c.cutoff == BIG
    return proc, c


def _drain_jobs(proc: rb.Processor, client: redis.Redis) -> int:
    """Claims until no move job is left (each claim goes on with one); returns how many."""
    part = proc.keys.for_base("k")
    calls = 0
    while client.hexists(part.meta("k", 0), "mv"):
        ops.claim_call(proc, part, 1, ops.new_token()).run(client)
        calls += 1
        assert calls < 1000
    return calls


def _items(proc: rb.Processor, client: redis.Redis) -> list[Any]:
    part = proc.keys.for_base("k")
    return [proc.codec.decode(x) for x in client.lrange(part.items("k", 0), 0, -1)]


@pytest.mark.slow
def test_windows_of_a_million_items_are_moved_in_bounded_steps() -> None:
    # every path that takes items out of the middle of a window, with a million items: no call
    # blocks Redis for SLOW_US (SLOWLOG), and each item ends where it must, in order
    with RedisServer(extra_args=["--slowlog-log-slower-than", str(SLOW_US // 5)]) as server:
        client = redis.Redis(port=server.port)
        b = Batcher(client, prefix="big")
        half = BIG // 2

        # a partial failure in a bisected half (the other half is the rest of the list): the
        # failed third stays first, then the rest, the others are delivered
        proc, c = _big(b, "partial", max_attempts=5, retry_backoff=0.01)
        client.hset(proc.keys.for_base("k").meta("k", 0), "window", half)
        c = ops.Claimed(**{**c.__dict__, "cutoff": half})
        failed = list(range(0, half, 3))
        reply = ops.nack_call(c, "{}", 0, "boom", "partial", failed).run(client)
        assert reply[0] == b"moving"
        assert _drain_jobs(proc, client) > 10
        assert _items(proc, client) == failed + list(range(half, BIG))
        [info] = proc.status("k").batches  # type: ignore[union-attr]
        assert (info.item_count, info.window, info.last_error) == (len(failed) + half, len(failed), "boom")

        # out of tries: the failed items go to a dead letter, the others were delivered
        proc, c = _big(b, "partial_dead", max_attempts=1)
        failed = list(range(1, BIG, 2))
        assert ops.nack_call(c, "{}", 0, "boom", "partial", failed).run(client)[0] == b"moving"
        _drain_jobs(proc, client)
        [letter] = proc.dead_letters()
        assert (letter.reason, letter.item_count) == ("max_attempts", len(failed))
        assert proc.dead_letter(letter.id).items == failed
        assert proc.status("k") is None

        # undecodable entries: out to a dead letter, the rest kept for a redelivery now
        proc, c = _big(b, "decode")
        bad = list(range(0, BIG, 1000))
        assert ops.nack_call(c, "{}", 0, "bad", "decode", bad).run(client)[0] == b"moving"
        _drain_jobs(proc, client)
        [letter] = proc.dead_letters()
        assert (letter.reason, letter.item_count) == ("decode_error", len(bad))
        assert len(_items(proc, client)) == BIG - len(bad) and _items(proc, client)[:2] == [1, 2]

        # a failing window smaller than its list, out of tries: dead-lettered in steps
        proc, c = _big(b, "bury", max_attempts=1)
        client.hset(proc.keys.for_base("k").meta("k", 0), "window", half + 1)
        c = ops.Claimed(**{**c.__dict__, "cutoff": half + 1})
        assert ops.nack_call(c, "{}", 0, "boom").run(client)[0] == b"moving"
        _drain_jobs(proc, client)
        [letter] = proc.dead_letters()
        assert (letter.reason, letter.item_count) == ("max_attempts", half + 1)
        assert _items(proc, client) == list(range(half + 1, BIG))

        # a worker that died with such a window, max_deaths reached: the claim buries it in steps
        proc, c = _big(b, "deaths", max_deaths=1)
        part = proc.keys.for_base("k")
        client.hset(part.meta("k", 0), "window", half)
        client.zadd(part.due, {"k::0": 0})  # its lease ran out
        ops.claim_call(proc, part, 1, ops.new_token()).run(client)
        _drain_jobs(proc, client)
        [letter] = proc.dead_letters()
        assert (letter.reason, letter.item_count, letter.deaths) == ("max_deaths", half, 1)
        assert _items(proc, client)[:1] == [half]

        # and the whole window delivered, then acknowledged
        proc, c = _big(b, "ack")
        ops.ack_call(c, "{}").run(client)
        assert proc.status("k") is None

        logged = client.slowlog_get(128)
        assert [(e["duration"], e["command"][:40]) for e in logged if e["duration"] >= SLOW_US] == []
        client.close()


def test_under_an_evicting_policy_vanished_items_are_dead_letters_never_empty_flushes() -> None:
    # allkeys-lru, allowed explicitly: Redis evicts item lists, states and heads alike; what a
    # worker then finds missing is reported as dead letters, never delivered short and acked
    with RedisServer(extra_args=["--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"]) as server:
        client = redis.Redis(port=server.port)
        b = Batcher(client, prefix="ev", allow_eviction=True)
        sizes: list[int] = []
        proc = b.processor(name="ev", max_batch_size=100, **NO_TIMER)(lambda f: sizes.append(len(f.items)))
        for i in range(300):
            proc.add_many(f"id{i}", [b"x" * 200] * 100)
        client.config_set("maxmemory", 0)  # what the worker records now stays
        assert int(client.info("stats")["evicted_keys"]) > 0
        part = proc.keys.parts[0]
        due = {m.decode() for m in client.zrange(part.due, 0, -1)}
        whole = {m for m in due if client.exists(part.meta(m[:-3], 0), part.items(m[:-3], 0)) == 2}
        listless = {
            m for m in due if client.exists(part.meta(m[:-3], 0)) and not client.exists(part.items(m[:-3], 0))
        }
        stateless = due - whole - listless
        # (the delay queue itself may have been evicted and started again: what it no longer
        # names is lost without an error, as allow_eviction says; what it names is checked)
        Worker(b, concurrency=2).run(burst=True)
        assert sizes == [100] * len(whole)  # whole sequences only
        letters = proc.dead_letters(limit=1000)
        assert sorted(d.batch_id for d in letters if d.reason == "items_missing") == sorted(
            m[:-3] for m in listless
        )
        assert sorted(d.batch_id for d in letters if d.reason == "quarantine") == sorted(
            m[:-3] for m in stateless
        )
        client.close()
