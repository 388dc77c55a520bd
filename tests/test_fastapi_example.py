"""examples/fastapi_app.py: the FastAPI service driven through httpx's ASGI transport against the
session's real redis-server, and its batches delivered by the worker command of its docstring
(``redis-batcher worker examples.fastapi_app:abatcher``) run as a real subprocess.

The example reads ``$REDIS_URL`` at import, so each test sets it and (re)imports the module: a
fresh ``Batcher`` per test, bound to the test server (never 6379).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis

from redis_batcher.testing import RedisServer
from tests.conftest import ROOT, cli_command, subprocess_env

MODULE = "examples.fastapi_app"
USERS = [f"u{i}" for i in range(5)]
EVENTS = 250
ADD_RESULT_FIELDS = {"batch_id", "sequence", "added", "pending", "flushed", "status", "sealed"}


@pytest.fixture
def example(
    redis_server: RedisServer, real_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    """The example module, freshly imported with REDIS_URL pointing at the test server."""
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    sys.modules.pop(MODULE, None)
    module = importlib.import_module(MODULE)
    assert module.abatcher.url == redis_server.url
    yield module
    sys.modules.pop(MODULE, None)  # the next test gets its own batcher (and event loop)


def serve(module: ModuleType, scenario: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    """Run ``scenario`` with a client of the app, inside the app's lifespan (startup: register,
    shutdown: close the batcher), in a fresh event loop."""

    async def main() -> None:
        app = module.app
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                await scenario(client)

    asyncio.run(main())


def run_worker(url: str) -> subprocess.CompletedProcess[str]:
    """The docstring's worker command, in burst mode: deliver what is due, exit."""
    proc = subprocess.run(
        cli_command("worker", "examples.fastapi_app:abatcher", "--redis-url", url, "--burst"),
        cwd=ROOT,
        env=subprocess_env(url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"worker exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))


def processed(client: redis.Redis, module: ModuleType) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(module.PROCESSED_KEY, 0, -1)]


@pytest.mark.slow
def test_concurrent_events_are_delivered_once_by_the_worker_command(
    example: ModuleType, redis_server: RedisServer, real_client: redis.Redis
) -> None:
    sent = [{"user": USERS[i % len(USERS)], "n": i, "type": "click"} for i in range(EVENTS)]

    async def scenario(client: httpx.AsyncClient) -> None:
        real_client.config_resetstat()
        responses = await asyncio.gather(*(client.post(f"/events/{e['user']}", json=e) for e in sent))
        for event, response in zip(sent, responses, strict=True):
            assert response.status_code == 202, response.text
            body = response.json()
            assert set(body) == ADD_RESULT_FIELDS
            assert body["batch_id"] == f"user:{event['user']}"
            assert body["sequence"] == 0
            assert body["added"] == 1
            assert body["flushed"] is False and body["sealed"] == 0
            assert body["status"] == "accumulating"
        # group commit: the concurrent requests shared script calls (one per user and round trip)
        assert script_calls(real_client) <= EVENTS // 5
        # group commit still gives every request its own result: per user, the pending counts
        # seen by the 50 requests are exactly 1..50
        for user in USERS:
            pending = sorted(
                r.json()["pending"] for e, r in zip(sent, responses, strict=True) if e["user"] == user
            )
            assert pending == list(range(1, EVENTS // len(USERS) + 1))

        for user in USERS:
            status = await client.get(f"/batches/{user}")
            assert status.status_code == 200, status.text
            batches = status.json()["batches"]
            assert [(b["sequence"], b["status"], b["item_count"]) for b in batches] == [
                (0, "accumulating", EVENTS // len(USERS))
            ]
            flushed = await client.post(f"/batches/{user}/flush")
            assert flushed.status_code == 200, flushed.text
            assert flushed.json() == {
                "batch_id": f"user:{user}",
                "sequence": 0,
                "item_count": EVENTS // len(USERS),
                "flushed": True,
                "status": "flushing",
                "reason": None,
                "retried": [],
            }

        worker = await asyncio.to_thread(run_worker, redis_server.url)
        assert "5 delivered, 0 failed" in worker.stderr, worker.stderr

        for user in USERS:  # delivered and completed: nothing active any more
            assert (await client.get(f"/batches/{user}")).status_code == 404

    serve(example, scenario)

    records = processed(real_client, example)
    assert len(records) == len(USERS)  # one flush per user
    assert all(r["reason"] == "manual" and r["attempt"] == 1 for r in records)
    delivered = Counter((item["user"], item["n"]) for r in records for item in r["items"])
    assert sorted(delivered) == sorted((e["user"], e["n"]) for e in sent)  # nothing lost
    assert set(delivered.values()) == {1}  # nothing twice
    for r in records:  # each batch holds only its own user's events
        assert {f"user:{item['user']}" for item in r["items"]} == {r["batch_id"]}


@pytest.mark.slow
def test_bulk_size_seal_and_errors(
    example: ModuleType, redis_server: RedisServer, real_client: redis.Redis
) -> None:
    items = [{"user": "bulk", "n": i} for i in range(150)]

    posted: list[float] = []

    async def scenario(client: httpx.AsyncClient) -> None:
        posted.append(time.monotonic())  # sequence 1's 1 s timer starts after this
        bulk = await client.post("/events/bulk/bulk", json=items)
        posted.append(time.monotonic())  # ... and before this
        assert bulk.status_code == 202, bulk.text
        # 150 items, max_batch_size 100: sequence 0 sealed full, 50 wait in sequence 1
        assert bulk.json() == {
            "batch_id": "user:bulk",
            "sequence": 1,
            "added": 150,
            "pending": 50,
            "flushed": True,
            "status": "accumulating",
            "sealed": 1,
        }
        empty = await client.post("/events/bulk/bulk", json=[])
        assert empty.status_code == 202 and empty.json()["added"] == 0

        status = (await client.get("/batches/bulk")).json()
        assert [(b["sequence"], b["status"], b["item_count"]) for b in status["batches"]] == [
            (0, "flushing", 100),
            (1, "accumulating", 50),
        ]
        assert status["config"]["name"] == "events" and status["config"]["max_batch_size"] == 100

        # errors: unknown user -> 404, bad batch id -> 422, body not a JSON object -> 422
        assert (await client.get("/batches/nobody")).status_code == 404
        missing = await client.post("/batches/nobody/flush")
        assert missing.status_code == 404 and missing.json()["error"] == "BatchNotFound"
        bad_id = await client.post("/events/a%01b", json={"type": "click"})
        assert bad_id.status_code == 422 and bad_id.json()["error"] == "InvalidBatchId"
        assert (await client.post("/events/u1", json=[1, 2])).status_code == 422
        assert (await client.post("/events/u1/bulk", json={"type": "click"})).status_code == 422

        # the lifespan published the processor config: tools without the app can read it
        assert real_client.hexists(f"{example.PREFIX}:processors", "events")

    serve(example, scenario)

    def delivered() -> list[tuple[int, str, list[int]]]:
        return [
            (r["sequence"], r["reason"], [i["n"] for i in r["items"]])
            for r in processed(real_client, example)
        ]

    sealed = (0, "size", list(range(100)))
    timed_out = (1, "interval", list(range(100, 150)))
    run_worker(redis_server.url)  # delivers the sealed 100; the other 50 wait for their 1 s timer
    if time.monotonic() < posted[0] + 1.0:
        assert delivered() == [sealed]  # the timer cannot have fallen due yet
    else:  # a slow machine: the burst worker may have outlived the timer and delivered both
        assert delivered() in ([sealed], [sealed, timed_out])
    time.sleep(max(0.0, posted[1] + 1.1 - time.monotonic()))
    run_worker(redis_server.url)  # now the timer is due: the other 50, once, by interval
    assert delivered() == [sealed, timed_out]
