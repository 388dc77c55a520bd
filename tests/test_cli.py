"""The ``redis-batcher`` command.

Inspection commands (status, history, flush, ls) and argument errors run in-process through
click's CliRunner against the session's real redis-server; the worker daemon runs as a real
subprocess for the SIGTERM, --burst and logging cases.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

import redis_batcher
from redis_batcher import wake
from redis_batcher.cli import main
from redis_batcher.testing import RedisServer
from tests.apps import exiting, ledger, slow
from tests.conftest import ROOT, cli_command, subprocess_env

PREFIX = "clitest"
# a wide console, so rich tables and log lines are not wrapped or truncated
WIDE = {"COLUMNS": "200"}


def invoke(*args: str) -> Result:
    return CliRunner(env=WIDE).invoke(main, list(args), catch_exceptions=False)


def table_rows(output: str) -> list[list[str]]:
    """The body cells of a rich table (rows drawn with a vertical bar)."""
    return [
        [c.strip() for c in line.split("\u2502")[1:-1]] for line in output.splitlines() if "\u2502" in line
    ]


def worker_env(url: str) -> dict[str, str]:
    return {**subprocess_env(url), **WIDE}


class Worker:
    """A ``redis-batcher worker`` subprocess with stderr in a file; always killed on exit."""

    def __init__(self, url: str, app: str, log: Path, *extra: str) -> None:
        self.log = log
        with log.open("wb") as err:
            self.process = subprocess.Popen(
                cli_command("worker", app, "--redis-url", url, *extra),
                cwd=ROOT,
                env=worker_env(url),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, what: str, check: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.process.poll() is None, (
                f"worker exited with {self.process.returncode}:\n{self.stderr()}"
            )
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.stderr()}"
            time.sleep(0.02)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.close()


# -- the worker daemon (subprocesses) -----------------------------------------------------------


def test_sigterm_finishes_the_running_flush_and_exits_0(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path, workers: list[Worker]
) -> None:
    _, proc = slow.make(real_client)
    proc.add_many("job", [{"i": i} for i in range(3)])
    assert proc.flush("job").flushed

    w = Worker(redis_server.url, "tests.apps.slow:batcher", tmp_path / "worker.log")
    workers.append(w)
    w.wait_until("the handler to start", lambda: real_client.exists(slow.STARTED_KEY))
    assert real_client.get(slow.STARTED_KEY) == b"job::0:3"
    assert not real_client.exists(slow.FINISHED_KEY)

    t0 = time.monotonic()
    w.process.send_signal(signal.SIGTERM)
    code = w.process.wait(10)
    elapsed = time.monotonic() - t0
    log = w.stderr()
    assert code == 0, log
    assert elapsed < slow.HANDLER_SECONDS + 4, f"exit took {elapsed:.1f}s"
    assert real_client.get(slow.FINISHED_KEY) == b"job::0:3"
    assert "SIGTERM: warm shutdown, finishing 1 in-flight flush(es)" in log
    assert "worker stopped: 1 delivered, 0 failed, 0 dead-lettered, 3 items" in log

    records = proc.history("job")
    assert len(records) == 1
    assert records[0].success is True and records[0].item_count == 3 and records[0].attempt == 1
    assert proc.status("job") is None
    assert [b.status for b in proc.sequences("job")] == ["completed"]
    assert real_client.zcard(proc.keys.parts[0].due) == 0


def stopping_slow_worker(
    redis_server: RedisServer,
    real_client: redis.Redis,
    tmp_path: Path,
    workers: list[Worker],
    items: list[str],
) -> tuple[Worker, Any]:
    """A CLI worker running the slow handler on ``items``, sent SIGTERM and logging its warm
    shutdown; and the processor."""
    _, proc = slow.make(real_client)
    proc.add_many("job", items)
    proc.flush("job")
    w = Worker(redis_server.url, "tests.apps.slow:batcher", tmp_path / "worker.log")
    workers.append(w)
    w.wait_until("the handler to start", lambda: real_client.exists(slow.STARTED_KEY))
    w.process.send_signal(signal.SIGTERM)
    w.wait_until("the warm shutdown message", lambda: "warm shutdown" in w.stderr(), timeout=5)
    return w, proc


def test_one_sigterm_delivered_twice_is_still_a_warm_shutdown(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path, workers: list[Worker]
) -> None:
    """GNU timeout signals the worker and its process group: the same SIGTERM arrives twice."""
    w, _ = stopping_slow_worker(redis_server, real_client, tmp_path, workers, ["x"])
    w.process.send_signal(signal.SIGTERM)
    assert w.process.wait(10) == 0, w.stderr()
    assert "SIGTERM again within 1s: taken as the same signal" in w.stderr()
    assert real_client.get(slow.FINISHED_KEY) == b"job::0:1"


def test_second_signal_exits_at_once_and_releases_the_flush(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path, workers: list[Worker]
) -> None:
    w, proc = stopping_slow_worker(redis_server, real_client, tmp_path, workers, ["x", "y"])
    w.process.send_signal(signal.SIGINT)
    assert w.process.wait(5) == 1, w.stderr()
    assert "second signal: releasing unfinished flushes and exiting now" in w.stderr()
    assert not real_client.exists(slow.FINISHED_KEY)
    # not acknowledged but released: due again at once for another worker, the attempt not
    # counted, no history entry (the handler never reported)
    [seq] = proc.sequences("job")
    assert (seq.status, seq.item_count, seq.attempt) == ("flushing", 2, 0)
    assert proc.history("job") == []
    part = proc.keys.for_base("job")
    assert real_client.hget(part.meta("job", 0), "owner") == b""
    score = real_client.zscore(part.due, "job::0")
    assert score is not None and score <= time.time() * 1000 + 1


def test_sigterm_on_an_idle_worker_exits_0(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path, workers: list[Worker]
) -> None:
    _, proc = slow.make(real_client)
    channel = proc.keys.channels[0]
    w = Worker(redis_server.url, "tests.apps.slow:batcher", tmp_path / "worker.log")
    workers.append(w)
    w.wait_until(
        "the wake-up subscription", lambda: wake.subscribers(real_client, channel) == 1
    )
    t0 = time.monotonic()
    w.process.send_signal(signal.SIGTERM)
    assert w.process.wait(10) == 0, w.stderr()
    assert time.monotonic() - t0 < 4
    assert "worker stopped: 0 delivered" in w.stderr()


@pytest.mark.parametrize("target", ["tests.apps.ledger:batcher", "tests.apps.ledger:processor"])
def test_burst_delivers_due_items_and_exits_0(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path, target: str
) -> None:
    _, proc = ledger.make(real_client)
    assert proc.add_many("full", list(range(ledger.MAX_BATCH_SIZE))).sealed == 1  # size flush
    proc.add_many("manual", list(range(7)))
    assert proc.flush("manual").item_count == 7  # manual flush
    proc.add_many("timed", list(range(3)))
    time.sleep(ledger.FLUSH_INTERVAL + 0.1)  # interval flush: due by the time the worker runs

    done = subprocess.run(
        [*cli_command("worker", target, "--redis-url", redis_server.url, "--burst")],
        cwd=ROOT,
        env=worker_env(redis_server.url),
        capture_output=True,
        timeout=30,
    )
    log = done.stderr.decode(errors="replace")
    assert done.returncode == 0, log
    delivered = {(b, s): items for b, s, _, _, items in ledger.read_ledger(real_client)}
    assert delivered == {
        ("full", 0): list(range(ledger.MAX_BATCH_SIZE)),
        ("manual", 0): list(range(7)),
        ("timed", 0): list(range(3)),
    }
    for bid in ("full", "manual", "timed"):
        assert proc.status(bid) is None
        assert [r.success for r in proc.history(bid)] == [True]
    assert "burst" in log and "worker stopped: 3 delivered, 0 failed, 0 dead-lettered, 60 items" in log


def test_burst_returns_when_a_handler_calls_sys_exit(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    """sys.exit(3) in a handler: a failed attempt (logged with its traceback), the worker goes
    on and --burst returns; the second attempt dead-letters the flush."""
    _, proc = exiting.make(real_client)
    proc.add_many("bad", [1, 2])
    proc.add_many("good", [3, 4])
    logs: list[str] = []
    for _ in range(5):  # a burst returns before a retry falls due: run until both are settled
        done = subprocess.run(
            cli_command("worker", "tests.apps.exiting:batcher", "--redis-url", redis_server.url, "--burst"),
            cwd=ROOT,
            env=worker_env(redis_server.url),
            capture_output=True,
            timeout=30,
        )
        logs.append(done.stderr.decode(errors="replace"))
        assert done.returncode == 0, logs[-1]
        if proc.status("bad") is None and proc.status("good") is None:
            break
        time.sleep(0.05)
    log = "".join(logs)
    assert [(h.attempt, h.error) for h in proc.history("bad")] == [(2, "SystemExit: 3"), (1, "SystemExit: 3")]
    assert [d.error for d in proc.dead_letters()] == ["SystemExit: 3"]
    assert [h.success for h in proc.history("good")] == [True]
    assert "handler raised SystemExit: 3" in log and "Traceback" in log and "sys.exit(3)" in log


def test_worker_logs_each_flush_at_debug(redis_server: RedisServer, real_client: redis.Redis) -> None:
    _, proc = ledger.make(real_client)
    proc.add_many("order-17", ["a", "b", "c", "d"])
    proc.flush("order-17")
    proc.add_many("order-18", list(range(ledger.MAX_BATCH_SIZE)))
    args = ("--redis-url", redis_server.url, "--burst", "-c", "1", "--log-level", "debug")
    done = subprocess.run(
        cli_command("worker", "tests.apps.ledger:batcher", *args),
        cwd=ROOT,
        env=worker_env(redis_server.url),
        capture_output=True,
        timeout=30,
    )
    log = done.stderr.decode(errors="replace")
    assert done.returncode == 0, log
    assert "worker serving ledger (concurrency 1, burst)" in log
    assert "ledger order-17::0: 4 items in" in log and "(attempt 1, manual)" in log
    assert "ledger order-18::0: 50 items in" in log and "(attempt 1, size)" in log
    assert done.stdout == b""  # logs go to stderr only


# -- argument errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker"], "Missing argument 'APP'"),
        (["worker", "nocolon"], "expected MODULE:ATTR"),
        (["worker", "nonexistent.module:x"], "cannot import 'nonexistent.module'"),
        (["worker", "tests.apps.slow:missing"], "has no attribute 'missing'"),
        (["worker", "tests.apps.slow:PREFIX"], "not a Batcher or Processor"),
        (["worker", "tests.apps.slow:batcher", "--processor", "unknown"], "unknown processor(s) ['unknown']"),
        (["worker", "tests.apps.slow:batcher", "--concurrency", "0"], "--concurrency"),
        (["status", "x"], "Missing option '--processor'"),
        (["history", "x"], "Missing option '--processor'"),
        (["flush", "x"], "Missing option '--processor'"),
        (["retry", "x"], "Missing option '--processor'"),
    ],
)
def test_bad_arguments_exit_non_zero(redis_server: RedisServer, args: list[str], message: str) -> None:
    result = CliRunner(env=WIDE).invoke(main, [*args, "--redis-url", redis_server.url])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["status", "history", "flush", "retry"])
def test_unregistered_processor_exits_non_zero(
    real_client: redis.Redis, redis_server: RedisServer, command: str
) -> None:
    result = CliRunner(env=WIDE).invoke(
        main,
        [command, "x", "--processor", "not-registered", "--redis-url", redis_server.url, "--prefix", PREFIX],
    )
    assert result.exit_code == 2, result.output
    assert "'not-registered' is not registered under prefix 'clitest'" in result.output


def test_bad_arguments_in_a_real_process(redis_server: RedisServer) -> None:
    for args in (["worker", "nocolon"], ["status", "x", "--processor", "nope", "--prefix", PREFIX]):
        done = subprocess.run(
            cli_command(*args, "--redis-url", redis_server.url),
            cwd=ROOT,
            env=worker_env(redis_server.url),
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        assert b"Traceback" not in done.stderr


# -- inspection commands (in-process) ---------------------------------------------------------


@dataclass
class Populated:
    url: str
    batcher: redis_batcher.Batcher
    orders: redis_batcher.Processor
    flaky: redis_batcher.Processor
    delivered: list[tuple[str, int, int]] = field(default_factory=list)

    def cli(self, *args: str) -> Result:
        return invoke(*args, "--redis-url", self.url, "--prefix", PREFIX)

    def json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.output)


@pytest.fixture
def populated(redis_server: RedisServer, real_client: redis.Redis) -> Populated:
    """orders: o1 has sequences 0 and 1 delivered and 2 accumulating (5 items), o2 accumulates
    3 items; flaky: f1::0 failed once and waits for its retry."""
    batcher = redis_batcher.Batcher(real_client, prefix=PREFIX)
    delivered: list[tuple[str, int, int]] = []

    @batcher.processor(name="orders", max_batch_size=10, flush_interval=None)
    def orders(flush: redis_batcher.Flush) -> None:
        delivered.append((flush.batch_id, flush.sequence, len(flush.items)))

    @batcher.processor(
        name="flaky", max_batch_size=5, flush_interval=None, retry_backoff=60, retry_backoff_max=60
    )
    def flaky(flush: redis_batcher.Flush) -> None:
        raise ValueError("boom")

    assert orders.add_many("o1", [{"n": i} for i in range(25)]).sealed == 2
    orders.add_many("o2", [{"n": i} for i in range(3)])
    assert flaky.add_many("f1", list(range(5))).sealed == 1
    # one handler thread: o1::0 then o1::1, so the history order below is deterministic
    stats = redis_batcher.Worker(batcher, concurrency=1).run(burst=True)
    assert (stats.delivered, stats.failed) == (2, 1)
    assert sorted(delivered) == [("o1", 0, 10), ("o1", 1, 10)]
    return Populated(redis_server.url, batcher, orders, flaky, delivered)


def test_status_table(populated: Populated) -> None:
    result = populated.cli("status", "o1", "--processor", "orders")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "orders / o1" in out
    rows = table_rows(out)
    assert [r[:4] for r in rows] == [["1", "completed", "10", "0"], ["2", "accumulating", "5", "0"]], out
    assert rows[0][4].startswith("20") and rows[1][4].startswith("20")  # created_at: ISO times

    result = populated.cli("status", "f1", "--processor", "flaky")
    assert result.exit_code == 0, result.output
    assert "flushing" in result.output and "ValueError: boom" in result.output

    result = populated.cli("status", "nope", "--processor", "orders")
    assert result.exit_code == 0
    assert "no sequences for 'nope' in processor 'orders'" in result.output


def test_status_json(populated: Populated) -> None:
    data = populated.json("status", "o1", "--processor", "orders")
    assert data["batch_id"] == "o1" and data["active"] is True
    seqs = data["sequences"]
    assert [(s["sequence"], s["status"], s["item_count"]) for s in seqs] == [
        (1, "completed", 10),
        (2, "accumulating", 5),
    ]
    assert seqs[1]["batch_id"] == "o1::2" and seqs[1]["created_at"]
    assert seqs[0]["created_at"] and seqs[0]["created_at"] <= seqs[1]["created_at"]
    assert data["config"]["name"] == "orders" and data["config"]["max_batch_size"] == 10

    data = populated.json("status", "f1", "--processor", "flaky")
    [seq] = data["sequences"]
    assert (seq["status"], seq["item_count"], seq["attempt"]) == ("flushing", 5, 1)
    assert seq["last_error"] == "ValueError: boom" and seq["next_attempt_at"]

    data = populated.json("status", "nope", "--processor", "orders")
    assert data["active"] is False and data["sequences"] == []


def test_history_table_and_json(populated: Populated) -> None:
    result = populated.cli("history", "o1", "--processor", "orders")
    assert result.exit_code == 0, result.output
    assert "history of orders / o1" in result.output
    assert result.output.count(" yes ") == 2

    result = populated.cli("history", "f1", "--processor", "flaky")
    assert result.exit_code == 0, result.output
    assert " no " in result.output and "ValueError: boom" in result.output

    records = populated.json("history", "o1", "--processor", "orders")
    assert isinstance(records, list)
    assert [(r["sequence"], r["item_count"], r["success"], r["attempt"]) for r in records] == [
        (1, 10, True, 1),
        (0, 10, True, 1),
    ]
    assert all(r["error"] is None and r["flush_id"] and r["reason"] == "size" for r in records)
    assert len(populated.json("history", "o1", "--processor", "orders", "--limit", "1")) == 1
    assert populated.json("history", "o1", "--processor", "orders", "--all") == records
    both = populated.cli("history", "o1", "--processor", "orders", "--all", "--limit", "1")
    assert both.exit_code == 2 and "leave out --limit" in both.output

    [failed] = populated.json("history", "f1", "--processor", "flaky")
    assert failed["success"] is False and failed["error"] == "ValueError: boom" and failed["item_count"] == 5

    assert populated.json("history", "nope", "--processor", "orders") == []


def test_flush_table_and_json(populated: Populated) -> None:
    data = populated.json("flush", "o1", "--processor", "orders")
    assert data["flushed"] is True and data["item_count"] == 5 and data["sequence"] == 2
    assert data["status"] == "flushing"

    data = populated.json("flush", "o1", "--processor", "orders")
    assert data["flushed"] is False and data["reason"] == "Batch is empty"

    result = populated.cli("flush", "o2", "--processor", "orders")
    assert result.exit_code == 0, result.output
    assert "sealed o2::0 with 3 items" in result.output
    result = populated.cli("flush", "o2", "--processor", "orders")
    assert result.exit_code == 0, result.output
    assert "nothing flushed: Batch is empty" in result.output

    result = populated.cli("flush", "nope", "--processor", "orders")
    assert result.exit_code == 1 and "does not exist" in result.output
    result = populated.cli("flush", "o1::0", "--processor", "orders")
    assert result.exit_code == 1, result.output

    # the sealed sequences are picked up by a worker
    redis_batcher.Worker(populated.batcher, processors=["orders"]).run(burst=True)
    assert sorted(populated.delivered) == [("o1", 0, 10), ("o1", 1, 10), ("o1", 2, 5), ("o2", 0, 3)]
    assert populated.orders.status("o1") is None and populated.orders.status("o2") is None


def test_retry_table_and_json(populated: Populated) -> None:
    # f1::0 failed once and waits 60 s for its retry: `retry` makes it due now
    result = populated.cli("retry", "o1", "--processor", "orders")
    assert result.exit_code == 0, result.output
    assert "nothing retried: Nothing waits for a retry" in result.output
    data = populated.json("retry", "f1", "--processor", "flaky")
    assert (data["flushed"], data["retried"], data["item_count"], data["sequence"]) == (True, [0], 5, 0)
    assert populated.json("retry", "f1::0", "--processor", "flaky")["flushed"] is False
    [seq] = populated.json("status", "f1", "--processor", "flaky")["sequences"]
    assert seq["attempt"] == 1  # kept: the retry is its second attempt
    stats = redis_batcher.Worker(populated.batcher, processors=["flaky"]).run(burst=True)
    assert stats.failed == 1
    assert [r.attempt for r in populated.flaky.history("f1")] == [2, 1]

    result = populated.cli("retry", "f1", "--processor", "flaky")  # the new backoff's wait
    assert result.exit_code == 0, result.output
    redis_batcher.Worker(populated.batcher, processors=["flaky"]).run(burst=True)
    result = populated.cli("retry", "f1::0", "--processor", "flaky")
    assert result.exit_code == 0, result.output
    assert "retried f1::0 now (attempt counts kept): 5 items due now" in result.output
    result = populated.cli("retry", "nope", "--processor", "flaky")
    assert result.exit_code == 1 and "does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_flush_retries_what_waits_for_a_retry(populated: Populated) -> None:
    populated.flaky.add("f1", 5)
    result = populated.cli("flush", "f1", "--processor", "flaky")
    assert result.exit_code == 0, result.output
    assert "sealed f1::1 and retried f1::0 now (attempt counts kept): 6 items due now" in result.output


def test_ls_table_and_json(populated: Populated) -> None:
    rows = {row["processor"]: row for row in populated.json("ls")}
    assert set(rows) == {"orders", "flaky"}
    assert rows["orders"]["active_batch_ids"] == 2 and rows["orders"]["queued_sequences"] == 0
    assert rows["flaky"]["active_batch_ids"] == 1 and rows["flaky"]["queued_sequences"] == 1
    assert rows["orders"]["config"]["max_batch_size"] == 10
    assert rows["orders"]["config"]["flush_interval"] is None
    assert rows["flaky"]["config"]["retry_backoff"] == 60

    result = populated.cli("ls")
    assert result.exit_code == 0, result.output
    assert "processors under prefix 'clitest'" in result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    assert " 10 " in lines["orders"] and " None " in lines["orders"]
    assert " 5 " in lines["flaky"]

    # nothing registered under the prefix: the wrong server, db or prefix (tests/test_cli_errors.py)
    args = ["ls", "--json", "--redis-url", populated.url, "--prefix", "empty"]
    result = CliRunner(env=WIDE).invoke(main, args)
    assert result.exit_code == 1 and result.stdout == ""
    assert "no processors registered under prefix 'empty'" in result.stderr


def test_ls_batch_ids_of_a_processor(populated: Populated) -> None:
    assert populated.json("ls", "--processor", "orders") == ["o1", "o2"]
    assert populated.json("ls", "--processor", "flaky") == ["f1"]
    result = populated.cli("ls", "--processor", "orders")
    assert result.exit_code == 0 and result.output.split() == ["o1", "o2"]
    result = populated.cli("ls", "--processor", "not-registered")
    assert result.exit_code == 2
