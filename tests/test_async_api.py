"""What only the asyncio client (``redis_batcher.asyncio``) has, against both backends.

The API both clients share is tested once, on each of them, in tests/test_api.py. Here: async
handlers, group commit (concurrent ``add()`` calls coalesced into one pipelined round trip, each
answered on its own), cancellation of awaiting adds, errors delivered to exactly the callers
they concern, and the async API's surface.

Every test body runs in one ``asyncio.run`` (see :func:`tests.clients.arun`), which fails the
test when the event loop reports an unhandled error such as "Task exception was never
retrieved".
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import random
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import redis_batcher as rb
from redis_batcher import asyncio as aio
from redis_batcher.processor import ADD_CHUNK
from redis_batcher.scripts import scripts

from .clients import Backend
from .conftest import ROOT, snapshot


def make(ab: aio.Batcher, **kw: Any) -> tuple[aio.AsyncProcessor, list[rb.Flush]]:
    """Processor "events" (3 items a batch, no interval) whose ``async def`` handler (run
    natively by the async worker) records each flush."""
    got: list[rb.Flush] = []
    kw.setdefault("name", "events")
    kw.setdefault("max_batch_size", 3)
    kw.setdefault("flush_interval", None)

    async def record(flush: rb.Flush) -> None:
        got.append(flush)

    proc: aio.AsyncProcessor = ab.processor(**kw)(record)
    return proc, got


async def burst(ab: aio.Batcher, **kw: Any) -> aio.WorkerStats:
    return await aio.Worker(ab, **kw).run(burst=True)


async def warm(ab: aio.Batcher) -> None:
    """Register the processors and load the add script, so what follows is adds alone."""
    await ab.register()
    await ab.client.script_load(scripts().add.source)


# == part 1: async handlers =========================================================================


def test_an_async_handler_stays_unit_testable(backend: Backend) -> None:
    """The async batcher's decorator gives an AsyncProcessor; calling it calls the handler
    directly, which for an ``async def`` handler gives its awaitable."""

    async def body(ab: aio.Batcher) -> None:
        @ab.processor(flush_interval=timedelta(milliseconds=1500))
        async def handler(flush: rb.Flush) -> str:
            return "awaited"

        assert isinstance(handler, aio.AsyncProcessor)
        assert handler.config.flush_interval == 1.5 and handler.definition.interval_ms == 1500
        call = handler(rb.Flush("p", "b", 0, [], 1, "id"))
        assert inspect.isawaitable(call) and await call == "awaited"

        @ab.processor
        async def bare(flush: rb.Flush) -> str:
            return "bare"

        assert isinstance(bare, aio.AsyncProcessor)
        assert bare.config.flush_interval == 30.0 and bare.config.max_batch_size == 100
        assert await bare(rb.Flush("p", "b", 0, [], 1, "id")) == "bare"

    backend.run(body)


# == part 2: group commit ===========================================================================


@dataclass
class Trips:
    """Round trips an async client made: single commands and pipeline executions."""

    sent: list[tuple[Any, ...]] = field(default_factory=list)  # args of each single command
    pipelines: list[list[tuple[Any, ...]]] = field(default_factory=list)  # args of each command
    fail_next_pipeline: BaseException | None = None
    # the next pipeline meets an empty script cache (a restarted server) that another client
    # fills again (its own EVAL after NOSCRIPT) right after the pipeline's first command:
    # SCRIPT FLUSH before it, SCRIPT LOAD after it; their replies are removed again
    reload_scripts_inside_next_pipeline: bool = False

    def clear(self) -> None:
        self.sent.clear()
        self.pipelines.clear()

    @property
    def commands(self) -> list[str]:
        return [str(args[0]).upper() for args in self.sent]

    @property
    def round_trips(self) -> int:
        return len(self.sent) + len(self.pipelines)

    def script_calls(self) -> list[tuple[Any, ...]]:
        """Every EVAL/EVALSHA sent, alone or in a pipeline (its full argument tuple)."""
        every = self.sent + [args for p in self.pipelines for args in p]
        return [args for args in every if str(args[0]).upper() in ("EVAL", "EVALSHA")]


def counting_client_class(base: type) -> tuple[type, Trips]:
    """A subclass of an async client class that records its round trips (and can fail the next
    pipeline execution, to inject a network error)."""
    trips = Trips()

    class Counting(base):  # type: ignore[misc]
        async def execute_command(self, *args: Any, **options: Any) -> Any:
            trips.sent.append(args)
            return await super().execute_command(*args, **options)

        def pipeline(self, *args: Any, **kwargs: Any) -> Any:
            pipe = super().pipeline(*args, **kwargs)
            execute = pipe.execute

            async def counted(*a: Any, **kw: Any) -> Any:
                trips.pipelines.append([tuple(cmd[0]) for cmd in pipe.command_stack])
                if trips.fail_next_pipeline is not None:
                    exc, trips.fail_next_pipeline = trips.fail_next_pipeline, None
                    await pipe.reset()
                    raise exc
                if trips.reload_scripts_inside_next_pipeline and len(pipe.command_stack) > 1:
                    trips.reload_scripts_inside_next_pipeline = False
                    pipe.command_stack.insert(1, (("SCRIPT", "LOAD", scripts().add.source), {}))
                    pipe.command_stack.insert(0, (("SCRIPT", "FLUSH"), {}))
                    trips.pipelines[-1] = [tuple(cmd[0]) for cmd in pipe.command_stack]
                    replies = await execute(*a, **kw)
                    del replies[2]
                    del replies[0]
                    return replies
                return await execute(*a, **kw)

            pipe.execute = counted
            return pipe

    return Counting, trips


def check_positions(
    results: dict[Any, rb.AddResult], flushes: list[rb.Flush], key: Callable[[Any], Any]
) -> None:
    """Every delivered item is where its own AddResult said: (sequence, pending) == (the
    flush's sequence, its 1-based position); and every successful add was delivered once."""
    seen: Counter[Any] = Counter()
    for f in flushes:
        for pos, item in enumerate(f.items, start=1):
            k = key(item)
            seen[k] += 1
            if k in results:
                r = results[k]
                assert (r.batch_id, r.sequence, r.pending) == (f.batch_id, f.sequence, pos), (k, r, f)
    dupes = {k: n for k, n in seen.items() if n > 1}
    assert not dupes, f"items delivered more than once: {dupes}"
    lost = set(results) - set(seen)
    assert not lost, f"acknowledged adds never delivered: {sorted(lost)[:10]}"


def test_thousand_concurrent_adds_coalesce_and_each_gets_its_own_result(backend: Backend) -> None:
    cls, trips = counting_client_class(backend.aclient_class())
    ids = [f"id{i}" for i in range(10)]

    async def body(ab: aio.Batcher) -> None:
        proc, got = make(ab, name="gc", max_batch_size=7)
        await warm(ab)
        trips.clear()
        calls = [(k, ids[k % 10]) for k in range(1000)]
        results = await asyncio.gather(*(proc.add(bid, {"k": k, "b": bid}) for k, bid in calls))
        coalesced_trips = trips.round_trips
        evals = trips.script_calls()

        by_id: dict[str, list[rb.AddResult]] = defaultdict(list)
        for (_, bid), r in zip(calls, results, strict=True):
            assert r.batch_id == bid and r.added == 1
            assert r.status == ("flushing" if r.pending == 7 else "accumulating"), r
            assert (r.flushed, r.sealed) == ((True, 1) if r.pending == 7 else (False, 0)), r
            by_id[bid].append(r)
        for bid, rs in by_id.items():
            # 100 adds per id: sequences 0..13 hold 1..7, sequence 14 holds 1..2 ...
            expected = [(s, p) for s in range(15) for p in range(1, 8)][:100]
            assert sorted((r.sequence, r.pending) for r in rs) == expected, bid
            # ... and in call order: coalescing keeps each batch id's adds in the order made
            assert [(r.sequence, r.pending) for r in rs] == expected, bid

        # far fewer round trips than adds: one pipeline, one EVALSHA per batch id
        assert coalesced_trips <= 3, (trips.commands, [len(p) for p in trips.pipelines])
        assert len(evals) == 10 and {str(a[0]).upper() for a in evals} == {"EVALSHA"}
        assert len(trips.pipelines) == 1

        for bid in ids:
            assert (await proc.flush(bid)).item_count == 2
        stats = await burst(ab, concurrency=8)
        assert stats.failed == 0 and stats.lease_lost == 0 and stats.items == 1000
        check_positions(
            {k: r for (k, _), r in zip(calls, results, strict=True)}, got, key=lambda item: item["k"]
        )
        for bid in ids:  # per batch id, in add order
            flushes = sorted((f for f in got if f.batch_id == bid), key=lambda f: f.sequence)
            assert [i["k"] for f in flushes for i in f.items] == [k for k, b in calls if b == bid]
            assert await proc.status(bid) is None

        # a lone caller is not batched with anybody: exactly one EVALSHA, no pipeline
        trips.clear()
        r = await proc.add("lone", 1)
        assert (r.sequence, r.pending) == (0, 1)
        assert trips.commands == ["EVALSHA"] and trips.pipelines == []
        trips.clear()
        r = await proc.add_many("lone", [2, 3])
        assert (r.sequence, r.pending, r.added) == (0, 3, 2)
        assert trips.commands == ["EVALSHA"] and trips.pipelines == []

    backend.run(body, client_cls=cls)


def test_lone_callers_send_at_once_and_company_switches_to_collecting(backend: Backend) -> None:
    """While adds come one at a time, a caller sends at once (no yield to collect company);
    adds made while it is in flight go after it, together and in order, and from then on the
    first caller of an iteration collects again, until a leader finds itself alone."""
    cls, trips = counting_client_class(backend.aclient_class())

    def trip_ids() -> list[list[str]]:
        # the batch id of each script call (EVALSHA sha 2 head guard base ...), per round trip
        out = [[str(args[5])] for args in trips.sent if str(args[0]).upper() == "EVALSHA"]
        return out + [[str(a[5]) for a in p] for p in trips.pipelines]

    async def body(ab: aio.Batcher) -> None:
        proc, got = make(ab, name="mode", max_batch_size=100)
        await warm(ab)
        # a new batcher collects (the adds of its first iteration go together) ...
        await proc.add("x", 0)  # ... until a leader finds itself alone: now it sends at once
        trips.clear()
        a, b, c = await asyncio.gather(proc.add("x", 1), proc.add("x", 2), proc.add("y", 3))
        # the first went alone; the two made meanwhile went after it in one pipeline
        assert trips.commands == ["EVALSHA"] and [len(p) for p in trips.pipelines] == [2]
        assert trip_ids() == [["x"], ["x", "y"]]
        assert (a.pending, b.pending, c.pending) == (2, 3, 1)  # x's adds kept their order

        trips.clear()  # company was seen: the next iteration's adds are collected
        d, e = await asyncio.gather(proc.add("x", 4), proc.add("z", 5))
        assert trips.sent == [] and trip_ids() == [["x", "z"]]
        assert (d.pending, e.pending) == (4, 1)

        trips.clear()  # this leader finds itself alone: one EVALSHA, and back to sending at once
        assert (await proc.add("x", 6)).pending == 5
        assert trips.commands == ["EVALSHA"] and trips.pipelines == []
        trips.clear()
        f, g = await asyncio.gather(proc.add("x", 7), proc.add("x", 8))
        if backend.kind == "real":
            assert trips.commands == ["EVALSHA", "EVALSHA"] and trips.pipelines == []
        else:  # a fake that answers without letting the loop run may leave this mode (see AsyncExecutor.add)
            assert trips.commands in (["EVALSHA", "EVALSHA"], ["EVALSHA"]) and trips.pipelines == []
        assert (f.pending, g.pending) == (6, 7)
        assert (await proc.flush("x")).item_count == 7
        stats = await burst(ab, concurrency=2)
        assert stats.failed == 0
        assert [i for f in got if f.batch_id == "x" for i in f.items] == [0, 1, 2, 4, 6, 7, 8]

    backend.run(body, client_cls=cls)


def test_adds_queued_behind_a_cancelled_lone_caller_are_still_sent(backend: Backend) -> None:
    """A caller that sent at once is cancelled while its reply is out: the adds queued behind
    it are sent all the same, in order, each with its own result."""

    async def body(ab: aio.Batcher) -> None:
        proc, got = make(ab, name="cx", max_batch_size=100)
        await warm(ab)
        await proc.add("x", 0)  # alone: from now on a caller sends at once
        lead = asyncio.create_task(proc.add("x", 1))
        await asyncio.sleep(0)  # the lead has sent its add
        others = [asyncio.create_task(proc.add("x", i)) for i in (2, 3)]
        await asyncio.sleep(0)  # these two queue behind it
        lead.cancel()
        results = await asyncio.gather(*others)
        assert [r.batch_id for r in results] == ["x", "x"]
        assert results[1].pending == results[0].pending + 1
        await proc.flush("x")
        assert (await burst(ab)).failed == 0
        items = [i for f in got for i in f.items]
        assert items[:1] == [0] and items[-2:] == [2, 3] and set(items) <= {0, 1, 2, 3}

    backend.run(body)


def test_coalesced_adds_to_one_batch_id_are_one_script_call(backend: Backend) -> None:
    """Adds and add_manys to the same id in one iteration: a single EVALSHA whose segments give
    each caller its own result, spilling over sequences exactly as sequential calls would."""
    cls, trips = counting_client_class(backend.aclient_class())

    async def body(ab: aio.Batcher) -> None:
        proc, got = make(ab, name="one", max_batch_size=4)
        await warm(ab)
        trips.clear()
        r1, r2, r3, r4 = await asyncio.gather(
            proc.add("x", "a"),
            proc.add_many("x", ["b", "c", "d", "e", "f"]),
            proc.add_many("x", []),
            proc.add("x", "g"),
        )
        assert trips.commands == ["EVALSHA"] and trips.pipelines == []
        assert r1 == rb.AddResult("x", 0, 1, 1, False, "accumulating", 0)
        assert r2 == rb.AddResult("x", 1, 5, 2, True, "accumulating", 1)
        assert (r3.added, r3.sequence) == (0, None)
        assert r4 == rb.AddResult("x", 1, 1, 3, False, "accumulating", 0)
        await proc.flush("x")
        await burst(ab)
        assert sorted((f.sequence, tuple(f.items)) for f in got) == [
            (0, ("a", "b", "c", "d")),
            (1, ("e", "f", "g")),
        ]

    backend.run(body, client_cls=cls)


def test_coalesced_script_calls_stay_within_add_chunk(real_client: redis.Redis) -> None:
    """docs/how-it-works.md: "add_many sends at most 10,000 items per script call, so no single call blocks
    Redis for long". Group commit must not merge concurrent add_manys into one bigger call."""
    cls, trips = counting_client_class(aioredis.Redis)
    port = real_client.connection_pool.connection_kwargs["port"]
    backend = Backend("real", real_client, port)

    async def body(ab: aio.Batcher) -> None:
        proc, _ = make(ab, name="chunk", max_batch_size=100_000)
        await warm(ab)
        trips.clear()
        n = 4
        results = await asyncio.gather(
            *(proc.add_many("x", [[c, i] for i in range(6_000)]) for c in range(n))
        )
        assert sorted(r.pending for r in results) == [6_000 * (c + 1) for c in range(n)]
        # EVALSHA sha numkeys, 2 keys, 2 fixed arguments, then the items (see lua/add.lua)
        sizes = [len(args) - 3 - 2 - 2 for args in trips.script_calls()]
        assert sum(sizes) == n * 6_000
        assert max(sizes) <= ADD_CHUNK, (
            f"one coalesced script call carried {max(sizes)} items (> ADD_CHUNK={ADD_CHUNK}); "
            f"items per script call: {sizes}"
        )
        st = await proc.status("x")
        assert st is not None and st.pending == n * 6_000

    backend.run(body, client_cls=cls)


# == part 2: cancellation ===========================================================================


def test_cancelled_adds_are_never_half_written_or_double_counted(backend: Backend) -> None:
    rng = random.Random(20240607)
    ids = [f"c{i}" for i in range(5)]

    async def body(ab: aio.Batcher) -> None:
        proc, got = make(ab, name="cancel", max_batch_size=7)
        await proc.add("warm", "up")  # registered: later sends are one round trip each
        loop = asyncio.get_running_loop()
        tasks: dict[tuple[int, int], asyncio.Task[rb.AddResult]] = {}
        before_send: set[tuple[int, int]] = set()
        for wave in range(25):
            wave_tasks = {
                (wave, i): asyncio.ensure_future(proc.add(rng.choice(ids), [wave, i])) for i in range(40)
            }
            keys = list(wave_tasks)
            rng.shuffle(keys)
            # cancelled before the coroutine ever ran: nothing submitted
            for key in keys[:4]:
                wave_tasks[key].cancel()
                before_send.add(key)
            await asyncio.sleep(0)  # every add of the wave is queued; the send runs after us
            # cancelled while queued, before the loop iteration that sends them
            for key in keys[4:8]:
                wave_tasks[key].cancel()
                before_send.add(key)
            # cancelled at random later points: during the send or after Redis answered
            for key in keys[8:16]:
                loop.call_later(rng.uniform(0, 0.004), wave_tasks[key].cancel)
            tasks.update(wave_tasks)
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        await asyncio.sleep(0.05)  # sends still running for cancelled callers finish
        done: dict[tuple[int, int], rb.AddResult] = {}
        cancelled: set[tuple[int, int]] = set()
        for key, out in zip(tasks, outcomes, strict=True):
            if isinstance(out, rb.AddResult):
                done[key] = out
            else:
                assert isinstance(out, asyncio.CancelledError), (key, out)
                cancelled.add(key)
        assert before_send <= cancelled and len(cancelled) > len(before_send)

        # the head's pending counter (with the open list, max_pending's basis) equals what the
        # sealed sequences' lists really hold, and status counts those and the open list's
        client = ab.client
        for bid in [*ids, "warm"]:
            part = proc.keys.for_base(bid)
            counter = int(await client.hget(part.head(bid), "pending") or 0)
            acc = await client.hget(part.head(bid), "acc")
            sealed = held = 0
            for s in await proc.sequences(bid):
                if acc is not None and int(acc) == s.sequence:
                    held += await client.llen(part.open_items(bid)) - 1  # behind its header
                else:
                    n = await client.llen(part.items(bid, s.sequence))
                    sealed, held = sealed + n, held + n
            st = await proc.status(bid)
            assert st is not None
            assert counter == sealed and held == st.pending, (bid, counter, sealed, held, st.pending)

        for bid in [*ids, "warm"]:
            await proc.flush(bid)
        stats = await burst(ab, concurrency=8)
        assert stats.failed == 0
        delivered = Counter(tuple(i) for f in got for i in f.items if i != "up")
        assert all(n == 1 for n in delivered.values()), [k for k, n in delivered.items() if n > 1]
        assert not (before_send & set(delivered)), "an add cancelled before its send was written"
        assert set(done) <= set(delivered)
        assert stats.items == sum(delivered.values()) + 1
        # some callers were cancelled after their send: their items are in Redis (exactly once)
        assert cancelled & set(delivered)
        check_positions(done, got, key=lambda item: tuple(item) if item != "up" else None)

    backend.run(body)


def test_a_caller_cancelled_while_the_processor_registers_writes_nothing(backend: Backend) -> None:
    """README: "A caller cancelled before its round trip is sent writes nothing". The first add
    of a processor registers it (HSET) before the adds are sent; a caller cancelled during that
    registration has not had its round trip sent yet."""
    gate: dict[str, asyncio.Event] = {}

    class Gated(backend.aclient_class()):  # type: ignore[misc]
        async def execute_command(self, *args: Any, **options: Any) -> Any:
            if str(args[0]).upper() == "HSET" and "open" in gate:
                gate["hset"].set()
                await gate["open"].wait()
            return await super().execute_command(*args, **options)

    async def body(ab: aio.Batcher) -> None:
        gate["hset"], gate["open"] = asyncio.Event(), asyncio.Event()
        proc, _ = make(ab, name="reg")
        keep = asyncio.ensure_future(proc.add("x", "kept"))
        drop = asyncio.ensure_future(proc.add("x", "cancelled"))
        await gate["hset"].wait()  # the send is registering the processor: no EVALSHA sent yet
        drop.cancel()
        gate["open"].set()
        r = await keep
        with pytest.raises(asyncio.CancelledError):
            await drop
        await asyncio.sleep(0.05)
        st = await proc.status("x")
        assert st is not None
        assert (r.pending, st.pending) == (1, 1), (
            f"an add cancelled before its EVALSHA was sent was written anyway: kept add got {r}, "
            f"batch holds {st.pending} items"
        )

    backend.run(body, client_cls=Gated)


def test_noscript_met_by_part_of_a_pipeline_never_runs_the_rest_twice(backend: Backend) -> None:
    """Only the calls of a pipeline that met NOSCRIPT may be sent again. Here the server's script
    cache is empty when the pipeline's first EVALSHA arrives and is filled again by another
    client before the second (as after a restart, when every producer meets NOSCRIPT and EVALs;
    on a cluster it is simpler still: one node lost its cache, the others did not). The second
    and third adds ran; re-sending them would add their items twice."""
    cls, trips = counting_client_class(backend.aclient_class())

    async def body(ab: aio.Batcher) -> None:
        proc, got = make(ab, name="mix", max_batch_size=100)
        await warm(ab)
        trips.clear()
        trips.reload_scripts_inside_next_pipeline = True
        results = await asyncio.gather(*(proc.add(f"m{i}", i) for i in range(3)))
        assert [(r.batch_id, r.pending) for r in results] == [("m0", 1), ("m1", 1), ("m2", 1)]
        sent = [[str(args[0]).upper() for args in p] for p in trips.pipelines]
        assert sent[0] == ["SCRIPT", "EVALSHA", "SCRIPT", "EVALSHA", "EVALSHA"]
        pending = {f"m{i}": await proc.pending(f"m{i}") for i in range(3)}
        assert pending == {"m0": 1, "m1": 1, "m2": 1}, (
            f"adds that had already run were sent again after NOSCRIPT: pending {pending}; "
            f"pipelines sent: {sent}"
        )
        for i in range(3):
            await proc.flush(f"m{i}")
        await burst(ab)
        assert sorted(i for f in got for i in f.items) == [0, 1, 2]

    backend.run(body, client_cls=cls)


# == part 2: error isolation ========================================================================


def test_errors_reach_only_the_callers_they_concern(backend: Backend) -> None:
    """In one loop iteration: adds over max_pending (BatchFull), adds to a batch id whose head
    key has the wrong type (CorruptData, refused by the script), bad input, and normal adds -- after a
    SCRIPT FLUSH, so the pipeline also meets NOSCRIPT. Each caller gets its own outcome."""
    cls, trips = counting_client_class(backend.aclient_class())

    async def body(ab: aio.Batcher) -> None:
        full, got_full = make(ab, name="p", max_batch_size=100, max_pending=5)
        normal, got_normal = make(ab, name="n", max_batch_size=3)
        broken_head = full.keys.for_base("broken").head("broken")
        assert broken_head == "t:{p:0}:b:broken"
        backend.sync.set(broken_head, "not a hash")
        # 2 pending of 5; with company, so the batcher goes on collecting each iteration's adds
        await asyncio.gather(full.add_many("b", [0, 1]), normal.add("n0", "-"))
        await warm(ab)
        backend.sync.script_flush()
        trips.clear()
        jobs: list[tuple[str, Awaitable[Any]]] = [
            ("ok", full.add("b", 2)),  # 3
            ("full", full.add_many("b", [3, 4, 5])),  # 6 > 5: refused, nothing written
            ("ok", full.add("b", 6)),  # 4: a later segment still fits
            ("broken", full.add("broken", "x")),
            ("ok", normal.add("n1", "a")),
            ("bad-id", normal.add("", "x")),
            ("ok", full.add("b", 7)),  # 5
            ("broken", full.add_many("broken", ["y", "z"])),
            ("bad-item", normal.add("n1", object())),
            ("full", full.add("b", 8)),  # 6 > 5
            ("ok", normal.add_many("n2", ["b", "c", "d", "e"])),
            ("ok", full.add("c", 9)),  # max_pending is per batch id
        ]
        outcomes = await asyncio.gather(*(j for _, j in jobs), return_exceptions=True)
        kinds = [k for k, _ in jobs]
        for kind, out in zip(kinds, outcomes, strict=True):
            if kind == "ok":
                assert isinstance(out, rb.AddResult), (kind, out)
            elif kind == "full":
                assert isinstance(out, rb.BatchFull), (kind, out)
            elif kind == "broken":
                assert isinstance(out, rb.CorruptData) and "b:broken is a string" in str(out), (kind, out)
            elif kind == "bad-id":
                assert isinstance(out, rb.InvalidBatchId), (kind, out)
            else:
                assert isinstance(out, rb.ItemEncodeError), (kind, out)
        assert [(r.batch_id, r.pending) for r in outcomes if isinstance(r, rb.AddResult)] == [
            ("b", 3),
            ("b", 4),
            ("n1", 1),
            ("b", 5),
            ("n2", 1),
            ("c", 1),
        ]
        refused = [o for o in outcomes if isinstance(o, rb.BatchFull)]
        assert [(e.pending, e.adding, e.limit) for e in refused] == [(3, 3, 5), (5, 1, 5)]
        # NOSCRIPT was recovered: one pipeline with EVALSHA, then the script calls again by EVAL
        assert [str(args[0]).upper() for p in trips.pipelines for args in p] == ["EVALSHA"] * 5 + ["EVAL"] * 5
        assert backend.sync.get(broken_head) == b"not a hash"

        backend.sync.delete(broken_head)
        for bid in ("b", "c"):
            await full.flush(bid)
        for bid in ("n1", "n2"):
            await normal.flush(bid)
        await burst(ab)
        assert sorted(i for f in got_full for i in f.items) == [0, 1, 2, 6, 7, 9]
        assert sorted(i for f in got_normal for i in f.items) == ["a", "b", "c", "d", "e"]
        assert await full.status("broken") is None

    backend.run(body, client_cls=cls)


def test_max_pending_refuses_adds_and_writes_nothing(backend: Backend) -> None:
    """tests/test_reliability.py's backpressure case, awaited; then the same limit met by adds
    coalesced into one script call for one id: each segment is checked on its own."""
    cls, trips = counting_client_class(backend.aclient_class())

    async def body(ab: aio.Batcher) -> None:
        proc = ab.processor(name="bp", max_batch_size=3, max_pending=5, **FAST)(lambda f: None)
        await proc.add_many("b", [1, 2, 3, 4])
        before = snapshot(backend.sync)
        with pytest.raises(rb.BatchFull) as err:
            await proc.add_many("b", [5, 6])
        assert (err.value.pending, err.value.adding, err.value.limit) == (4, 2, 5)
        assert snapshot(backend.sync) == before
        assert (await proc.add("b", 5)).pending == 2
        with pytest.raises(rb.BatchFull):
            await proc.add("b", 6)
        await proc.add_many("other", [1, 2, 3, 4, 5])  # the limit is per batch id
        await burst(ab)  # delivers the sealed sequences 0 (3 items)
        assert (await proc.add("b", 6)).pending == 3
        st = await proc.status("b")
        assert st is not None and st.pending == 3

        trips.clear()
        outs = await asyncio.gather(
            proc.add("c", 1),
            proc.add_many("c", [2, 3, 4, 5, 6]),  # 6 > 5: refused
            proc.add_many("c", [2, 3, 4]),  # 4
            proc.add("c", 5),  # 5
            proc.add("c", 6),  # 6 > 5: refused
            return_exceptions=True,
        )
        # the first add went at once (the calls before came one at a time); the four made
        # meanwhile went after it as one script call, each segment checked on its own (a fake
        # that answers without letting the loop run: all five as one call, see AsyncExecutor.add)
        sizes = [len(args) for args in trips.sent]  # 7 + items
        assert trips.pipelines == []
        if backend.kind == "real" or sizes != [18]:
            assert sizes == [8, 17], sizes
        assert [type(o).__name__ for o in outs] == [
            "AddResult",
            "BatchFull",
            "AddResult",
            "AddResult",
            "BatchFull",
        ]
        assert [(o.sequence, o.pending) for o in outs if isinstance(o, rb.AddResult)] == [
            (0, 1),
            (1, 1),
            (1, 2),
        ]
        st = await proc.status("c")
        assert st is not None and st.pending == 5

    backend.run(body, client_cls=cls)


FAST = {"flush_interval": None, "retry_backoff": 0.01, "retry_backoff_max": 0.02}


def test_a_lone_failing_add_and_bad_input_send_nothing_else(backend: Backend) -> None:
    cls, trips = counting_client_class(backend.aclient_class())

    async def body(ab: aio.Batcher) -> None:
        proc, _ = make(ab, name="p")
        await warm(ab)
        backend.sync.set(proc.keys.for_base("w").head("w"), "x")
        trips.clear()
        with pytest.raises(rb.CorruptData, match="b:w is a string"):
            await proc.add("w", 1)  # the single-call path (no pipeline) is refused just as well
        assert trips.commands == ["EVALSHA"]
        trips.clear()
        with pytest.raises(rb.InvalidBatchId):
            await proc.add("a\x00b", 1)
        with pytest.raises(rb.ItemEncodeError):
            await proc.add_many("ok", [1, object()])
        assert trips.round_trips == 0  # rejected before anything was queued or sent
        assert (await proc.add("ok", 1)).pending == 1

    backend.run(body, client_cls=cls)


def test_a_failed_round_trip_fails_its_callers_only(backend: Backend) -> None:
    """A network error on the coalesced pipeline reaches every caller in it as OutcomeUnknown
    (their items may or may not have run: they must be told) and no caller of another round
    trip; a request known not to have been sent (NotSent) is retried transparently, without
    duplicates."""
    cls, trips = counting_client_class(backend.aclient_class())

    async def body(ab: aio.Batcher) -> None:
        proc, got = make(ab, name="net", max_batch_size=100)
        await warm(ab)
        trips.fail_next_pipeline = redis.ConnectionError("Connection reset by peer")
        first = asyncio.gather(
            *(proc.add(f"x{i % 3}", ["lost", i]) for i in range(6)), return_exceptions=True
        )
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first send is under way; these adds go in the next round trip
        second = asyncio.gather(
            *(proc.add(f"x{i % 3}", ["kept", i]) for i in range(6)), return_exceptions=True
        )
        lost, kept = await first, await second
        assert all(isinstance(e, rb.OutcomeUnknownConnectionError) for e in lost), lost
        assert all(isinstance(e, redis.ConnectionError) for e in lost), lost
        assert all(isinstance(r, rb.AddResult) for r in kept), kept
        assert len(trips.pipelines) == 2

        trips.fail_next_pipeline = rb.NotSentConnectionError("Error 111 connecting to 127.0.0.1:1.")
        again = await asyncio.gather(*(proc.add(f"x{i % 3}", ["retried", i]) for i in range(6)))
        assert [r.pending for r in again] == [3, 3, 3, 4, 4, 4]

        for i in range(3):
            await proc.flush(f"x{i}")
        await burst(ab)
        delivered = sorted(tuple(i) for f in got for i in f.items)
        assert delivered == sorted([("kept", i) for i in range(6)] + [("retried", i) for i in range(6)])

    backend.run(body, client_cls=cls)


# == part 3: the async API's surface ===============================================================


def test_the_async_processor_offers_every_method_of_the_sync_one() -> None:
    """Each public method of :class:`redis_batcher.Processor` exists on AsyncProcessor with the
    same parameters, awaited when it talks to Redis (``encode`` alone does not)."""
    local = {"encode"}
    for name, sync_method in inspect.getmembers(rb.Processor, inspect.isfunction):
        if name.startswith("_"):
            continue
        async_method = getattr(aio.AsyncProcessor, name, None)
        assert async_method is not None, f"AsyncProcessor has no {name}()"
        params = inspect.signature(async_method).parameters
        assert list(params) == list(inspect.signature(sync_method).parameters), name
        if name in local:
            assert not inspect.iscoroutinefunction(async_method), name
        else:
            awaited = inspect.iscoroutinefunction(async_method) or inspect.isasyncgenfunction(async_method)
            assert awaited, f"AsyncProcessor.{name} is not awaited"


def test_the_library_never_imports_a_test_backend() -> None:
    """fakeredis (and its Lua runtime) is a test dependency: no module of the library imports it,
    not even lazily in a function, and importing the library (asyncio and CLI too) loads neither."""
    for path in sorted((ROOT / "redis_batcher").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] in ("fakeredis", "lupa")], (
                f"{path.name}:{node.lineno} imports {names}"
            )
    probe = (
        "import sys, redis_batcher, redis_batcher.asyncio, redis_batcher.cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('fakeredis', 'lupa'))\n"
        "assert not loaded, loaded\n"
        "import fakeredis\n"  # the probe itself can see them: it would notice them imported
        "assert 'fakeredis' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
