"""What shows that a system is stalled: a sequence due in the past that no worker holds is
``overdue`` in ``status``/``sequences`` (since when), and ``ls`` shows each processor's oldest
overdue age, read with a fixed number of commands per partition.

The status cases run on the sync and the asyncio client, each on a real redis-server and on
fakeredis (the ``api`` fixture); the rest on the real server.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

import redis_batcher as rb
from redis_batcher import overview

from .clients import ClientApi
from .test_pause import make

pytestmark = pytest.mark.timeout(60)


def test_status_shows_overdue_sequences(api: ClientApi) -> None:
    proc, _ = make(api, flush_interval=0.05)
    later, _ = make(api, name="later", flush_interval=60)
    proc.add("a", 1)
    later.add("z", 1)
    time.sleep(0.3)  # no worker: the interval timer of "a" passes
    [a] = proc.sequences("a")
    assert a.status == "accumulating" and a.overdue
    assert a.due_at is not None and a.overdue_since == a.due_at
    assert a.created_at is not None
    assert 40 <= (a.due_at - a.created_at).total_seconds() * 1000 <= 60
    [z] = later.sequences("z")
    assert not z.overdue and z.overdue_since is None
    assert z.due_at is not None and z.created_at is not None
    assert 59 <= (z.due_at - z.created_at).total_seconds() <= 61

    # sealed by size and no worker running: overdue since it was sealed
    proc.add_many("s", [1, 2, 3])
    time.sleep(0.05)
    [s] = proc.sequences("s")
    assert s.status == "flushing" and s.overdue and s.overdue_since is not None

    # delivered: nothing left, and the completed record is never overdue
    api.burst()
    assert proc.status("a") is None
    assert all(not b.overdue and b.due_at is None for b in proc.sequences("a"))


def test_a_held_flush_is_not_overdue(real_client: redis.Redis) -> None:
    batcher = rb.Batcher(real_client, prefix="h")
    running, release = threading.Event(), threading.Event()

    def handler(flush: rb.Flush) -> None:
        running.set()
        release.wait(10)

    proc = batcher.processor(name="events", max_batch_size=2, flush_interval=None, lease_timeout=30)(handler)
    proc.add_many("b", [1, 2])
    worker = rb.Worker(batcher)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    try:
        assert running.wait(10)
        proc.pause()  # a flush already claimed finishes normally
        [b] = proc.sequences("b")
        assert b.status == "flushing" and not b.overdue
        assert b.due_at is not None and b.created_at is not None
        assert (b.due_at - b.created_at).total_seconds() > 25  # its lease's expiry
    finally:
        release.set()
        thread.join(10)
    assert proc.status("b") is None
    assert worker.stats.delivered == 1


def test_overview_oldest_overdue_at_a_fixed_cost(real_client: redis.Redis) -> None:
    batcher = rb.Batcher(real_client, prefix="o")
    proc = batcher.processor(name="events", partitions=2, max_batch_size=2, flush_interval=None)(
        lambda flush: None
    )
    idle = batcher.processor(name="idle", flush_interval=60)(lambda flush: None)
    idle.add("x", 1)

    def commands() -> int:
        stats = real_client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

    def overview_cost() -> tuple[overview.ProcessorOverview, int]:
        real_client.config_resetstat()
        row = overview.processor_overview(proc)
        return row, commands()

    overview.processor_overview(proc)  # the connection made and set up before counting
    row, empty_cost = overview_cost()
    assert row.oldest_overdue is None and row.paused is False
    proc.add_many("first", [1, 2])
    time.sleep(0.4)
    for n in range(50):
        proc.add_many(f"id{n}", [n, n])
    proc.pause()
    row, cost = overview_cost()
    assert row.queued_sequences == 51 and row.paused is True
    assert row.oldest_overdue is not None and 0.35 <= row.oldest_overdue < 30
    assert cost == empty_cost, "the overview's cost grows with the batch ids"
    [idle_row] = overview.processors(batcher, ["idle"])
    assert idle_row.queued_sequences == 1 and idle_row.oldest_overdue is None
