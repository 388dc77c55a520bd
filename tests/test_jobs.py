"""Iterator jobs (issue #6) on a real redis-server: the sync API, the runner inside the worker,
retries, pause/resume/cancel/delete, listing, fencing, and kill -9 of a worker process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

import redis_batcher as rb
from redis_batcher import Batcher, JobContext, Page, Worker
from redis_batcher.job_ops import claim_call, commit_call, parse_claim
from redis_batcher.job_runner import JobRunner
from redis_batcher.testing import RedisServer
from tests.apps import jobs_app
from tests.chaos_util import own_server
from tests.conftest import ROOT, cli_command, snapshot, subprocess_env
from tests.test_worker import running


def make_table(path: Path, rows: int) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO rows VALUES (?, ?)", ((i, f"user{i}") for i in range(1, rows + 1)))
    db.commit()
    db.close()


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextmanager
def running_worker(batcher: Batcher, **options: Any) -> Iterator[Worker]:
    """A worker serving in a thread; always stopped."""
    with running(Worker(batcher, grace_period=5.0, **options)) as worker:
        yield worker


def counting_iterator(batcher: Batcher, name: str = "count", **options: Any) -> tuple[Any, list[int]]:
    """An iterator over range(params["n"]) that records what it processed."""
    seen: list[int] = []
    options.setdefault("delay_between_batches", 0.0)
    options.setdefault("batch_size", 10)

    @batcher.iterator(name=name, **options)
    class Count:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            start = int(cursor or 0)
            stop = min(start + batch_size, job.params["n"])
            return Page(list(range(start, stop)), str(stop), stop >= job.params["n"])

        def process(self, items: list[int], job: JobContext) -> None:
            time.sleep(job.params.get("sleep", 0))
            seen.extend(items)

    return Count, seen


def test_walks_a_100k_row_sqlite_table_exactly_once(real_batcher: Batcher, tmp_path: Path) -> None:
    source, sink = tmp_path / "source.db", tmp_path / "sink.db"
    make_table(source, 100_000)
    out = sqlite3.connect(sink)
    out.execute("CREATE TABLE processed (id INTEGER)")  # no key: a duplicate would be kept
    out.commit()
    out.close()
    completed: list[int] = []

    @real_batcher.iterator(name="backfill-users", batch_size=1000, delay_between_batches=0.0)
    class BackfillUsers:
        def __init__(self) -> None:
            self.src = sqlite3.connect(source)
            self.dst = sqlite3.connect(sink)

        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            return jobs_app.walk_page(self.src, cursor, batch_size)

        def process(self, items: list[int], job: JobContext) -> None:
            assert job.params == {"since": "2026-01-01"}
            self.dst.executemany("INSERT INTO processed VALUES (?)", [(i,) for i in items])
            self.dst.commit()

        def on_complete(self, job: JobContext) -> None:
            completed.append(job.processed)

    started = BackfillUsers.start("backfill-2026-11", params={"since": "2026-01-01"})
    assert started.status == "pending" and started.processed == 0 and started.cursor is None
    Worker(real_batcher).run(burst=True)

    st = BackfillUsers.status("backfill-2026-11")
    assert st is not None
    assert (st.status, st.processed, st.cursor, st.retry_count, st.error) == (
        "completed",
        100_000,
        "100000",
        0,
        None,
    )
    assert completed == [100_000]
    db = sqlite3.connect(sink)
    total, distinct, low, high = db.execute(
        "SELECT COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM processed"
    ).fetchone()
    assert (total, distinct, low, high) == (100_000, 100_000, 1, 100_000)


def test_pause_stops_progress_and_resume_finishes(real_batcher: Batcher) -> None:
    Count, seen = counting_iterator(real_batcher)
    Count.start("p1", params={"n": 400, "sleep": 0.01})
    with running_worker(real_batcher):
        wait_until(lambda: (Count.status("p1") or 0) and Count.status("p1").processed >= 50, what="progress")
        paused = Count.pause("p1")
        assert paused.status == "paused"
        assert Count.pause("p1").status == "paused"  # again: a no-op
        # the step in progress is saved, then the worker stops and gives the lease back
        wait_until(lambda: real_batcher.client.hget(Count.keys.job("p1"), "owner") == b"", what="stop")
        frozen = Count.status("p1")
        assert frozen is not None and frozen.status == "paused"
        assert frozen.processed == len(seen) < 400
        time.sleep(0.3)
        assert Count.status("p1").processed == frozen.processed  # type: ignore[union-attr]
        assert Count.resume("p1").status == "running"
        wait_until(lambda: Count.status("p1").status == "completed", what="completion")  # type: ignore[union-attr]
    assert sorted(seen) == list(range(400))


def test_a_step_failing_twice_then_succeeding_is_retried_with_backoff(
    real_batcher: Batcher, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []

    @real_batcher.iterator(name="flaky", batch_size=5, retry_backoff=0.1, retry_backoff_max=30.0)
    class Flaky:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            return Page([1, 2, 3], "end", True)

        def process(self, items: list[int], job: JobContext) -> None:
            calls.append(time.monotonic())
            if len(calls) <= 2:
                assert job.retry_count == len(calls) - 1
                raise ConnectionError(f"database away ({len(calls)})")

    Flaky.start("f1")
    with running_worker(real_batcher):
        wait_until(lambda: Flaky.status("f1").retry_count == 1, what="first failure")  # type: ignore[union-attr]
        st = Flaky.status("f1")
        assert st is not None and st.status == "running" and st.next_run_at is not None
        assert st.error == "ConnectionError: database away (1)"
        wait_until(lambda: Flaky.status("f1").status == "completed", what="completion")  # type: ignore[union-attr]
    assert len(calls) == 3
    # exponential backoff: 0.1 s, then 0.2 s
    assert calls[1] - calls[0] >= 0.09 and calls[2] - calls[1] >= 0.19
    st = Flaky.status("f1")
    assert st is not None
    assert (st.retry_count, st.processed) == (0, 3)
    assert st.error == "ConnectionError: database away (2)"  # the last error is kept
    retries = [r.getMessage() for r in caplog.records if "step failed" in r.getMessage()]
    assert retries == [
        "flaky f1: step failed (ConnectionError: database away (1)); retry 1 in 0.1s",
        "flaky f1: step failed (ConnectionError: database away (2)); retry 2 in 0.2s",
    ]
    # at WARNING, each with the step's traceback
    tracebacks = [r.exc_info for r in caplog.records if "step failed" in r.getMessage()]
    assert [str(info[1]) for info in tracebacks if info] == ["database away (1)", "database away (2)"]


def test_a_step_always_failing_fails_the_job_after_max_attempts(real_batcher: Batcher) -> None:
    attempts = [0]
    fixed = [False]

    @real_batcher.iterator(name="broken", max_attempts=3, retry_backoff=0.02, retry_backoff_max=0.05)
    class Broken:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            attempts[0] += 1
            if not fixed[0]:
                raise ValueError("schema mismatch in column 'since'")
            return Page([], None, True)

        def process(self, items: list[Any], job: JobContext) -> None:
            pass

    Broken.start("b1")
    with running_worker(real_batcher):
        wait_until(lambda: Broken.status("b1").status == "failed", what="failure")  # type: ignore[union-attr]
    st = Broken.status("b1")
    assert st is not None
    assert attempts[0] == 3  # max_attempts=3
    assert (st.retry_count, st.error) == (3, "ValueError: schema mismatch in column 'since'")
    assert st.finished_at is not None
    assert [j.job_id for j in real_batcher.jobs(status="failed")] == ["b1"]

    fixed[0] = True
    resumed = Broken.resume("b1")  # a failed job may be resumed: its retry count is reset
    assert (resumed.status, resumed.retry_count) == ("running", 0)
    Worker(real_batcher).run(burst=True)
    assert Broken.status("b1").status == "completed"  # type: ignore[union-attr]


def test_a_step_calling_sys_exit_is_a_failed_step(
    real_batcher: Batcher, caplog: pytest.LogCaptureFixture
) -> None:
    """sys.exit() in a step ends neither the runner nor the job's bookkeeping: each try is a
    counted failure (logged with its traceback) and the job fails after max_attempts."""
    tries = [0]

    @real_batcher.iterator(name="exits", max_attempts=2, retry_backoff=0.02, retry_backoff_max=0.05)
    class Exits:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            return Page([1], None, True)

        def process(self, items: list[Any], job: JobContext) -> None:
            tries[0] += 1
            sys.exit(3)

    Exits.start("e1")
    with running_worker(real_batcher):
        wait_until(lambda: Exits.status("e1").status == "failed", what="failure")  # type: ignore[union-attr]
    st = Exits.status("e1")
    assert st is not None and (st.retry_count, st.error) == (2, "SystemExit: 3") and tries[0] == 2
    [record, *_] = [r for r in caplog.records if "step raised SystemExit: 3" in r.getMessage()]
    assert record.levelname == "ERROR" and record.exc_info is not None


@contextmanager
def fast_runner(batcher: Batcher) -> Iterator[JobRunner]:
    """A job runner that looks for runnable jobs every 50 ms; always stopped."""
    runner = JobRunner(batcher, concurrency=1, poll_interval=0.05, grace_period=5.0)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()
        runner.wait()


def failure_schedule(batcher: Batcher, it: Any, job_id: str, runs: list[int]) -> list[int]:
    """Run an always-failing job on a real runner until it fails; the delay job_fail.lua
    scheduled after each failure (``next_run_at - error_at``, both written by it from one
    clock reading). Each retry is made runnable at once (score 0) instead of waited for (so the
    backoffs must be long enough not to end by themselves meanwhile); the number of runs is
    checked against the recorded failures as it goes."""
    client, key = batcher.client, it.keys.job(job_id)
    delays: list[int] = []
    with fast_runner(batcher):
        for n in range(1, 100):
            wait_until(lambda n=n: int(client.hget(key, "retries") or 0) >= n, what=f"failure {n}")
            status, error_at, next_run_at = client.hmget(key, ["status", "error_at", "next_run_at"])
            assert runs[0] == n
            if status == b"failed":
                assert next_run_at is None
                break
            assert status == b"running"
            delays.append(int(next_run_at) - int(error_at))
            client.zadd(it.keys.due, {job_id: 0})
    return delays


def always_failing(batcher: Batcher, name: str, **options: Any) -> tuple[Any, list[int]]:
    runs = [0]

    @batcher.iterator(name=name, **options)
    class Failing:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            runs[0] += 1
            raise ConnectionError(f"source away ({runs[0]})")

        def process(self, items: list[Any], job: JobContext) -> None:
            pass

    return Failing, runs


def test_default_retry_schedule_is_the_seeds_5_attempts_2_4_8_16_seconds(real_batcher: Batcher) -> None:
    """The seed (maxRetries=5 by default) fails a job at its 5th failure in a row and waits
    min(1 s * 2**n, 30 s) after failure n: 2, 4, 8, 16 s. So do the defaults here."""
    Failing, runs = always_failing(real_batcher, "defaults")
    cfg = Failing.config
    assert (cfg.max_attempts, cfg.retry_backoff, cfg.retry_backoff_max) == (5, 2.0, 30.0)
    Failing.start("d1")
    assert failure_schedule(real_batcher, Failing, "d1", runs) == [2000, 4000, 8000, 16000]
    st = Failing.status("d1")
    assert st is not None and (st.status, st.retry_count, runs[0]) == ("failed", 5, 5)
    assert st.error == "ConnectionError: source away (5)"


def test_max_attempts_counts_every_run_and_the_backoff_is_capped(real_batcher: Batcher) -> None:
    Failing, runs = always_failing(real_batcher, "capped", max_attempts=8)
    Failing.start("c1")
    delays = failure_schedule(real_batcher, Failing, "c1", runs)
    assert delays == [2000, 4000, 8000, 16000, 30000, 30000, 30000] and runs[0] == 8
    Short, short_runs = always_failing(
        real_batcher, "short", max_attempts=4, retry_backoff=25.5, retry_backoff_max=60
    )
    Short.start("s1")
    assert failure_schedule(real_batcher, Short, "s1", short_runs) == [25500, 51000, 60000]
    assert short_runs[0] == 4


@pytest.mark.parametrize(("max_retries", "attempts"), [(3, 3), (1, 1), (0, 1)])
def test_max_retries_keeps_the_seeds_meaning(real_batcher: Batcher, max_retries: int, attempts: int) -> None:
    """The seed fails a job once its retry count, incremented at each failure, reaches
    maxRetries: maxRetries=N allows N attempts (0 and 1: a single one)."""
    Failing, runs = always_failing(real_batcher, "seed", max_retries=max_retries)
    assert Failing.config.max_attempts == attempts
    Failing.start("r1")
    delays = failure_schedule(real_batcher, Failing, "r1", runs)
    assert runs[0] == attempts and len(delays) == attempts - 1
    with pytest.raises(rb.ConfigError, match="not both"):
        real_batcher.iterator(name="both", max_attempts=3, max_retries=3)


def test_a_config_stored_by_an_older_version_reads_max_retries_as_retries() -> None:
    """Job snapshots written before max_attempts existed hold max_retries=N, which then
    allowed N + 1 attempts."""
    old = {"name": "x", "batch_size": 10, "delay_between_batches": 0.1, "max_retries": 5}
    old |= {"retry_backoff": 1.0, "retry_backoff_max": 30.0, "lease_timeout": 60.0}
    assert rb.IteratorConfig.from_json(json.dumps(old)).max_attempts == 6


def test_cancel_is_final(real_batcher: Batcher) -> None:
    Count, seen = counting_iterator(real_batcher)
    Count.start("c1", params={"n": 100})
    cancelled = Count.cancel("c1")
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    Worker(real_batcher).run(burst=True)
    assert seen == []
    with pytest.raises(rb.JobStateError) as info:
        Count.resume("c1")
    assert info.value.status == "cancelled"
    with pytest.raises(rb.JobStateError):
        Count.cancel("c1")

    # cancelled while running: the step in progress is saved, then the worker stops
    Count.start("c2", params={"n": 1000, "sleep": 0.01})
    with running_worker(real_batcher):
        wait_until(lambda: Count.status("c2").processed >= 30, what="progress")  # type: ignore[union-attr]
        Count.cancel("c2")
        wait_until(lambda: real_batcher.client.hget(Count.keys.job("c2"), "owner") == b"", what="stop")
    st = Count.status("c2")
    assert st is not None and st.status == "cancelled" and st.processed == len(seen) < 1000


def test_delete_is_refused_while_running_or_paused(real_batcher: Batcher) -> None:
    Count, _ = counting_iterator(real_batcher)
    Count.start("d1", params={"n": 500, "sleep": 0.01})
    with running_worker(real_batcher):
        wait_until(lambda: Count.status("d1").status == "running", what="running")  # type: ignore[union-attr]
        with pytest.raises(rb.JobStateError) as info:
            Count.delete("d1")
        assert info.value.status == "running"
        Count.pause("d1")
        with pytest.raises(rb.JobStateError) as info:
            Count.delete("d1")
        assert info.value.status == "paused"
        Count.resume("d1")
        wait_until(lambda: Count.status("d1").status == "completed", what="completion")  # type: ignore[union-attr]
    assert Count.delete("d1") is True
    assert Count.status("d1") is None
    assert Count.delete("d1") is False
    assert not list(real_batcher.client.scan_iter(match="t:{jobs:count}:*"))  # nothing left behind
    with pytest.raises(rb.JobNotFound):
        Count.pause("d1")


def test_starting_an_existing_job_id_is_an_error(real_batcher: Batcher) -> None:
    Count, _ = counting_iterator(real_batcher)
    Count.start("dup", params={"n": 10})
    before = snapshot(real_batcher.client)
    with pytest.raises(rb.JobExists) as info:
        Count.start("dup", params={"n": 99})
    assert isinstance(info.value, rb.BatcherError)
    assert info.value.status == "pending"
    assert snapshot(real_batcher.client) == before


def test_bad_input_leaves_redis_untouched(real_batcher: Batcher) -> None:
    Count, _ = counting_iterator(real_batcher)
    Count.start("ok", params={"n": 1})
    before = snapshot(real_batcher.client)
    for bad_id in ("", "a\nb", "x" * 600, 42):
        with pytest.raises(rb.InvalidJob):
            Count.start(bad_id, params={"n": 1})  # type: ignore[arg-type]
    for bad_params in ({"when": object()}, {"ratio": float("nan")}, {1, 2}):
        with pytest.raises(rb.InvalidJob):
            Count.start("new", params=bad_params)
    for options in (
        {"batch_size": 0},
        {"batch_size": -5},
        {"max_retries": -1},
        {"max_attempts": 0},
        {"max_attempts": True},
        {"max_attempts": 3, "max_retries": 3},
        {"retry_backoff": 0},
    ):
        with pytest.raises(rb.ConfigError):
            real_batcher.iterator(name="other", **options)
    with pytest.raises(rb.ConfigError):
        real_batcher.iterator(name="has space")
    with pytest.raises(rb.ConfigError):
        real_batcher.iterator(name="count")(type("Again", (), {"next_batch": print, "process": print}))
    with pytest.raises(rb.ConfigError):
        real_batcher.iterator(name="noprocess")(type("Half", (), {"next_batch": print}))
    with pytest.raises(rb.ConfigError):
        real_batcher.jobs(status="done")
    assert snapshot(real_batcher.client) == before


def test_listing_by_status_with_limit(real_batcher: Batcher) -> None:
    Count, _ = counting_iterator(real_batcher)
    Other, _ = counting_iterator(real_batcher, name="other")
    for i in range(5):
        Count.start(f"job-{i}", params={"n": 3})
        time.sleep(0.002)  # distinct created_at: newest first is well defined
    Other.start("other-0", params={"n": 3})
    Count.pause("job-1")
    Count.cancel("job-2")
    assert [j.job_id for j in real_batcher.jobs()] == ["other-0", "job-4", "job-3", "job-2", "job-1", "job-0"]
    assert [j.job_id for j in real_batcher.jobs(status="pending", limit=2)] == ["other-0", "job-4"]
    assert [j.job_id for j in real_batcher.jobs(status="paused")] == ["job-1"]
    assert [j.job_id for j in Count.jobs(status="pending")] == ["job-4", "job-3", "job-0"]
    Worker(real_batcher).run(burst=True)
    assert {j.job_id for j in real_batcher.jobs(status="completed")} == {"other-0", "job-4", "job-3", "job-0"}
    assert [j.job_id for j in real_batcher.jobs(status="completed", limit=1)] == ["other-0"]
    assert real_batcher.jobs(status="running") == []
    # another process sees the jobs through the registry, without the iterator classes
    assert len(Batcher(real_batcher.client, prefix="t").jobs()) == 6


def test_status_fields_and_items_per_second(real_batcher: Batcher) -> None:
    Count, _ = counting_iterator(real_batcher, batch_size=20, delay_between_batches=0.01)
    Count.start("s1", params={"n": 100_000, "sleep": 0.005})
    with running_worker(real_batcher):
        wait_until(lambda: Count.status("s1").processed >= 400, what="progress")  # type: ignore[union-attr]
        st = Count.status("s1")
        assert st is not None
        assert st.status == "running" and st.worker is not None and st.worker.endswith(f":{os.getpid()}")
        assert 100 < st.items_per_second < 100_000, st.items_per_second
        assert st.params == {"n": 100_000, "sleep": 0.005}
        assert st.config is not None and (st.config.batch_size, st.config.max_attempts) == (20, 5)
        assert st.cursor == str(st.processed) or int(st.cursor or 0) >= st.processed
        assert st.created_at and st.started_at and st.last_run_at and st.updated_at
        assert st.created_at <= st.started_at <= st.last_run_at
        assert st.finished_at is None and st.retry_count == 0 and st.error is None
        Count.cancel("s1")
    st = Count.status("s1")
    assert st is not None and st.status == "cancelled"


def test_a_stale_lease_holder_cannot_save_progress(real_batcher: Batcher) -> None:
    """Fencing: after the lease of worker A expired and B claimed the job, A's commit is refused."""
    Count, _ = counting_iterator(real_batcher, lease_timeout=0.05)
    Count.start("fence", params={"n": 100})
    keys, cfg, client = Count.keys, Count.config, real_batcher.client
    _, [a] = parse_claim("owner-a", claim_call(keys, cfg, 1, "owner-a", "a").run(client))
    time.sleep(0.1)  # A's lease runs out
    _, [b] = parse_claim("owner-b", claim_call(keys, cfg, 1, "owner-b", "b").run(client))
    assert (a.job_id, b.job_id) == ("fence", "fence")
    assert commit_call(keys, cfg, "fence", "owner-a", "10", 10, False, 1).run(client) == b"lease_lost"
    assert Count.status("fence").processed == 0  # type: ignore[union-attr]
    assert commit_call(keys, cfg, "fence", "owner-b", "10", 10, False, 1).run(client) == b"ok"
    st = Count.status("fence")
    assert st is not None and (st.processed, st.cursor, st.worker) == (10, "10", "b")


def test_stopping_a_worker_releases_its_jobs_at_once(real_batcher: Batcher) -> None:
    Count, seen = counting_iterator(real_batcher, lease_timeout=60.0)
    Count.start("r1", params={"n": 2000, "sleep": 0.01})
    with running_worker(real_batcher):
        wait_until(lambda: Count.status("r1").processed >= 20, what="progress")  # type: ignore[union-attr]
    # the lease is 60 s, but the stopped worker gave the job back: another takes it now
    assert real_batcher.client.hget(Count.keys.job("r1"), "owner") == b""
    saved = Count.status("r1").processed  # type: ignore[union-attr]
    assert saved == len(seen)
    runner = JobRunner(real_batcher, concurrency=1)
    thread = runner.start(burst=True)
    thread.join(30)
    assert not thread.is_alive()
    assert Count.status("r1").status == "completed"  # type: ignore[union-attr]
    assert sorted(seen) == list(range(2000))


def test_kill_9_worker_mid_job_another_resumes_from_saved_cursor(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path
) -> None:
    db = tmp_path / "rows.db"
    rows = 5_000
    make_table(db, rows)
    _, walk = jobs_app.make(real_client)
    walk.start("kill-test")
    env = subprocess_env(redis_server.url)
    env["JOBS_DB"] = str(db)
    procs: list[subprocess.Popen[bytes]] = []

    def start_worker(i: int) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker{i}.log").open("wb")
        p = subprocess.Popen(
            cli_command("worker", "tests.apps.jobs_app:batcher", "--redis-url", redis_server.url),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        procs.append(p)
        return p

    def status() -> rb.JobStatus:
        st = walk.status("kill-test")
        assert st is not None
        return st

    try:
        first = start_worker(0)
        wait_until(lambda: status().processed >= 1000, timeout=30, what="progress in worker 0")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        saved = status()
        assert saved.status == "running" and saved.processed < rows
        start_worker(1)
        wait_until(lambda: status().status == "completed", timeout=30, what="completion in worker 1")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    final = status()
    assert final.processed == rows
    assert final.worker is not None and final.worker.endswith(f":{procs[1].pid}")
    counts = {int(k): int(v) for k, v in real_client.hgetall(jobs_app.SEEN_KEY).items()}
    assert sorted(counts) == list(range(1, rows + 1))  # every row processed
    repeated = [k for k, n in counts.items() if n > 1]
    # only the batch in flight when worker 0 died ran twice: worker 1 resumed from the saved cursor
    assert len(repeated) <= jobs_app.BATCH_SIZE
    assert all(counts[k] == 2 for k in repeated)
    assert all(k > int(saved.cursor or 0) for k in repeated)


def test_a_commit_resent_after_its_reply_was_lost_is_counted_once(
    real_batcher: Batcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that ran but whose reply was lost (connection dropped) is sent again by the
    runner; the step number in it keeps ``processed`` from counting the batch twice."""
    Count, seen = counting_iterator(real_batcher)
    Count.start("resent", params={"n": 50})
    execute = real_batcher.executor.execute
    lost: list[str] = []

    def reply_lost_once(call: Any, **kw: Any) -> Any:
        reply = execute(call, **kw)
        if call.script.name == "job_commit" and not lost:
            lost.append(call.script.name)
            raise redis.ConnectionError("connection reset after the script ran")
        return reply

    monkeypatch.setattr(real_batcher.executor, "execute", reply_lost_once)
    Worker(real_batcher).run(burst=True)
    st = Count.status("resent")
    assert lost and st is not None
    assert (st.status, st.processed, st.cursor) == ("completed", 50, "50")
    assert sorted(seen) == list(range(50))


def test_next_batch_with_the_issues_two_argument_signature(real_batcher: Batcher) -> None:
    """``next_batch(cursor, batch_size)`` as written in the issue works too (no job argument);
    params still reach ``process`` and ``on_complete``."""
    seen: list[tuple[int, str]] = []
    finished: list[int] = []

    @real_batcher.iterator(name="plain", batch_size=4, delay_between_batches=0.0)
    class Plain:
        def next_batch(self, cursor: str | None, batch_size: int) -> Page:
            start = int(cursor or 0)
            stop = min(start + batch_size, 10)
            return Page(list(range(start, stop)), str(stop), stop >= 10)

        def process(self, items: list[int], job: JobContext) -> None:
            seen.extend((i, job.params["tag"]) for i in items)

        def on_complete(self, job: JobContext) -> None:
            finished.append(job.processed)

    Plain.start("two-args", params={"tag": "x"})
    Worker(real_batcher).run(burst=True)
    st = Plain.status("two-args")
    assert st is not None and (st.status, st.processed, st.error) == ("completed", 10, None)
    assert seen == [(i, "x") for i in range(10)] and finished == [10]


def test_a_bad_page_fails_the_job_without_losing_progress_or_the_worker(real_batcher: Batcher) -> None:
    """next_batch returning a non-Page, or a Page whose cursor is not a str, is a step error:
    retried, then the job fails with the TypeError's text. The saved cursor and count stay, the
    worker keeps running other jobs, and a resumed job continues from the saved cursor."""
    good = [False]

    @real_batcher.iterator(
        name="badpage", batch_size=5, delay_between_batches=0.0, max_attempts=2, retry_backoff=0.01
    )
    class BadPage:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Any:
            if cursor is None or good[0]:
                start = int(cursor or 0)
                return Page(list(range(start, start + batch_size)), str(start + batch_size), start >= 5)
            if job.params == "dict":
                return {"items": [1], "cursor": "x"}
            return Page([1], cursor=10)  # type: ignore[arg-type]

        def process(self, items: list[int], job: JobContext) -> None:
            pass

    Count, seen = counting_iterator(real_batcher)
    BadPage.start("dict", params="dict")
    BadPage.start("int-cursor", params="int")
    Count.start("healthy", params={"n": 30})
    with running_worker(real_batcher):
        wait_until(
            lambda: {j.job_id for j in real_batcher.jobs(status="failed")} == {"dict", "int-cursor"},
            what="both bad jobs to fail",
        )
        wait_until(lambda: Count.status("healthy").status == "completed", what="the healthy job")  # type: ignore[union-attr]
    expected = {
        "dict": "TypeError: next_batch must return a redis_batcher.Page, got dict",
        "int-cursor": "TypeError: Page.cursor must be a str or None, got int",
    }
    for job_id, error in expected.items():
        st = BadPage.status(job_id)
        assert st is not None
        assert (st.status, st.error, st.retry_count) == ("failed", error, 2)
        assert (st.processed, st.cursor) == (5, "5")  # the first, good step is kept
    assert sorted(seen) == list(range(30))
    good[0] = True
    BadPage.resume("dict")
    Worker(real_batcher).run(burst=True)
    st = BadPage.status("dict")
    assert st is not None and (st.status, st.processed, st.cursor) == ("completed", 10, "10")


def test_on_complete_raising_is_retried_without_reprocessing(real_batcher: Batcher) -> None:
    processed: list[int] = []
    completions: list[int] = []

    @real_batcher.iterator(name="oncomplete", batch_size=10, delay_between_batches=0.0, retry_backoff=0.01)
    class Notify:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            start = int(cursor or 0)
            return Page(list(range(start, start + batch_size)), str(start + batch_size), start >= 10)

        def process(self, items: list[int], job: JobContext) -> None:
            processed.extend(items)

        def on_complete(self, job: JobContext) -> None:
            completions.append(job.processed)
            if len(completions) < 3:
                raise RuntimeError("mail server down")

    Notify.start("n1")
    with running_worker(real_batcher):
        wait_until(lambda: Notify.status("n1").status == "completed", what="completion")  # type: ignore[union-attr]
    st = Notify.status("n1")
    assert st is not None
    assert (st.status, st.processed, st.retry_count) == ("completed", 20, 2)
    assert st.error == "RuntimeError: mail server down"
    assert completions == [20, 20, 20]
    assert processed == list(range(20))  # the walk itself ran once


def test_a_hung_step_whose_lease_was_taken_cannot_save(real_batcher: Batcher) -> None:
    """The lease of a worker stuck in a step passes to another worker (simulated: the owner
    token is replaced, as job_claim.lua does after expiry). When the stuck step returns, its
    commit is refused: nothing it did overwrites the new owner's progress, and it stops."""
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @real_batcher.iterator(name="hung", batch_size=5, delay_between_batches=0.0)
    class Hung:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            start = int(cursor or 0)
            return Page(list(range(start, start + batch_size)), str(start + batch_size), False)

        def process(self, items: list[int], job: JobContext) -> None:
            calls.append(items[0])
            entered.set()
            release.wait(10)

    Hung.start("h1")
    runner = JobRunner(real_batcher, concurrency=1, grace_period=5.0)
    runner.start()
    try:
        assert entered.wait(10)
        real_batcher.client.hset(Hung.keys.job("h1"), mapping={"owner": "thief", "cursor": "500"})
        release.set()
        wait_until(lambda: runner.stats.lease_lost == 1, what="the refused commit")
        time.sleep(0.1)
    finally:
        runner.stop()
        runner.wait()
    st = Hung.status("h1")
    assert st is not None and (st.processed, st.cursor, st.status) == (0, "500", "running")
    assert real_batcher.client.hget(Hung.keys.job("h1"), "owner") == b"thief"  # not released
    assert calls == [0] and runner.stats.steps == 0


def test_heartbeats_keep_a_step_longer_than_the_lease(real_batcher: Batcher) -> None:
    """A step three times longer than lease_timeout stays with its worker: a second runner
    polling the same iterator never takes the job over, and no batch runs twice."""
    Count, seen = counting_iterator(real_batcher, batch_size=5, lease_timeout=0.3)
    Count.start("long", params={"n": 15, "sleep": 0.9})
    runners = [JobRunner(real_batcher, concurrency=1, poll_interval=0.05) for _ in range(2)]
    threads = [r.start(burst=False) for r in runners]
    try:
        wait_until(lambda: Count.status("long").status == "completed", timeout=15, what="completion")  # type: ignore[union-attr]
    finally:
        for r in runners:
            r.stop()
        for r in runners:
            r.wait()
    assert all(not t.is_alive() for t in threads)
    assert sorted(seen) == list(range(15))
    assert sum(r.stats.lease_lost for r in runners) == 0
    assert sum(r.stats.steps for r in runners) == 3


def test_a_redis_outage_mid_job_neither_kills_the_worker_nor_loses_the_job() -> None:
    """Redis is killed twice while a job runs (AOF fsync'd on every write) and comes back:
    the worker thread survives, the job completes, ``processed`` is exact and no batch but the
    ones in flight at the outages ran twice."""
    args = ["--appendonly", "yes", "--appendfsync", "always"]
    with own_server(persistence=True, extra_args=args) as server:
        batcher = Batcher(server.url, prefix="t", connect_retry=0.2)
        Count, seen = counting_iterator(batcher, batch_size=5, lease_timeout=1.0, retry_backoff=0.05)
        Count.start("outage", params={"n": 300, "sleep": 0.01})
        with running_worker(batcher) as worker:
            for at in (40, 150):
                wait_until(lambda: Count.status("outage").processed >= at, what=f"{at} items")  # type: ignore[union-attr]  # noqa: B023
                server.stop(kill=True)
                time.sleep(0.4)
                server.start()
            wait_until(lambda: Count.status("outage").status == "completed", timeout=20, what="completion")  # type: ignore[union-attr]
            assert worker.jobs is not None and worker.jobs._thread is not None
            assert worker.jobs._thread.is_alive()
        st = Count.status("outage")
        assert st is not None and (st.processed, st.cursor) == (300, "300")
        assert sorted(set(seen)) == list(range(300))
        assert len(seen) - 300 <= 2 * 5  # at most the batch in flight at each outage, again
        batcher.client.close()


def test_a_pause_during_delay_between_batches_runs_no_further_step(real_batcher: Batcher) -> None:
    """Paused while the worker waits between two steps: it starts no other step (the next one
    would otherwise run and be saved on a paused job) and gives the lease back."""
    Count, seen = counting_iterator(real_batcher, batch_size=5, delay_between_batches=0.6)
    Count.start("slow", params={"n": 100})
    with running_worker(real_batcher):
        wait_until(lambda: Count.status("slow").processed == 5, what="the first step")  # type: ignore[union-attr]
        Count.pause("slow")
        wait_until(lambda: real_batcher.client.hget(Count.keys.job("slow"), "owner") == b"", what="release")
        time.sleep(0.2)
        st = Count.status("slow")
        assert st is not None and (st.status, st.processed, st.cursor) == ("paused", 5, "5")
        assert seen == list(range(5))
        Count.resume("slow")
        wait_until(lambda: Count.status("slow").processed >= 10, what="progress after resume")  # type: ignore[union-attr]
        Count.cancel("slow")  # likewise between steps
        wait_until(lambda: real_batcher.client.hget(Count.keys.job("slow"), "owner") == b"", what="release")
        time.sleep(0.2)
        st = Count.status("slow")
        assert st is not None and (st.status, st.processed) == ("cancelled", 10)
    assert seen == list(range(10))


def test_bad_listing_and_control_arguments_raise_batcher_errors(real_batcher: Batcher) -> None:
    Count, _ = counting_iterator(real_batcher)
    Count.start("ok", params={"n": 1})
    before = snapshot(real_batcher.client)
    for limit in (0, -1, True, 2.5):
        with pytest.raises(rb.ConfigError):
            real_batcher.jobs(limit=limit)  # type: ignore[arg-type]
        with pytest.raises(rb.ConfigError):
            Count.jobs(limit=limit)  # type: ignore[arg-type]
    for status in ("done", "", "RUNNING"):
        with pytest.raises(rb.ConfigError):
            Count.jobs(status=status)
    for bad_id in ("", "tab\there", "x" * 513, None):
        for action in (Count.pause, Count.resume, Count.cancel, Count.delete, Count.status):
            with pytest.raises(rb.InvalidJob):
                action(bad_id)  # type: ignore[operator]
    for options in ({"concurrency": 0}, {"concurrency": True}, {"poll_interval": 0}):
        with pytest.raises(rb.ConfigError):
            JobRunner(real_batcher, **options)
    with pytest.raises(rb.UnknownIterator):
        Worker(real_batcher, iterators=["nope"])
    with pytest.raises(rb.ConfigError):
        Worker(real_batcher, iterators=[])  # nothing to serve: no processors, no iterators
    assert snapshot(real_batcher.client) == before


def sizing_iterator(batcher: Batcher, **options: Any) -> tuple[Any, list[tuple[str, int, int]]]:
    """An iterator over range(params["n"]) recording (job id, page size, job.batch_size)."""
    pages: list[tuple[str, int, int]] = []

    @batcher.iterator(name="sized", batch_size=10, delay_between_batches=0.0, **options)
    class Sized:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            start = int(cursor or 0)
            stop = min(start + batch_size, job.params["n"])
            return Page(list(range(start, stop)), str(stop), stop >= job.params["n"])

        def process(self, items: list[int], job: JobContext) -> None:
            pages.append((job.job_id, len(items), job.batch_size))

    return Sized, pages


def test_start_overrides_the_iterators_settings_for_one_job(real_batcher: Batcher) -> None:
    """The seed takes batch size, delay and retries per startIterator call: start() takes them
    for one job, stores them with it, and any worker honours them: here a worker of another
    Batcher, whose definition of the iterator knows nothing of the job's settings."""
    Sized, _ = sizing_iterator(real_batcher)
    st = Sized.start("small", params={"n": 10}, batch_size=3, delay_between_batches=timedelta(0))
    assert st.config is not None and (st.config.batch_size, st.config.delay_between_batches) == (3, 0.0)
    assert st.config.max_attempts == 5 and Sized.config.batch_size == 10  # the iterator's are kept
    Sized.start("plain", params={"n": 25})
    assert real_batcher.client.hget(Sized.keys.job("plain"), "overrides") is None
    assert real_batcher.client.hget(Sized.keys.job("small"), "overrides") == (
        b'{"batch_size": 3, "delay_between_batches": 0.0}'
    )

    elsewhere = Batcher(real_batcher.client, prefix="t")
    _, pages = sizing_iterator(elsewhere)
    Worker(elsewhere).run(burst=True)
    assert [(n, size) for job, n, size in pages if job == "small"] == [(3, 3), (3, 3), (3, 3), (1, 3)]
    assert [(n, size) for job, n, size in pages if job == "plain"] == [(10, 10), (10, 10), (5, 10)]
    assert {Sized.status(j).status for j in ("small", "plain")} == {"completed"}  # type: ignore[union-attr]


def test_a_jobs_own_retry_settings_are_honoured(real_batcher: Batcher) -> None:
    Failing, runs = always_failing(real_batcher, "fragile")  # 5 attempts, 2 s backoff
    st = Failing.start("f1", max_attempts=3, retry_backoff=40, retry_backoff_max=timedelta(seconds=50))
    assert st.config is not None
    assert (st.config.max_attempts, st.config.retry_backoff, st.config.retry_backoff_max) == (3, 40.0, 50.0)
    assert failure_schedule(real_batcher, Failing, "f1", runs) == [40000, 50000] and runs[0] == 3
    runs[0] = 0
    Failing.start("f2", max_retries=2)  # the seed's spelling: 2 attempts
    assert failure_schedule(real_batcher, Failing, "f2", runs) == [2000] and runs[0] == 2
    assert Failing.status("f2").config.max_attempts == 2  # type: ignore[union-attr]


def test_bad_job_settings_leave_redis_untouched(real_batcher: Batcher) -> None:
    Sized, _ = sizing_iterator(real_batcher, retry_backoff_max=30.0)
    before = snapshot(real_batcher.client)
    for bad in (
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"delay_between_batches": -1},
        {"max_attempts": 0},
        {"max_attempts": 2, "max_retries": 2},
        {"retry_backoff": 31},  # above the iterator's retry_backoff_max
        {"retry_backoff_max": "1m"},
    ):
        with pytest.raises(rb.ConfigError):
            Sized.start("bad", params={"n": 1}, **bad)
    with pytest.raises(TypeError, match="lease_timeout"):
        Sized.start("bad", params={"n": 1}, lease_timeout=5)  # type: ignore[call-arg]
    assert snapshot(real_batcher.client) == before


def test_stored_settings_a_worker_refuses_leave_the_iterators(
    real_batcher: Batcher, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings only this library writes, checked again when a worker claims the job: a value
    that no longer passes (edited by hand) is logged and the iterator's settings apply."""
    Sized, pages = sizing_iterator(real_batcher)
    Sized.start("edited", params={"n": 12}, batch_size=4)
    real_batcher.client.hset(Sized.keys.job("edited"), "overrides", '{"batch_size": 0}')
    Worker(real_batcher).run(burst=True)
    assert [n for _, n, _ in pages] == [10, 2]
    assert any("edited: own settings refused" in r.getMessage() for r in caplog.records)
