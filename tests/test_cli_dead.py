"""`redis-batcher dead ls|show|replay|purge` against a real redis-server."""

from __future__ import annotations

import json

from click.testing import CliRunner

import redis_batcher as rb
from redis_batcher import Batcher, Worker
from redis_batcher.cli import main
from redis_batcher.testing import RedisServer


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_dead_letter_commands(redis_server: RedisServer, real_client: object) -> None:
    failing = [True]

    def handler(flush: rb.Flush) -> None:
        if failing[0]:
            raise RuntimeError("crm rejected the batch")

    batcher = Batcher(redis_server.url, prefix="cd")
    proc = batcher.processor(name="crm", max_batch_size=2, flush_interval=None, max_attempts=1)(handler)
    proc.add_many("acct:1", [{"n": 1}, {"n": 2}])
    proc.add_many("acct:2", [{"n": 3}, {"n": 4}])
    Worker(batcher).run(burst=True)
    common = ["--redis-url", redis_server.url, "--prefix", "cd", "--processor", "crm"]

    code, out = run("dead", "ls", *common, "--json")
    assert code == 0
    letters = json.loads(out)
    assert sorted(d["batch_id"] for d in letters) == ["acct:1", "acct:2"]
    assert all(
        d["reason"] == "max_attempts" and d["error"] == "RuntimeError: crm rejected the batch"
        for d in letters
    )
    code, out = run("dead", "ls", *common)
    assert code == 0 and "acct:1" in out and "max_attempts" in out

    one = next(d for d in letters if d["batch_id"] == "acct:1")
    code, out = run("dead", "show", one["id"], *common, "--json")
    assert code == 0 and json.loads(out)["items"] == [{"n": 1}, {"n": 2}]
    code, out = run("dead", "show", one["id"], *common)
    assert code == 0 and "{'n': 1}" in out

    failing[0] = False
    code, out = run("dead", "replay", one["id"], *common)
    assert code == 0 and "replayed" in out
    Worker(batcher).run(burst=True)
    assert proc.history("acct:1")[0].success and proc.history("acct:1")[0].reason == "replay"

    code, out = run("dead", "replay", *common)  # neither ids nor --all
    assert code == 2
    code, out = run("dead", "show", "no-such-id", *common)
    assert code == 1 and "no dead letter" in out
    code, out = run("dead", "purge", "--all", *common)
    assert code == 0 and "purged 1" in out
    assert proc.dead_letters() == []


def test_dead_ls_without_processor_lists_every_registered_processor(
    redis_server: RedisServer, real_client: object
) -> None:
    def failing(flush: rb.Flush) -> None:
        raise RuntimeError(f"{flush.batch_id} rejected")

    batcher = Batcher(redis_server.url, prefix="cdall")
    crm = batcher.processor(name="crm", max_batch_size=1, flush_interval=None, max_attempts=1)(failing)
    mail = batcher.processor(name="mail", max_batch_size=1, flush_interval=None, max_attempts=1)(failing)
    batcher.processor(name="quiet", max_batch_size=1, flush_interval=None)(failing)  # no dead letters
    crm.add("acct:1", 1)
    Worker(batcher).run(burst=True)
    mail.add("user:1", 2)
    Worker(batcher).run(burst=True)
    common = ["--redis-url", redis_server.url, "--prefix", "cdall"]

    code, out = run("dead", "ls", *common, "--json")
    assert code == 0, out
    letters = json.loads(out)
    # newest first, across processors
    assert [(d["processor"], d["batch_id"]) for d in letters] == [("mail", "user:1"), ("crm", "acct:1")]
    code, out = run("dead", "ls", *common)
    assert code == 0 and "processor" in out
    assert "crm" in out and "mail" in out and "acct:1" in out and "user:1" in out
    code, out = run("dead", "ls", *common, "--json", "--limit", "1")
    assert [d["processor"] for d in json.loads(out)] == ["mail"]
    code, out = run("dead", "ls", *common, "-p", "crm", "--json")
    assert [(d["processor"], d["batch_id"]) for d in json.loads(out)] == [("crm", "acct:1")]
