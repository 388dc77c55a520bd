"""The asyncio worker (``redis_batcher.asyncio.Worker``) against a real redis-server: native
``async def`` handlers with ``concurrency`` in flight, sync handlers in the thread pool,
timeouts, partial failures, dead letters, interval timers, pub/sub wake-ups, graceful stop,
processors shared between the sync and the async API, the CLI daemon with an async app,
WAIT with group commit, and a ``redis.asyncio.RedisCluster`` smoke test."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.credentials import UsernamePasswordCredentialProvider

import redis_batcher as rb
from redis_batcher import asyncio as aio
from redis_batcher.keys import partition_of
from redis_batcher.testing import RedisClusterServers, RedisServer
from tests.apps import async_app
from tests.conftest import ROOT, cli_command, subprocess_env

from .clients import arun
from .test_async_api import check_positions
from .test_reliability import Abort, guarded
from .test_worker import wait_for

FAST = {"flush_interval": None, "retry_backoff": 0.01, "retry_backoff_max": 0.02}


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def port(redis_server: RedisServer, real_client: redis.Redis) -> int:
    """The session server's port, with the server flushed (through ``real_client``)."""
    return redis_server.port


def run_async(port: int, body: Callable[[aio.Batcher], Awaitable[None]], **options: Any) -> None:
    """``body(async batcher)`` (prefix "t", a redis.asyncio client) in a fresh event loop."""

    async def main() -> None:
        options.setdefault("prefix", "t")
        ab = aio.Batcher(aioredis.Redis(host="127.0.0.1", port=port), **options)
        try:
            await body(ab)
        finally:
            await ab.aclose()

    arun(main)


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond()`` (a bool or an awaitable of one) without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def serving(worker: aio.Worker) -> AsyncIterator[asyncio.Task[aio.WorkerStats]]:
    """Run ``worker.run()`` as a task until the block ends, then stop it and wait for it."""
    task = asyncio.ensure_future(worker.run())
    try:
        await until(lambda: worker.ready is not None and worker.ready.is_set(), what="worker ready")
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def drain(ab: aio.Batcher, done: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await done():
        assert time.monotonic() < deadline, "not done in time"
        await aio.Worker(ab, concurrency=2).run(burst=True)
        await asyncio.sleep(0.02)


class Gauge:
    """Peak number of handlers running at once (thread-safe, for sync and async handlers)."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


# -- handlers: where and how many ----------------------------------------------------------------


def test_async_handlers_run_on_the_loop_up_to_concurrency(port: int) -> None:
    async def body(ab: aio.Batcher) -> None:
        gauge = Gauge()
        threads: set[threading.Thread] = set()

        @ab.processor(name="conc", max_batch_size=1, flush_interval=None)
        async def handler(flush: rb.Flush) -> None:
            threads.add(threading.current_thread())
            gauge.enter()
            await asyncio.sleep(0.05)
            gauge.leave()

        await handler.add_many("b", list(range(20)))
        t0 = time.monotonic()
        stats = await aio.Worker(ab, concurrency=3).run(burst=True)
        elapsed = time.monotonic() - t0
        assert stats.delivered == 20 and gauge.peak == 3
        assert threads == {threading.current_thread()}  # natively on the event loop's thread
        assert elapsed < 20 * 0.05  # overlapped, not one after the other

    run_async(port, body)


def test_sync_handlers_run_in_the_thread_pool_without_blocking_the_loop(port: int) -> None:
    async def body(ab: aio.Batcher) -> None:
        gauge = Gauge()
        threads: set[threading.Thread] = set()

        @ab.processor(name="sync", max_batch_size=1, flush_interval=None)
        def handler(flush: rb.Flush) -> None:
            threads.add(threading.current_thread())
            gauge.enter()
            time.sleep(0.1)  # blocking: must not stall the event loop
            gauge.leave()

        await handler.add_many("b", list(range(9)))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.ensure_future(ticker())
        stats = await aio.Worker(ab, concurrency=3).run(burst=True)
        tick.cancel()
        assert stats.delivered == 9 and gauge.peak == 3
        loop_thread = threading.current_thread()
        assert threads and loop_thread not in threads
        assert all(t.name.startswith("rb-sync-handler") for t in threads), threads
        assert ticks >= 10, f"the loop was blocked by sync handlers ({ticks} ticks in ~0.3 s)"

    run_async(port, body)


def test_heartbeat_keeps_a_long_async_handler_from_being_redelivered(port: int) -> None:
    async def body(ab: aio.Batcher) -> None:
        calls: list[int] = []

        @ab.processor(name="hb", max_batch_size=1, flush_interval=None, lease_timeout=0.3)
        async def slow(flush: rb.Flush) -> None:
            calls.append(flush.attempt)
            await asyncio.sleep(1.0)  # three times the lease

        await slow.add("b", 1)
        stats = await aio.Worker(ab, concurrency=2).run(burst=True)
        assert calls == [1] and stats.delivered == 1 and stats.lease_lost == 0

    run_async(port, body)


# -- failures ------------------------------------------------------------------------------------


def test_handler_timeout_cancels_an_async_handler_then_the_retry_succeeds(port: int) -> None:
    async def body(ab: aio.Batcher) -> None:
        attempts: list[int] = []
        cancelled: list[int] = []
        finished: list[int] = []

        @ab.processor(
            name="to", max_batch_size=1, handler_timeout=0.3, flush_interval=None, retry_backoff=0.05
        )
        async def handler(flush: rb.Flush) -> None:
            attempts.append(flush.attempt)
            if flush.attempt == 1:
                try:
                    await asyncio.sleep(5)
                except asyncio.CancelledError:
                    cancelled.append(flush.attempt)
                    raise
            finished.append(flush.attempt)

        await handler.add("b", 1)
        t0 = time.monotonic()
        worker = aio.Worker(ab, concurrency=1)
        async with serving(worker):
            await until(lambda: _is_none(handler.status("b")), timeout=5, what="delivery")
        assert time.monotonic() - t0 < 3  # nowhere near the 5 s the first attempt wanted
        assert worker.stats.timed_out == 1 and worker.stats.delivered == 1
        assert attempts == [1, 2] and cancelled == [1] and finished == [2]
        hist = await handler.history("b")
        assert [(h.attempt, h.success) for h in hist] == [(2, True), (1, False)]
        assert (hist[1].error or "").startswith("HandlerTimeout: handler still running after 0.3s")

    run_async(port, body)


def test_sync_handler_timeout_counts_as_failure_and_frees_the_slot(port: int) -> None:
    """tests/test_reliability.py's case for the async worker's thread pool: a sync handler past
    its timeout cannot be killed, but it must not keep the retry from running (nor make
    deliveries that never started count as "still running" timeouts)."""

    async def body(ab: aio.Batcher) -> None:
        started: list[int] = []
        finished: list[int] = []

        def handler(flush: rb.Flush) -> None:
            started.append(flush.attempt)
            if flush.attempt == 1:
                time.sleep(1.5)
            finished.append(flush.attempt)

        proc = ab.processor(
            name="to", max_batch_size=1, handler_timeout=0.3, flush_interval=None, retry_backoff=0.05
        )(handler)
        await proc.add("b", 1)
        w = aio.Worker(ab, concurrency=1)
        async with serving(w):
            await until(lambda: _is_none(proc.status("b")), timeout=5, what="delivery")
            await until(lambda: len(finished) == 2, timeout=5, what="the abandoned handler")
        hist = [(h.attempt, h.success, h.error) for h in await proc.history("b")]
        assert started == [1, 2] and finished == [2, 1] and w.stats.timed_out == 1, (
            f"attempt 2 did not run while attempt 1 still slept: handler started for {started}, "
            f"finished {finished}, timed_out={w.stats.timed_out}, history {hist}"
        )
        assert [(a, s) for a, s, _ in hist] == [(2, True), (1, False)]

    run_async(port, body)


@pytest.mark.parametrize("style", ["raise", "return"])
def test_partial_failure_from_an_async_handler_retries_only_the_failed_items(port: int, style: str) -> None:
    async def body(ab: aio.Batcher) -> None:
        seen: list[tuple[int, list[Any]]] = []

        @ab.processor(name="pf", max_batch_size=5, **FAST)
        async def handler(flush: rb.Flush) -> Any:
            seen.append((flush.attempt, flush.items))
            if flush.attempt == 1:
                failure = rb.PartialFailure(failed=[1, 3], message="b and d were rejected")
                if style == "raise":
                    raise failure
                return failure
            return None

        await handler.add_many("b", ["a", "b", "c", "d", "e"])
        await drain(ab, lambda: _is_none(handler.status("b")))
        assert seen == [(1, ["a", "b", "c", "d", "e"]), (2, ["b", "d"])]
        hist = await handler.history("b")
        assert [(h.success, h.item_count) for h in hist] == [(True, 2), (False, 5)]
        assert hist[1].error == "PartialFailure: b and d were rejected"
        assert hist[0].flush_id == hist[1].flush_id
        assert await handler.dead_letters() == []

    run_async(port, body)


async def _is_none(value: Awaitable[Any]) -> bool:
    return (await value) is None


def test_async_handler_failures_dead_letter_and_replay(port: int) -> None:
    """Dead letters of an async processor, inspected and replayed awaited (and seen by the
    sync definition it shares); other batch ids keep flowing meanwhile."""

    async def body(ab: aio.Batcher) -> None:
        calls: list[tuple[str, int]] = []
        failing = {"bad"}

        @ab.processor(name="d", max_batch_size=3, max_attempts=3, **FAST)
        async def handler(flush: rb.Flush) -> None:
            calls.append((flush.batch_id, flush.attempt))
            await asyncio.sleep(0)
            if flush.batch_id in failing:
                raise ValueError("nope")

        await asyncio.gather(handler.add_many("bad", [1, 2, 3]), handler.add_many("good", [4, 5, 6]))

        async def settled() -> bool:
            return await handler.status("bad") is None and await handler.status("good") is None

        await drain(ab, settled)
        assert [a for b, a in calls if b == "bad"] == [1, 2, 3]
        assert [a for b, a in calls if b == "good"] == [1]
        (dead,) = await handler.dead_letters()
        assert (dead.batch_id, dead.item_count, dead.reason, dead.attempts) == ("bad", 3, "max_attempts", 3)
        assert dead.error == "ValueError: nope"
        assert await asyncio.to_thread(handler.definition.dead_letters) == [dead]
        assert (await handler.dead_letter(dead.id)).items == [1, 2, 3]
        failing.clear()
        assert await handler.replay_dead(dead.id) == 1
        assert await handler.dead_letters() == []
        await drain(ab, lambda: _is_none(handler.status("bad")))
        assert calls[-1] == ("bad", 1)
        assert (await handler.history("bad"))[0].reason == "replay"

    run_async(port, body, definitions=rb.Batcher(redis.Redis(host="127.0.0.1", port=port), prefix="t"))


@pytest.mark.parametrize(
    ("style", "exc", "text"),
    [
        ("async", SystemExit(3), "SystemExit: 3"),
        ("sync", SystemExit(3), "SystemExit: 3"),
        ("sync", KeyboardInterrupt(), "KeyboardInterrupt: "),
        ("async", Abort("stop"), "Abort: stop"),
    ],
    ids=["async-exit", "sync-exit", "sync-interrupt", "async-custom"],
)
def test_a_handler_raising_a_base_exception_fails_its_attempt(
    port: int, style: str, exc: BaseException, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    """sys.exit() in a handler neither ends the event loop nor wedges the flush: a failed
    attempt, retried, then dead-lettered; bursts return. The loop runs in a thread of its own,
    so a regression cannot stop the test session."""
    calls: list[int] = []

    def fail(flush: rb.Flush) -> None:
        calls.append(flush.attempt)
        if flush.batch_id == "bad":
            raise exc

    async def body(ab: aio.Batcher) -> None:
        if style == "async":

            @ab.processor(name="x", max_batch_size=2, max_attempts=2, **FAST)
            async def handler(flush: rb.Flush) -> None:
                await asyncio.sleep(0)
                fail(flush)

        else:
            handler = ab.processor(name="x", max_batch_size=2, max_attempts=2, **FAST)(fail)
        await handler.add_many("bad", [1, 2])
        await handler.add_many("good", [3, 4])

        async def settled() -> bool:
            return await handler.status("bad") is None and await handler.status("good") is None

        await drain(ab, settled)
        assert sorted(calls) == [1, 1, 2]
        history = [(h.attempt, h.success, h.error) for h in await handler.history("bad")]
        assert history == [(2, False, text), (1, False, text)]
        (dead,) = await handler.dead_letters()
        assert (dead.batch_id, dead.reason, dead.error) == ("bad", "max_attempts", text)

    guarded(lambda: run_async(port, body), timeout=30)
    [record, *_] = [r for r in caplog.records if "handler raised" in r.getMessage()]
    assert record.levelname == "ERROR" and text in record.getMessage() and record.exc_info is not None


# -- timers, wake-ups, shutdown --------------------------------------------------------------------


def test_interval_flush_fires_with_the_serving_async_worker(port: int) -> None:
    async def body(ab: aio.Batcher) -> None:
        got: list[rb.Flush] = []

        @ab.processor(name="iv", max_batch_size=1000, flush_interval=0.3)
        async def handler(flush: rb.Flush) -> None:
            got.append(flush)

        async with serving(aio.Worker(ab, max_idle_wait=30)):
            await handler.add_many("slow-trickle", [1, 2, 3])
            await handler.add("other", "x")
            await until(lambda: len(got) == 2, timeout=5, what="two interval flushes")
        assert sorted((f.batch_id, tuple(f.items), f.reason) for f in got) == [
            ("other", ("x",), "interval"),
            ("slow-trickle", (1, 2, 3), "interval"),
        ]
        assert await handler.status("slow-trickle") is None

    run_async(port, body)


def test_idle_async_worker_wakes_on_seal_not_on_timer(port: int) -> None:
    """With max_idle_wait=30 s, only the pub/sub wake-up can explain a prompt delivery."""

    async def body(ab: aio.Batcher) -> None:
        started: list[float] = []

        @ab.processor(name="wake", max_batch_size=5, flush_interval=None)
        async def handler(flush: rb.Flush) -> None:
            started.append(time.monotonic())

        latencies = []
        async with serving(aio.Worker(ab, max_idle_wait=30)):
            await asyncio.sleep(0.3)  # let it go idle
            for _ in range(3):
                before = len(started)  # before the add: the handler may start while it is awaited
                t0 = time.monotonic()
                await handler.add_many("w", [1, 2, 3, 4, 5])
                await until(lambda: len(started) > before, timeout=5, what="wake-up")  # noqa: B023
                latencies.append(started[-1] - t0)
                await asyncio.sleep(0.2)
        assert max(latencies) < 2, latencies

    run_async(port, body)


def test_graceful_stop_releases_unfinished_leases(port: int) -> None:
    async def body(ab: aio.Batcher) -> None:
        slow = [True]
        cancelled: list[int] = []
        delivered: list[int] = []

        @ab.processor(name="gr", max_batch_size=1, flush_interval=None)
        async def handler(flush: rb.Flush) -> None:
            if slow[0]:
                try:
                    await asyncio.sleep(3)
                except asyncio.CancelledError:
                    cancelled.append(flush.attempt)
                    raise
            delivered.append(flush.attempt)

        await handler.add("b", 1)
        w = aio.Worker(ab, grace_period=0.2)
        task = asyncio.ensure_future(w.run())
        await until(lambda: w.inflight == 1, what="the handler to start")
        t0 = time.monotonic()
        w.stop()
        stats = await asyncio.wait_for(task, 5)
        assert time.monotonic() - t0 < 2
        assert stats.released == 1 and cancelled == [1] and delivered == []
        st = await handler.status("b")
        assert st is not None and st.batches[0].attempt == 0  # released: the attempt does not count
        slow[0] = False
        await aio.Worker(ab).run(burst=True)  # due at once, not after the lease timeout
        assert delivered == [1]

    run_async(port, body)


# -- dead letters, awaited, on clients a sync copy could not reproduce ----------------------------


@pytest.fixture(scope="module")
def locked_server() -> Iterator[tuple[RedisServer, str]]:
    """A redis-server also listening on a unix socket, with its default user disabled: only the
    ACL user "app" (password "app-pw") gets in, so a connection made with anything but the
    test's own client settings is refused."""
    server = RedisServer()
    sock = str(Path(server.directory) / "redis.sock")
    server.extra_args += ["--unixsocket", sock, "--unixsocketperm", "700"]
    server.start()
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    admin.execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    admin.close()
    try:
        yield server, sock
    finally:
        server.close()


def locked_batcher(server: RedisServer, sock: str, kind: str) -> aio.Batcher:
    """An async batcher on db 3 of ``locked_server`` as user "app", connected three ways."""
    if kind == "unix-socket":
        client: Any = aioredis.Redis(unix_socket_path=sock, db=3, username="app", password="app-pw")
    elif kind == "credential-provider":
        creds = UsernamePasswordCredentialProvider("app", "app-pw")
        client = aioredis.Redis(host="127.0.0.1", port=server.port, db=3, credential_provider=creds)
    else:  # a URL plus options for the client redis-py builds from it
        client = f"redis://127.0.0.1:{server.port}/3"
        return aio.Batcher(client, prefix="t", username="app", password="app-pw")
    return aio.Batcher(client, prefix="t")


@pytest.mark.parametrize("kind", ["unix-socket", "credential-provider", "url-and-options"])
def test_dead_letters_are_administered_through_the_async_client(
    locked_server: tuple[RedisServer, str], kind: str
) -> None:
    """Listing, reading, replaying and purging dead letters goes through the async client itself,
    whatever it was built with (a unix socket, a credential provider, options beside a URL; db 3
    of a server that refuses any other login), never through a sync client guessed from it."""
    server, sock = locked_server
    admin = redis.Redis(host="127.0.0.1", port=server.port, db=3, username="app", password="app-pw")
    admin.flushall()
    delivered: list[tuple[str, list[Any]]] = []
    failing = {"a", "b", "c"}

    async def body() -> None:
        ab = locked_batcher(server, sock, kind)

        @ab.processor(name="d", max_batch_size=2, max_attempts=1, partitions=2, **FAST)
        async def handler(flush: rb.Flush) -> None:
            if flush.batch_id in failing:
                raise ValueError("nope")
            delivered.append((flush.batch_id, flush.items))

        async def settled(*ids: str) -> bool:
            return all([await handler.status(i) is None for i in ids])

        try:
            for i, bid in enumerate(["a", "b", "c", "ok"]):
                await handler.add_many(bid, [2 * i, 2 * i + 1])
            await drain(ab, lambda: settled("a", "b", "c", "ok"))
            assert delivered == [("ok", [6, 7])]
            letters = await handler.dead_letters()
            assert sorted((d.batch_id, d.item_count, d.reason, d.error) for d in letters) == [
                (bid, 2, "max_attempts", "ValueError: nope") for bid in ("a", "b", "c")
            ]
            assert [d.dead_at for d in letters] == sorted((d.dead_at for d in letters), reverse=True)
            assert await handler.dead_letters(limit=2) == letters[:2]
            dead = {d.batch_id: d for d in letters}
            assert (await handler.dead_letter(dead["a"].id)).items == [0, 1]
            # the sync definition has no connection: it refuses instead of guessing one
            with pytest.raises(rb.ConfigError, match="no Redis connection"):
                await asyncio.to_thread(handler.definition.dead_letters)
            for missing in ("no-such-id", ""):
                with pytest.raises(rb.DeadLetterNotFound):
                    await handler.dead_letter(missing)
            with pytest.raises(rb.ConfigError):
                await handler.dead_letters(limit=0)

            failing.discard("a")
            assert await handler.replay_dead(dead["a"].id) == 1  # a new sequence of "a"
            with pytest.raises(rb.DeadLetterNotFound):
                await handler.replay_dead(dead["a"].id)
            await drain(ab, lambda: settled("a"))
            assert delivered[-1] == ("a", [0, 1])
            assert (await handler.history("a"))[0].reason == "replay"

            assert await handler.purge_dead(dead["b"].id) == 1
            with pytest.raises(rb.DeadLetterNotFound):
                await handler.purge_dead(dead["b"].id)
            assert [d.batch_id for d in await handler.dead_letters()] == ["c"]
            assert await handler.purge_dead() == 1
            assert await handler.dead_letters() == [] and await handler.purge_dead() == 0
        finally:
            await ab.aclose()

    try:
        arun(body)
        # all of it happened in db 3 (db 0 untouched)
        db0 = redis.Redis(host="127.0.0.1", port=server.port, username="app", password="app-pw")
        assert admin.dbsize() > 0 and db0.dbsize() == 0
        db0.close()
    finally:
        admin.close()


# -- one definition, both APIs ---------------------------------------------------------------------


def test_processor_defined_on_a_sync_batcher_used_from_asyncio(redis_server: RedisServer, port: int) -> None:
    sync_b = rb.Batcher(redis.Redis(host="127.0.0.1", port=port), prefix="t")
    got: list[rb.Flush] = []
    proc = sync_b.processor(name="shared", max_batch_size=4, flush_interval=None)(got.append)
    proc.add("x", "sync-0")

    async def body() -> None:
        ab = aio.Batcher(redis_server.url, definitions=sync_b)
        assert ab.prefix == "t" and set(ab.processors) == {"shared"}
        aproc = ab.use("shared")
        assert aproc.definition is proc and ab.use(proc).definition is proc
        results = await asyncio.gather(*(aproc.add("x", f"async-{i}") for i in range(5)))
        assert [(r.sequence, r.pending) for r in results] == [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
        await aproc.flush("x")
        await ab.aclose()

    arun(body)
    stats = rb.Worker(sync_b).run(burst=True)  # the sync worker delivers what asyncio added
    assert stats.delivered == 2
    assert [f.items for f in sorted(got, key=lambda f: f.sequence)] == [
        ["sync-0", "async-0", "async-1", "async-2"],
        ["async-3", "async-4"],
    ]
    with pytest.raises(rb.ConfigError):
        aio.Batcher(redis_server.url, prefix="other", definitions=sync_b)
    sync_b.close()


def test_processor_defined_on_an_async_batcher_used_from_sync_code(
    redis_server: RedisServer, port: int
) -> None:
    got: list[rb.Flush] = []
    sync_b = rb.Batcher(redis.Redis(host="127.0.0.1", port=port), prefix="t")

    async def body() -> None:
        ab = aio.Batcher(redis_server.url, definitions=sync_b)

        @ab.processor(name="shared", max_batch_size=3, flush_interval=None)
        async def handler(flush: rb.Flush) -> None:
            got.append(flush)

        # sync code (e.g. a thread, a sync library) adds through the same definition
        r = await asyncio.to_thread(handler.definition.add_many, "x", [1, 2, 3, 4])
        assert (r.sequence, r.pending, r.sealed) == (1, 1, 1)
        assert await asyncio.to_thread(handler.definition.pending, "x") == 4
        assert (await handler.add("x", 5)).pending == 2
        await handler.flush("x")
        await aio.Worker(ab).run(burst=True)
        assert await asyncio.to_thread(handler.definition.status, "x") is None
        await ab.aclose()

    arun(body)
    sync_b.close()
    assert [f.items for f in sorted(got, key=lambda f: f.sequence)] == [[1, 2, 3], [4, 5]]


def test_sync_worker_never_acknowledges_an_async_handler_it_did_not_run(
    redis_server: RedisServer, port: int
) -> None:
    """A processor defined once is usable from both APIs, so the sync Worker can meet an
    ``async def`` handler: calling it only creates a coroutine. Acknowledging that as a
    successful delivery would delete the items unprocessed."""
    sync_b = rb.Batcher(redis.Redis(host="127.0.0.1", port=port), prefix="t")
    ran: list[list[Any]] = []
    ab = aio.Batcher(redis_server.url, definitions=sync_b)

    @ab.processor(name="coro", max_batch_size=2, flush_interval=None)
    async def handler(flush: rb.Flush) -> None:
        ran.append(flush.items)

    handler.definition.add_many("x", [1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
        stats = rb.Worker(sync_b).run(burst=True)
        gc.collect()
    pending = handler.definition.pending("x")
    sync_b.close()
    assert ran == [[1, 2]] or (stats.delivered == 0 and pending == 2), (
        f"the sync Worker acknowledged an async handler without running it: handler ran {ran}, "
        f"stats {stats}, items left {pending} -- the 2 items are gone"
    )


def test_definitions_of_an_async_batcher_without_a_sync_batcher_have_no_connection(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aio.Batcher(client)`` keeps its definitions on a connectionless sync batcher: sync use
    of ``aproc.definition`` (or of its iterators) refuses with a ConfigError saying why, and
    reaches no server -- not the client's, not $REDIS_URL's (db 15 of the test server here)."""
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/15")
    other_db = redis.Redis(host="127.0.0.1", port=port, db=15)

    async def body(ab: aio.Batcher) -> None:
        aproc = ab.processor(name="cl", max_batch_size=10, flush_interval=None)(lambda f: None)

        @ab.iterator(name="it")
        class Empty:
            def next_batch(self, cursor: str | None, batch_size: int) -> rb.Page:
                return rb.Page(items=[], cursor=None, done=True)

            def process(self, items: list[Any], job: rb.JobContext) -> None:
                pass

        uses: list[Callable[[], Any]] = [
            lambda: aproc.definition.add("x", 1),
            lambda: aproc.definition.status("x"),
            lambda: aproc.definition.dead_letters(),
            lambda: aproc.definition.purge_dead(),
            lambda: ab.definitions.register(),
            lambda: ab.definitions.check_memory_policy(),
            lambda: rb.Worker(ab.definitions).run(burst=True),
            lambda: Empty.definition.start("j"),
        ]
        for use in uses:
            with pytest.raises(rb.ConfigError, match="no Redis connection: it only holds definitions"):
                await asyncio.to_thread(use)
        ab.definitions.close()  # nothing to close: no error
        assert "no Redis connection" in repr(ab.definitions.client)
        # the async side works as ever, through the async client
        assert await aproc.status("x") is None
        assert (await aproc.add("x", 1)).pending == 1
        assert (await Empty.start("j")).status == "pending"

    try:
        run_async(port, body)
        assert other_db.dbsize() == 0
    finally:
        other_db.flushdb()
        other_db.close()


def test_a_definitions_only_batcher_connects_later(port: int) -> None:
    """A definitions-only sync batcher becomes a normal one on connect() (the CLI's --redis-url)."""
    b = rb.Batcher.definitions_only(prefix="d")
    proc = b.processor(name="p", max_batch_size=2, flush_interval=None)(lambda f: None)
    with pytest.raises(rb.ConfigError, match="only holds definitions"):
        proc.add("x", 1)
    b.connect(f"redis://127.0.0.1:{port}/0")
    assert proc.add("x", 1).pending == 1
    b.close()


# -- WAIT with group commit ----------------------------------------------------------------------


def test_wait_replicas_with_coalesced_adds() -> None:
    with RedisServer() as primary:
        replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
        rep = redis.Redis(host="127.0.0.1", port=replica.port)
        try:
            wait_for(lambda: rep.info("replication").get("master_link_status") == "up")
            with redis.Redis(host="127.0.0.1", port=primary.port) as pc:  # the primary counts it too
                pc.execute_command("WAIT", 1, 5000)

            async def body() -> None:
                # a timeout that a busy machine's replica still meets when it is up
                ab = aio.Batcher(primary.url, prefix="w", wait_replicas=1, wait_timeout=1.0)
                proc = ab.processor(name="w", max_batch_size=10, flush_interval=None)(lambda f: None)
                rs = await asyncio.gather(*(proc.add(f"b{i % 2}", i) for i in range(6)))
                assert [r.pending for r in rs] == [1, 1, 2, 2, 3, 3]
                # WAIT returned: the replica already holds every item
                for bid in ("b0", "b1"):
                    assert rep.llen(proc.keys.for_base(bid).open_items(bid)) == 1 + 3  # header, items
                assert (await proc.add("b0", "lone")).pending == 4
                replica.stop()
                t0 = time.monotonic()
                outs = await asyncio.gather(
                    *(proc.add(f"b{i % 2}", i) for i in range(4)), return_exceptions=True
                )
                assert all(isinstance(o, rb.NotReplicated) and o.got == 0 for o in outs), outs
                with pytest.raises(rb.NotReplicated):
                    await proc.add("b1", "lone")
                assert time.monotonic() - t0 < 5  # two WAITs of 1 s, never hanging
                assert await proc.pending("b0") == 6 and await proc.pending("b1") == 6  # on the primary
                await ab.aclose()

            arun(body)
        finally:
            rep.close()
            replica.close()


# -- the CLI daemon with an async app ---------------------------------------------------------------


def start_cli_worker(url: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            cli_command("worker", "tests.apps.async_app:abatcher", "--redis-url", url, *extra),
            cwd=ROOT,
            env={**subprocess_env(url), "COLUMNS": "200"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def add_jobs(url: str, jobs: dict[str, list[Any]]) -> None:
    async def body() -> None:
        ab, aproc = async_app.make(url)
        await asyncio.gather(*(aproc.add_many(bid, items) for bid, items in jobs.items()))
        for bid in jobs:
            assert (await aproc.flush(bid)).flushed
        await ab.aclose()

    arun(body)


def test_cli_sigterm_finishes_the_running_async_handler_and_exits_0(
    redis_server: RedisServer,
    real_client: redis.Redis,
    tmp_path: Path,
    cli_procs: list[subprocess.Popen[bytes]],
) -> None:
    add_jobs(redis_server.url, {"job": [{"i": i} for i in range(3)]})
    log = tmp_path / "worker.log"
    proc = start_cli_worker(redis_server.url, log)
    cli_procs.append(proc)
    deadline = time.monotonic() + 20
    while not real_client.exists(async_app.STARTED_KEY):
        assert proc.poll() is None, f"worker exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the handler never started:\n{log.read_text()}"
        time.sleep(0.02)
    assert real_client.get(async_app.STARTED_KEY) == b"job::0:3"
    assert not real_client.exists(async_app.FINISHED_KEY)

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(10)
    elapsed = time.monotonic() - t0
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert elapsed < async_app.HANDLER_SECONDS + 4, f"exit took {elapsed:.1f}s"
    assert real_client.get(async_app.FINISHED_KEY) == b"job::0:3"  # the handler was allowed to finish
    assert "warm shutdown" in text and "worker stopped: 1 delivered, 0 failed" in text, text
    assert [(b, s, items) for b, s, _, items in async_app.read_ledger(real_client)] == [
        ("job", 0, [{"i": 0}, {"i": 1}, {"i": 2}])
    ]
    remote = rb.Batcher(real_client, prefix=async_app.PREFIX).remote(async_app.PROCESSOR)
    (record,) = remote.history("job")
    assert record.success and record.item_count == 3 and record.attempt == 1
    assert remote.status("job") is None


def test_cli_second_signal_releases_the_async_flush_and_exits_1(
    redis_server: RedisServer,
    real_client: redis.Redis,
    tmp_path: Path,
    cli_procs: list[subprocess.Popen[bytes]],
) -> None:
    add_jobs(redis_server.url, {"job": ["x", "y"]})
    log = tmp_path / "worker.log"
    proc = start_cli_worker(redis_server.url, log)
    cli_procs.append(proc)
    deadline = time.monotonic() + 20
    while not real_client.exists(async_app.STARTED_KEY):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    while "warm shutdown" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline + 5, log.read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(5) == 1, log.read_text()
    assert "second signal" in log.read_text()
    assert not real_client.exists(async_app.FINISHED_KEY)
    remote = rb.Batcher(real_client, prefix=async_app.PREFIX).remote(async_app.PROCESSOR)
    [seq] = remote.sequences("job")
    assert (seq.status, seq.item_count, seq.attempt) == ("flushing", 2, 0)  # released, not failed
    assert remote.history("job") == []
    part = remote.keys.for_base("job")
    score = real_client.zscore(part.due, "job::0")
    assert score is not None and score <= time.time() * 1000 + 1  # due again at once


def test_cli_burst_delivers_with_the_async_worker(
    redis_server: RedisServer,
    real_client: redis.Redis,
    tmp_path: Path,
    cli_procs: list[subprocess.Popen[bytes]],
) -> None:
    jobs: dict[str, list[Any]] = {f"job{n}": [[n, i] for i in range(n + 1)] for n in range(3)}
    add_jobs(redis_server.url, jobs)
    log = tmp_path / "burst.log"
    t0 = time.monotonic()
    proc = start_cli_worker(redis_server.url, log, "--burst", "--concurrency", "3")
    cli_procs.append(proc)
    code = proc.wait(30)
    elapsed = time.monotonic() - t0
    assert code == 0, log.read_text()
    ledger = async_app.read_ledger(real_client)
    assert sorted((b, items) for b, _, _, items in ledger) == sorted(jobs.items())
    # three 1.5 s async handlers overlapped on one event loop
    assert elapsed < 3 * async_app.HANDLER_SECONDS + 2, f"burst took {elapsed:.1f}s"


# -- redis.asyncio.RedisCluster ----------------------------------------------------------------------


@pytest.mark.slow
def test_async_cluster_smoke(redis_cluster: RedisClusterServers) -> None:
    nodes = [redis.Redis(host=h, port=p) for h, p in redis_cluster.startup_nodes]
    for n in nodes:
        n.flushall()
    ids = ["{user}:1", "a b", "ü:{x}", "{", "}{", "a::b", "{ac:0}", "emoji 🎉"]
    ids += [f"order:{i}" for i in range(20 - len(ids))]

    async def body() -> None:
        client = aioredis.RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes]
        )
        ab = aio.Batcher(client, prefix="ac")
        assert ab.is_cluster
        got: list[rb.Flush] = []

        @ab.processor(name="ac", partitions=3, max_batch_size=5, flush_interval=None)
        async def handler(flush: rb.Flush) -> None:
            got.append(flush)

        assert {partition_of(b, 3) for b in ids} == {0, 1, 2}
        calls = [(bid, k) for k in range(8) for bid in ids]
        results = await asyncio.gather(*(handler.add(bid, [bid, k]) for bid, k in calls))
        for (_, k), r in zip(calls, results, strict=True):
            assert (r.sequence, r.pending) == (k // 5, k % 5 + 1)
        assert sorted(await _alist(handler.batch_ids())) == sorted(ids)
        for bid in ids:
            assert (await handler.flush(bid)).item_count == 3
        stats = await aio.Worker(ab, concurrency=4).run(burst=True)
        assert stats.delivered == 2 * len(ids) and stats.items == 8 * len(ids) and stats.failed == 0
        check_positions(
            {(bid, k): r for (bid, k), r in zip(calls, results, strict=True)}, got, key=lambda i: tuple(i)
        )
        by_id: dict[str, list[rb.Flush]] = defaultdict(list)
        for f in got:
            by_id[f.batch_id].append(f)
        for bid, flushes in by_id.items():
            flushes.sort(key=lambda f: f.sequence)
            assert [i[1] for f in flushes for i in f.items] == list(range(8)), bid
        assert Counter(f.flush_id for f in got).most_common(1)[0][1] == 1
        for bid in ids:
            assert await handler.status(bid) is None

        # the serving worker is woken through pub/sub on the cluster (its timed check is 30 s away)
        async with serving(aio.Worker(ab, concurrency=2, max_idle_wait=30)):
            await asyncio.sleep(0.5)
            for n, bid in enumerate(["{user}:1", "a b", "order:9"]):
                before = len(got)
                t0 = time.monotonic()
                await handler.add_many(bid, [f"w{n}-{i}" for i in range(5)])
                await until(lambda: len(got) > before, timeout=5, what=f"wake-up for {bid}")  # noqa: B023
                assert time.monotonic() - t0 < 3
        await ab.aclose()

    try:
        arun(body)
    finally:
        for n in nodes:
            n.close()


async def _alist(it: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in it]


@pytest.mark.slow
def test_async_cluster_noscript_on_one_node_never_duplicates(redis_cluster: RedisClusterServers) -> None:
    """One master lost its script cache (restart, failover), the others kept theirs: a coalesced
    pipeline meets NOSCRIPT on that node only. Only those calls may be sent again."""
    nodes = [redis.Redis(host=h, port=p) for h, p in redis_cluster.startup_nodes]
    for n in nodes:
        n.flushall()
    ids = ["{a}", "ö ö", "b b"]

    async def body() -> None:
        client = aioredis.RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes]
        )
        ab = aio.Batcher(client, prefix="nsc")
        proc = ab.processor(name="nsc", partitions=3, max_batch_size=100, flush_interval=None)(lambda f: None)
        assert [partition_of(b, 3) for b in ids] == [0, 1, 2]
        for bid in ids:
            await proc.add(bid, 0)  # the script is cached on every node that serves a partition
        slots = nodes[0].execute_command("CLUSTER SLOTS")

        def port_of(bid: str) -> int:
            slot = int(nodes[0].execute_command("CLUSTER KEYSLOT", proc.keys.for_base(bid).due))
            return next(int(m[1]) for lo, hi, m, *_ in slots if int(lo) <= slot <= int(hi))

        ports = {bid: port_of(bid) for bid in ids}
        assert len(set(ports.values())) > 1, ports
        owner = next(n for n in nodes if n.connection_pool.connection_kwargs["port"] == ports["{a}"])
        others = sorted(bid for bid in ids if ports[bid] != ports["{a}"])
        owner.script_flush()  # only this node forgot the script
        results = await asyncio.gather(*(proc.add(bid, 1) for bid in ids))
        assert [r.pending for r in results] == [2, 2, 2]
        pending = {bid: await proc.pending(bid) for bid in ids}
        assert pending == dict.fromkeys(ids, 2), (
            f"adds on the nodes that still had the script ran twice after NOSCRIPT on another node: "
            f"{pending} (ids served by the other nodes: {others})"
        )
        await ab.aclose()

    try:
        arun(body)
    finally:
        for n in nodes:
            n.close()


def test_prefetched_flushes_wait_for_a_slot_and_are_handed_back_at_stop(port: int) -> None:
    async def body(ab: aio.Batcher) -> None:
        gate = asyncio.Event()
        started: list[int] = []

        async def handler(flush: rb.Flush) -> None:
            started.append(flush.sequence)
            await gate.wait()

        proc = ab.processor(name="pf", max_batch_size=1, flush_interval=None)(handler)
        await proc.add_many("p", [0, 1, 2, 3])
        w = aio.Worker(ab, concurrency=1, prefetch_multiplier=3, grace_period=5)
        task = asyncio.ensure_future(w.run())

        async def claimed_ahead() -> bool:
            st = await proc.status("p")
            return st is not None and sum(1 for b in st.batches if b.attempt == 1) == 3

        await until(lambda: len(started) == 1, what="first handler")
        await until(claimed_ahead, what="two flushes claimed ahead")
        assert w.inflight == 1
        w.stop()
        await asyncio.sleep(0.2)
        gate.set()
        stats = await asyncio.wait_for(task, 10)
        assert started == [0] and stats.delivered == 1 and stats.released == 2
        again = await aio.Worker(ab).run(burst=True)  # due at once, not after a lease timeout
        assert again.delivered == 3 and sorted(started) == [0, 1, 2, 3]

    run_async(port, body)


def test_the_async_worker_asks_for_the_next_flush_with_each_ack(port: int, real_client: redis.Redis) -> None:
    from .test_worker import script_calls

    async def body(ab: aio.Batcher) -> None:
        got: list[int] = []

        @ab.processor(name="chain", max_batch_size=1, flush_interval=None)
        async def handler(flush: rb.Flush) -> None:
            got.extend(flush.items)

        await handler.add_many("b", list(range(30)))
        real_client.config_resetstat()
        stats = await aio.Worker(ab, concurrency=1).run(burst=True)
        assert stats.delivered == 30 and sorted(got) == list(range(30))
        assert script_calls(real_client) <= 30 + 3  # one per flush (+ a few claims), not two
        assert await handler.status("b") is None

    run_async(port, body)


def test_an_async_flush_an_ack_brought_after_the_grace_period_is_handed_back(port: int) -> None:
    async def body(ab: aio.Batcher) -> None:
        got: list[str] = []

        @ab.processor(name="late", max_batch_size=1, flush_interval=None, lease_timeout=60)
        async def handler(flush: rb.Flush) -> None:
            got.append(flush.batch_id)

        await handler.add("a", 1)
        await handler.add("b", 2)
        w = aio.Worker(ab, concurrency=1, grace_period=0.1)
        settle = w._settle

        async def slow_settle(c: Any, call: Any) -> Any:
            reply = await settle(c, call)  # the ack of the first flush claims the second one...
            w.stop()  # ... while the worker is being stopped
            await asyncio.sleep(0.5)  # past the grace period
            return reply

        w._settle = slow_settle  # type: ignore[method-assign]
        await w.run()
        await until(lambda: w.stats.released == 1, what="the second flush handed back")
        assert len(got) == 1
        assert (await aio.Worker(ab).run(burst=True)).delivered == 1  # due now, not in 60 s
        assert sorted(got) == ["a", "b"]

    run_async(port, body)
