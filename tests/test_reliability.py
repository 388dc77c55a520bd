"""Retries, dead letters, partial failure, bisection, ordering and backpressure.

Burst-driven cases run on both backends (real redis-server and fakeredis); timing and fault
cases run on the real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import redis_batcher as rb
from redis_batcher import Batcher, Worker, wake

from .conftest import snapshot
from .test_worker import claim_directly, running, wait_for

FAST = {"flush_interval": None, "retry_backoff": 0.01, "retry_backoff_max": 0.02}


def drain(batcher: Batcher, done: Callable[[], bool], timeout: float = 20.0) -> int:
    """Run burst workers until ``done()``; returns how many bursts it took."""
    deadline = time.monotonic() + timeout
    bursts = 0
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("not done in time")
        Worker(batcher, concurrency=2).run(burst=True)
        bursts += 1
        time.sleep(0.02)
    return bursts


def test_max_attempts_dead_letters_and_other_batches_keep_flowing(batcher: Batcher) -> None:
    calls: list[tuple[str, int]] = []
    failing = {"bad"}

    def handler(flush: rb.Flush) -> None:
        calls.append((flush.batch_id, flush.attempt))
        if flush.batch_id in failing:
            raise ValueError("nope")

    proc = batcher.processor(name="d", max_batch_size=3, max_attempts=3, **FAST)(handler)
    proc.add_many("bad", [1, 2, 3])
    proc.add_many("good", [4, 5, 6])
    drain(batcher, lambda: proc.status("bad") is None and proc.status("good") is None)
    assert [a for b, a in calls if b == "bad"] == [1, 2, 3]
    assert [a for b, a in calls if b == "good"] == [1]
    (dead,) = proc.dead_letters()
    assert (dead.batch_id, dead.sequence, dead.item_count, dead.reason) == ("bad", 0, 3, "max_attempts")
    assert (dead.attempts, dead.error, dead.processor) == (3, "ValueError: nope", "d")
    assert dead.dead_at is not None and dead.flush_id
    assert proc.dead_letter(dead.id).items == [1, 2, 3]
    assert [(h.attempt, h.success) for h in proc.history("bad")] == [(3, False), (2, False), (1, False)]

    failing.clear()
    assert proc.replay_dead(dead.id) == 1
    assert proc.dead_letters() == []
    drain(batcher, lambda: proc.status("bad") is None)
    assert calls[-1] == ("bad", 1)
    assert proc.history("bad")[0].reason == "replay" and proc.history("bad")[0].success
    with pytest.raises(rb.DeadLetterNotFound):
        proc.replay_dead(dead.id)
    with pytest.raises(rb.DeadLetterNotFound):
        proc.dead_letter("nope")


def test_purge_dead_letters(batcher: Batcher, client: Any) -> None:
    proc = batcher.processor(name="p", max_batch_size=1, max_attempts=1, partitions=3, **FAST)(
        lambda f: 1 / 0
    )
    for i in range(7):
        proc.add(f"id{i}", i)
    drain(batcher, lambda: len(proc.dead_letters()) == 7)
    first = proc.dead_letters()[0]
    assert proc.purge_dead(first.id) == 1
    assert len(proc.dead_letters()) == 6
    assert proc.purge_dead() == 6
    assert proc.dead_letters() == []
    assert list(client.scan_iter("t:{p:*}:d*")) == []


@pytest.mark.parametrize("style", ["raise", "return"])
def test_partial_failure_retries_only_the_failed_items(batcher: Batcher, style: str) -> None:
    seen: list[tuple[int, list[Any]]] = []

    def handler(flush: rb.Flush) -> Any:
        seen.append((flush.attempt, flush.items))
        if flush.attempt == 1:
            failure = rb.PartialFailure(failed=[1, 3], message="b and d were rejected")
            if style == "raise":
                raise failure
            return failure
        return None

    proc = batcher.processor(name="pf", max_batch_size=5, **FAST)(handler)
    proc.add_many("b", ["a", "b", "c", "d", "e"])
    drain(batcher, lambda: proc.status("b") is None)
    assert seen == [(1, ["a", "b", "c", "d", "e"]), (2, ["b", "d"])]
    hist = proc.history("b")
    assert [(h.success, h.item_count) for h in hist] == [(True, 2), (False, 5)]
    assert hist[1].error == "PartialFailure: b and d were rejected"
    assert hist[0].flush_id == hist[1].flush_id  # b and d were delivered under it: they keep it
    assert proc.dead_letters() == []


def test_partial_failure_exhausting_attempts_dead_letters_only_the_failed(batcher: Batcher) -> None:
    delivered: list[Any] = []

    def handler(flush: rb.Flush) -> None:
        bad = [i for i, item in enumerate(flush.items) if item == "poison"]
        delivered.extend(item for item in flush.items if item != "poison")
        if bad:
            raise rb.PartialFailure(failed=bad)

    proc = batcher.processor(name="pf2", max_batch_size=4, max_attempts=2, **FAST)(handler)
    proc.add_many("b", ["x", "poison", "y", "z"])
    drain(batcher, lambda: proc.status("b") is None)
    assert sorted(delivered) == ["x", "y", "z"]
    (dead,) = proc.dead_letters()
    assert proc.dead_letter(dead.id).items == ["poison"] and dead.attempts == 2


def test_partial_failure_with_bad_indices_fails_the_whole_flush(batcher: Batcher) -> None:
    calls: list[int] = []

    def handler(flush: rb.Flush) -> None:
        calls.append(len(flush.items))
        if len(calls) == 1:
            raise rb.PartialFailure(failed=[7])

    proc = batcher.processor(name="pf3", max_batch_size=2, **FAST)(handler)
    proc.add_many("b", [1, 2])
    drain(batcher, lambda: proc.status("b") is None)
    assert calls == [2, 2]
    assert "outside 0..1" in (proc.history("b")[1].error or "")


def test_bisect_isolates_a_poison_item_without_spending_attempts_on_good_ones(batcher: Batcher) -> None:
    calls: list[list[int]] = []
    good: list[int] = []

    def handler(flush: rb.Flush) -> None:
        calls.append(list(flush.items))
        if 5 in flush.items:
            raise RuntimeError("poison")
        good.extend(flush.items)

    proc = batcher.processor(name="bi", max_batch_size=8, max_attempts=2, bisect_on_error=True, **FAST)(
        handler
    )
    proc.add_many("b", list(range(8)))
    drain(batcher, lambda: proc.status("b") is None)
    assert sorted(good) == [0, 1, 2, 3, 4, 6, 7] and len(good) == 7  # each good item exactly once
    (dead,) = proc.dead_letters()
    assert proc.dead_letter(dead.id).items == [5]
    assert (dead.reason, dead.attempts) == ("max_attempts", 2)
    assert [5] in calls and calls.count([5]) == 2  # only the poison spent the retry budget
    assert len(calls) <= 10


def test_other_batch_ids_are_not_delayed_by_a_failing_one(real_batcher: Batcher) -> None:
    times: dict[str, float] = {}

    def handler(flush: rb.Flush) -> None:
        if flush.batch_id == "bad":
            raise RuntimeError("down")
        times[flush.batch_id] = time.monotonic()

    proc = real_batcher.processor(name="iso", max_batch_size=2, flush_interval=None, retry_backoff=5)(handler)
    with running(Worker(real_batcher, concurrency=2)) as w:
        assert w.ready.wait(10)
        proc.add_many("bad", [1, 2])
        t0 = time.monotonic()
        for i in range(5):
            proc.add_many(f"ok{i}", [1, 2])
        wait_for(lambda: len(times) == 5, timeout=5)
    assert max(times.values()) - t0 < 2  # nowhere near the 5 s backoff of "bad"


def test_ordered_delivery_holds_later_sequences_behind_a_retrying_one(batcher: Batcher) -> None:
    order: list[tuple[int, int]] = []
    failing = [True]

    def handler(flush: rb.Flush) -> None:
        order.append((flush.sequence, flush.attempt))
        if flush.sequence == 0 and failing[0]:
            raise RuntimeError("first one fails")

    # a retry 0.5-1 s away: a slow burst run ends before it, and drain() waits for it
    slow_retry = {**FAST, "retry_backoff": 1.0, "retry_backoff_max": 1.0}
    proc = batcher.processor(name="ord", max_batch_size=2, ordered=True, **slow_retry)(handler)
    proc.add_many("b", [1, 2, 3, 4, 5, 6])  # sequences 0, 1, 2 sealed
    Worker(batcher, concurrency=4).run(burst=True)
    assert order == [(0, 1)]
    st = proc.status("b")
    assert st is not None and [(x.sequence, x.attempt) for x in st.batches] == [(0, 1), (1, 0), (2, 0)]
    failing[0] = False
    drain(batcher, lambda: proc.status("b") is None)
    assert order == [(0, 1), (0, 2), (1, 1), (2, 1)]


def test_unordered_delivery_does_not_wait(batcher: Batcher) -> None:
    order: list[int] = []

    def handler(flush: rb.Flush) -> None:
        order.append(flush.sequence)
        if flush.sequence == 0:
            raise RuntimeError("first one fails")

    proc = batcher.processor(name="unord", max_batch_size=2, flush_interval=None, retry_backoff=60)(handler)
    proc.add_many("b", [1, 2, 3, 4, 5, 6])
    Worker(batcher, concurrency=4).run(burst=True)
    assert sorted(order) == [0, 1, 2]


def test_max_pending_refuses_adds_and_writes_nothing(batcher: Batcher, client: Any) -> None:
    proc = batcher.processor(name="bp", max_batch_size=3, max_pending=5, **FAST)(lambda f: None)
    proc.add_many("b", [1, 2, 3, 4])
    before = snapshot(client)
    with pytest.raises(rb.BatchFull) as err:
        proc.add_many("b", [5, 6])
    assert (err.value.pending, err.value.adding, err.value.limit) == (4, 2, 5)
    assert snapshot(client) == before
    assert proc.add("b", 5).pending == 2
    with pytest.raises(rb.BatchFull):
        proc.add("b", 6)
    proc.add_many("other", [1, 2, 3, 4, 5])  # the limit is per batch id
    Worker(batcher).run(burst=True)  # delivers the sealed sequence 0 (3 items)
    assert proc.add("b", 6).pending == 3
    st = proc.status("b")
    assert st is not None and st.pending == 3


def test_handler_timeout_counts_as_failure_and_frees_the_slot(real_batcher: Batcher) -> None:
    finished: list[int] = []

    def handler(flush: rb.Flush) -> None:
        if flush.attempt == 1:
            time.sleep(1.5)
        finished.append(flush.attempt)

    proc = real_batcher.processor(
        name="to", max_batch_size=1, handler_timeout=0.3, flush_interval=None, retry_backoff=0.05
    )(handler)
    proc.add("b", 1)
    with running(Worker(real_batcher, concurrency=1)) as w:
        wait_for(lambda: proc.status("b") is None, timeout=5)  # attempt 2 ran while 1 still sleeps
        assert w.stats.timed_out == 1
        wait_for(lambda: len(finished) == 2, timeout=5)
    hist = proc.history("b")
    assert [(h.attempt, h.success) for h in hist] == [(2, True), (1, False)]
    assert (hist[1].error or "").startswith("HandlerTimeout: handler still running after 0.3s")


def test_shutdown_grace_period_releases_unfinished_leases(real_batcher: Batcher) -> None:
    slow = [True]
    delivered: list[int] = []

    def handler(flush: rb.Flush) -> None:
        if slow[0]:
            time.sleep(3)
        delivered.append(flush.attempt)

    proc = real_batcher.processor(name="gr", max_batch_size=1, flush_interval=None)(handler)
    proc.add("b", 1)
    w = Worker(real_batcher, grace_period=0.2)
    t = threading.Thread(target=w.run)
    t.start()
    wait_for(lambda: w.inflight == 1)
    t0 = time.monotonic()
    w.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert w.stats.released == 1
    st = proc.status("b")
    assert st is not None and st.batches[0].attempt == 0  # released: the attempt does not count
    slow[0] = False
    Worker(real_batcher).run(burst=True)  # due at once, not after the lease timeout
    assert delivered == [1]


def test_worker_deaths_dead_letter_after_max_deaths(real_batcher: Batcher) -> None:
    calls: list[Any] = []
    proc = real_batcher.processor(
        name="dd", max_batch_size=2, flush_interval=None, lease_timeout=0.2, max_deaths=2
    )(calls.append)
    proc.add_many("b", [1, 2])
    claim_directly(proc, "b")  # delivery 1: its worker "dies"
    time.sleep(0.3)
    claim_directly(proc, "b")  # death 1 detected; delivery 2: its worker "dies" too
    time.sleep(0.3)
    Worker(real_batcher).run(burst=True)  # death 2: dead-lettered, not delivered again
    assert calls == []
    (dead,) = proc.dead_letters()
    assert (dead.reason, dead.deaths, dead.item_count) == ("max_deaths", 2, 2)
    assert proc.status("b") is None
    assert [h.error for h in proc.history("b")] == ["worker died or lost its lease during the handler"] * 2


def test_worker_deaths_with_bisect_isolate_the_killer(real_batcher: Batcher) -> None:
    calls: list[list[int]] = []
    proc = real_batcher.processor(
        name="db",
        max_batch_size=4,
        flush_interval=None,
        lease_timeout=0.2,
        max_deaths=1,
        bisect_on_error=True,
    )(lambda f: calls.append(f.items))
    proc.add_many("b", [1, 2, 3, 4])
    c = first = claim_directly(proc, "b")
    assert c.cutoff == 4
    time.sleep(0.3)
    c = claim_directly(proc, "b")  # the death halves the window; same flush, next attempt
    assert (c.cutoff, c.attempt, c.flush_id) == (2, 2, first.flush_id)
    time.sleep(0.3)
    c = claim_directly(proc, "b")
    assert c.cutoff == 1
    time.sleep(0.3)
    Worker(real_batcher).run(burst=True)  # [1] died max_deaths times: dead; the rest delivered
    (dead,) = proc.dead_letters()
    assert proc.dead_letter(dead.id).items == [1] and dead.reason == "max_deaths"
    assert calls == [[2, 3, 4]]


def test_redis_restart_worker_and_producer_recover() -> None:
    from redis_batcher.testing import RedisServer

    with RedisServer() as server:
        batcher = Batcher(server.url, prefix="rs", connect_retry=0.5)
        got: list[list[int]] = []
        proc = batcher.processor(name="rs", max_batch_size=2, flush_interval=None)(
            lambda f: got.append(f.items)
        )
        channel = proc.keys.channels[0]
        probe = redis.Redis(host="127.0.0.1", port=server.port)

        def subscribed() -> bool:
            try:
                return wake.subscribers(probe, channel) == 1
            except redis.ConnectionError:
                return False

        with running(Worker(batcher, max_idle_wait=30)):
            wait_for(subscribed)
            proc.add_many("a", [1, 2])
            wait_for(lambda: got == [[1, 2]])
            server.stop(kill=True)
            t0 = time.monotonic()
            with pytest.raises(redis.ConnectionError):
                proc.add("a", 3)  # the outage surfaces after connect_retry, nothing half-written
            assert time.monotonic() - t0 < 5
            time.sleep(1.0)  # the idle worker sees the outage too
            server.start()
            wait_for(subscribed, timeout=15)  # it resubscribes on its own
            proc.add_many("a", [3, 4])  # scripts were lost with the restart: NOSCRIPT recovery
            wait_for(lambda: got == [[1, 2], [3, 4]], timeout=5)
        probe.close()


def test_wait_replicas() -> None:
    from redis_batcher.testing import RedisServer

    with RedisServer() as primary:
        replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
        try:
            rep = redis.Redis(host="127.0.0.1", port=replica.port)
            wait_for(lambda: rep.info("replication").get("master_link_status") == "up")
            with redis.Redis(host="127.0.0.1", port=primary.port) as pc:  # the primary counts it too
                pc.execute_command("WAIT", 1, 5000)
            # a timeout that a busy machine's replica still meets when it is up
            batcher = Batcher(primary.url, prefix="w", wait_replicas=1, wait_timeout=1.0)
            proc = batcher.processor(name="w", max_batch_size=10, flush_interval=None)(lambda f: None)
            proc.add("b", 1)
            # WAIT returned: the replica already holds the item
            assert rep.llen(proc.keys.for_base("b").open_items("b")) == 1 + 1  # header, item
            replica.stop()
            t0 = time.monotonic()
            with pytest.raises(rb.NotReplicated) as err:
                proc.add("b", 2)
            assert err.value.got == 0 and time.monotonic() - t0 < 3
            assert proc.pending("b") == 2  # written on the primary all the same
            rep.close()
        finally:
            replica.close()
    with pytest.raises(rb.ConfigError):
        Batcher("redis://127.0.0.1:1/0", wait_replicas=-1)


def test_a_million_item_batch_never_blocks_redis(real_batcher: Batcher, real_client: redis.Redis) -> None:
    # busy-reply-threshold is 5 s; a 10,000-item chunk takes a few ms, a single 1,000,000-item
    # script call seconds. 250 ms separates the two with room for a loaded machine.
    real_client.config_set("slowlog-log-slower-than", 250_000)
    real_client.slowlog_reset()
    got: list[int] = []
    fail = [True]

    def handler(flush: rb.Flush) -> None:
        got.append(len(flush.items))
        if fail[0]:
            raise RuntimeError("dead-letter the whole million")

    proc = real_batcher.processor(name="big", max_batch_size=1_000_000, flush_interval=None, max_attempts=1)(
        handler
    )
    r = proc.add_many("huge", range(1_000_000))  # 100 atomic chunks of 10,000
    assert (r.added, r.sealed, r.status) == (1_000_000, 1, "flushing")
    Worker(real_batcher).run(burst=True)  # drained in chunks; dead letter by RENAME
    (dead,) = proc.dead_letters()
    assert got == [1_000_000] and dead.item_count == 1_000_000
    fail[0] = False
    proc.replay_dead(dead.id)  # RENAME back
    Worker(real_batcher).run(burst=True)  # ack: UNLINK
    assert got == [1_000_000, 1_000_000] and proc.status("huge") is None
    proc.add_many("huge", range(100))
    slow = real_client.slowlog_get(128)
    print("slowlog entries over 250 ms:", [(e["command"][:40], e["duration"]) for e in slow])
    assert slow == []


# -- handlers that raise a BaseException ---------------------------------------------------------


class Abort(BaseException):
    """Not an Exception: what some libraries raise to unwind a whole program."""


EXITS: list[tuple[BaseException, str]] = [
    (SystemExit(3), "SystemExit: 3"),
    (KeyboardInterrupt(), "KeyboardInterrupt: "),
    (Abort("stop"), "Abort: stop"),
]


def guarded(target: Callable[[], Any], timeout: float = 15.0) -> Any:
    """``target()`` in a thread: an exception it lets out (even SystemExit or KeyboardInterrupt)
    fails the test, and so does not returning in time (instead of hanging the suite)."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not return within {timeout:.0f}s"
    assert not errors, f"raised {errors[0]!r}"
    return out[0]


@pytest.mark.parametrize(("exc", "text"), EXITS, ids=[type(e).__name__ for e, _ in EXITS])
def test_a_handler_raising_a_base_exception_fails_its_attempt(
    batcher: Batcher, exc: BaseException, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def handler(flush: rb.Flush) -> None:
        calls.append(flush.attempt)
        if flush.batch_id == "bad":
            raise exc

    proc = batcher.processor(name="x", max_batch_size=2, max_attempts=2, **FAST)(handler)
    proc.add_many("bad", [1, 2])
    proc.add_many("good", [3, 4])
    deadline = time.monotonic() + 20
    while proc.status("bad") is not None or proc.status("good") is not None:
        assert time.monotonic() < deadline, "not delivered in time"
        guarded(lambda: Worker(batcher, concurrency=2).run(burst=True))  # burst returns
        time.sleep(0.02)
    assert sorted(calls) == [1, 1, 2]  # bad twice, good once: the worker went on serving
    history = [(h.attempt, h.success, h.error) for h in proc.history("bad")]
    assert history == [(2, False, text), (1, False, text)]
    (dead,) = proc.dead_letters()
    assert (dead.batch_id, dead.reason, dead.error, dead.item_count) == ("bad", "max_attempts", text, 2)
    # logged with its traceback, at error level
    [record, *_] = [r for r in caplog.records if "handler raised" in r.getMessage()]
    assert record.levelname == "ERROR" and text in record.getMessage() and record.exc_info is not None
