"""Iterator jobs on the asyncio client (issue #6): the same behaviour as tests/test_jobs.py,
awaited, with ``async def`` iterator methods run by the async worker."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

import redis_batcher as rb
import redis_batcher.asyncio as aio
from redis_batcher import JobContext, Page
from redis_batcher.testing import RedisServer
from tests.apps import jobs_app
from tests.conftest import snapshot
from tests.test_jobs import make_table
from tests.test_reliability import guarded


def arun(server: RedisServer, body: Callable[[aio.Batcher], Awaitable[None]]) -> None:
    async def main() -> None:
        ab = aio.Batcher(server.url, prefix="t")
        try:
            await body(ab)
        finally:
            await ab.aclose()

    asyncio.run(main())


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def counting(ab: aio.Batcher, name: str = "count", **options: Any) -> tuple[Any, list[tuple[str, int]]]:
    seen: list[tuple[str, int]] = []  # (job id, item)
    options.setdefault("delay_between_batches", 0.0)
    options.setdefault("batch_size", 10)

    @ab.iterator(name=name, **options)
    class Count:
        async def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            start = int(cursor or 0)
            stop = min(start + batch_size, job.params["n"])
            return Page(list(range(start, stop)), str(stop), stop >= job.params["n"])

        async def process(self, items: list[int], job: JobContext) -> None:
            await asyncio.sleep(job.params.get("sleep", 0))
            seen.extend((job.job_id, i) for i in items)

    return Count, seen


async def status_of(it: Any, job_id: str) -> rb.JobStatus:
    st = await it.status(job_id)
    assert st is not None
    return st


def test_async_walk_of_a_sqlite_table_exactly_once(
    redis_server: RedisServer, real_client: redis.Redis, tmp_path: Path
) -> None:
    source = tmp_path / "source.db"
    make_table(source, 20_000)
    seen: list[int] = []
    done: list[int] = []

    async def body(ab: aio.Batcher) -> None:
        @ab.iterator(name="walk", batch_size=500, delay_between_batches=0.0)
        class Walk:
            def __init__(self) -> None:
                self.db = sqlite3.connect(source, check_same_thread=False)

            def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
                return jobs_app.walk_page(self.db, cursor, batch_size)  # sync: runs in a thread

            async def process(self, items: list[int], job: JobContext) -> None:
                assert job.params == {"table": "rows"}
                seen.extend(items)

            async def on_complete(self, job: JobContext) -> None:
                done.append(job.processed)

        started = await Walk.start("w1", params={"table": "rows"})
        assert started.status == "pending"
        await aio.Worker(ab).run(burst=True)
        st = await status_of(Walk, "w1")
        assert (st.status, st.processed, st.cursor) == ("completed", 20_000, "20000")

    arun(redis_server, body)
    assert sorted(seen) == list(range(1, 20_001)) and done == [20_000]


def test_async_pause_resume_cancel_delete(redis_server: RedisServer, real_client: redis.Redis) -> None:
    async def body(ab: aio.Batcher) -> None:
        Count, seen = counting(ab)
        await Count.start("p1", params={"n": 300, "sleep": 0.01})
        worker = aio.Worker(ab, grace_period=5.0)
        task = asyncio.ensure_future(worker.run())
        try:
            await wait_for(lambda: _processed_at_least(Count, "p1", 30), what="progress")
            assert (await Count.pause("p1")).status == "paused"
            with pytest.raises(rb.JobStateError):
                await Count.delete("p1")
            await wait_for(lambda: _owner_free(real_client, Count, "p1"), what="the worker to stop")
            frozen = await status_of(Count, "p1")
            await asyncio.sleep(0.2)
            assert (await status_of(Count, "p1")).processed == frozen.processed == len(seen) < 300
            assert (await Count.resume("p1")).status == "running"
            with pytest.raises(rb.JobStateError):
                await Count.delete("p1")
            await wait_for(lambda: _status_is(Count, "p1", "completed"), what="completion")
            await Count.start("c1", params={"n": 10_000, "sleep": 0.01})
            await wait_for(lambda: _processed_at_least(Count, "c1", 10), what="progress of c1")
            assert (await Count.cancel("c1")).status == "cancelled"
            await wait_for(lambda: _owner_free(real_client, Count, "c1"), what="the worker to stop")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)
        assert sorted(i for job_id, i in seen if job_id == "p1") == list(range(300))
        with pytest.raises(rb.JobStateError):
            await Count.resume("c1")
        assert await Count.delete("p1") is True
        assert await Count.delete("p1") is False
        assert await Count.status("p1") is None
        assert [j.job_id for j in await ab.jobs(status="cancelled")] == ["c1"]

    arun(redis_server, body)


async def _processed_at_least(it: Any, job_id: str, n: int) -> bool:
    return (await status_of(it, job_id)).processed >= n


async def _status_is(it: Any, job_id: str, status: str) -> bool:
    return (await status_of(it, job_id)).status == status


async def _owner_free(client: redis.Redis, it: Any, job_id: str) -> bool:
    return client.hget(it.keys.job(job_id), "owner") == b""


def test_async_retries_then_failure_then_resume(
    redis_server: RedisServer, real_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []
    healthy = [False]

    async def body(ab: aio.Batcher) -> None:
        @ab.iterator(name="flaky", max_attempts=3, retry_backoff=0.05, retry_backoff_max=0.1)
        class Flaky:
            async def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
                return Page(["a", "b"], "x", True)

            async def process(self, items: list[str], job: JobContext) -> None:
                calls.append(time.monotonic())
                if not healthy[0]:
                    raise TimeoutError("api timed out")

        await Flaky.start("f1")
        worker = aio.Worker(ab)
        task = asyncio.ensure_future(worker.run())
        try:
            await wait_for(lambda: _status_is(Flaky, "f1", "failed"), what="failure")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)
        st = await status_of(Flaky, "f1")
        assert (st.retry_count, st.error) == (3, "TimeoutError: api timed out")
        assert len(calls) == 3 and calls[1] - calls[0] >= 0.045 and calls[2] - calls[1] >= 0.095
        # logged as by the sync runner: with the delay before the retry
        logged = [r.getMessage() for r in caplog.records if "step failed" in r.getMessage()]
        assert logged[1] == "flaky f1: step failed (TimeoutError: api timed out); retry 2 in 0.1s"
        healthy[0] = True
        assert (await Flaky.resume("f1")).retry_count == 0
        await aio.Worker(ab).run(burst=True)
        st = await status_of(Flaky, "f1")
        assert (st.status, st.processed, st.retry_count) == ("completed", 2, 0)

    arun(redis_server, body)


@pytest.mark.parametrize("style", ["async", "sync"])
def test_async_runner_counts_a_step_calling_sys_exit_as_a_failed_step(
    redis_server: RedisServer, real_client: redis.Redis, style: str
) -> None:
    """sys.exit() in a step (on the loop, or in its thread) does not end the event loop: a
    failed step, retried, then the job fails. The loop runs in a thread of its own, so a
    regression cannot stop the test session."""

    def exit_step() -> None:
        sys.exit(3)

    async def body(ab: aio.Batcher) -> None:
        @ab.iterator(name="exits", max_attempts=2, retry_backoff=0.02, retry_backoff_max=0.05)
        class Exits:
            async def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
                return Page([1], None, True)

            if style == "async":

                async def process(self, items: list[int], job: JobContext) -> None:
                    exit_step()

            else:

                def process(self, items: list[int], job: JobContext) -> None:
                    exit_step()

        await Exits.start("e1")
        worker = aio.Worker(ab)
        task = asyncio.ensure_future(worker.run())
        try:
            await wait_for(lambda: _status_is(Exits, "e1", "failed"), what="failure")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)
        st = await status_of(Exits, "e1")
        assert (st.retry_count, st.error) == (2, "SystemExit: 3")

    guarded(lambda: arun(redis_server, body), timeout=30)


def test_async_start_errors_and_listing(redis_server: RedisServer, real_client: redis.Redis) -> None:
    async def body(ab: aio.Batcher) -> None:
        Count, _ = counting(ab)
        for i in range(3):
            await Count.start(f"j{i}", params={"n": 5})
            await asyncio.sleep(0.002)
        before = snapshot(real_client)
        with pytest.raises(rb.JobExists):
            await Count.start("j0", params={"n": 1})
        with pytest.raises(rb.InvalidJob):
            await Count.start("bad\x00id")
        with pytest.raises(rb.InvalidJob):
            await Count.start("j9", params={"at": object()})
        with pytest.raises(rb.ConfigError):
            ab.iterator(name="zero", batch_size=0)
        with pytest.raises(rb.ConfigError):
            await ab.jobs(status="unknown")
        assert snapshot(real_client) == before
        await Count.pause("j1")
        assert [j.job_id for j in await ab.jobs(limit=2)] == ["j2", "j1"]
        assert [j.job_id for j in await ab.jobs(status="pending")] == ["j2", "j0"]
        assert [j.job_id for j in await Count.jobs(status="paused")] == ["j1"]
        # the sync client sees the same jobs (same keys, same registry)
        assert {j.job_id: j.status for j in rb.Batcher(real_client, prefix="t").jobs()}["j1"] == "paused"

    arun(redis_server, body)


def test_async_commit_resent_after_its_reply_was_lost_is_counted_once(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    lost: list[str] = []

    async def body(ab: aio.Batcher) -> None:
        Count, seen = counting(ab)
        await Count.start("resent", params={"n": 50})
        execute = ab.executor.execute

        async def reply_lost_once(call: Any, **kw: Any) -> Any:
            reply = await execute(call, **kw)
            if call.script.name == "job_commit" and not lost:
                lost.append(call.script.name)
                raise redis.ConnectionError("connection reset after the script ran")
            return reply

        ab.executor.execute = reply_lost_once  # type: ignore[method-assign]
        await aio.Worker(ab).run(burst=True)
        st = await status_of(Count, "resent")
        assert (st.status, st.processed, st.cursor) == ("completed", 50, "50")
        assert sorted(i for _, i in seen) == list(range(50))

    arun(redis_server, body)
    assert lost


def test_async_next_batch_with_the_issues_two_argument_signature(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    seen: list[int] = []

    async def body(ab: aio.Batcher) -> None:
        @ab.iterator(name="plain", batch_size=4, delay_between_batches=0.0)
        class Plain:
            async def next_batch(self, cursor: str | None, batch_size: int) -> Page:
                start = int(cursor or 0)
                stop = min(start + batch_size, 10)
                return Page(list(range(start, stop)), str(stop), stop >= 10)

            def process(self, items: list[int], job: JobContext) -> None:
                seen.extend(items)

        await Plain.start("two-args")
        await aio.Worker(ab).run(burst=True)
        st = await status_of(Plain, "two-args")
        assert (st.status, st.processed, st.error) == ("completed", 10, None)

    arun(redis_server, body)
    assert seen == list(range(10))


def test_async_pause_during_delay_between_batches_runs_no_further_step(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    async def body(ab: aio.Batcher) -> None:
        Count, seen = counting(ab, batch_size=5, delay_between_batches=0.6)
        await Count.start("slow", params={"n": 100})
        worker = aio.Worker(ab, grace_period=5.0)
        task = asyncio.ensure_future(worker.run())
        try:
            await wait_for(lambda: _processed_at_least(Count, "slow", 5), what="the first step")
            await Count.pause("slow")
            await wait_for(lambda: _owner_free(real_client, Count, "slow"), what="release")
            await asyncio.sleep(0.2)
            st = await status_of(Count, "slow")
            assert (st.status, st.processed, st.cursor) == ("paused", 5, "5")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)
        assert [i for _, i in seen] == list(range(5))

    arun(redis_server, body)


def test_async_bad_runner_and_listing_arguments(redis_server: RedisServer, real_client: redis.Redis) -> None:
    from redis_batcher.job_runner_async import AsyncJobRunner
    from redis_batcher.jobs_async import AsyncJobControl

    async def body(ab: aio.Batcher) -> None:
        Count, _ = counting(ab)
        for options in ({"concurrency": 0}, {"poll_interval": -1}):
            with pytest.raises(rb.ConfigError):
                AsyncJobRunner(ab, **options)
        with pytest.raises(rb.ConfigError):
            AsyncJobControl(ab, "has {brace}")
        with pytest.raises(rb.ConfigError):
            await ab.jobs(limit=0)
        with pytest.raises(rb.InvalidJob):
            await Count.pause("")
        with pytest.raises(rb.UnknownIterator):
            aio.Worker(ab, iterators=["nope"])

    arun(redis_server, body)


def test_async_start_overrides_the_iterators_settings_for_one_job(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    """As the sync start: the job's own batch size and attempts, stored with it and honoured by
    the async worker; bad settings write nothing."""
    pages: list[tuple[str, int, int]] = []  # (job id, page size, job.batch_size)
    runs = [0]

    async def body(ab: aio.Batcher) -> None:
        @ab.iterator(name="sized", batch_size=10, delay_between_batches=0.0)
        class Sized:
            async def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
                start = int(cursor or 0)
                stop = min(start + batch_size, job.params["n"])
                return Page(list(range(start, stop)), str(stop), stop >= job.params["n"])

            async def process(self, items: list[int], job: JobContext) -> None:
                pages.append((job.job_id, len(items), job.batch_size))

        @ab.iterator(name="failing", retry_backoff=0.01)
        class Failing:
            async def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
                runs[0] += 1
                raise ValueError("no source")

            async def process(self, items: list[int], job: JobContext) -> None:
                pass

        before = snapshot(real_client)
        with pytest.raises(rb.ConfigError):
            await Sized.start("bad", params={"n": 1}, batch_size=0)
        assert snapshot(real_client) == before
        st = await Sized.start("small", params={"n": 7}, batch_size=3)
        assert st.config is not None and st.config.batch_size == 3
        await Sized.start("plain", params={"n": 12})
        await Failing.start("once", max_attempts=1)  # the iterator's: 5
        await aio.Worker(ab).run(burst=True)
        assert (await status_of(Failing, "once")).status == "failed" and runs[0] == 1

    arun(redis_server, body)
    assert [(n, size) for job, n, size in pages if job == "small"] == [(3, 3), (3, 3), (1, 3)]
    assert [(n, size) for job, n, size in pages if job == "plain"] == [(10, 10), (2, 10)]
