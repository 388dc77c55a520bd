"""What the workers log (issue #23): a handler failure at WARNING with its traceback (ERROR when
it dead-letters the flush), each delivered flush at DEBUG, a periodic INFO summary, and
``redis-batcher worker --log-format json`` for log shippers; against a real redis-server."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

import redis_batcher as rb
from redis_batcher import Batcher, Worker
from redis_batcher import asyncio as aio
from redis_batcher.testing import RedisServer
from tests.apps import exiting, ledger
from tests.conftest import ROOT, cli_command, subprocess_env

from .test_worker import running, wait_for
from .test_worker_registry import running_async

WORKER_LOG = "redis_batcher.worker"


def failing_then_ok(calls: list[str]) -> Callable[[rb.Flush], None]:
    """A handler failing the first delivery of each batch id, delivering the next."""

    def handler(flush: rb.Flush) -> None:
        calls.append(flush.batch_id)
        if calls.count(flush.batch_id) == 1:
            raise ValueError(f"boom {flush.batch_id}")

    return handler


@contextmanager
def serving(kind: str, url: str, prefix: str, calls: list[str]) -> Iterator[Callable[[str, int], None]]:
    """A sync or asyncio worker of processors "flaky" (fails each batch id once, then delivers)
    and "doomed" (always fails, max_attempts=1: dead-lettered); yields ``add(name, batch id)``."""
    producer = Batcher(url, prefix=prefix)
    handler = failing_then_ok(calls)

    def doomed(flush: rb.Flush) -> None:
        calls.append(flush.batch_id)
        raise RuntimeError("always")

    def define(batcher: Any) -> dict[str, Any]:
        flaky = batcher.processor(name="flaky", max_batch_size=1, flush_interval=None, retry_backoff=0.05)
        dies = batcher.processor(name="doomed", max_batch_size=1, flush_interval=None, max_attempts=1)
        return {"flaky": flaky(handler), "doomed": dies(doomed)}

    procs = define(producer)

    def add(name: str, batch_id: str) -> None:
        procs[name].add(batch_id, 1)

    if kind == "sync":
        with running(Worker(producer, beat_interval=0.1)):
            yield add
        return
    ab = aio.Batcher(url, prefix=prefix)
    define(ab)
    with running_async(aio.Worker(ab, beat_interval=0.1), ab):
        yield add


def formatted(record: logging.LogRecord) -> str:
    assert record.exc_info is not None and record.exc_info[1] is not None
    return "".join(traceback.format_exception(record.exc_info[1]))


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_failures_carry_their_traceback_successes_are_debug_and_stop_sums_up(
    kind: str, redis_server: RedisServer, real_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="redis_batcher")
    calls: list[str] = []
    with serving(kind, redis_server.url, f"logs-{kind}", calls) as add:
        add("flaky", "f1")
        add("doomed", "d1")
        wait_for(lambda: calls.count("f1") == 2 and "d1" in calls)
        wait_for(lambda: "f1::0: 1 items in" in caplog.text)
    records = [r for r in caplog.records if r.name == WORKER_LOG]

    [retry] = [
        r for r in records if "f1::0 attempt 1 failed: ValueError: boom f1; retry scheduled" in r.getMessage()
    ]
    assert retry.levelname == "WARNING"
    assert 'raise ValueError(f"boom {flush.batch_id}")' in formatted(retry)
    [dead] = [r for r in records if "d1::0 attempt 1 failed: RuntimeError: always" in r.getMessage()]
    assert dead.levelname == "ERROR" and "moved to the dead-letter store" in dead.getMessage()
    assert 'raise RuntimeError("always")' in formatted(dead)

    [ok] = [r for r in records if "flaky f1::0: 1 items in" in r.getMessage()]
    assert ok.levelname == "DEBUG" and ok.exc_info is None
    assert not [r for r in records if r.levelno >= logging.INFO and " items in " in r.getMessage()]
    # the traceback is no longer a DEBUG record of its own
    assert "handler traceback" not in caplog.text

    [summary] = [r for r in records if r.getMessage().startswith("summary of the last")]
    assert summary.levelname == "INFO"
    assert summary.getMessage().endswith(": 1 flushes delivered (1 items), 2 failed, 1 dead-lettered")
    stopped = [i for i, r in enumerate(records) if r.getMessage().startswith("worker stopped")]
    assert stopped and records.index(summary) < stopped[0]


def test_the_summary_comes_every_interval_only_when_something_happened(
    real_batcher: Batcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=WORKER_LOG)
    got: list[rb.Flush] = []
    proc = real_batcher.processor(name="sum", max_batch_size=2, flush_interval=None)(got.append)
    worker = Worker(real_batcher, beat_interval=0.05)

    def summaries() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("summary of the last")]

    worker.summary.interval = 1000.0
    with running(worker):
        proc.add_many("a", [1, 2, 3, 4])
        wait_for(lambda: len(got) == 2)
        worker.summary.interval = 0.3  # both flushes in the same summary
        wait_for(lambda: len(summaries()) == 1, timeout=5)
        assert summaries()[0].endswith(": 2 flushes delivered (4 items), 0 failed, 0 dead-lettered")
        time.sleep(1.0)  # three intervals without a flush: nothing to say
        assert len(summaries()) == 1
        proc.add_many("b", [5, 6])
        wait_for(lambda: len(summaries()) == 2, timeout=5)
        assert summaries()[1].endswith(": 1 flushes delivered (2 items), 0 failed, 0 dead-lettered")
    # nothing since the last summary: none at stop either
    assert len(summaries()) == 2
    assert "worker stopped: 3 delivered, 0 failed, 0 dead-lettered, 6 items" in caplog.text


def run_worker(url: str, app: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cli_command("worker", app, "--redis-url", url, "--burst", *extra),
        cwd=ROOT,
        env={**subprocess_env(url), "COLUMNS": "200"},
        capture_output=True,
        timeout=60,
    )


def test_log_format_json_writes_one_object_per_line(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    _, proc = exiting.make(real_client)
    proc.add_many("bad", [1, 2])
    proc.add_many("good", [3, 4])
    done = run_worker(
        redis_server.url, "tests.apps.exiting:batcher", "--log-format", "json", "--log-level", "debug"
    )
    err = done.stderr.decode()
    assert done.returncode == 0, err
    lines = err.splitlines()
    assert lines and all(line.startswith("{") for line in lines), err
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert entry["time"].endswith("+00:00")
    messages = [e["message"] for e in entries]
    assert any(m.startswith("worker serving exiting (concurrency 4, burst)") for m in messages)
    raised, *_ = [e for e in entries if "handler raised SystemExit: 3" in e["message"]]
    assert raised["level"] == "ERROR" and raised["logger"] == "redis_batcher.worker"
    assert "Traceback" in raised["exc_info"] and "sys.exit(3)" in raised["exc_info"]
    [ok] = [e for e in entries if "good::0: 2 items in" in e["message"]]
    assert ok["level"] == "DEBUG" and "exc_info" not in ok
    assert "Traceback" not in "".join(e["message"] for e in entries)


def test_log_format_text_is_the_default_and_flushes_are_debug(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    _, proc = ledger.make(real_client)
    proc.add_many("order-17", ["a", "b", "c", "d"])
    proc.flush("order-17")
    done = run_worker(redis_server.url, "tests.apps.ledger:batcher", "-c", "1")
    log = done.stderr.decode()
    assert done.returncode == 0, log
    assert " INFO redis_batcher.worker: worker serving ledger (concurrency 1, burst)" in log
    assert "items in" not in log  # per flush: DEBUG
    assert "summary of the last" in log and ": 1 flushes delivered (4 items), 0 failed" in log
    bad = subprocess.run(
        cli_command("worker", "tests.apps.ledger:batcher", "--log-format", "xml"),
        cwd=ROOT,
        env=subprocess_env(redis_server.url),
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr
