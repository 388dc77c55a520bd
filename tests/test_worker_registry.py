"""The worker registry (heartbeat records, ``redis-batcher workers``), the health probes
(``health``, ``worker --check``, ``--pidfile``) and recycling (``--max-flushes``,
``--max-idle``), against a real redis-server: in-process workers for the fields, worker
subprocesses for kill -9, signals, pid files and exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

import redis_batcher as rb
from redis_batcher import Batcher, Worker
from redis_batcher import asyncio as aio
from redis_batcher.cli import main
from redis_batcher.testing import RedisClusterServers, RedisServer
from redis_batcher.worker_beat import beat_task
from redis_batcher.worker_registry import MISSED_BEATS, worker_key, workers_key
from tests.apps import fleet
from tests.conftest import ROOT, cli_command, subprocess_env

from .test_worker import running, wait_for

APP = "tests.apps.fleet:batcher"
BEAT = 0.2  # the beat interval of the workers started here


def invoke(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)


@contextmanager
def running_async(worker: aio.Worker, abatcher: aio.Batcher) -> Iterator[aio.Worker]:
    """An asyncio worker served on an event loop of its own thread, stopped on exit."""
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        try:
            await worker.run()
        finally:
            await abatcher.aclose()

    t = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    t.start()
    try:
        yield worker
    finally:
        loop.call_soon_threadsafe(worker.stop)
        t.join(timeout=30)
        assert not t.is_alive(), "asyncio worker did not stop"
        loop.close()


def start_worker(url: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A ``redis-batcher worker`` subprocess serving tests.apps.fleet (stderr in ``log``)."""
    with log.open("wb") as err:
        return subprocess.Popen(
            cli_command("worker", APP, "--redis-url", url, *extra),
            cwd=ROOT,
            env={**subprocess_env(url), "COLUMNS": "200"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


Spawn = Callable[..., tuple[subprocess.Popen[bytes], Path]]


@pytest.fixture
def spawn(redis_server: RedisServer, tmp_path: Path, cli_procs: list[subprocess.Popen[bytes]]) -> Spawn:
    """Start a worker subprocess of tests.apps.fleet with these extra options: (it, its log)."""

    def start(*extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"worker{len(cli_procs)}.log"
        cli_procs.append(start_worker(redis_server.url, log, *extra))
        return cli_procs[-1], log

    return start


def pids(batcher: Batcher) -> set[int]:
    return {w.pid for w in batcher.workers()}


def fleet_producer(url: str) -> tuple[Batcher, rb.Processor]:
    """A producer of tests.apps.fleet's processor (same config, no handler work)."""
    producer = Batcher(url, prefix=fleet.PREFIX)
    proc = producer.processor(name=fleet.PROCESSOR, max_batch_size=1, flush_interval=None)(lambda f: None)
    return producer, proc


def sync_and_async(prefix: str, url: str) -> tuple[Batcher, rb.Processor, list[rb.Flush], aio.Batcher]:
    """A sync batcher with processor "ping" (its handler keeps the flushes in the list
    returned) and an asyncio batcher with processor "apong", under ``prefix``."""
    sync_b = Batcher(url, prefix=prefix)
    got: list[rb.Flush] = []
    ping = sync_b.processor(name="ping", max_batch_size=1)(got.append)
    ab = aio.Batcher(url, prefix=prefix)

    @ab.processor(name="apong", max_batch_size=1)
    async def apong(flush: rb.Flush) -> None:
        pass

    return sync_b, ping, got, ab


# -- the registry -------------------------------------------------------------------------------


def test_the_registry_lists_a_sync_and_an_asyncio_worker_with_their_fields(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    url = redis_server.url
    sync_b, ping, _, ab = sync_and_async("reg", url)
    sw = Worker(sync_b, concurrency=2, beat_interval=BEAT)
    aw = aio.Worker(ab, concurrency=3, beat_interval=BEAT)
    before = time.time()
    with running(sw), running_async(aw, ab):
        wait_for(lambda: len(sync_b.workers()) == 2)
        ping.add("a", 1)
        wait_for(lambda: [w.delivered for w in sync_b.workers() if w.kind == "sync"] == [1])
        found = {w.kind: w for w in sync_b.workers()}
        s, a = found["sync"], found["asyncio"]
        assert (s.id, a.id) == (sw.worker_id, aw.worker_id)
        assert s.id.startswith(f"{socket.gethostname()}.{os.getpid()}.")
        assert (s.processors, a.processors) == (["ping"], ["apong"])
        assert s.iterators == a.iterators == []
        assert (s.concurrency, a.concurrency) == (2, 3)
        assert s.host == a.host == socket.gethostname() and s.pid == a.pid == os.getpid()
        assert s.version == a.version == rb.__version__
        assert s.prefix == a.prefix == "reg"
        assert (s.delivered, s.failed, s.inflight) == (1, 0, 0)
        assert (a.delivered, a.failed, a.inflight) == (0, 0, 0)
        assert s.ttl == pytest.approx(BEAT * MISSED_BEATS)
        assert before - 1 <= s.started.timestamp() <= s.last_beat.timestamp() <= time.time() + 1
        # the record expires by itself unless beaten again
        assert 0 < real_client.pttl(worker_key("reg", s.id)) <= BEAT * MISSED_BEATS * 1000

        shown = invoke("workers", "--redis-url", url, "--prefix", "reg", "--json")
        assert shown.exit_code == 0, shown.output
        listed = json.loads(shown.output)
        assert sorted(w["id"] for w in listed) == sorted([s.id, a.id])
        assert {w["kind"]: w["processors"] for w in listed} == {"sync": ["ping"], "asyncio": ["apong"]}
        table = invoke("workers", "--redis-url", url, "--prefix", "reg")
        assert table.exit_code == 0 and s.id in table.output and a.id in table.output
    # a clean stop removes the records at once
    assert sync_b.workers() == []
    assert real_client.zcard(workers_key("reg")) == 0
    empty = invoke("workers", "--redis-url", url, "--prefix", "reg")
    assert empty.exit_code == 0 and "no live workers under prefix 'reg'" in empty.output


def test_a_killed_worker_leaves_the_registry_after_its_ttl_a_stopped_one_at_once(
    redis_server: RedisServer, real_client: redis.Redis, spawn: Spawn
) -> None:
    url = redis_server.url
    lister = Batcher(url, prefix=fleet.PREFIX)
    (killed, _), (stopped, stopped_log) = (spawn("--beat-interval", str(BEAT)) for _ in range(2))
    wait_for(lambda: pids(lister) == {killed.pid, stopped.pid}, timeout=20)
    (killed_id,) = [w.id for w in lister.workers() if w.pid == killed.pid]

    killed.kill()
    killed.wait(5)
    t0 = time.monotonic()
    assert killed.pid in pids(lister)  # its record outlives it, until its time to live runs out
    wait_for(lambda: killed.pid not in pids(lister), timeout=5)
    assert time.monotonic() - t0 < BEAT * MISSED_BEATS + 2
    # the live worker's next beat prunes the dead worker's index entry
    wait_for(lambda: real_client.zscore(workers_key(fleet.PREFIX), killed_id) is None, timeout=5)

    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(10) == 0, stopped_log.read_text()
    assert lister.workers() == []
    assert real_client.zcard(workers_key(fleet.PREFIX)) == 0


def test_flushall_under_running_workers_heals_the_processor_registry(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    url = redis_server.url
    sync_b, ping, got, ab = sync_and_async("heal", url)
    probe = Batcher(url, prefix="heal")
    with running(Worker(sync_b, beat_interval=BEAT)), running_async(aio.Worker(ab, beat_interval=BEAT), ab):
        wait_for(lambda: set(probe.registered()) == {"ping", "apong"} and len(probe.workers()) == 2)
        real_client.flushall()  # a Redis restarted without persistence
        wait_for(lambda: set(probe.registered()) == {"ping", "apong"} and len(probe.workers()) == 2)
        shown = invoke("status", "-p", "apong", "x", "--redis-url", url, "--prefix", "heal")
        assert shown.exit_code == 0, shown.output
        ping.add("after", 1)
        wait_for(lambda: len(got) == 1)


# -- health probes ------------------------------------------------------------------------------


def test_health_exit_codes(redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path) -> None:
    url = redis_server.url
    args = ("--redis-url", url, "--prefix", "hp")
    nobody = invoke("health", *args)
    assert nobody.exit_code == 1 and "no live workers under prefix 'hp'" in nobody.output
    down = invoke("health", "--redis-url", "redis://127.0.0.1:1/0", "--timeout", "0")
    assert down.exit_code == 1 and "cannot read the workers" in down.output
    assert "Traceback" not in down.output

    b = Batcher(url, prefix="hp")
    b.processor(name="ping")(lambda f: None)
    w = Worker(b, beat_interval=BEAT)
    pidfile = tmp_path / "worker.pid"
    with running(w):
        wait_for(lambda: len(b.workers()) == 1)
        assert invoke("health", *args).exit_code == 0
        assert invoke("health", *args, "-p", "ping").exit_code == 0
        partly = invoke("health", *args, "-p", "ping", "-p", "other")
        assert partly.exit_code == 1 and "no live worker serves other" in partly.output
        alive = invoke("health", *args, "--worker-id", w.worker_id)
        assert alive.exit_code == 0 and f"worker {w.worker_id} alive" in alive.output
        assert invoke("health", *args, "--worker-id", "nope").exit_code == 1
        pidfile.write_text(f"{os.getpid()}\n")  # this process runs the worker
        assert invoke("health", *args, "--pidfile", str(pidfile)).exit_code == 0
        pidfile.write_text("999999999\n")
        assert invoke("health", *args, "--pidfile", str(pidfile)).exit_code == 1
        nofile = invoke("health", *args, "--pidfile", str(tmp_path / "none.pid"))
        assert nofile.exit_code == 1 and "no pid file" in nofile.output
    # stopped cleanly: dead at once
    assert invoke("health", *args, "--worker-id", w.worker_id).exit_code == 1


def test_pidfile_and_worker_check(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path, spawn: Spawn
) -> None:
    url = redis_server.url
    pidfile = tmp_path / "worker.pid"
    check = ("worker", APP, "--redis-url", url, "--check")
    none = invoke(*check)
    assert none.exit_code == 1 and "no live workers under prefix 'fleet'" in none.output

    p, log = spawn("--pidfile", str(pidfile), "--beat-interval", str(BEAT))
    lister = Batcher(url, prefix=fleet.PREFIX)
    wait_for(lambda: pidfile.exists() and pidfile.read_text() == f"{p.pid}\n", timeout=20)
    wait_for(lambda: pids(lister) == {p.pid}, timeout=20)
    assert invoke(*check).exit_code == 0
    assert invoke(*check, "--pidfile", str(pidfile)).exit_code == 0
    assert invoke("health", "--redis-url", url, "--prefix", "fleet", "--pidfile", str(pidfile)).exit_code == 0
    assert pidfile.read_text() == f"{p.pid}\n"  # a check leaves the pid file alone

    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0, log.read_text()
    assert not pidfile.exists()
    assert invoke(*check, "--pidfile", str(pidfile)).exit_code == 1
    assert invoke(*check).exit_code == 1


# -- recycling ----------------------------------------------------------------------------------


def test_max_flushes_exits_0_and_leaves_the_rest_to_the_next_worker(
    redis_server: RedisServer, real_client: redis.Redis, spawn: Spawn
) -> None:
    url = redis_server.url
    _, proc = fleet_producer(url)
    for i in range(3):
        proc.add(f"b{i}", i)
    recycled, log = spawn("--max-flushes", "2", "-c", "1")
    assert recycled.wait(30) == 0, log.read_text()
    assert "worker recycling: 2 flushes handled (max_flushes)" in log.read_text()
    assert real_client.llen(fleet.DONE_KEY) == 2
    burst, log = spawn("--burst")
    assert burst.wait(30) == 0, log.read_text()
    assert sorted(real_client.lrange(fleet.DONE_KEY, 0, -1)) == [b"b0", b"b1", b"b2"]


def test_max_idle_exits_0_after_that_long_without_work(redis_server: RedisServer, spawn: Spawn) -> None:
    url = redis_server.url
    idle, log = spawn("--max-idle", "0.5")
    assert idle.wait(30) == 0, log.read_text()
    assert "worker recycling: idle for 0.5s (max_idle)" in log.read_text()
    assert Batcher(url, prefix=fleet.PREFIX).workers() == []


def test_the_sync_worker_recycles_after_max_idle_but_not_while_working(real_batcher: Batcher) -> None:
    got: list[Any] = []
    proc = real_batcher.processor(name="idle", max_batch_size=1)(got.append)
    w = Worker(real_batcher, max_idle=0.6)
    t = threading.Thread(target=w.run, daemon=True)
    t0 = time.monotonic()
    t.start()
    for i in range(4):  # work arriving within max_idle keeps the worker
        time.sleep(0.3)
        proc.add(f"b{i}", i)
    t.join(timeout=10)
    assert not t.is_alive()
    assert len(got) == 4 and w.stats.delivered == 4
    assert time.monotonic() - t0 >= 1.2 + 0.6
    assert w.recycling == "idle for 0.6s (max_idle)"


def test_the_asyncio_worker_recycles_after_max_flushes_and_max_idle(redis_server: RedisServer) -> None:
    async def body() -> None:
        ab = aio.Batcher(redis_server.url, prefix="arec")
        got: list[Any] = []

        @ab.processor(name="p", max_batch_size=1)
        async def handle(flush: rb.Flush) -> None:
            got.append(flush.items)

        for i in range(3):
            await handle.add(f"b{i}", i)
        w = aio.Worker(ab, max_flushes=2, concurrency=1)
        stats = await asyncio.wait_for(w.run(), 10)
        assert stats.delivered == 2 and w.recycling == "2 flushes handled (max_flushes)"
        idle = aio.Worker(ab, max_idle=0.3)
        stats = await asyncio.wait_for(idle.run(), 10)
        assert stats.delivered == 1 and idle.recycling == "idle for 0.3s (max_idle)"
        assert len(got) == 3
        assert await ab.workers() == []
        await ab.aclose()

    redis.Redis(port=redis_server.port).flushall()
    asyncio.run(body())


@pytest.mark.parametrize(
    "option",
    [{"max_flushes": 0}, {"max_flushes": 1.5}, {"max_idle": 0}, {"max_idle": -1.0}, {"beat_interval": 0}],
)
def test_bad_recycling_options_are_config_errors(real_batcher: Batcher, option: dict[str, Any]) -> None:
    real_batcher.processor(name="p")(lambda f: None)
    with pytest.raises(rb.ConfigError):
        Worker(real_batcher, **option)
    assert real_batcher.client.dbsize() == 0


# -- Redis Cluster ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_registry_on_redis_cluster(redis_cluster: RedisClusterServers) -> None:
    for host, port in redis_cluster.startup_nodes:
        redis.Redis(host=host, port=port).flushall()
    url = redis_cluster.url
    sync_b = Batcher(url, cluster=True, prefix="creg")
    sync_b.processor(name="ping", partitions=4)(lambda f: None)
    ab = aio.Batcher(url, cluster=True, prefix="creg")

    @ab.processor(name="apong", partitions=4)
    async def apong(flush: rb.Flush) -> None:
        pass

    args = ("--redis-url", url, "--cluster", "--prefix", "creg")
    with running(Worker(sync_b, beat_interval=BEAT)), running_async(aio.Worker(ab, beat_interval=BEAT), ab):
        wait_for(lambda: sorted(w.kind for w in sync_b.workers()) == ["asyncio", "sync"], timeout=20)
        assert invoke("health", *args, "-p", "ping", "-p", "apong").exit_code == 0
        assert len(json.loads(invoke("workers", *args, "--json").output)) == 2
    assert sync_b.workers() == []
    sync_b.close()


def test_a_beat_that_swallowed_the_stop_ends_without_sleeping_an_interval(redis_server: RedisServer) -> None:
    """A cancellation that lands inside a redis-py call may come out as a Redis error, which a
    beat survives: the beat then sees the worker stopping and ends at once, instead of sleeping
    a whole ``beat_interval`` (which held every asyncio burst run up to 5 s at its end)."""
    stopping = [False]

    async def register() -> None:
        stopping[0] = True  # the worker stops while this beat is in Redis
        raise redis.exceptions.TimeoutError("what a cancelled read may raise")

    async def main() -> None:
        ab = aio.Batcher(redis_server.url, prefix="swallow")
        ab.processor(name="p", flush_interval=None)(lambda f: None)
        worker = aio.Worker(ab, beat_interval=3600)
        # an hour's sleep would hit this guard and fail the test
        await asyncio.wait_for(beat_task(worker, register, lambda: stopping[0]), 30)
        await ab.aclose()

    asyncio.run(main())
