"""`redis-batcher jobs ls|status|pause|resume|cancel|delete` against a real redis-server, run
without the iterator's code (the CLI finds iterators through the Redis registry)."""

from __future__ import annotations

import json

import redis
from click.testing import CliRunner

from redis_batcher import Batcher, JobContext, Page, Worker
from redis_batcher.cli import main
from redis_batcher.testing import RedisServer


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_jobs_commands(redis_server: RedisServer, real_client: redis.Redis) -> None:
    batcher = Batcher(redis_server.url, prefix="cj")

    @batcher.iterator(name="backfill-users", batch_size=2, delay_between_batches=0.0)
    class Backfill:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            start = int(cursor or 0)
            return Page(list(range(start, start + batch_size)), str(start + batch_size), start >= 4)

        def process(self, items: list[int], job: JobContext) -> None:
            pass

    Backfill.start("done-1", params={"since": "2026-01-01"})
    Worker(batcher).run(burst=True)
    Backfill.start("later", params={"since": "2026-02-01"})
    common = ["--redis-url", redis_server.url, "--prefix", "cj"]

    code, out = run("jobs", "ls", *common, "--json")
    assert code == 0
    assert [(j["job_id"], j["status"]) for j in json.loads(out)] == [
        ("later", "pending"),
        ("done-1", "completed"),
    ]
    code, out = run("jobs", "ls", *common, "--status", "completed")
    assert code == 0 and "done-1" in out and "later" not in out and "backfill-users" in out
    code, out = run("jobs", "ls", *common, "--status", "finished")
    assert code == 2

    code, out = run("jobs", "status", "done-1", *common, "--json")
    assert code == 0
    st = json.loads(out)
    assert (st["status"], st["processed"], st["cursor"], st["retry_count"]) == ("completed", 6, "6", 0)
    assert st["params"] == {"since": "2026-01-01"} and st["config"]["batch_size"] == 2
    assert "items_per_second" in st and st["created_at"] and st["last_run_at"]
    code, out = run("jobs", "status", "done-1", *common)
    assert code == 0 and "completed" in out and "2026-01-01" in out and "items/s" in out

    code, out = run("jobs", "pause", "later", *common)
    assert code == 0 and "paused" in out
    code, out = run("jobs", "delete", "later", *common)
    assert code == 1 and "paused" in out
    code, out = run("jobs", "resume", "later", "--iterator", "backfill-users", *common, "--json")
    assert code == 0 and json.loads(out)["status"] == "pending"
    code, out = run("jobs", "cancel", "later", *common)
    assert code == 0 and "cancelled" in out
    code, out = run("jobs", "resume", "later", *common)
    assert code == 1 and "cancelled" in out
    code, out = run("jobs", "delete", "later", *common, "--json")
    assert code == 0 and json.loads(out)["deleted"] is True
    code, out = run("jobs", "status", "later", *common)
    assert code == 1 and "no job" in out
    code, out = run("jobs", "delete", "later", "--iterator", "backfill-users", *common)
    assert code == 1 and "no job" in out
    code, out = run("jobs", "status", "done-1", "--iterator", "nope", *common)
    assert code == 1 and "not registered" in out
    assert Backfill.status("done-1") is not None


def test_worker_serves_only_the_named_processors_and_iterators(redis_server: RedisServer) -> None:
    """-i/--iterator picks iterators as -p picks processors; naming either serves only what is
    named (-p alone runs no jobs), naming neither serves everything."""
    from tests.apps import mixed_app

    mixed_app.batcher.connect(redis_server.url)
    mixed_app.delivered.clear()
    mixed_app.walked.clear()
    mixed_app.alpha.start("a1")
    mixed_app.beta.start("b1")
    mixed_app.events.add("user:1", "hello")
    worker = ["worker", "tests.apps.mixed_app:batcher", "--redis-url", redis_server.url, "--burst"]

    assert run(*worker, "--iterator", "alpha")[0] == 0
    assert mixed_app.walked == ["alpha:a1"] and mixed_app.delivered == []
    assert mixed_app.beta.status("b1").status == "pending"  # type: ignore[union-attr]

    assert run(*worker, "-p", "events")[0] == 0
    assert mixed_app.delivered == ["hello"] and mixed_app.walked == ["alpha:a1"]

    assert run(*worker, "-i", "beta", "-p", "events")[0] == 0
    assert mixed_app.walked == ["alpha:a1", "beta:b1"]
    assert mixed_app.beta.status("b1").status == "completed"  # type: ignore[union-attr]

    mixed_app.alpha.start("a2")
    assert run(*worker)[0] == 0
    assert mixed_app.walked[-1] == "alpha:a2"

    code, out = run(*worker, "-i", "gamma")
    assert code == 2 and "unknown iterator" in out and "gamma" in out


def test_jobs_status_is_a_table_and_prints_markup_like_text_as_is(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    """Job ids, cursors and error texts are user data: '[/]' or '[bold]' in them is printed as
    written (rich would raise MarkupError on a stray closing tag)."""
    batcher = Batcher(redis_server.url, prefix="cm")

    @batcher.iterator(name="odd", max_retries=0, delay_between_batches=0.0)
    class Odd:
        def next_batch(self, cursor: str | None, batch_size: int) -> Page:
            if cursor is None:
                return Page([1], "[/]cursor", False)
            raise KeyError("[/] no [bold]column[/bold]")

        def process(self, items: list[int], job: JobContext) -> None:
            pass

    Odd.start("[/]job")
    Worker(batcher).run(burst=True)
    common = ["--redis-url", redis_server.url, "--prefix", "cm"]
    code, out = run("jobs", "status", "[/]job", *common)
    assert code == 0, out
    assert "odd / [/]job" in out and "[/]cursor" in out and "[/] no [bold]column[/bold]" in out
    assert "│ status" in out and "failed" in out and "retry count" in out  # a table
    code, out = run("jobs", "ls", *common)
    assert code == 0 and "[/]job" in out and "[/] no [bold]column" in out
    code, out = run("jobs", "delete", "[/]job", *common)
    assert code == 0 and "deleted job [/]job of odd" in out
