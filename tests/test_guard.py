"""Every script call declares its partition's (or iterator's) migration guard as its last key.

The guard (``keys.GUARD``) is never written, so while the slot migrates Redis Cluster refuses
every script of it before it runs (TRYAGAIN, or ASK then TRYAGAIN): no script can fail half-way
on a key that has moved (tests/test_cluster_reshard.py shows the effect under load). Here the
wire is watched with MONITOR on a real redis-server while the API, a worker and an iterator job
run, and every EVALSHA / EVAL is checked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from redis_batcher import Batcher, Flush, JobContext, Page, Worker
from redis_batcher.scripts import scripts
from redis_batcher.testing import RedisServer

pytestmark = pytest.mark.timeout(120)


class Wire:
    """The script calls a MONITOR connection sees: (script name, keys). redis-py hands each
    command over as its words joined by spaces: the names used here have none."""

    def __init__(self, server: RedisServer) -> None:
        self.client = redis.Redis(
            host="127.0.0.1", port=server.port, socket_timeout=None, encoding_errors="replace"
        )
        self.calls: list[tuple[str, list[str]]] = []
        variants = [(name, v) for name, s in scripts().scripts.items() for v in (s.best, s.plain)]
        self.names = {v.sha: name for name, v in variants}
        self.ready = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with self.client.monitor() as m:
            self.ready.set()
            for event in m.listen():
                words = event["command"].split(" ")  # no spaces in this test's names
                assert words[0].upper() != "EVAL", "a script was sent as EVAL: load it first"
                if words[0].upper() == "EVALSHA":
                    head = words[1]
                    name = self.names.get(head, head)
                    self.calls.append((name, words[3 : 3 + int(words[2])]))
                if self.done.is_set() and words[:2] == ["GET", "wire:end"]:
                    return

    def __enter__(self) -> Wire:
        for script in scripts().scripts.values():  # every call is an EVALSHA then, never an EVAL
            script.load(self.client)
        self.thread.start()
        assert self.ready.wait(10)
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.client.get("wire:end")
        self.thread.join(timeout=10)
        self.client.close()


@pytest.fixture
def server(redis_server: RedisServer) -> Iterator[RedisServer]:
    c = redis.Redis(host="127.0.0.1", port=redis_server.port)
    c.flushall()
    c.close()
    yield redis_server


def test_every_script_call_declares_the_guard_last(server: RedisServer) -> None:
    batcher = Batcher(server.url, prefix="g")

    def handler(flush: Flush) -> None:
        if flush.batch_id == "bad":
            raise RuntimeError("always fails")

    proc = batcher.processor(name="gp", partitions=2, max_batch_size=3, flush_interval=0.05, max_attempts=1)(
        handler
    )

    @batcher.iterator(name="walk", batch_size=2)
    class Walk:
        def next_batch(self, cursor: str | None, batch_size: int, job: JobContext) -> Page:
            n = int(cursor or 0)
            return Page(items=[n, n + 1], cursor=str(n + 2), done=n >= 4)

        def process(self, items: list[Any], job: JobContext) -> None:
            pass

    with Wire(server) as wire:
        proc.add("a", 1)
        proc.add_many("b", [1, 2, 3, 4])
        proc.add("bad", 1)
        proc.flush("a")
        proc.flush("bad")
        proc.retry("a")
        proc.status("b")
        proc.pause()
        Worker(batcher).run(burst=True)  # claims nothing: paused
        proc.resume()
        Worker(batcher).run(burst=True)
        dead = proc.dead_letters()
        assert dead, "the failing flush was dead-lettered (max_attempts=1)"
        proc.replay_dead(dead[0].id)
        Worker(batcher).run(burst=True)  # dead again
        proc.add("x", 1)
        assert proc.purge_dead() == 1
        proc.delete("a")
        job = Walk.start("j1")  # type: ignore[attr-defined]
        Walk.pause(job.job_id)  # type: ignore[attr-defined]
        Walk.resume(job.job_id)  # type: ignore[attr-defined]
        Worker(batcher).run(burst=True)
        Walk.start("j2")  # type: ignore[attr-defined]
        Walk.cancel("j2")  # type: ignore[attr-defined]
        Walk.delete("j2")  # type: ignore[attr-defined]
    batcher.close()

    seen = {name for name, _ in wire.calls}
    want = {"add", "flush", "retry", "status", "claim", "ack", "nack", "replay", "purge", "delete", "pause"}
    want |= {"job_start", "job_pause", "job_resume", "job_claim", "job_commit", "job_finish"}
    want |= {"job_cancel", "job_delete"}
    assert want <= seen, sorted(want - seen)
    for name, keys in wire.calls:
        assert len(keys) >= 2 and keys[-1].endswith(":guard"), (name, keys)
        tag = keys[-1][keys[-1].index("{") : keys[-1].index("}") + 1]
        assert all(tag in k for k in keys), (name, keys)  # one slot: the guard's
