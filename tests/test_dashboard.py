"""The web dashboard (``redis-batcher dashboard``) over HTTP, through Starlette's TestClient,
against a real redis-server: every page, the partial refresh, read-only mode, the token, the
session and its CSRF token, the actions and their audit lines, bad input, the CLI's refusal of
a public address without a token, and the Redis cost of a page view whatever the number of
batch ids."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from click.testing import CliRunner
from starlette.testclient import TestClient

import redis_batcher as rb
from redis_batcher import Batcher, Worker, dashboard_reads, ops
from redis_batcher.cli import main
from redis_batcher.dashboard_app import create_app
from redis_batcher.dashboard_auth import SESSION_COOKIE, Access, is_loopback
from redis_batcher.dashboard_rates import RateHistory, sparkline
from redis_batcher.dashboard_web import safe_next
from redis_batcher.errors import ConfigError
from redis_batcher.scripts import scripts
from redis_batcher.testing import RedisServer
from redis_batcher.worker_registry import WorkerInfo

from .conftest import subprocess_env

PREFIX = "dash"
TOKEN = "s3cret-token"


def failing(flush: rb.Flush) -> None:
    raise RuntimeError(f"crm rejected {flush.batch_id}")


class Walk:
    def next_batch(self, cursor: str | None, batch_size: int) -> rb.Page:
        return rb.Page([1], "1", True)

    def process(self, items: list[int], job: rb.JobContext) -> None:
        pass


@pytest.fixture
def app(redis_server: RedisServer, real_client: redis.Redis) -> Batcher:
    """ok: ``a`` holds 2 items accumulating (plus one entry no codec reads), ``b`` one; bad:
    ``x`` dead-lettered; walk: one pending job."""
    batcher = Batcher(redis_server.url, prefix=PREFIX)
    ok = batcher.processor(name="ok", max_batch_size=10, flush_interval=None, codec="json")(lambda f: None)
    bad = batcher.processor(name="bad", max_batch_size=1, flush_interval=None, max_attempts=1)(failing)
    batcher.iterator(name="walk", batch_size=1)(Walk).start("job-1")
    bad.add("x", {"n": 1})
    Worker(batcher, processors=["bad"], iterators=[]).run(burst=True)
    ok.add_many("a", [{"n": 1}, "two"])
    ok.add("b", 3)
    real_client.rpush(ok.keys.for_base("a").open_items("a"), b"\xff\xfe not json")
    return batcher


def reader(redis_server: RedisServer) -> Batcher:
    """The dashboard's own batcher, as the CLI makes it: the registry only."""
    return Batcher(redis_server.url, prefix=PREFIX)


@pytest.fixture
def read_only(app: Batcher, redis_server: RedisServer) -> Iterator[TestClient]:
    with TestClient(create_app(reader(redis_server), sample_interval=None)) as client:
        yield client


@pytest.fixture
def with_token(app: Batcher, redis_server: RedisServer) -> Iterator[TestClient]:
    with TestClient(create_app(reader(redis_server), TOKEN, sample_interval=None)) as client:
        yield client


def login(client: TestClient) -> str:
    """Log in; the CSRF token of the session (read from a page's forms)."""
    reply = client.post("/login", data={"token": TOKEN, "next": "/dead"}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/dead"
    assert SESSION_COOKIE in reply.cookies
    page = client.get("/dead")
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, page.text
    return found.group(1)


def dead_ids(batcher: Batcher, name: str = "bad") -> list[str]:
    return [d.id for d in batcher.remote(name).dead_letters()]


def message(reply: Any) -> str:
    """The outcome an action sends the browser back with."""
    assert reply.status_code == 303, reply.text
    return parse_qs(urlsplit(reply.headers["location"]).query)["msg"][0]


PAGES = [
    "/",
    "/processor?name=ok",
    "/processor?name=bad",
    "/batch?processor=ok&id=a",
    "/dead",
    "/jobs",
    "/workers",
]


def test_every_page_answers_read_only_without_action_buttons(read_only: TestClient, app: Batcher) -> None:
    for path in [*PAGES, f"/dead/show?processor=bad&id={dead_ids(app)[0]}", "/dead?processor=bad"]:
        reply = read_only.get(path)
        assert reply.status_code == 200, (path, reply.text)
        assert "/action/" not in reply.text and "read-only" in reply.text, path
    overview = read_only.get("/").text
    assert 'data-processor="ok"' in overview and 'data-processor="bad"' in overview
    assert "<svg" in overview  # the rate charts
    processor = read_only.get("/processor?name=ok").text
    assert 'data-batch-id="a"' in processor and 'data-batch-id="b"' in processor
    assert read_only.get("/jobs").text.count('data-job-id="job-1"') == 1
    dead = read_only.get(f"/dead/show?processor=bad&id={dead_ids(app)[0]}").text
    assert "RuntimeError: crm rejected x" in dead and "{&#34;n&#34;: 1}" in dead
    for asset in ("/static/dashboard.css", "/static/dashboard.js"):
        assert read_only.get(asset).status_code == 200


def test_the_overview_shows_each_processors_pending_items(read_only: TestClient, app: Batcher) -> None:
    def ok_row() -> str:
        page = read_only.get("/").text
        return page.split('data-processor="ok"', 1)[1].split("</tr>", 1)[0]

    assert '<td data-label="pending items">0</td>' in ok_row()  # a and b still accumulate
    app.remote("ok").flush("b")
    assert '<td data-label="pending items">1</td>' in ok_row()


def test_the_batch_page_decodes_items_and_shows_the_rest_in_hex(read_only: TestClient, app: Batcher) -> None:
    page = read_only.get("/batch?processor=ok&id=a").text
    assert "{&#34;n&#34;: 1}" in page and "&#34;two&#34;" in page
    assert "ff fe 20 6e 6f 74" in page and "the codec cannot decode it" in page
    view = dashboard_reads.batch_view(app.remote("ok"), "a")
    [seq] = view.sequences
    assert seq.items is not None and [i.decoded for i in seq.items] == [True, True, False]
    assert view.history == [] and not view.paused


def test_the_refresh_gets_only_the_live_part(read_only: TestClient) -> None:
    for path in PAGES:
        part = read_only.get(path, headers={"X-Dashboard-Partial": "1"})
        assert part.status_code == 200 and "<html" not in part.text and "<nav>" not in part.text, path
    assert 'data-processor="ok"' in read_only.get("/", headers={"X-Dashboard-Partial": "1"}).text


def test_read_only_refuses_every_action(
    read_only: TestClient, app: Batcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="redis_batcher.dashboard")
    before = dead_ids(app)
    for op, data in [
        ("pause", {"processor": "ok"}),
        ("flush", {"processor": "ok", "batch_id": "a"}),
        ("replay", {"processor": "bad", "id": before[0]}),
        ("purge", {"processor": "bad", "all": "1"}),
        ("job", {"iterator": "walk", "job_id": "job-1", "op": "cancel"}),
    ]:
        reply = read_only.post(f"/action/{op}", data=data, follow_redirects=False)
        assert reply.status_code == 403 and "read-only" in reply.text, op
    assert not app.remote("ok").paused() and dead_ids(app) == before
    assert (
        app.remote("ok").status("a") is not None
        and app.remote("ok").status("a").batches[0].status == "accumulating"
    )  # type: ignore[union-attr]
    assert app.jobs()[0].status == "pending"
    assert read_only.post("/login", data={"token": "x"}, follow_redirects=False).status_code == 303
    assert any("refused action pause" in r.getMessage() for r in caplog.records)


def test_with_a_token_the_pages_need_a_login(with_token: TestClient) -> None:
    reply = with_token.get("/processor?name=ok", follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/login?next=%2Fprocessor%3Fname%3Dok"
    form = with_token.get("/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    wrong = with_token.post("/login", data={"token": "nope", "next": "/"}, follow_redirects=False)
    assert wrong.status_code == 403 and "wrong token" in wrong.text and SESSION_COOKIE not in wrong.cookies
    csrf = login(with_token)
    assert with_token.get("/").status_code == 200 and csrf
    # a forged cookie is no session
    with_token.cookies.set(SESSION_COOKIE, "abc.def")
    assert with_token.get("/", follow_redirects=False).status_code == 303


def test_actions_need_the_session_and_its_csrf_token(
    with_token: TestClient, app: Batcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="redis_batcher.dashboard")
    data = {"processor": "ok", "next": "/processor?name=ok"}
    assert with_token.post("/action/pause", data=data, follow_redirects=False).status_code == 403
    csrf = login(with_token)
    for bad in ({}, {"csrf": "0" * 64}):
        reply = with_token.post("/action/pause", data={**data, **bad}, follow_redirects=False)
        assert reply.status_code == 403 and "CSRF" in reply.text
    assert not app.remote("ok").paused()
    reply = with_token.post("/action/pause", data={**data, "csrf": csrf}, follow_redirects=False)
    assert message(reply) == "paused ok" and reply.headers["location"].startswith("/processor?name=ok&msg=")
    assert app.remote("ok").paused()
    page = with_token.get(reply.headers["location"]).text
    assert "paused ok" in page and ">Resume</button>" in page
    audit = [r.getMessage() for r in caplog.records if r.name == "redis_batcher.dashboard"]
    assert any(
        line.startswith("action pause {'processor': 'ok'} from ") and "paused ok" in line for line in audit
    )
    assert any("refused action pause" in line and "CSRF" in line for line in audit)
    # the session's pages carry the action forms
    assert "/action/resume" in page and f'value="{csrf}"' in page
    # a foreign next is not followed
    reply = with_token.post(
        "/action/resume",
        data={"processor": "ok", "csrf": csrf, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert message(reply) == "resumed ok" and reply.headers["location"].startswith("/?msg=")
    # logging out ends the session
    assert with_token.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert (
        with_token.post("/action/pause", data={**data, "csrf": csrf}, follow_redirects=False).status_code
        == 403
    )


def test_the_bearer_token_acts_without_a_session(with_token: TestClient, app: Batcher) -> None:
    wrong = with_token.post("/action/pause", data={"processor": "ok"}, headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 403
    reply = with_token.post(
        "/action/pause",
        data={"processor": "ok"},
        headers={"Authorization": f"Bearer {TOKEN}"},
        follow_redirects=False,
    )
    assert message(reply) == "paused ok" and app.remote("ok").paused()
    assert with_token.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_flush_replay_purge_and_job_control(
    with_token: TestClient, app: Batcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="redis_batcher.dashboard")
    csrf = login(with_token)

    def act(action: str, /, **fields: str) -> str:
        reply = with_token.post(f"/action/{action}", data={"csrf": csrf, **fields}, follow_redirects=False)
        return message(reply)

    ok = app.remote("ok")
    assert act("flush", processor="ok", batch_id="b") == "flushed b::0 (1 items)"
    assert [s.status for s in ok.sequences("b")] == ["flushing"]
    assert act("flush", processor="ok", batch_id="b") == "nothing flushed: Batch is empty"
    assert act("flush", processor="ok", batch_id="nope").startswith("failed: ")

    [first] = dead_ids(app)
    assert act("replay", processor="bad", id=first) == f"replayed {first} as sequence 1"
    assert dead_ids(app) == [] and app.remote("bad").pending("x") == 1
    Worker(app, processors=["bad"], iterators=[]).run(burst=True)  # fails again: a new dead letter
    [second] = dead_ids(app)
    assert act("replay", processor="bad", id=first).startswith("failed: ")
    assert act("purge", processor="bad", id=second) == "purged 1 dead letter(s) of bad"
    assert act("purge", processor="bad").startswith("failed: purge needs")
    assert dead_ids(app) == []

    assert act("job", iterator="walk", job_id="job-1", op="pause") == "job job-1 of walk: paused"
    assert act("job", iterator="walk", job_id="job-1", op="resume") == "job job-1 of walk: pending"
    assert act("job", iterator="walk", job_id="job-1", op="cancel") == "job job-1 of walk: cancelled"
    assert act("job", iterator="walk", job_id="job-1", op="explode").startswith("failed: unknown job action")
    assert with_token.post("/action/nope", data={"csrf": csrf}).status_code == 404
    audit = [r.getMessage() for r in caplog.records if r.name == "redis_batcher.dashboard"]
    assert sum(line.startswith("action ") for line in audit) == 11


def test_bad_input_gets_a_clear_page_and_redis_is_untouched(read_only: TestClient, real_client: Any) -> None:
    before = sorted(real_client.scan_iter(count=1000))
    for path, status, text in [
        ("/processor?name=nope", 404, "not registered"),
        ("/processor?name=ok&part=7", 400, "no page at partition 7"),
        ("/processor?name=ok&cursor=-1", 400, "whole number"),
        ("/processor", 400, "needs ?name="),
        ("/batch?processor=ok", 400, "needs ?id="),
        ("/dead/show?processor=bad&id=nope", 404, "no dead letter"),
        ("/jobs?status=sleeping", 400, "status must be one of"),
    ]:
        reply = read_only.get(path)
        assert reply.status_code == status and text in reply.text, (path, reply.status_code, reply.text)
    assert sorted(real_client.scan_iter(count=1000)) == before


def test_processor_pages_walk_every_id_by_sscan_cursor(redis_server: RedisServer, real_client: Any) -> None:
    batcher = Batcher(redis_server.url, prefix=PREFIX)
    proc = batcher.processor(name="many", partitions=3, flush_interval=None)(lambda f: None)
    wanted = {f"id:{i}" for i in range(300)}
    for bid in wanted:
        proc.add(bid, 1)
    seen: list[str] = []
    with TestClient(create_app(reader(redis_server), sample_interval=None)) as client:
        path: str | None = "/processor?name=many"
        pages = 0
        while path is not None:
            page = client.get(path).text
            seen += re.findall(r'<tr data-batch-id="([^"]+)"', page)
            found = re.search(r'id="next-page" href="([^"]+)"', page)
            path = found.group(1).replace("&amp;", "&") if found else None
            pages += 1
    assert sorted(seen) == sorted(wanted) and pages > 3
    with pytest.raises(ConfigError):
        dashboard_reads.ids_page(proc, 3, 0)


def test_the_cli_refuses_a_public_address_without_a_token(redis_server: RedisServer) -> None:
    runner = CliRunner()
    for args in (["--host", "0.0.0.0"], ["--host", "192.0.2.7"], ["--host", "::"], ["--token", " "]):
        result = runner.invoke(main, ["dashboard", "--redis-url", redis_server.url, *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "without an access token" in runner.invoke(main, ["dashboard", "--host", "0.0.0.0"]).output


def test_access_rules_and_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))
    assert [safe_next(v) for v in ("/dead?x=1", "//evil", "/\\evil", "http://evil/", None)] == [
        "/dead?x=1",
        "/",
        "/",
        "/",
        "/",
    ]
    access = Access(TOKEN)
    cookie = access.new_session()
    session = access.session(cookie)
    assert session is not None and access.csrf_matches(session, access.csrf(session))
    assert access.session(cookie + "0") is None and not access.csrf_matches(session, "x")
    assert Access(TOKEN).session(cookie) is None  # another process's key
    assert access.bearer(f"Bearer {TOKEN}") and not access.bearer(TOKEN) and not access.bearer(None)
    with pytest.raises(ConfigError):
        Access("  ")
    assert Access(None).read_only and Access(None).session(cookie) is None


def _worker(delivered: int, failed: int, beat: float, processors: list[str]) -> WorkerInfo:
    return WorkerInfo(
        id="w1",
        host="h",
        pid=1,
        version="0",
        kind="sync",
        prefix=PREFIX,
        processors=processors,
        iterators=[],
        concurrency=1,
        started=datetime.fromtimestamp(0, timezone.utc),
        last_beat=datetime.fromtimestamp(beat, timezone.utc),
        inflight=0,
        delivered=delivered,
        failed=failed,
        ttl=15.0,
    )


def test_the_rate_history_keeps_the_last_samples_and_draws_them() -> None:
    rates = RateHistory(size=3)
    rates.record([_worker(0, 0, 10.0, ["ok"])], 10.0)
    rates.record([_worker(50, 5, 20.0, ["ok"])], 20.0)
    rates.record([_worker(50, 5, 20.0, ["ok"])], 25.0)  # no new beat: the same rates
    rates.record([_worker(150, 5, 30.0, ["ok"])], 30.0)
    points = rates.series("ok")
    assert [(p.at, p.flushes, p.failures) for p in points] == [
        (20.0, 5.0, 0.5),
        (25.0, 5.0, 0.5),
        (30.0, 10.0, 0.0),
    ]
    assert [p.flushes for p in rates.series("other")] == [None, None, None]
    assert rates.latest()["w1"].flushes_per_s == 10.0
    svg = sparkline(points)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "10.00 flushes/s" in svg
    assert "no samples yet" in sparkline([])


# -- the cost of a page view ---------------------------------------------------------------------


def _add_ids(client: redis.Redis, proc: rb.Processor, n: int) -> None:
    """``n`` active ids of one item each, by pipelined calls of the add script (setup)."""
    script = scripts().add
    script.load(client)
    encoded = proc.encode([{"n": 1}])
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        call = ops.add_call(proc, f"id:{i}", encoded)
        pipe.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
    assert client.scard(proc.keys.parts[0].ids) == n


def _commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(
        int(v["calls"]) for k, v in stats.items() if not k.startswith(("cmdstat_info", "cmdstat_config"))
    )


def _page_costs(redis_server: RedisServer, client: redis.Redis, n: int) -> dict[str, int]:
    client.flushall()
    batcher = Batcher(redis_server.url, prefix=PREFIX)
    proc = batcher.processor(name="big", flush_interval=None)(lambda f: None)
    batcher.register()
    _add_ids(client, proc, n)
    costs = {}
    with TestClient(create_app(reader(redis_server), sample_interval=None)) as web:
        paths = ["/", "/processor?name=big", "/batch?processor=big&id=id:7", "/dead", "/jobs", "/workers"]
        for path in paths:
            assert web.get(path).status_code == 200  # warm: scripts loaded, connections made
        for path in paths:
            client.config_resetstat()
            assert web.get(path).status_code == 200
            costs[path] = _commands(client)
    return costs


@pytest.mark.slow
def test_a_page_view_costs_the_same_with_100_000_ids_as_with_1_000(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    small = _page_costs(redis_server, real_client, 1_000)
    large = _page_costs(redis_server, real_client, 100_000)
    for path, cost in small.items():
        # SSCAN's COUNT is a hint: a page holds about PAGE_SIZE ids, each one status call
        # (a script: its own commands count too)
        bound = 40 if path != "/processor?name=big" else 20 + 2 * dashboard_reads.PAGE_SIZE * 16
        assert cost <= bound and large[path] <= bound, (path, cost, large[path])
        if path != "/processor?name=big":
            assert large[path] == cost, (path, cost, large[path])


WITHOUT_EXTRA = """
import sys
from importlib.abc import MetaPathFinder


class NoExtra(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("starlette", "uvicorn", "jinja2"):
            raise ModuleNotFoundError(name)
        return None


sys.meta_path.insert(0, NoExtra())
from redis_batcher.cli import main

main(["dashboard", "--redis-url", sys.argv[1]])
"""


def test_without_the_extra_the_cli_works_and_the_dashboard_says_what_to_install(
    redis_server: RedisServer,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA, redis_server.url],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "Error: the dashboard needs starlette, uvicorn and jinja2: pip install 'redis-batcher[dashboard]'"
    ]
