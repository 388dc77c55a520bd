"""Worker behaviour against a real redis-server: timers, wake-ups, retries, leases, bad entries."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

import redis_batcher as rb
from redis_batcher import Batcher, Worker, ops
from tests.conftest import wake_pubsub


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    try:
        yield worker
    finally:
        worker.stop()
        t.join(timeout=30)
        assert not t.is_alive(), "worker did not stop"


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_interval_flush_fires_without_further_adds(real_batcher: Batcher) -> None:
    got: list[rb.Flush] = []
    proc = real_batcher.processor(name="iv", max_batch_size=1000, flush_interval=0.3)(got.append)
    with running(Worker(real_batcher, max_idle_wait=30)):
        proc.add_many("slow-trickle", [1, 2, 3])
        proc.add("other", "x")
        # wait a few intervals; lateness is measured by benchmarks, not asserted here
        wait_for(lambda: len(got) == 2, timeout=5)
    assert sorted((f.batch_id, tuple(f.items), f.reason) for f in got) == [
        ("other", ("x",), "interval"),
        ("slow-trickle", (1, 2, 3), "interval"),
    ]
    assert proc.status("slow-trickle") is None


def test_idle_worker_wakes_on_seal_not_on_timer(real_batcher: Batcher) -> None:
    """With max_idle_wait=30 s, only the pub/sub wake-up can explain a prompt delivery."""
    started: list[float] = []
    proc = real_batcher.processor(name="wake", max_batch_size=5, flush_interval=None)(
        lambda f: started.append(time.monotonic())
    )
    with running(Worker(real_batcher, max_idle_wait=30)) as w:
        assert w.ready.wait(10)
        time.sleep(0.3)  # let it go idle
        for _ in range(3):
            before = len(started)  # read before the add: the handler may start before it returns
            t0 = time.monotonic()
            proc.add_many("w", [1, 2, 3, 4, 5])
            wait_for(lambda: len(started) > before, timeout=10)  # noqa: B023
            assert started[-1] - t0 < 10  # far below the 30 s the timer alone would take
            time.sleep(0.2)


def test_items_added_during_a_flush_go_to_the_next_sequence(real_batcher: Batcher) -> None:
    gate = threading.Event()
    inside = threading.Event()
    got: list[rb.Flush] = []

    def handler(flush: rb.Flush) -> None:
        if flush.sequence == 0:
            inside.set()
            assert gate.wait(10)
        got.append(flush)

    proc = real_batcher.processor(name="late", max_batch_size=100, flush_interval=None)(handler)
    proc.add_many("b", [1, 2])
    proc.flush("b")
    with running(Worker(real_batcher, max_idle_wait=0.2)):
        assert inside.wait(10)
        r = proc.add_many("b", [3, 4])  # after the cutoff of sequence 0
        assert (r.sequence, r.status) == (1, "accumulating")
        gate.set()
        wait_for(lambda: len(got) == 1)
        proc.flush("b")
        wait_for(lambda: len(got) == 2)
    assert [(f.sequence, f.items) for f in got] == [(0, [1, 2]), (1, [3, 4])]


def test_failing_handler_is_retried_with_backoff_then_succeeds(real_batcher: Batcher) -> None:
    attempts: list[tuple[int, str, float]] = []

    def handler(flush: rb.Flush) -> None:
        attempts.append((flush.attempt, flush.flush_id, time.monotonic()))
        if flush.attempt < 3:
            raise ConnectionError(f"try {flush.attempt}")

    proc = real_batcher.processor(name="retry", max_batch_size=2, flush_interval=None, retry_backoff=0.2)(
        handler
    )
    proc.add_many("b", ["a", "b"])
    with running(Worker(real_batcher, max_idle_wait=5)):
        wait_for(lambda: proc.status("b") is None, timeout=10)
    assert [a[0] for a in attempts] == [1, 2, 3]
    assert len({a[1] for a in attempts}) == 1  # one flush_id across redeliveries
    gap1, gap2 = attempts[1][2] - attempts[0][2], attempts[2][2] - attempts[1][2]
    assert gap1 >= 0.09 and gap2 >= 0.19  # 0.2*2**(n-1) with 50-100% jitter
    hist = proc.history("b")
    assert [(h.attempt, h.success, h.error) for h in hist] == [
        (3, True, None),
        (2, False, "ConnectionError: try 2"),
        (1, False, "ConnectionError: try 1"),
    ]


def test_undecodable_entries_are_quarantined_and_the_rest_delivered(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    calls: list[rb.Flush] = []
    proc = real_batcher.processor(name="dec", max_batch_size=10, flush_interval=None, retry_backoff=60)(
        calls.append
    )
    proc.add("b", {"ok": 1})
    # into the accumulating sequence's open list, as an add would have put it
    real_client.rpush(proc.keys.for_base("b").open_items("b"), b"\xc1")  # 0xc1 is never valid msgpack
    proc.add("b", {"ok": 2})
    proc.flush("b")
    stats = Worker(real_batcher).run(burst=True)
    # the worker neither crashed nor looped: the bad entry is a dead letter, the rest delivered
    assert [f.items for f in calls] == [[{"ok": 1}, {"ok": 2}]]
    assert stats.quarantined == 1 and stats.delivered == 1
    (dead,) = proc.dead_letters()
    assert (dead.reason, dead.item_count, dead.batch_id, dead.sequence) == ("decode_error", 1, "b", 0)
    assert "cannot decode item 1" in dead.error
    assert proc.dead_letter(dead.id).items == [b"\xc1"]  # kept as raw bytes
    hist = proc.history("b")
    assert [(h.success, h.error is not None and "cannot decode" in h.error) for h in hist] == [
        (True, False),
        (False, True),
    ]
    assert proc.status("b") is None


def claim_directly(proc: rb.Processor, base: str) -> ops.Claimed:
    part = proc.keys.for_base(base)
    owner = ops.new_token()
    _, claimed = ops.parse_claim(
        proc, part, owner, ops.claim_call(proc, part, 10, owner).run(proc.batcher.client)
    )
    (c,) = claimed
    return c


def test_expired_lease_is_redelivered_and_stale_ack_is_refused(real_batcher: Batcher) -> None:
    got: list[rb.Flush] = []
    proc = real_batcher.processor(name="lease", max_batch_size=2, flush_interval=None, lease_timeout=0.3)(
        got.append
    )
    proc.add_many("b", [1, 2])
    dead = claim_directly(proc, "b")  # a worker claims, then "dies" without acking
    assert dead.attempt == 1
    assert Worker(real_batcher).run(burst=True).delivered == 0  # leased: not due yet
    time.sleep(0.4)
    Worker(real_batcher).run(burst=True)
    (f,) = got
    assert (f.items, f.attempt, f.flush_id) == ([1, 2], 2, dead.flush_id)
    # the stale worker comes back and tries to ack: refused, nothing trimmed twice
    entry = ops.history_entry(dead, 0, 1.0, True, None)
    reply = ops.ack_call(dead, entry).run(real_batcher.client)
    assert reply[0] == b"lease_lost"
    # the death is recorded in the history, then the successful redelivery
    hist = proc.history("b")
    assert [(h.attempt, h.success) for h in hist] == [(2, True), (1, False)]
    assert hist[1].error == "worker died or lost its lease during the handler"


def test_heartbeat_keeps_a_long_handler_from_being_redelivered(real_batcher: Batcher) -> None:
    calls: list[int] = []

    def slow(flush: rb.Flush) -> None:
        calls.append(flush.attempt)
        time.sleep(1.2)  # four times the lease

    proc = real_batcher.processor(name="hb", max_batch_size=1, flush_interval=None, lease_timeout=0.3)(slow)
    proc.add("b", 1)
    stats = Worker(real_batcher, concurrency=2).run(burst=True)
    assert calls == [1] and stats.delivered == 1 and stats.lease_lost == 0


def test_concurrency_limits_running_handlers(real_batcher: Batcher) -> None:
    lock = threading.Lock()
    running_now = [0]
    peak = [0]

    def handler(flush: rb.Flush) -> None:
        with lock:
            running_now[0] += 1
            peak[0] = max(peak[0], running_now[0])
        time.sleep(0.05)
        with lock:
            running_now[0] -= 1

    proc = real_batcher.processor(name="conc", max_batch_size=1, flush_interval=None)(handler)
    proc.add_many("b", list(range(20)))
    stats = Worker(real_batcher, concurrency=3).run(burst=True)
    assert stats.delivered == 20 and peak[0] == 3


def test_two_workers_never_deliver_a_sequence_twice(real_batcher: Batcher, redis_server: Any) -> None:
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def handler(flush: rb.Flush) -> None:
        with lock:
            seen.append((flush.batch_id, flush.sequence))

    proc = real_batcher.processor(name="race", max_batch_size=5, flush_interval=None)(handler)
    for i in range(40):
        proc.add_many(f"id{i}", list(range(5)))
    other = Batcher(redis.Redis(port=redis_server.port), prefix="t")
    other.processor(name="race", max_batch_size=5, flush_interval=None)(handler)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda b=b: results.append(Worker(b, concurrency=4).run(burst=True)))
        for b in (real_batcher, other)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(seen) == sorted({(f"id{i}", 0) for i in range(40)})
    assert sum(r.delivered for r in results) == 40


def test_new_timer_wakes_an_idle_worker(real_batcher: Batcher) -> None:
    """An idle worker sleeping max_idle_wait (30 s) must learn about a new, earlier timer."""
    got = threading.Event()
    proc = real_batcher.processor(name="timer-wake", max_batch_size=100, flush_interval=0.2)(
        lambda f: got.set()
    )
    with running(Worker(real_batcher, max_idle_wait=30)) as w:
        assert w.ready.wait(10)
        time.sleep(0.5)  # idle: its last check found an empty queue
        proc.add("x", {"n": 1})
        assert got.wait(10)  # without the wake-up this takes the full 30 s


def test_each_add_is_exactly_one_evalsha(redis_server: Any) -> None:
    """The hot path: one round trip, one EVALSHA, nothing else (registry write is once per process)."""
    sent: list[str] = []

    class Counting(redis.Redis):
        def execute_command(self, *args: Any, **options: Any) -> Any:
            sent.append(str(args[0]).upper())
            return super().execute_command(*args, **options)

    client = Counting(host="127.0.0.1", port=redis_server.port)
    batcher = Batcher(client, prefix="one")
    proc = batcher.processor(name="hot", max_batch_size=7, flush_interval=1.0)(lambda f: None)
    proc.add("warm", 0)  # registers the processor (HSET) once per process
    sent.clear()
    for i in range(50):
        proc.add(f"id{i % 5}", i)
    for i in range(10):
        proc.add_many(f"id{i}", list(range(20)))  # spans several sequences, still one call
    assert sent == ["EVALSHA"] * 60
    client.close()


def test_small_windows_come_inline_with_the_claim_and_large_ones_are_read_in_chunks(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    got: list[rb.Flush] = []
    small = real_batcher.processor(name="small", max_batch_size=3, flush_interval=None)(got.append)
    small.add_many("s", ["a", {"b": 1}, [2]])
    part = small.keys.for_base("s")
    owner = ops.new_token()
    _, [claimed] = ops.parse_claim(
        small, part, owner, real_batcher.executor.execute(ops.claim_call(small, part, 5, owner))
    )
    assert claimed.raw is not None and [small.codec.decode(d) for d in claimed.raw] == ["a", {"b": 1}, [2]]
    real_batcher.executor.execute(ops.release_call(claimed), wait=False)

    big_size = ops.INLINE_MAX + 500
    large = real_batcher.processor(name="large", max_batch_size=big_size, flush_interval=None)(got.append)
    large.add_many("l", list(range(big_size)))
    lpart = large.keys.for_base("l")
    owner = ops.new_token()
    reply = real_batcher.executor.execute(ops.claim_call(large, lpart, 5, owner))
    _, [big] = ops.parse_claim(large, lpart, owner, reply)
    assert big.raw is None and big.cutoff == big_size  # too large to come inline
    real_batcher.executor.execute(ops.release_call(big), wait=False)

    stats = Worker(real_batcher).run(burst=True)
    assert stats.delivered == 2
    by_name = {f.processor: f.items for f in got}
    assert by_name == {"small": ["a", {"b": 1}, [2]], "large": list(range(big_size))}


def test_prefetched_flushes_wait_for_a_thread_and_are_handed_back_at_stop(real_batcher: Batcher) -> None:
    gate = threading.Event()
    started: list[int] = []

    def handler(flush: rb.Flush) -> None:
        started.append(flush.sequence)
        assert gate.wait(10)

    proc = real_batcher.processor(name="pf", max_batch_size=1, flush_interval=None)(handler)
    proc.add_many("p", [0, 1, 2, 3])  # four sealed sequences
    w = Worker(real_batcher, concurrency=1, prefetch_multiplier=3, grace_period=5)
    t = threading.Thread(target=w.run)
    t.start()
    try:
        wait_for(lambda: len(started) == 1)
        # one running, two more claimed ahead (capacity 1 x 3), one left in the queue
        wait_for(lambda: sum(1 for b in proc.status("p").batches if b.attempt == 1) == 3)  # type: ignore[union-attr]
        assert w.inflight == 1 and started == [0]
        w.stop()
        time.sleep(0.2)
        gate.set()  # the running handler finishes within the grace period
    finally:
        gate.set()
        t.join(10)
    assert not t.is_alive()
    assert started == [0] and w.stats.delivered == 1
    assert w.stats.released == 2  # the two that never started were handed back at once
    gate.set()
    stats = Worker(real_batcher).run(burst=True)  # due again now, not after a lease timeout
    assert stats.delivered == 3 and sorted(started) == [0, 1, 2, 3]
    assert all(h.attempt == 1 for h in proc.history("p"))  # a hand-back is not an attempt


def test_prefetch_multiplier_is_checked() -> None:
    import fakeredis

    b = Batcher(fakeredis.FakeRedis())
    b.processor(name="x")(lambda f: None)
    for bad in (0, -1, 1.5, True):
        try:
            Worker(b, prefetch_multiplier=bad)  # type: ignore[arg-type]
        except rb.ConfigError:
            continue
        raise AssertionError(f"prefetch_multiplier={bad!r} accepted")


def script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))


def test_an_ack_claims_the_partitions_next_flush_in_the_same_call(real_batcher: Batcher) -> None:
    proc = real_batcher.processor(name="fuse", max_batch_size=1, flush_interval=None)(lambda f: None)
    proc.add_many("b", [10, 11, 12])  # three sealed sequences, all due
    part = proc.keys.for_base("b")
    owner = ops.new_token()
    _, (first,) = ops.parse_claim(
        proc, part, owner, ops.claim_call(proc, part, 1, owner).run(real_batcher.client)
    )
    entry = ops.history_entry(first, 0, 1.0, True, None)
    follow = ops.new_token()
    call = ops.ack_call(first, entry, claim_owner=follow)
    reply = call.run(real_batcher.client)
    assert reply[:2] == [b"ok", 0]
    claim = ops.claim_part(reply)
    assert claim is not None
    next_due, (second,) = ops.parse_claim(proc, part, follow, claim)
    assert next_due == 0  # one more sequence is due now
    assert (second.sequence, second.owner, second.raw, second.attempt) == (
        1,
        follow,
        [rb.codec.MsgpackCodec().encode(11)],
        1,
    )
    # the claimed flush is leased to the new owner like any claim: a plain ack settles it
    plain = ops.ack_call(second, ops.history_entry(second, 0, 1.0, True, None))
    assert ops.without_claim(call).args == ops.ack_call(first, entry).args
    assert ops.without_claim(plain) is plain
    assert ops.claim_part(plain.run(real_batcher.client)) is None
    # a refused ack (lease lost) claims nothing: sequence 2 stays due for anyone
    refused = ops.ack_call(first, entry, claim_owner=ops.new_token()).run(real_batcher.client)
    assert refused == [b"lease_lost", 0]
    assert [(s.sequence, s.status, s.attempt) for s in proc.status("b").batches] == [(2, "flushing", 0)]  # type: ignore[union-attr]
    assert [(h.sequence, h.success) for h in proc.history("b")] == [(1, True), (0, True)]


def test_the_worker_asks_for_the_next_flush_with_each_ack(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    got: list[int] = []
    proc = real_batcher.processor(name="chain", max_batch_size=1, flush_interval=None)(
        lambda f: got.extend(f.items)
    )
    proc.add_many("b", list(range(50)))  # 50 sealed one-item sequences
    real_client.config_resetstat()
    stats = Worker(real_batcher, concurrency=1).run(burst=True)
    assert stats.delivered == 50 and sorted(got) == list(range(50))  # once each
    # one script call per flush (the ack brings the next one) plus a few claims, not two
    assert script_calls(real_client) <= 50 + 3
    assert proc.status("b") is None


def test_a_claim_reply_never_hides_a_wake_up_that_came_while_it_was_on_the_way(
    real_batcher: Batcher,
) -> None:
    proc = real_batcher.processor(name="race", flush_interval=None)(lambda f: None)
    w = Worker(real_batcher, processors=["race"])
    (idx,) = range(len(w.parts))
    owner, call, seen = w.claim_call(idx, 1)
    reply = call.run(real_batcher.client)  # the queue is empty: "nothing due, ever"
    w.on_wake(proc.keys.parts[0].pfx.encode())  # ... but a seal was announced meanwhile
    assert w.tokens_wanted(0) == []  # (no free slot: the token is left to the others, for now)
    assert w.tokens_wanted(1) == [idx] and w.tokens_wanted(1) == []
    w.token_tried(idx, True)  # this worker took its token
    assert w.claimed(idx, owner, reply, time.monotonic(), seen) == ([], False)
    assert w.due_at[idx] == 0.0  # still checked on the next round
    owner, call, seen = w.claim_call(idx, 1)
    w.claimed(idx, owner, call.run(real_batcher.client), time.monotonic(), seen)
    assert w.due_at[idx] == float("inf")  # no news since: sleep until a wake-up


def test_history_entry_is_the_json_of_its_fields() -> None:
    import json

    proc = rb.Batcher("redis://127.0.0.1:1/0", prefix="t").processor(name="h")(lambda flush: None)
    part = proc.keys.parts[0]
    for error, reason, flush_id in (
        (None, "size", "abc-1"),
        ('ValueError: "quoted" \\ back\nline\ttab \x00 caf\u00e9 \u2603 \U0001f600', "interval", "x-2"),
        ("", "manual", "\u00e9-3"),
    ):
        c = ops.Claimed(proc, part, "b::7", "b", 7, 42, 3, flush_id, reason, "tok")
        for started, duration, success in ((0, 1.0, True), (1764300000123, 0.1234567, False), (5, 12, True)):
            expected = {
                "seq": 7,
                "items": 42,
                "started_at": started,
                "duration_ms": round(duration, 3),
                "success": success,
                "error": error,
                "attempt": 3,
                "flush_id": flush_id,
                "reason": reason,
            }
            entry = ops.history_entry(c, started, duration, success, error)
            assert entry == json.dumps(expected, separators=(",", ":"))
            assert json.loads(entry) == expected


def test_tokens_are_unique_and_a_forked_child_draws_its_own() -> None:
    import multiprocessing

    tokens = {ops.new_token() for _ in range(10_000)}
    assert len(tokens) == 10_000
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        children = pool.map(_child_tokens, range(2))
    assert len({*children[0], *children[1], *tokens}) == 10_000 + 2 * 100


def _child_tokens(_: int) -> list[str]:
    return [ops.new_token() for _ in range(100)]


def test_an_interval_seal_by_the_claim_records_the_sealed_state(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    proc = real_batcher.processor(name="ivs", max_batch_size=10, flush_interval=0.1)(lambda f: None)
    proc.add_many("b", [1, 2])
    time.sleep(0.15)
    c = claim_directly(proc, "b")
    assert (c.reason, c.cutoff, c.sequence) == ("interval", 2, 0)
    part = proc.keys.for_base("b")
    meta = {k.decode(): v.decode() for k, v in real_client.hgetall(f"{part.pfx}s:b::0").items()}
    assert (meta["status"], meta["cutoff"], meta["reason"], meta["owner"]) == (
        "flushing",
        "2",
        "interval",
        c.owner,
    )
    assert int(meta["sealed_at"]) == int(meta["claimed_at"])
    head = real_client.hgetall(part.head("b"))
    assert head[b"a:0"] == b"flushing" and b"acc" not in head
    assert real_client.zscore(part.due, "b::0") == int(meta["lease_until"])
    proc.add("b", 3)  # a new sequence takes the next add
    assert [(s.sequence, s.status) for s in proc.status("b").batches] == [
        (0, "flushing"),
        (1, "accumulating"),
    ]  # type: ignore[union-attr]


def test_an_interval_sealed_sequence_parked_behind_an_earlier_one_keeps_its_cutoff(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    got: list[list[int]] = []
    proc = real_batcher.processor(name="ordiv", max_batch_size=2, flush_interval=0.1, ordered=True)(
        lambda f: got.append(f.items)
    )
    proc.add_many("b", [1, 2])  # sequence 0 sealed by size
    first = claim_directly(proc, "b")  # in flight
    proc.add("b", 3)  # sequence 1 accumulates; its timer falls due while 0 is in flight
    time.sleep(0.15)
    part = proc.keys.for_base("b")
    owner = ops.new_token()
    _, claimed = ops.parse_claim(
        proc, part, owner, ops.claim_call(proc, part, 10, owner).run(real_batcher.client)
    )
    assert claimed == []  # parked: ordered processors deliver sequence 1 after 0
    meta = {k.decode(): v.decode() for k, v in real_client.hgetall(f"{part.pfx}s:b::1").items()}
    assert (meta["status"], meta["cutoff"], meta["reason"], meta["parked"]) == (
        "flushing",
        "1",
        "interval",
        "1",
    )
    proc.add("b", 4)  # not into the sealed sequence 1
    ops.ack_call(first, ops.history_entry(first, 0, 1.0, True, None)).run(real_batcher.client)
    Worker(real_batcher, processors=["ordiv"]).run(burst=True)
    assert got == [[3]]  # sequence 1 (sequence 2 with item 4 waits for its own timer)


def test_wake_ups_are_held_back_until_a_claim_answers_the_last_one(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    proc = real_batcher.processor(name="hold", max_batch_size=1, flush_interval=None)(lambda f: None)
    pubsub = wake_pubsub(real_client, *proc.keys.channels)
    part = proc.keys.parts[0]

    def wake_ups() -> int:
        n = 0
        while pubsub.get_message(timeout=0.05) is not None:
            n += 1
        return n

    try:
        wake_ups()
        proc.add("a", 1)  # sealed: the first wake-up goes out and is held
        proc.add("b", 2)  # sealed too, but nobody has claimed since: no second message
        assert wake_ups() == 1
        assert real_client.pttl(f"{part.pfx}woke") > 0
        owner = ops.new_token()
        _, claimed = ops.parse_claim(
            proc, part, owner, ops.claim_call(proc, part, 10, owner).run(real_client)
        )
        assert sorted(c.base for c in claimed) == ["a", "b"]  # the claim found both
        assert not real_client.exists(f"{part.pfx}woke")  # ... and answered the wake-up
        proc.add("c", 3)
        assert wake_ups() == 1  # so the next seal wakes the workers again
        time.sleep(0.15)  # unanswered, the hold lapses after 100 ms
        proc.add("d", 4)
        assert wake_ups() == 1
    finally:
        pubsub.close()


def test_a_burst_of_seals_reaches_every_idle_handler_despite_held_back_wake_ups(
    real_batcher: Batcher,
) -> None:
    gate = threading.Event()
    running: set[str] = set()
    lock = threading.Lock()

    def handler(flush: rb.Flush) -> None:
        with lock:
            running.add(flush.batch_id)
        assert gate.wait(10)

    proc = real_batcher.processor(name="burst", max_batch_size=1, flush_interval=None)(handler)
    with running_worker(Worker(real_batcher, concurrency=4, max_idle_wait=60)):
        for b in "wxyz":  # four seals in a row: one wake-up, the rest held back
            proc.add(b, 0)
        wait_for(lambda: len(running) == 4, timeout=2)  # all four run at once, not after 60 s
        gate.set()
        wait_for(lambda: proc.status("z") is None)


@contextmanager
def running_worker(worker: Worker) -> Iterator[Worker]:
    with running(worker) as w:
        assert w.ready.wait(10)
        time.sleep(0.2)  # subscribed
        yield w


def test_a_flush_an_ack_brought_after_the_grace_period_is_handed_back_at_once(
    real_batcher: Batcher,
) -> None:
    got: list[str] = []
    proc = real_batcher.processor(name="late", max_batch_size=1, flush_interval=None, lease_timeout=60)(
        lambda f: got.append(f.batch_id)
    )
    proc.add("a", 1)
    proc.add("b", 2)
    w = Worker(real_batcher, concurrency=1, grace_period=0.1)
    settle = w._settle

    def slow_settle(c: ops.Claimed, call: ops.Call) -> Any:
        reply = settle(c, call)  # the ack of the first flush claims the second one...
        w.stop()  # ... while the worker is being stopped
        time.sleep(0.5)  # past the grace period: the shutdown has released what it saw
        return reply

    w._settle = slow_settle  # type: ignore[method-assign]
    w.run()  # returns once that is handed back (the process may exit right after)
    assert w.stats.released == 1  # the second flush was handed back, not left leased
    assert len(got) == 1
    assert Worker(real_batcher).run(burst=True).delivered == 1  # due now, not in 60 s
    assert sorted(got) == ["a", "b"]


def test_a_worker_whose_last_ack_found_nothing_hears_the_next_seal(real_batcher: Batcher) -> None:
    # the review case: a wake-up answered only by an ack's claim (no free slot to claim with)
    # must not leave the next seal unannounced while the worker sits idle
    gate = threading.Event()
    got: list[str] = []

    def handler(flush: rb.Flush) -> None:
        if flush.batch_id == "first":
            assert gate.wait(10)
        got.append(flush.batch_id)

    proc = real_batcher.processor(name="quiet", max_batch_size=1, flush_interval=None)(handler)
    with running_worker(Worker(real_batcher, concurrency=1, max_idle_wait=60)):
        proc.add("first", 0)
        wait_for(lambda: proc.status("first").batches[0].attempt == 1)  # type: ignore[union-attr]
        proc.add("second", 0)  # wakes the worker, which has no free slot
        gate.set()  # the first ack claims "second"; the second ack finds nothing
        wait_for(lambda: got == ["first", "second"])
        time.sleep(0.02)  # the worker is idle again, well within the 100 ms hold
        proc.add("third", 0)
        wait_for(lambda: got == ["first", "second", "third"], timeout=2)  # not after 60 s


def test_an_ack_whose_claim_finds_nothing_answers_the_pending_wake_up(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    proc = real_batcher.processor(name="ans", max_batch_size=1, flush_interval=None)(lambda f: None)
    part = proc.keys.parts[0]
    woke = f"{part.pfx}woke"
    proc.add("a", 1)
    owner = ops.new_token()
    (a,) = ops.parse_claim(proc, part, owner, ops.claim_call(proc, part, 1, owner).run(real_client))[1]
    proc.add("b", 2)  # announced: the hold is set
    assert real_client.exists(woke)
    entry = ops.history_entry(a, 0, 1.0, True, None)
    follow = ops.new_token()
    reply = ops.ack_call(a, entry, claim_owner=follow).run(real_client)
    (b,) = ops.parse_claim(proc, part, follow, ops.claim_part(reply) or [])[1]
    assert real_client.exists(woke)  # that claim took a flush: its slot is busy, no answer
    reply = ops.ack_call(b, ops.history_entry(b, 0, 1.0, True, None), claim_owner=ops.new_token()).run(
        real_client
    )
    assert ops.claim_part(reply) == [-1]  # nothing left
    assert not real_client.exists(woke)  # the idle slot answered the wake-up


def test_a_claim_reports_a_backlog_of_eight_or_more_beyond_what_it_took(real_batcher: Batcher) -> None:
    proc = real_batcher.processor(name="backlog", max_batch_size=1, flush_interval=None)(lambda f: None)
    proc.add_many("b", list(range(12)))  # twelve sealed sequences, all due
    part = proc.keys.for_base("b")

    def claim(limit: int) -> tuple[int, int]:
        owner = ops.new_token()
        reply = ops.claim_call(proc, part, limit, owner).run(real_batcher.client)
        next_due, claimed = ops.parse_claim(proc, part, owner, reply)
        return next_due, len(claimed)

    assert claim(1) == (ops.BACKLOG_DUE, 1)  # 11 left: 8 or more beyond the one taken
    assert claim(3) == (ops.BACKLOG_DUE, 3)  # 8 left
    assert claim(1) == (0, 1)  # 7 left: more is due, no backlog
    next_due, taken = claim(7)
    assert taken == 7 and next_due > 0  # nothing left due: the earliest lease expiry
    # the worker reads a backlog as "due now" and remembers it per partition
    proc.add_many("b", list(range(10)))
    w = Worker(real_batcher)
    idx = w.part_index[part.pfx]
    owner = ops.new_token()
    reply = ops.claim_call(proc, part, 1, owner).run(real_batcher.client)
    claimed, due_now = w.claimed(idx, owner, reply, time.monotonic(), w.wakes[idx])
    assert len(claimed) == 1 and due_now and w.backlog[idx] and w.due_at[idx] == 0.0


def test_the_main_loop_holds_due_flushes_only_for_young_computing_handlers(real_batcher: Batcher) -> None:
    from redis_batcher.worker_pace import HOLD, Running

    proc = real_batcher.processor(name="hold", max_batch_size=1, flush_interval=None)(lambda f: None)
    proc.add("b", 1)
    w = Worker(real_batcher, concurrency=4)
    c = claim_directly(proc, "b")
    now = time.monotonic()
    w.due_at = [0.0] * len(w.parts)  # something is due
    assert w._hold_until(now) == 0.0  # no handler running
    w._inflight["x"] = Running(c, started=now - HOLD / 2)
    assert w._hold_until(now) == now - HOLD / 2 + HOLD  # held until the handler is HOLD old
    assert not w._spread(("x", w._inflight["x"]))  # its ack claims the rest, no other thread
    assert w._spread(None)  # a thread with nothing next always lets the loop look
    w._inflight["x"] = Running(c, chained=True)  # claimed by an ack, about to start
    assert w._hold_until(now) == now + HOLD
    w._inflight["x"] = Running(c, started=now - 2 * HOLD)  # running for longer: spread
    assert w._hold_until(now) == 0.0
    w._inflight["x"] = Running(c, started=now)
    for undo in (
        lambda: setattr(w, "_cpu_share", 0.1),  # handlers that wait: threads are worth it
        lambda: w.backlog.__setitem__(0, True),  # a backlog: threads are worth it
        lambda: setattr(w, "due_at", [now + 10.0] * len(w.parts)),  # nothing due: nothing to hold
    ):
        saved = (w._cpu_share, list(w.backlog), list(w.due_at))
        undo()
        assert w._hold_until(now) == 0.0
        w._cpu_share, w.backlog, w.due_at = saved[0], saved[1], saved[2]
    assert Worker(real_batcher, prefetch_multiplier=2)._hold_until(now) == 0.0


def test_the_spread_limit_applies_only_to_computing_handlers_under_a_backlog_on_a_busy_machine(
    real_batcher: Batcher,
) -> None:
    from redis_batcher.worker_pace import COMPUTING_THREADS

    real_batcher.processor(name="spread", max_batch_size=1, flush_interval=None)(lambda f: None)
    w = Worker(real_batcher, concurrency=4)
    assert not w._crowded  # until measured, the machine has room
    w._crowded, w.backlog[0] = True, True  # computing handlers (the initial estimate), a backlog
    assert w._slots() == COMPUTING_THREADS == 2
    for undo in (
        lambda: setattr(w, "_cpu_share", 0.1),  # handlers that wait: every thread is worth it
        lambda: w.backlog.__setitem__(0, False),  # no backlog: the hold applies instead
        lambda: setattr(w, "_crowded", False),  # CPUs with room: more threads overlap round trips
    ):
        saved = (w._cpu_share, list(w.backlog), w._crowded)
        undo()
        assert w._slots() == w.capacity == 4
        w._cpu_share, w.backlog, w._crowded = saved
    prefetching = Worker(real_batcher, concurrency=4, prefetch_multiplier=2)
    prefetching._crowded, prefetching.backlog[0] = True, True
    assert prefetching._slots() == 8  # prefetch asked for: claimed flushes wait for threads
    single = Worker(real_batcher, concurrency=1)
    single._crowded, single.backlog[0] = True, True
    assert single._slots() == 1


def test_crowding_is_measured_from_a_threads_run_queue_wait(
    real_batcher: Batcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis_batcher import worker as worker_module
    from redis_batcher.worker import CROWD_WINDOW

    real_batcher.processor(name="crowd", max_batch_size=1, flush_interval=None)(lambda f: None)
    w = Worker(real_batcher, concurrency=4)
    readings: list[tuple[int, int] | None] = [(1_000, 500), (2_000, 1_300), (3_000, 1_400), None]
    monkeypatch.setattr(worker_module, "sched_times", lambda: readings.pop(0))
    w._measure_crowding(10.0)  # the first reading: nothing to compare with yet
    assert not w._crowded
    w._measure_crowding(10.0 + CROWD_WINDOW / 2)  # within the window: not read again
    assert len(readings) == 3
    w._measure_crowding(10.0 + CROWD_WINDOW)  # waited 800 ns for 1,000 ns run: >= 0.5
    assert w._crowded
    w._measure_crowding(10.0 + 2 * CROWD_WINDOW)  # waited 100 for 1,000: room again
    assert not w._crowded
    w._measure_crowding(10.0 + 3 * CROWD_WINDOW)  # no /proc: left as it was
    assert not w._crowded and not readings


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/thread-self is Linux's")
def test_sched_times_reads_the_calling_threads_cpu_time() -> None:
    from redis_batcher.worker import sched_times

    before = sched_times()
    assert before is not None
    spin = time.perf_counter() + 0.02
    while time.perf_counter() < spin:
        pass
    after = sched_times()
    assert after is not None and after[0] - before[0] >= 5_000_000 and after[1] >= before[1]


@pytest.mark.timing
@pytest.mark.parametrize("computing, crowded", [(True, True), (False, True), (True, False)])
def test_computing_handlers_work_through_a_backlog_on_two_threads_when_cpus_are_busy(
    real_batcher: Batcher, monkeypatch: pytest.MonkeyPatch, computing: bool, crowded: bool
) -> None:
    from redis_batcher import worker as worker_module

    monkeypatch.setattr(worker_module, "sched_times", lambda: None)  # crowding as set below
    workers: list[Worker] = []
    inflight: list[int] = []  # flushes in flight (claimed or running) as each handler starts

    def handler(flush: rb.Flush) -> None:
        inflight.append(len(workers[0]._inflight))
        if computing:
            spin = time.perf_counter() + 0.002
            while time.perf_counter() < spin:
                pass
        else:
            time.sleep(0.005)  # waits: every thread is worth it

    proc = real_batcher.processor(name="backlog2", max_batch_size=1, flush_interval=None)(handler)
    proc.add_many("b", list(range(80)))  # 80 sequences due at once: a backlog
    workers.append(Worker(real_batcher, concurrency=4, max_idle_wait=60))
    workers[0]._crowded = crowded
    with running_worker(workers[0]) as w:
        assert w.ready.wait(10)
        wait_for(lambda: len(inflight) == 80, timeout=30)
    # the first claim, before any reply told of the backlog, may start all four threads
    later = max(inflight[20:])
    if computing and crowded:
        assert later <= 2, inflight
    else:
        assert later == 4, inflight


def test_the_hold_never_keeps_another_partitions_due_flush_waiting(real_batcher: Batcher) -> None:
    from redis_batcher.worker_pace import HOLD, Running

    busy = real_batcher.processor(name="busy", max_batch_size=1, flush_interval=None)(lambda f: None)
    real_batcher.processor(name="other", max_batch_size=1, flush_interval=None)(lambda f: None)
    busy.add("b", 1)
    w = Worker(real_batcher, concurrency=4)
    now = time.monotonic()
    w._inflight["x"] = Running(claim_directly(busy, "b"), started=now)  # busy's chain is young
    busy_idx = w.part_index[busy.keys.parts[0].pfx]
    w.due_at = [now + 60.0] * len(w.parts)
    w.due_at[busy_idx] = 0.0
    assert w._hold_until(now) == now + HOLD  # its ack will claim busy's next flush
    w.due_at = [0.0] * len(w.parts)  # "other" has something due too: only the loop claims it
    assert w._hold_until(now) == 0.0


def test_a_freed_thread_wakes_the_main_loop_only_when_it_has_something_to_do(real_batcher: Batcher) -> None:
    real_batcher.processor(name="look", max_batch_size=1, flush_interval=None)(lambda f: None)
    w = Worker(real_batcher, concurrency=2)
    now = time.monotonic()
    w.due_at = [now + 60.0] * len(w.parts)
    w._until, w._full = now + 5.0, False  # asleep until the next full check, slots free
    assert not w._needs_look()  # nothing due before it wakes anyway
    w.due_at[0] = now + 1.0  # this thread's ack learnt of an earlier due time
    assert w._needs_look()
    w.due_at[0] = now + 60.0
    w._full = True  # asleep waiting for a free slot
    assert w._needs_look()
    w._full, w._burst = False, True  # burst: it returns once nothing is in flight
    assert w._needs_look()


@pytest.mark.timing
def test_a_flush_due_during_a_slow_handler_gets_another_thread_within_the_hold(
    real_batcher: Batcher,
) -> None:
    from redis_batcher.worker_pace import HOLD

    spans: dict[str, tuple[float, float]] = {}

    def handler(flush: rb.Flush) -> None:
        t0 = time.monotonic()
        time.sleep(0.3)
        spans[flush.batch_id] = (t0, time.monotonic())

    proc = real_batcher.processor(name="slow", max_batch_size=1, flush_interval=None)(handler)
    with running_worker(Worker(real_batcher, concurrency=2, max_idle_wait=60)) as w:
        assert w.ready.wait(10)
        proc.add("first", 1)
        wait_for(lambda: w.inflight == 1)
        time.sleep(0.05)
        proc.add("second", 2)  # due while "first" runs: held for at most HOLD, then a thread
        wait_for(lambda: len(spans) == 2)
    assert spans["second"][0] < spans["first"][1]  # they overlapped
    assert spans["second"][0] - spans["first"][0] < 0.3 - HOLD


@pytest.mark.timing
def test_flushes_due_during_a_fast_computing_handler_run_on_its_thread(real_batcher: Batcher) -> None:
    threads: list[int] = []

    def handler(flush: rb.Flush) -> None:
        n = flush.items[0]
        if n < 29:
            proc.add(f"b{n + 1}", n + 1)  # the next flush is due while this handler computes
        spin = time.perf_counter() + 0.0003
        while time.perf_counter() < spin:
            pass
        threads.append(threading.get_ident())

    proc = real_batcher.processor(name="chain", max_batch_size=1, flush_interval=None)(handler)
    with running_worker(Worker(real_batcher, concurrency=4, max_idle_wait=60)) as w:
        assert w.ready.wait(10)
        proc.add("b0", 0)
        wait_for(lambda: len(threads) == 30)
    # its ack claims the next one: the chain stays on the thread that ran the last flush instead
    # of moving to an idle thread at each hand-off, as it would without the hold (about 3 in 4 of
    # the 29 with 4 threads); a busy machine lets an idle thread's wake-up win now and then
    moves = sum(a != b for a, b in itertools.pairwise(threads))
    assert moves <= 10, [threads.index(t) for t in threads]
