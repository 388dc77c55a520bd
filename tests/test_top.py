"""``redis-batcher top`` and :func:`redis_batcher.top.snapshot` (issue #23): the processors'
backlog, oldest overdue, rates, dead letters, paused and workers, at a fixed number of Redis
commands per refresh; against a real redis-server with a running worker."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis
from click.testing import CliRunner, Result

import redis_batcher as rb
from redis_batcher import Batcher, Worker, top
from redis_batcher.cli import main
from redis_batcher.testing import RedisServer
from redis_batcher.worker_registry import WorkerInfo
from tests.conftest import ROOT, cli_command, subprocess_env

from .test_worker import running, wait_for


def invoke(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)


def commands(client: redis.Redis) -> int:
    """Commands the server ran so far (INFO itself not counted)."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def test_top_once_shows_the_backlog_the_rates_and_the_workers(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    url = redis_server.url
    producer = Batcher(url, prefix="top")
    got: list[rb.Flush] = []
    served = producer.processor(name="served", max_batch_size=1, flush_interval=None)(got.append)
    stuck = producer.processor(name="stuck", max_batch_size=1, flush_interval=None)(got.append)
    stuck.pause()
    for i in range(3):
        stuck.add(f"s{i}", i)
    worker = Worker(producer, beat_interval=0.1)
    with running(worker):
        for i in range(5):
            served.add(f"a{i}", i)
        wait_for(lambda: len(got) == 5)
        wait_for(lambda: [w.delivered for w in producer.workers()] == [5])
        time.sleep(0.2)  # the oldest of the paused backlog is overdue by then

        shown = invoke("top", "--once", "--json", "--redis-url", url, "--prefix", "top")
        assert shown.exit_code == 0, shown.output
        data = json.loads(shown.output)
        assert data["prefix"] == "top"
        rows = {p["name"]: p for p in data["processors"]}
        assert sorted(rows) == ["served", "stuck"]
        s = rows["stuck"]
        assert (s["backlog"], s["queued"], s["paused"], s["workers"], s["shared"]) == (3, 3, True, 1, True)
        assert s["oldest_overdue"] >= 0.15 and s["dead_letters"] == 0
        ok = rows["served"]
        assert (ok["backlog"], ok["queued"], ok["paused"], ok["oldest_overdue"]) == (0, 0, False, None)
        assert ok["flushes_per_s"] > 0 and ok["failures_per_s"] == 0
        [w] = data["workers"]
        assert w["info"]["id"] == worker.worker_id and w["info"]["delivered"] == 5
        assert w["flushes_per_s"] == ok["flushes_per_s"]

        text = invoke("top", "--once", "--redis-url", url, "--prefix", "top")
        assert text.exit_code == 0, text.output
        cells = {
            line.split("\u2502")[1].strip(): [c.strip() for c in line.split("\u2502")[2:-1]]
            for line in text.output.splitlines()
            if line.count("\u2502") > 2
        }
        # backlog, oldest overdue, flushes/s, failures/s, dead letters, paused, workers, queued
        assert cells["stuck"][0] == "3" and cells["stuck"][5:] == ["PAUSED", "1", "3"]
        assert cells["stuck"][1].endswith("s") and cells["stuck"][2].endswith("*")
        assert cells["served"][:2] == ["0", "-"] and cells["served"][5:] == ["no", "1", "0"]
        assert worker.worker_id in text.output and "1 live worker(s)" in text.output
        assert "processors under prefix 'top'" in text.output
    # stopped: no workers, no rates
    after = top.snapshot(Batcher(url, prefix="top"))
    assert after.workers == [] and {p.name: p.workers for p in after.processors} == {"served": 0, "stuck": 0}
    assert all(p.flushes_per_s is None for p in after.processors)
    empty = invoke("top", "--once", "--redis-url", url, "--prefix", "top")
    assert "no live workers under prefix 'top'" in empty.output


def info(delivered: int, failed: int, beat: float, started: float = 0.0) -> WorkerInfo:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    at = t0 + timedelta(seconds=beat)
    return WorkerInfo(
        "w",
        "h",
        1,
        "v",
        "sync",
        "p",
        ["a"],
        [],
        1,
        t0 + timedelta(seconds=started),
        at,
        0,
        delivered,
        failed,
        15.0,
    )


def test_rates_come_from_the_counters_between_two_heartbeats() -> None:
    first = top.worker_rates(info(100, 10, beat=10.0), None)  # since it started
    assert (first.flushes_per_s, first.failures_per_s) == (10.0, 1.0)
    same_beat = top.worker_rates(info(100, 10, beat=10.0), first)  # no beat since: rates kept
    assert (same_beat.flushes_per_s, same_beat.failures_per_s) == (10.0, 1.0)
    later = top.worker_rates(info(150, 10, beat=15.0), same_beat)
    assert (later.flushes_per_s, later.failures_per_s) == (10.0, 0.0)
    just_started = top.worker_rates(info(0, 0, beat=0.0), None)
    assert (just_started.flushes_per_s, just_started.failures_per_s) == (None, None)


def test_a_refresh_costs_the_same_commands_for_1_and_50_batch_ids(real_client: redis.Redis) -> None:
    costs: dict[int, int] = {}
    for n in (1, 50):
        real_client.flushall()
        producer = Batcher(real_client, prefix="cost")
        proc = producer.processor(name="events", partitions=2, max_batch_size=2, flush_interval=None)(
            lambda flush: None
        )
        waiting = producer.processor(name="waiting", flush_interval=60)(lambda flush: None)
        for i in range(n):
            proc.add_many(f"id{i}", [i, i])
            waiting.add(f"w{i}", i)
        reader = Batcher(real_client, prefix="cost")
        snap = top.snapshot(reader)  # the connection made and set up before counting
        before = commands(real_client)
        snap = top.snapshot(reader, snap)
        costs[n] = commands(real_client) - before
        rows = {p.name: p for p in snap.processors}
        assert (rows["events"].backlog, rows["events"].queued) == (n, n)
        assert (rows["waiting"].backlog, rows["waiting"].queued) == (0, n)
    assert costs[1] == costs[50] > 0, costs


def test_sigint_ends_top_with_exit_0_and_no_traceback(
    redis_server: RedisServer, real_client: redis.Redis, cli_procs: list[subprocess.Popen[bytes]]
) -> None:
    url = redis_server.url
    producer = Batcher(url, prefix="live")
    producer.processor(name="events", max_batch_size=1, flush_interval=None)(lambda flush: None).add("x", 1)

    def zcounts() -> int:
        return int(real_client.info("commandstats").get("cmdstat_zcount", {}).get("calls", 0))

    start = zcounts()
    cli_procs.append(
        subprocess.Popen(
            cli_command("top", "--redis-url", url, "--prefix", "live", "--interval", "0.1"),
            cwd=ROOT,
            env={**subprocess_env(url), "COLUMNS": "200"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
    p = cli_procs[-1]
    wait_for(lambda: zcounts() >= start + 3 or p.poll() is not None, timeout=30)  # refreshed twice
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert b"Traceback" not in err and b"Aborted" not in err
    assert b"processors under prefix 'live'" in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--json"], 2, "--json prints one frame: use it with --once"),
        (["--once", "-p", "nope"], 2, "not registered under prefix 'errs'"),
        (["--once", "--prefix", "empty"], 1, "no processors registered under prefix 'empty'"),
    ],
)
def test_top_errors_are_one_line(
    redis_server: RedisServer, real_client: redis.Redis, args: list[str], code: int, message: str
) -> None:
    Batcher(real_client, prefix="errs").processor(name="events")(lambda flush: None).add("x", 1)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        main, ["top", "--redis-url", redis_server.url, "--prefix", "errs", *args]
    )
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
