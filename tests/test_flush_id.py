"""flush_id is decided when a sequence is sealed and only read by the claims that deliver it.

So a handler sees the same id on every delivery of the same items: after its worker died (the
lease ran out), and after a failover that lost the claim's write (simulated here by putting
the sequence's state hash and delay-queue entry back as they were before the claim). Cases
that need no waiting run on both backends (real redis-server and fakeredis)."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import pytest

import redis_batcher as rb
from redis_batcher import Batcher, Worker, ops

from .test_worker import claim_directly

NO_TIMER = {"flush_interval": None, "retry_backoff": 0.01, "retry_backoff_max": 0.02}
# "<sealed at, microseconds>-<12 hex digits of the partition prefix and base id>-<sequence>"
FLUSH_ID = re.compile(r"^(\d{16})-([0-9a-f]{12})-(\d+)$")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def state(client: Any, proc: rb.Processor, base: str, seq: int) -> dict[str, str]:
    """The sequence's state hash, decoded."""
    meta = proc.keys.for_base(base).meta(base, seq)
    return {_s(k): _s(v) for k, v in client.hgetall(meta).items()}


def sealed_id(client: Any, proc: rb.Processor, base: str, seq: int) -> str:
    """The flush_id of a sealed, never claimed sequence, as its state and status() show it."""
    st = state(client, proc, base, seq)
    assert st["status"] == "flushing" and "owner" not in st, st  # sealed, not claimed yet
    status = proc.status(base)
    assert status is not None
    (info,) = [b for b in status.batches if b.sequence == seq]
    assert info.flush_id == st["flush_id"]
    return st["flush_id"]


def parts(flush_id: str) -> tuple[str, str, int]:
    """(sealed at in microseconds, tag, sequence) of a sealed flush_id."""
    m = FLUSH_ID.match(flush_id)
    assert m, flush_id
    return m.group(1), m.group(2), int(m.group(3))


def check_format(seq: int, flush_id: str, sealed_at_ms: str) -> None:
    us, _, n = parts(flush_id)
    assert (us[:13], n) == (sealed_at_ms, seq)  # the seal's time (its sealed_at, in us) and number


def claim_all(proc: rb.Processor, base: str, limit: int = 10) -> list[ops.Claimed]:
    part = proc.keys.for_base(base)
    owner = ops.new_token()
    reply = ops.claim_call(proc, part, limit, owner).run(proc.batcher.client)
    return ops.parse_claim(proc, part, owner, reply)[1]


def lost_claim(client: Any, proc: rb.Processor, base: str, seq: int) -> ops.Claimed:
    """A claim whose write a failover lost: claimed (its worker may have run the handler), then
    the sequence's state hash and delay-queue entry are put back as they were before it."""
    part = proc.keys.for_base(base)
    meta, member = part.meta(base, seq), f"{base}::{seq}"
    before = client.hgetall(meta)
    score = client.zscore(part.due, member)
    assert before and score is not None
    c = claim_directly(proc, base)
    assert c.member == member
    client.delete(meta)
    client.hset(meta, mapping=before)
    client.zadd(part.due, {member: score})
    return c


def seal_by(how: str, proc: rb.Processor, base: str) -> None:
    """Seal sequence 0 of ``base`` (max_batch_size 3) along one of the seal paths."""
    if how == "size-one-add":  # add.lua's hot path: the third single add seals
        for i in range(3):
            proc.add(base, i)
    elif how == "size-general":  # add.lua's general path: an add_many fills an open sequence
        proc.add(base, 0)
        proc.add_many(base, [1, 2])
    elif how == "size-at-once":  # add.lua: opened and filled by one add_many, written sealed
        proc.add_many(base, [0, 1, 2])
    elif how == "manual":
        proc.add_many(base, [0, 1])
        assert proc.flush(base).flushed
    else:
        raise AssertionError(how)


SEAL_PATHS = ["size-one-add", "size-general", "size-at-once", "manual"]


@pytest.mark.parametrize("how", SEAL_PATHS)
def test_flush_id_is_fixed_at_sealing_and_survives_a_lost_claim(
    batcher: Batcher, client: Any, how: str
) -> None:
    got: list[rb.Flush] = []
    proc = batcher.processor(name="fid", max_batch_size=3, **NO_TIMER)(got.append)
    seal_by(how, proc, "b")
    fid = sealed_id(client, proc, "b", 0)
    st = state(client, proc, "b", 0)
    check_format(0, fid, st["sealed_at"])
    assert st["reason"] == ("manual" if how == "manual" else "size") and proc.history("b") == []

    c = lost_claim(client, proc, "b", 0)
    assert (c.flush_id, c.attempt) == (fid, 1)
    assert sealed_id(client, proc, "b", 0) == fid  # the failover's view: sealed, unclaimed

    Worker(batcher).run(burst=True)
    (f,) = got
    assert (f.flush_id, f.attempt, f.items) == (fid, 1, [0, 1] if how == "manual" else [0, 1, 2])
    assert [h.flush_id for h in proc.history("b")] == [fid]


def test_flush_id_of_an_interval_seal_is_written_with_it(real_batcher: Batcher, real_client: Any) -> None:
    """The claim that finds an interval due seals and delivers in one write: the state holds
    the id it delivered; a worker that dies, and a later claim that a failover loses, change
    nothing."""
    got: list[rb.Flush] = []
    proc = real_batcher.processor(name="ivl", max_batch_size=10, flush_interval=0.05, lease_timeout=0.3)(
        got.append
    )
    proc.add_many("b", [1, 2])
    time.sleep(0.1)
    first = claim_directly(proc, "b")  # seals by interval and delivers; its worker "dies"
    st = state(real_client, proc, "b", 0)
    assert (first.reason, first.flush_id, first.attempt) == ("interval", st["flush_id"], 1)
    check_format(0, first.flush_id, st["sealed_at"])
    time.sleep(0.4)  # the lease runs out
    second = lost_claim(real_client, proc, "b", 0)  # death detected, then the claim is lost
    assert (second.flush_id, second.attempt) == (first.flush_id, 2)
    Worker(real_batcher).run(burst=True)
    (f,) = got
    assert (f.flush_id, f.attempt, f.items, f.reason) == (first.flush_id, 2, [1, 2], "interval")


def test_an_interval_seal_that_is_parked_has_its_flush_id_before_delivery(
    batcher: Batcher, client: Any
) -> None:
    """Ordered: the claim seals a due interval sequence behind an earlier one and parks it
    (sealed, not delivered); its flush_id is there already, and its deliveries carry it."""
    got: list[rb.Flush] = []
    proc = batcher.processor(name="ord", max_batch_size=2, flush_interval=0.05, ordered=True)(got.append)
    proc.add_many("b", [1, 2])  # sequence 0, sealed by size
    proc.add("b", 3)  # sequence 1, its timer 50 ms away
    time.sleep(0.1)
    (c0,) = claim_all(proc, "b")  # 0 is delivered; 1 is sealed by its interval and parked
    assert c0.sequence == 0
    st1 = state(client, proc, "b", 1)
    assert (st1["status"], st1["reason"], st1.get("parked")) == ("flushing", "interval", "1")
    fid1 = sealed_id(client, proc, "b", 1)
    check_format(1, fid1, st1["sealed_at"])
    assert ops.ack_call(c0, ops.history_entry(c0, 0, 1.0, True, None)).run(proc.batcher.client)[0] == b"ok"
    c1 = lost_claim(client, proc, "b", 1)  # unparked by the ack, claimed, lost
    assert c1.flush_id == fid1
    Worker(batcher).run(burst=True)
    (f,) = got
    assert (f.sequence, f.flush_id, f.attempt, f.items) == (1, fid1, 1, [3])


def test_a_dead_worker_leaves_the_sealed_flush_id(real_batcher: Batcher, real_client: Any) -> None:
    got: list[rb.Flush] = []
    proc = real_batcher.processor(name="die", max_batch_size=2, flush_interval=None, lease_timeout=0.3)(
        got.append
    )
    proc.add_many("b", [1, 2])
    fid = sealed_id(real_client, proc, "b", 0)
    assert claim_directly(proc, "b").flush_id == fid  # its worker "dies"
    time.sleep(0.4)
    Worker(real_batcher).run(burst=True)
    (f,) = got
    assert (f.flush_id, f.attempt) == (fid, 2)


def test_flush_ids_of_one_call_and_one_millisecond_differ(batcher: Batcher, client: Any) -> None:
    """Sequences sealed by one script call share its time to the microsecond: the base id and
    the sequence number tell their ids apart."""
    proc = batcher.processor(name="ms", max_batch_size=2, flush_interval=0.05)(lambda f: None)
    proc.add_many("a", [1, 2, 3, 4, 5, 6])  # one call seals sequences 0, 1, 2
    ids = [sealed_id(client, proc, "a", seq) for seq in range(3)]
    assert [parts(i)[2] for i in ids] == [0, 1, 2] and len({parts(i)[:2] for i in ids}) == 1
    # base ids of the same partition, each at sequence 0, sealed by one claim (their interval)
    bases = [f"id{i}" for i in range(20)]
    for base in bases:
        proc.add(base, 1)
    time.sleep(0.1)
    claimed = claim_all(proc, "id0", limit=50)
    by_base = {c.base: c.flush_id for c in claimed if c.base in bases}
    assert sorted(by_base) == sorted(bases) and len(set(by_base.values())) == len(bases)
    assert len({parts(i)[0] for i in by_base.values()}) == 1  # one time, to the microsecond
    assert len({parts(i)[1] for i in by_base.values()}) == len(bases)  # a tag per base id


def test_a_restarted_base_id_gets_new_flush_ids(batcher: Batcher, client: Any) -> None:
    """Deleting a base id restarts its sequence numbers; the seal's time keeps ids apart."""
    got: list[rb.Flush] = []
    proc = batcher.processor(name="rs", max_batch_size=2, **NO_TIMER)(got.append)
    proc.add_many("b", [1, 2])
    Worker(batcher).run(burst=True)
    assert proc.delete("b").deleted
    proc.add_many("b", [3, 4])
    Worker(batcher).run(burst=True)
    assert [(f.sequence, f.items) for f in got] == [(0, [1, 2]), (0, [3, 4])]
    assert got[0].flush_id != got[1].flush_id
    # one base id in two processors (another partition prefix): another tag
    other = batcher.processor(name="rs2", max_batch_size=2, **NO_TIMER)(lambda f: None)
    other.add_many("b", [5, 6])
    assert parts(sealed_id(client, other, "b", 0))[1] != parts(got[1].flush_id)[1]


def test_flush_id_tag_is_the_sha1_of_prefix_and_base(real_batcher: Batcher, real_client: Any) -> None:
    proc = real_batcher.processor(name="tag", max_batch_size=1, **NO_TIMER)(lambda f: None)
    proc.add("user:42", 1)
    fid = sealed_id(real_client, proc, "user:42", 0)
    pfx = proc.keys.for_base("user:42").pfx
    assert pfx == "t:{tag:0}:"
    assert parts(fid)[1] == hashlib.sha1(f"{pfx}user:42".encode()).hexdigest()[:12]


def test_a_later_window_gets_the_sealed_id_plus_a_counter_before_its_claim(
    batcher: Batcher, client: Any
) -> None:
    """A replayed dead letter larger than max_batch_size is delivered in windows: the first
    under the replay's sealed id, the next under "<that id>-1", fixed by the ack that removed
    the first window -- the same after a lost claim."""
    big = batcher.processor(name="win", max_batch_size=4, max_attempts=1, **NO_TIMER)(lambda f: 1 / 0)
    big.add_many("b", [1, 2, 3, 4])
    Worker(batcher).run(burst=True)
    (dead,) = big.dead_letters()
    assert dead.item_count == 4 and dead.id == f"{dead.flush_id}.4"  # dead-letter ids from flush_id

    got: list[rb.Flush] = []
    small = Batcher(client, prefix="t").processor(name="win", max_batch_size=2, **NO_TIMER)(got.append)
    seq = small.replay_dead(dead.id)
    replay_id = sealed_id(client, small, "b", seq)
    check_format(seq, replay_id, state(client, small, "b", seq)["sealed_at"])
    assert replay_id != dead.flush_id

    first = claim_directly(small, "b")
    assert (first.flush_id, first.cutoff) == (replay_id, 2)
    assert ops.ack_call(first, ops.history_entry(first, 0, 1.0, True, None)).run(client)[0] == b"ok"
    st = state(client, small, "b", seq)
    assert (st["flush_id"], st["fid_k"], st["cutoff"], st["attempt"]) == (f"{replay_id}-1", "1", "2", "0")
    assert lost_claim(client, small, "b", seq).flush_id == f"{replay_id}-1"
    Worker(small.batcher).run(burst=True)
    (f,) = got
    assert (f.flush_id, f.attempt, f.items) == (f"{replay_id}-1", 1, [3, 4])


def test_later_windows_count_on_from_the_sealed_id(batcher: Batcher, client: Any) -> None:
    """Three windows: <id>, <id>-1, <id>-2 (the counter is replaced, never appended twice)."""
    got: list[rb.Flush] = []
    proc = batcher.processor(name="w3", max_batch_size=6, **NO_TIMER)(got.append)
    proc.add_many("b", [1, 2, 3, 4, 5, 6])
    fid = sealed_id(client, proc, "b", 0)
    client.hset(proc.keys.for_base("b").meta("b", 0), "max", 2)  # as if opened with max 2
    for _ in range(3):
        Worker(batcher).run(burst=True)
    assert [(f.flush_id, f.items) for f in got] == [(fid, [1, 2]), (f"{fid}-1", [3, 4]), (f"{fid}-2", [5, 6])]


def test_a_sequence_sealed_by_an_older_version_gets_a_stable_id(batcher: Batcher, client: Any) -> None:
    """Sealed before flush_id was fixed at sealing (no flush_id in its state): its claims give
    it the id its sealed_at gives, the same after a lost claim; later windows count on."""
    got: list[rb.Flush] = []
    proc = batcher.processor(name="old", max_batch_size=2, **NO_TIMER)(got.append)
    proc.add_many("b", [1, 2])
    meta = proc.keys.for_base("b").meta("b", 0)
    client.hdel(meta, "flush_id")
    sealed_at = state(client, proc, "b", 0)["sealed_at"]
    c = lost_claim(client, proc, "b", 0)
    assert c.flush_id.startswith(f"{sealed_at}000-") and c.flush_id.endswith("-0")
    Worker(batcher).run(burst=True)
    (f,) = got
    assert f.flush_id == c.flush_id
