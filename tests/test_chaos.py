"""Chaos suite: real producer processes, real ``redis-batcher worker`` processes and a real
redis-server started by each test, while workers are SIGKILLed / SIGSTOPped, Redis is killed
with -9 and restarted, scripts are flushed and client connections are killed.

The promise under test: every item whose ``add()``/``add_many()`` returned is delivered to a
handler at least once; duplicates happen only for a flush whose worker died or lost its lease,
and then every delivery of those items carries the same ``flush_id``.

Each test keeps a ledger (see ``tests/apps/chaos.py``): handlers record every flush they
complete in ``chaos:ledger``; producers report the ids whose call returned. Lost = returned ids
never recorded. Every test prints its counts (run with ``-s``).
"""

from __future__ import annotations

import itertools
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
import redis

from redis_batcher import Processor
from tests.apps import chaos
from tests.chaos_util import (
    Ledger,
    Producers,
    Workers,
    analyze,
    due_count,
    leftovers,
    own_server,
    wait_for_subscribers,
    wait_until,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

APP = "tests.apps.chaos:batcher"
FAST = ["--max-idle-wait", "1"]


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10)


def _processor(url: str, name: str) -> Processor:
    _, procs = chaos.make(url)
    return procs[name]


def _pfx(proc: Processor) -> str:
    return proc.keys.parts[0].pfx


def _producer(item: int) -> int:
    return item // chaos.ID_SPACE


# -- 1. workers SIGKILLed at random under load, handler failing 20 % of calls -------------------

KILL_PRODUCERS = 4
KILL_ITEMS_PER_PRODUCER = 25_000
KILL_WORKERS = 3
KILL_BATCH_IDS = 32
MIN_KILLS = 5  # SIGKILLs per run, however quick the producers are


def test_random_worker_kills_and_handler_failures_lose_nothing(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    with own_server() as server:
        client = _client(server.url)
        proc = _processor(server.url, "chaos")
        pfx = _pfx(proc)
        ledger = Ledger(client)
        workers = Workers(
            server.url,
            APP,
            KILL_WORKERS,
            tmp_path,
            args=["--processor", "chaos", "--log-level", "WARNING", *FAST],
            env={"CHAOS_FAIL_RATE": "0.2", "CHAOS_HANDLER_SLEEP": "0.03"},
        )
        producers = Producers(server.url, KILL_PRODUCERS, KILL_ITEMS_PER_PRODUCER, KILL_BATCH_IDS, tmp_path)
        t0 = time.monotonic()
        with workers, producers:
            workers.start_all()
            wait_for_subscribers(client, proc.keys.channels[0], KILL_WORKERS, workers)
            producers.start()
            next_kill = time.monotonic() + rng.uniform(0.3, 1.0)
            # kill at least MIN_KILLS times, going on into the drain when producing was quicker
            while producers.running() or workers.kills < MIN_KILLS:
                workers.assert_alive()  # only our SIGKILLs may end a worker
                if time.monotonic() >= next_kill:
                    i = rng.randrange(KILL_WORKERS)
                    workers.kill(i)
                    workers.start(i)
                    next_kill = time.monotonic() + rng.uniform(0.3, 1.0)
                time.sleep(0.02)
            producers.join()
            t_produced = time.monotonic()
            returned = producers.returned
            assert len(returned) == KILL_PRODUCERS * KILL_ITEMS_PER_PRODUCER  # no Redis faults here

            def drained() -> bool:
                workers.assert_alive()
                return ledger.covers(returned) and due_count(client, pfx) == 0

            wait_until(drained, 120, "every returned item delivered and acknowledged", step=0.1)
            t_delivered = time.monotonic()
            codes = workers.terminate_all()
            ledger.poll()
        logs = workers.log_text()
        assert codes == [0] * KILL_WORKERS, [workers.log_tail(i) for i in range(KILL_WORKERS)]
        assert leftovers(client, pfx) == []
        assert proc.dead_letters() == []

    report = analyze(
        "kill-workers",
        ledger.records,
        returned,
        producers.uncertain,
        kills=workers.kills,
        max_batch_size=chaos.MAX_BATCH_SIZE,
        producer_of=_producer,
    )
    # a flush recorded more than once: every record but one must come from a worker we killed
    # (or whose lease expired: then its log says so)
    by_flush: dict[str, list[chaos.Record]] = defaultdict(list)
    for rec in ledger.records:
        by_flush[rec.flush_id].append(rec)
    lease_lost = 0
    for flush_id, recs in by_flush.items():
        survivors = [r for r in recs if r.pid not in workers.killed_pids]
        if len(survivors) > 1:
            member = f"{recs[0].batch_id}::{recs[0].sequence}"
            if f"{member}: lease lost" in logs:
                lease_lost += 1
            else:
                report.violations.append(f"flush {flush_id} recorded by {len(survivors)} live workers")
        if len({(r.batch_id, r.sequence) for r in recs}) != 1:
            report.violations.append(f"flush {flush_id} names several sequences")
    failures = logs.count("failed: RuntimeError: chaos: injected handler failure")
    report.extra.update(
        restarts=workers.restarts,
        retried_records=sum(1 for r in ledger.records if r.attempt > 1),
        lease_lost_redeliveries=lease_lost,
        handler_failures_logged=failures,
        produce_s=round(t_produced - t0, 1),
        deliver_s=round(t_delivered - t0, 1),
    )
    print(report.line())
    assert report.lost == 0, report.lost_ids
    assert not report.violations, report.violations[:10]
    assert report.kills >= MIN_KILLS
    assert failures > 0


# -- 2. SIGSTOP past the lease: redelivery, then the stale worker's late ack is refused ----------


@pytest.mark.parametrize("resume", ["after-redelivery", "during-redelivery"])
def test_stopped_worker_late_ack_is_refused_and_changes_nothing(tmp_path: Path, resume: str) -> None:
    """Worker A runs the handler of ``bid::0`` and is SIGSTOPped past its lease; worker B
    redelivers it (attempt 2, same flush_id). A is resumed after B acknowledged, or while B's
    handler still runs; either way A's late ack must be refused and change nothing: one
    success in the history, and ``bid::1`` (added meanwhile) intact and delivered once."""
    bid = "stop" if resume == "after-redelivery" else "stopboth"  # stopboth: B's handler is slow too
    with own_server() as server:
        client = _client(server.url)
        proc = _processor(server.url, "lease")
        pfx = _pfx(proc)
        ledger = Ledger(client)
        workers = Workers(server.url, APP, 2, tmp_path, args=["--processor", "lease", *FAST])

        def succeeded() -> list[tuple[int, int]]:
            """(sequence, attempt) of the successful flushes in the history, newest first."""
            return [(h.sequence, h.attempt) for h in proc.history(bid, limit=50) if h.success]

        with workers:
            workers.start_all()
            wait_for_subscribers(client, proc.keys.channels[0], 2, workers)

            first = list(range(10))
            assert proc.add_many(bid, first).sequence == 0
            assert proc.flush(bid).sequence == 0
            key = f"{chaos.STARTED_KEY}{bid}:0:"
            wait_until(lambda: client.get(key + "1") is not None, 10, f"the handler of {bid}::0 to start")
            stale_pid = int(client.get(key + "1") or 0)
            stale = workers.slot_of(stale_pid)
            workers.signal(stale, signal.SIGSTOP)
            t_stop = time.monotonic()

            # the other worker claims it once the lease ran out: attempt 2, same flush_id
            if resume == "after-redelivery":
                wait_until(lambda: (0, 2) in succeeded(), 15, f"{bid}::0 redelivered and acked")
                ledger.poll()
                assert [(r.sequence, r.attempt) for r in ledger.records] == [(0, 2)]
                assert ledger.records[0].pid != stale_pid
            else:
                wait_until(lambda: client.get(key + "2") is not None, 15, f"{bid}::0 redelivered")
                assert int(client.get(key + "2") or 0) != stale_pid
            t_redelivered = time.monotonic() - t_stop

            # a later sequence of the same batch id, added meanwhile, must survive the late ack
            second = list(range(100, 120))
            assert proc.add_many(bid, second).sequence == 1

            workers.signal(stale, signal.SIGCONT)
            wait_until(
                lambda: f"{bid}::0: lease lost before the result was recorded" in workers.log_tail(stale),
                15,
                "the stale worker's ack to be refused",
            )
            if resume == "during-redelivery":
                assert succeeded() == [], "A's ack was refused while B still ran the handler"
                wait_until(lambda: (0, 2) in succeeded(), 15, f"{bid}::0 acked by the new owner")
            time.sleep(0.3)
            ledger.poll()

            # the stale handler ran to the end (its record is there) but its ack changed nothing
            flush_id = ledger.records[0].flush_id
            assert sorted((r.attempt, r.pid == stale_pid, r.flush_id) for r in ledger.records) == [
                (1, True, flush_id),
                (2, False, flush_id),
            ]
            # exactly one success; the refused ack wrote nothing (a failure record of attempt 1
            # may come from the claim that found the expired lease, not from the stale worker)
            history = proc.history(bid, limit=50)
            assert [(h.sequence, h.attempt, h.flush_id) for h in history if h.success] == [(0, 2, flush_id)]
            assert [(h.sequence, h.attempt) for h in history if not h.success] in ([], [(0, 1)])
            st = proc.status(bid)
            assert st is not None
            assert [(b.sequence, b.status, b.item_count) for b in st.batches] == [(1, "accumulating", 20)]
            assert st.last_completed is not None
            assert (st.last_completed.sequence, st.last_completed.item_count) == (0, 10)
            raw = client.lrange(f"{pfx}o:{bid}", 1, -1)  # sequence 1 accumulates: the open list
            assert [proc.codec.decode(x) for x in raw] == second
            assert client.exists(f"{pfx}i:{bid}::0", f"{pfx}s:{bid}::0") == 0

            # the later sequence is delivered exactly once, intact
            assert proc.flush(bid).sequence == 1
            wait_until(lambda: (1, 1) in succeeded(), 10, f"{bid}::1 delivered")
            time.sleep(0.5)
            ledger.poll()
            later = [r for r in ledger.records if r.sequence == 1]
            assert [(r.items, r.attempt) for r in later] == [(second, 1)]
            assert succeeded() == [(1, 1), (0, 2)]
            assert proc.status(bid) is None
            logs = workers.log_text()
            codes = workers.terminate_all()
        assert codes == [0, 0], [workers.log_tail(i) for i in range(2)]
        assert leftovers(client, pfx) == []

    report = analyze(f"sigstop-{resume}", ledger.records, first + second, kills=0)
    report.extra.update(
        redelivered_after_s=round(t_redelivered, 2),
        lease_lost_logged=logs.count("lease lost"),
    )
    print(report.line())
    assert report.lost == 0
    assert not report.violations, report.violations
    assert report.duplicates == len(first)  # exactly the redelivered flush, same flush_id


# -- 3. kill -9 of redis-server (AOF, fsync always) mid-handler and under producer load ---------


CRASHES = [("hold", 1.5), ("load", 0.5)]  # (what runs when Redis dies, outage seconds)


def test_redis_kill9_and_restart_loses_no_returned_add(tmp_path: Path) -> None:
    """Redis (AOF, fsync always) is killed with -9 twice: once while a handler runs (claimed,
    not acked), once under producer load only; it restarts on the same port and directory. The
    worker processes are never restarted: they must reconnect on their own (default
    ``--max-idle-wait``)."""
    aof = ["--appendonly", "yes", "--appendfsync", "always"]
    with own_server(persistence=True, extra_args=aof) as server:
        client = _client(server.url)
        proc = _processor(server.url, "chaos")
        pfx = _pfx(proc)
        ledger = Ledger(client)
        workers = Workers(server.url, APP, 2, tmp_path, args=["--processor", "chaos"])
        producers = Producers(server.url, 2, 10**9, 16, tmp_path, max_seconds=60)
        hold_items = [99 * chaos.ID_SPACE + i for i in range(10)]
        crashes: list[tuple[str, float, float]] = []  # (kind, killed at, back up at), wall clock
        with workers, producers:
            workers.start_all()
            wait_for_subscribers(client, proc.keys.channels[0], 2, workers)
            pids = sorted(workers.pids)
            producers.start()
            for kind, outage in CRASHES:
                time.sleep(1.5)
                # producers are spawned interpreters: on a loaded machine they take a while to
                # start, and the report below wants a load of adds to have returned before a crash
                wait_until(lambda: ledger.delivered_count() >= 1500, 30, "adds under way")
                if kind == "hold":
                    proc.add_many("hold-1", hold_items)
                    proc.flush("hold-1")
                    hold_key = chaos.HOLD_KEY + "hold-1"
                    wait_until(lambda: client.get(hold_key) is not None, 10, "the hold-1 handler to start")  # noqa: B023
                server.stop(kill=True)  # kill -9 (for "hold": mid-handler, claimed but not acked)
                t_kill = time.time()
                time.sleep(outage)
                server.start()
                t_up = time.time()
                crashes.append((kind, t_kill, t_up))

                # producers keep adding through the outage; workers reconnect on their own
                def delivering_again() -> bool:
                    return any(r.started >= t_up for r in ledger.poll())  # noqa: B023

                wait_until(delivering_again, 30, f"a delivery after restart {len(crashes)}")
            time.sleep(1.5)
            producers.stop()
            producers.join()
            returned = producers.returned
            wait_until(
                lambda: ledger.covers([*returned, *hold_items]) and due_count(client, pfx) == 0,
                60,
                "every returned item delivered and acknowledged",
                step=0.1,
            )
            workers.assert_alive()
            assert sorted(workers.pids) == pids and workers.restarts == 0
            codes = workers.terminate_all()
            ledger.poll()
        assert codes == [0, 0], [workers.log_tail(i) for i in range(2)]
        assert leftovers(client, pfx) == []
        assert proc.dead_letters() == []

    report = analyze(
        "redis-kill9",
        ledger.records,
        [*returned, *hold_items],
        producers.uncertain,
        max_batch_size=chaos.MAX_BATCH_SIZE,
        producer_of=_producer,
    )
    # recovery, from the ledger: when each item was first recorded, relative to each restart
    first_seen: dict[int, float] = {}
    for rec in ledger.records:
        for item in rec.items:
            first_seen[item] = min(first_seen.get(item, rec.ended), rec.ended)
    recovery = []
    for kind, t_kill, t_up in crashes:
        before = [i for i, t in returned.items() if t < t_kill] + (hold_items if kind == "hold" else [])
        recovery.append(
            {
                "crash": kind,
                "outage_s": round(t_up - t_kill, 2),
                "returned_before": len(before),
                "first_add_after_s": round(min(t for t in returned.values() if t >= t_up) - t_up, 2),
                "first_delivery_after_s": round(
                    min(r.started for r in ledger.records if r.started >= t_up) - t_up, 2
                ),
                "all_before_delivered_after_s": round(max(first_seen[i] for i in before) - t_up, 2),
            }
        )
    hold = [r for r in ledger.records if r.batch_id == "hold-1"]
    report.extra.update(
        returned=len(returned),
        producer_errors=producers.errors,
        hold_deliveries=[(r.attempt, r.pid) for r in hold],
        recovery=recovery,
        all_delivered_after_last_restart_s=round(max(first_seen.values()) - crashes[-1][2], 2),
    )
    print(report.line())
    assert all(r["returned_before"] > 1000 for r in recovery)
    assert len([t for t in returned.values() if t >= crashes[-1][2]]) > 1000
    assert report.lost == 0, report.lost_ids
    assert not report.violations, report.violations[:10]
    assert hold and all(r.items == hold_items for r in hold)


# -- 4. dead letters: poison items (raising / killing the worker) with bisect and partial failure


def test_poison_items_end_in_dead_letters_and_the_rest_is_delivered(tmp_path: Path) -> None:
    from tests.apps import chaos_dead

    with own_server() as server:
        client = _client(server.url)
        _, procs = chaos_dead.make(server.url)
        bisect, partial = procs["bisect"], procs["partial"]
        ledger = Ledger(client)
        workers = Workers(
            server.url, "tests.apps.chaos_dead:batcher", 3, tmp_path, args=["--concurrency", "1", *FAST]
        )
        # poisoned batches first, then clean batch ids whose delivery must not wait for them
        poisoned = {
            ("bisect", "poison-raise"): [*range(1000, 1008), chaos_dead.RAISE, *range(1008, 1020)],
            ("bisect", "poison-kill"): [*range(2000, 2013), chaos_dead.KILL, *range(2013, 2020)],
            ("partial", "poison-partial"): [*range(3000, 3005), chaos_dead.RAISE, *range(3005, 3020)],
        }
        clean = {
            ("bisect" if j % 2 else "partial", f"clean{j}"): list(
                range(10_000 + 100 * j, 10_000 + 100 * j + 15)
            )
            for j in range(6)
        }
        with workers:
            workers.start_all()
            for proc in procs.values():
                wait_for_subscribers(client, proc.keys.channels[0], 3, workers)
            for (name, bid), items in poisoned.items():
                procs[name].add_many(bid, items)
                procs[name].flush(bid)
            t_clean = time.time()
            for (name, bid), items in clean.items():
                procs[name].add_many(bid, items)
            expected = [i for items in poisoned.values() for i in items if i >= 0]
            expected += [i for items in clean.values() for i in items]
            deaths = 0

            def settled() -> bool:
                nonlocal deaths
                for i, p in enumerate(workers.procs):
                    if p is not None and p.poll() is not None:  # the KILL item: restart it
                        deaths += 1
                        workers.start(i)
                letters = bisect.dead_letters() + partial.dead_letters()
                return (
                    ledger.covers(expected)
                    and len(letters) >= len(poisoned)
                    and due_count(client, _pfx(bisect)) == 0
                    and due_count(client, _pfx(partial)) == 0
                )

            wait_until(settled, 90, "poison dead-lettered and everything else delivered", step=0.1)
            time.sleep(0.5)
            settled()
            # a worker just restarted may still be importing, without its SIGTERM handler
            for proc in procs.values():
                wait_for_subscribers(client, proc.keys.channels[0], 3, workers)
            codes = workers.terminate_all()
            ledger.poll()
        assert all(c == 0 for c in codes), [workers.log_tail(i) for i in range(3)]
        letters = [(name, p.dead_letter(d.id)) for name, p in procs.items() for d in p.dead_letters()]

    report = analyze("dead-letters", ledger.records, expected, kills=deaths)
    latency = {bid: min(r.started for r in ledger.records if r.batch_id == bid) - t_clean for _, bid in clean}
    report.extra.update(
        deaths=deaths,
        dead_letters=[
            (name, d.batch_id, d.items, d.reason, d.item_count, d.attempts, d.deaths) for name, d in letters
        ],
        clean_max_latency_s=round(max(latency.values()), 2),
    )
    print(report.line())
    assert report.lost == 0, report.lost_ids
    assert not report.violations, report.violations[:10]
    assert report.duplicates == 0
    # exactly the poison items are dead, each after the configured attempts / deaths
    assert sorted((name, d.batch_id, d.items, d.item_count) for name, d in letters) == [
        ("bisect", "poison-kill", [chaos_dead.KILL], 1),
        ("bisect", "poison-raise", [chaos_dead.RAISE], 1),
        ("partial", "poison-partial", [chaos_dead.RAISE], 1),
    ]
    for name, d in letters:
        if d.batch_id == "poison-kill":
            assert d.reason == "max_deaths" and d.deaths >= chaos_dead.MAX_DEATHS, d
        else:
            assert d.reason == "max_attempts" and d.attempts >= chaos_dead.MAX_ATTEMPTS, d
            assert "poison" in d.error or name == "partial", d
    assert deaths >= chaos_dead.MAX_DEATHS
    # clean batch ids were not held back by the poison: due after flush_interval, then at most
    # one backoff step (plus scheduling slack on a 2-core machine)
    bound = chaos_dead.FLUSH_INTERVAL + chaos_dead.RETRY_BACKOFF + 1.5
    assert max(latency.values()) <= bound, latency


def test_worker_death_after_side_effects_keeps_one_flush_id_with_bisect(tmp_path: Path) -> None:
    """The promise holds with ``bisect_on_error=True`` too: a worker that dies after its handler
    recorded the flush (before the ack) causes duplicates, and every delivery of those items
    must carry the same flush_id so the handler can recognise them."""
    from tests.apps import chaos_dead

    with own_server() as server:
        client = _client(server.url)
        proc = chaos_dead.make(server.url)[1]["afterdeath"]
        ledger = Ledger(client)
        workers = Workers(
            server.url,
            "tests.apps.chaos_dead:batcher",
            2,
            tmp_path,
            args=["--processor", "afterdeath", "--concurrency", "1", *FAST],
        )
        items = list(range(chaos_dead.MAX_BATCH_SIZE))
        with workers:
            workers.start_all()
            wait_for_subscribers(client, proc.keys.channels[0], 2, workers)
            proc.add_many("die-after", items)  # one full sequence, due now
            deaths = 0

            def settled() -> bool:
                nonlocal deaths
                for i, p in enumerate(workers.procs):
                    if p is not None and p.poll() is not None:
                        deaths += 1
                        workers.start(i)
                return ledger.covers(items) and deaths >= 1 and due_count(client, _pfx(proc)) == 0

            wait_until(settled, 30, "the sequence delivered after the death", step=0.05)
            # a worker restarted by the last poll may still be importing, without its SIGTERM
            # handler: let both serve before the warm shutdown
            wait_for_subscribers(client, proc.keys.channels[0], 2, workers)
            codes = workers.terminate_all()
            ledger.poll()
        assert all(c == 0 for c in codes), [workers.log_tail(i) for i in range(2)]
        letters = proc.dead_letters()

    report = analyze("death-after-side-effects+bisect", ledger.records, items, kills=deaths)
    report.extra.update(
        deliveries=[(r.flush_id, r.attempt, len(r.items)) for r in ledger.records],
        dead_letters=len(letters),
    )
    print(report.line())
    assert deaths == 1 and not letters
    assert report.lost == 0, report.lost_ids
    assert not report.violations, report.violations[:10]


# -- 5. eight workers racing for the same due sequences ------------------------------------------

RACE_WORKERS = 8
RACE_ROUNDS = 12


def test_racing_workers_never_run_one_sequence_twice(tmp_path: Path) -> None:
    with own_server() as server:
        client = _client(server.url)
        proc = _processor(server.url, "race")
        pfx = _pfx(proc)
        ledger = Ledger(client)
        workers = Workers(
            server.url, APP, RACE_WORKERS, tmp_path, args=["--processor", "race", "--concurrency", "2", *FAST]
        )
        added: list[int] = []
        next_id = 1
        slow_id = -1

        def add(bid: str, k: int, slow: bool = False) -> None:
            nonlocal next_id, slow_id
            items = list(range(next_id, next_id + k))
            next_id += k
            if slow:
                items[0] = slow_id
                slow_id -= 1
            proc.add_many(bid, items)
            added.extend(items)

        with workers:
            workers.start_all()
            wait_for_subscribers(client, proc.keys.channels[0], RACE_WORKERS, workers)
            t0 = time.monotonic()
            for r in range(RACE_ROUNDS):
                add("hot", chaos.RACE_BATCH_SIZE)  # sealed by size: every idle worker wakes up
                add("hot", 7)  # a timer all workers see fire at once
                for j in range(3):
                    add(f"more{j}", 25)
                if r % 4 == 0:
                    add(f"slow{r}", 3, slow=True)  # handler outlives its lease: heartbeat only
                time.sleep(0.25)
            wait_until(
                lambda: ledger.covers(added) and due_count(client, pfx) == 0,
                60,
                "every item delivered and acknowledged",
                step=0.1,
            )
            elapsed = time.monotonic() - t0
            time.sleep(0.5)  # a duplicate delivery would show up now
            workers.assert_alive()
            codes = workers.terminate_all()
            ledger.poll()
        assert codes == [0] * RACE_WORKERS, [workers.log_tail(i) for i in range(RACE_WORKERS)]
        assert leftovers(client, pfx) == []
        assert proc.dead_letters() == []

    report = analyze(
        "race",
        ledger.records,
        added,
        max_batch_size=chaos.RACE_BATCH_SIZE,
        producer_of=lambda i: i < 0,  # the test adds in increasing order (slow items < 0 apart)
    )
    by_sequence: dict[tuple[str, int], list[chaos.Record]] = defaultdict(list)
    for rec in ledger.records:
        by_sequence[(rec.batch_id, rec.sequence)].append(rec)
    overlaps = []
    for key, recs in by_sequence.items():
        recs.sort(key=lambda r: r.started)
        for a, b in itertools.pairwise(recs):
            if b.started < a.ended:
                overlaps.append((key, a.pid, b.pid, a.started, a.ended, b.started))
    # the most handlers that ran at once, over all workers (proves there was concurrency)
    edges = sorted([(r.started, 1) for r in ledger.records] + [(r.ended, -1) for r in ledger.records])
    running = peak = 0
    for _, d in edges:
        running += d
        peak = max(peak, running)
    slow = [r for r in ledger.records if any(i < 0 for i in r.items)]
    report.extra.update(
        sequences=len(by_sequence),
        worker_pids=len({r.pid for r in ledger.records}),
        peak_concurrent_handlers=peak,
        slow_handlers=len(slow),
        overlaps=len(overlaps),
        deliver_s=round(elapsed, 1),
    )
    print(report.line())
    assert not overlaps, overlaps[:10]
    assert report.lost == 0 and report.duplicates == 0, report.lost_ids
    assert not report.violations, report.violations[:10]
    assert all(len(recs) == 1 for recs in by_sequence.values())
    assert all(r.attempt == 1 for r in ledger.records), "no fault was injected: no redelivery expected"
    assert slow and all(r.ended - r.started >= chaos.RACE_LEASE for r in slow)
    assert len({r.pid for r in ledger.records}) >= 2


# -- 6. SCRIPT FLUSH and CLIENT KILL (normal, pubsub) during a run -------------------------------

FAULTS = ["script-flush", "kill-normal", "kill-pubsub"] * 3


def test_script_flush_and_client_kill_during_a_run(tmp_path: Path) -> None:
    with own_server() as server:
        client = _client(server.url)
        proc = _processor(server.url, "chaos")
        pfx = _pfx(proc)
        channel = proc.keys.channels[0]
        ledger = Ledger(client)
        workers = Workers(server.url, APP, 2, tmp_path, args=["--processor", "chaos", *FAST])
        producers = Producers(server.url, 3, 10**9, 16, tmp_path, max_seconds=60)
        recovery: list[tuple[str, int, float]] = []
        with workers, producers:
            workers.start_all()
            wait_for_subscribers(client, channel, 2, workers)
            pids = sorted(workers.pids)
            producers.start()
            time.sleep(1.0)
            for fault in FAULTS:
                ledger.poll()
                seen = len(ledger.records)
                t_fault = time.monotonic()
                if fault == "script-flush":
                    client.script_flush()
                    killed = 0
                elif fault == "kill-normal":
                    killed = int(client.execute_command("CLIENT", "KILL", "TYPE", "normal"))
                else:
                    killed = int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
                # deliveries go on after each fault (and the workers listen again)
                wait_until(lambda: ledger.grew(seen), 15, f"deliveries after {fault}")  # noqa: B023
                if fault == "kill-pubsub":
                    assert killed >= 2
                    wait_for_subscribers(client, channel, 2, workers, timeout=15)
                recovery.append((fault, killed, round(time.monotonic() - t_fault, 2)))
                time.sleep(0.5)
            t_last = time.time()
            time.sleep(2.0)
            producers.stop()
            producers.join()
            returned = producers.returned
            wait_until(
                lambda: ledger.covers(returned) and due_count(client, pfx) == 0,
                60,
                "every returned item delivered and acknowledged",
                step=0.1,
            )
            workers.assert_alive()
            assert sorted(workers.pids) == pids and workers.restarts == 0
            codes = workers.terminate_all()
            ledger.poll()
        assert codes == [0, 0], [workers.log_tail(i) for i in range(2)]
        assert leftovers(client, pfx) == []
        assert proc.dead_letters() == []

    report = analyze(
        "script-flush+client-kill",
        ledger.records,
        returned,
        producers.uncertain,
        max_batch_size=chaos.MAX_BATCH_SIZE,
        producer_of=_producer,
    )
    late_pids = {r.pid for r in ledger.records if r.started > t_last}
    report.extra.update(
        producer_errors=producers.errors,
        faults=recovery,
        workers_delivering_after_last_fault=len(late_pids),
    )
    print(report.line())
    assert report.lost == 0, report.lost_ids
    assert not report.violations, report.violations[:10]
    assert late_pids == set(pids), "both workers keep delivering after the faults"
