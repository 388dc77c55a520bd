"""Pausing and resuming a processor: adds go on and seal, no claim takes its flushes (the claim
script and the claim inside the ack script check each partition's own flag), resuming delivers
what became due at once, waking the workers.

The API cases run on the sync and the asyncio client, each on a real redis-server and on
fakeredis (the ``api`` fixture); the wake-up, the ack's claim and the CLI on the real server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

import redis_batcher as rb
from redis_batcher import asyncio as aio
from redis_batcher import ops
from redis_batcher.cli import main
from redis_batcher.testing import RedisServer

from .clients import ClientApi, ProcessorApi
from .test_async_worker import run_async, serving, until

pytestmark = pytest.mark.timeout(60)


def make(api: ClientApi, **kw: Any) -> tuple[ProcessorApi, list[rb.Flush]]:
    got: list[rb.Flush] = []
    kw.setdefault("name", "events")
    kw.setdefault("max_batch_size", 3)
    kw.setdefault("flush_interval", None)
    return api.processor(**kw)(api.recorder(got)), got


def items_of(got: list[rb.Flush]) -> list[Any]:
    return sorted(item for flush in got for item in flush.items)


def test_paused_processor_accumulates_and_seals_then_delivers_on_resume(api: ClientApi) -> None:
    proc, got = make(api)
    assert proc.paused() is False
    assert proc.pause() is True
    assert proc.pause() is False  # paused already
    assert proc.paused() is True

    r = proc.add_many("b", list(range(7)))  # seals two sequences by size
    assert (r.sealed, r.pending) == (2, 1)
    assert proc.add("c", 100).added == 1
    assert proc.flush("b").flushed  # a manual flush still seals
    stats = api.burst()
    assert got == [] and stats.delivered == 0
    st = proc.status("b")
    assert st is not None and st.pending == 7
    assert [b.status for b in st.batches] == ["flushing"] * 3

    assert proc.resume() is True
    assert proc.resume() is False  # not paused
    assert proc.paused() is False
    assert api.burst().delivered == 3
    assert items_of(got) == list(range(7))
    assert proc.status("b") is None and proc.pending("c") == 1


def test_pause_sets_the_flag_of_every_partition(api: ClientApi) -> None:
    proc, got = make(api, partitions=4, max_batch_size=2)
    proc.pause()
    flags = [part.paused for part in proc.keys.parts]
    assert len(set(flags)) == 4 and all(api.client.exists(f) for f in flags)
    ids = [f"id{n}" for n in range(24)]
    for bid in ids:
        proc.add_many(bid, [bid, bid])
    used = {proc.keys.for_base(bid).pfx for bid in ids}
    assert len(used) == 4, "the ids reach every partition"
    assert api.burst().delivered == 0 and got == []

    # a partition paused alone (a pause cut short) still counts, and still stops its claims
    proc.resume()
    api.client.set(flags[2], 1)
    assert proc.paused() is True
    api.burst()
    left = sorted(bid for bid in ids if proc.pending(bid))
    assert left and all(proc.keys.for_base(bid).pfx == proc.keys.parts[2].pfx for bid in left)

    assert proc.resume() is True
    assert not any(api.client.exists(f) for f in flags)
    api.burst()
    assert sorted(f.batch_id for f in got) == sorted(ids)


# -- the claim scripts ------------------------------------------------------------------------------


def _claim(batcher: rb.Batcher, proc: rb.Processor, limit: int = 1) -> tuple[int, list[ops.Claimed]]:
    part = proc.keys.parts[0]
    owner = ops.new_token()
    reply = batcher.executor.execute(ops.claim_call(proc, part, limit, owner))
    return ops.parse_claim(proc, part, owner, reply)


def test_ack_claims_no_next_flush_while_paused(real_client: redis.Redis) -> None:
    batcher = rb.Batcher(real_client, prefix="p")
    proc = batcher.processor(name="events", max_batch_size=2, flush_interval=None)(lambda flush: None)
    proc.add_many("b", [1, 2, 3, 4])  # two sealed sequences, both due
    _, [first] = _claim(batcher, proc)
    assert first.sequence == 0

    proc.pause()  # the flush in flight goes on; its ack must not claim the next one
    part = proc.keys.parts[0]
    reply = batcher.executor.execute(ops.ack_call(first, "{}", claim_owner=ops.new_token()))
    assert ops.claim_part(reply) == [-1]
    assert real_client.exists(part.woke), "the paused claim holds wake-ups back"
    assert proc.pending("b") == 2 and proc.sequences("b")[-1].status == "flushing"
    assert _claim(batcher, proc) == (-1, [])

    proc.resume()
    _, [second] = _claim(batcher, proc)
    assert second.sequence == 1


def test_resume_wakes_a_waiting_worker(real_client: redis.Redis) -> None:
    batcher = rb.Batcher(real_client, prefix="w")
    got: list[rb.Flush] = []
    proc = batcher.processor(name="events", max_batch_size=3, flush_interval=None)(got.append)
    proc.pause()
    # without wake-ups this worker would look again only after a minute
    worker = rb.Worker(batcher, max_idle_wait=60)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)  # subscribed and idle
        proc.add_many("b", [1, 2, 3])  # sealed: due now, a wake-up goes out
        time.sleep(0.5)
        assert got == [], "a paused processor's flush was delivered"
        started = time.monotonic()
        proc.resume()
        while not got and time.monotonic() - started < 5:
            time.sleep(0.01)
        assert [f.items for f in got] == [[1, 2, 3]]
        assert time.monotonic() - started < 2, "resuming woke the worker"
    finally:
        worker.stop()
        thread.join(10)


def test_resume_wakes_a_waiting_asyncio_worker(redis_server: RedisServer, real_client: redis.Redis) -> None:
    async def body(ab: aio.Batcher) -> None:
        got: list[rb.Flush] = []

        async def handler(flush: rb.Flush) -> None:
            got.append(flush)

        proc = ab.processor(name="events", max_batch_size=2, flush_interval=None)(handler)
        assert await proc.pause()
        async with serving(aio.Worker(ab, max_idle_wait=60)):
            await proc.add_many("b", [1, 2])
            await asyncio.sleep(0.5)
            assert got == [] and await proc.paused()
            started = time.monotonic()
            assert await proc.resume()
            await until(lambda: bool(got), timeout=5, what="delivery after resume")
            assert time.monotonic() - started < 2, "resuming woke the worker"
        assert [f.items for f in got] == [[1, 2]]

    run_async(redis_server.port, body)


# -- the CLI ---------------------------------------------------------------------------------------


def cli(server: RedisServer, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        main, [*args, "--redis-url", server.url, "--prefix", "c"], catch_exceptions=False
    )


def test_cli_pause_resume_status_and_ls(redis_server: RedisServer, real_client: redis.Redis) -> None:
    batcher = rb.Batcher(real_client, prefix="c")
    proc = batcher.processor(name="events", max_batch_size=2, flush_interval=None)(lambda flush: None)
    batcher.register()

    result = cli(redis_server, "ls", "-p", "events")
    assert result.exit_code == 0 and "no active batch ids" in result.output

    result = cli(redis_server, "pause", "-p", "events")
    assert result.exit_code == 0, result.output
    assert "processor 'events' is paused" in result.output and proc.paused()
    result = cli(redis_server, "pause", "-p", "events")
    assert result.exit_code == 0 and "paused already" in result.output

    proc.add_many("b", [1, 2])
    time.sleep(0.2)
    rb.Worker(batcher).run(burst=True)
    result = cli(redis_server, "status", "b", "-p", "events")
    assert result.exit_code == 0, result.output
    assert "overdue since 20" in result.output and "is paused" in result.output
    data = json.loads(cli(redis_server, "status", "b", "-p", "events", "--json").output)
    assert data["paused"] is True and data["sequences"][0]["overdue"] is True

    rows = json.loads(cli(redis_server, "ls", "--json").output)
    [row] = rows
    assert row["paused"] is True and row["oldest_overdue_s"] >= 0.15
    result = cli(redis_server, "ls")
    line = next(line for line in result.output.splitlines() if "events" in line)
    assert " yes " in line and "s " in line.split("│")[-3], line

    result = cli(redis_server, "resume", "-p", "events", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["changed"] is True
    result = cli(redis_server, "resume", "-p", "events")
    assert result.exit_code == 0 and "was not paused" in result.output
    rb.Worker(batcher).run(burst=True)
    assert proc.status("b") is None

    result = cli(redis_server, "pause", "-p", "nope")
    assert result.exit_code == 2 and "nope" in result.output
