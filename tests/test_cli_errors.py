"""The ``redis-batcher`` command facing an operator's mistakes: Redis unreachable, a bad URL, an
unknown processor, the wrong prefix or db, a refused login or command, a full Redis, a bad
worker target. Each ends with one line on stderr and its exit status (1 failure, 2 usage),
never a traceback unless ``--debug`` asks for it. And the application's own connection wins
over ``$REDIS_URL`` in ``redis-batcher worker``.

The commands run as real processes (what an operator sees), or through click's CliRunner where
only the command's own handling matters; every server is a real redis-server of this module.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
import redis
from click.testing import CliRunner, Result

import redis_batcher
from redis_batcher import asyncio as aio
from redis_batcher.cli import main
from redis_batcher.testing import RedisServer, free_port
from tests.apps import pinned
from tests.conftest import ROOT, cli_command, subprocess_env

PASSWORD = "s3cret-pw"


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The last line on stderr (a worker logs before it): what the operator reads."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def start(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``redis-batcher ARGS`` in a process of its own, with neither $REDIS_URL nor
    $REDIS_BATCHER_URL unless ``env`` sets them."""
    base = subprocess_env()
    base.pop("REDIS_URL", None)
    base.pop("REDIS_BATCHER_URL", None)
    return subprocess.Popen(
        cli_command(*args),
        cwd=ROOT,
        env={**base, "COLUMNS": "200", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen[bytes], timeout: float = 60) -> Done:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    return Done(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def run(*args: str, env: dict[str, str] | None = None) -> Done:
    return finish(start(args, env))


def assert_one_line(done: Done, code: int, *expected: str) -> None:
    """Exit status ``code``, no traceback, and the error line holding each of ``expected``."""
    assert done.code == code, done
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    line = done.error_line()
    for text in expected:
        assert text in line, (text, done.stderr)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """In-process, with $REDIS_URL and $REDIS_BATCHER_URL unset unless ``env`` sets them."""
    unset: dict[str, str | None] = {"REDIS_URL": None, "REDIS_BATCHER_URL": None, "COLUMNS": "200"}
    return CliRunner(env={**unset, **(env or {})}).invoke(main, list(args))


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A redis-server of this module's own: its ACL users and memory limit touch no other test."""
    with RedisServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def other_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def db(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    client.flushall()
    try:
        yield client
    finally:
        client.config_set("maxmemory", "0")
        for user in client.acl_users():
            if user != "default":
                client.acl_deluser(user)
        client.close()


@pytest.fixture
def events(server: RedisServer, db: redis.Redis) -> redis_batcher.Processor:
    """A processor "events" registered under prefix "ops" on ``server``."""
    batcher = redis_batcher.Batcher(server.url, prefix="ops")
    proc = batcher.processor(name="events", max_batch_size=100, flush_interval=None)(lambda flush: None)
    batcher.register()
    return proc


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# -- Redis unreachable, and --debug ------------------------------------------------------------

UNREACHABLE = [
    ["ls"],
    ["ls", "--nodes"],
    ["status", "b1", "-p", "events"],
    ["history", "b1", "-p", "events"],
    ["flush", "b1", "-p", "events"],
    ["retry", "b1", "-p", "events"],
    ["layout"],
    ["dead", "ls"],
    ["dead", "purge", "--all", "-p", "events"],
    ["jobs", "ls"],
    ["jobs", "status", "job-1"],
]


def test_every_command_with_redis_unreachable_prints_one_line_and_exits_1() -> None:
    """Each command retries for the CLI's connect_retry (3 s), so they run side by side."""
    url = dead_url()
    port = url.rsplit(":", 1)[1].split("/")[0]
    started = [(args, start([*args, "--redis-url", url])) for args in UNREACHABLE]
    debug = start(["--debug", "ls", "--redis-url", url])
    for args, process in started:
        done = finish(process)
        assert_one_line(done, 1, f"Error: cannot reach Redis at {url}: ", f"connecting to 127.0.0.1:{port}")
        assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert done.stdout == "", args
    done = finish(debug)
    assert done.code == 1 and "Traceback" in done.stderr and "NotSentConnectionError" in done.stderr


# -- bad URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [redis_batcher.Batcher, aio.Batcher])
@pytest.mark.parametrize("url", ["localhost:6411", "redis://127.0.0.1:port/0"])
def test_batcher_refuses_a_url_redis_py_cannot_parse(factory: type, url: str) -> None:
    with pytest.raises(redis_batcher.ConfigError, match="invalid Redis URL") as caught:
        factory(url)
    assert isinstance(caught.value, redis_batcher.BatcherError)


def test_a_bad_url_is_a_usage_error_with_the_password_hidden(server: RedisServer) -> None:
    done = run("ls", "--redis-url", "localhost:6411")
    assert_one_line(done, 2, "Invalid value for", "--redis-url: invalid Redis URL 'localhost:6411'")
    assert "must specify one of the following schemes" in done.error_line()
    done = run("status", "b1", "-p", "events", "--redis-url", f"redis://ops:{PASSWORD}@localhost:noport/0")
    assert_one_line(done, 2, "invalid Redis URL 'redis://ops:***@localhost:noport/0'")
    assert PASSWORD not in done.stderr
    done = run("ls", env={"REDIS_URL": "localhost:6411"})  # from the environment: the same
    assert_one_line(done, 2, "Invalid value for", "--redis-url: invalid Redis URL")
    done = run("worker", "tests.apps.pinned:batcher", "--burst", "--redis-url", "localhost:6411")
    assert_one_line(done, 2, "Invalid value for", "--redis-url: invalid Redis URL 'localhost:6411'")


def test_a_worker_app_with_a_bad_url_exits_1_with_one_line() -> None:
    done = run("worker", "tests.apps.pinned:batcher", "--burst", env={"APP_REDIS_URL": "localhost:6411"})
    assert_one_line(done, 1, "Error: invalid Redis URL 'localhost:6411'")


# -- unknown processor, wrong prefix or db -----------------------------------------------------


def test_an_unknown_processor_is_a_usage_error_naming_prefix_and_server(
    server: RedisServer, events: redis_batcher.Processor
) -> None:
    done = run("status", "b1", "-p", "evnts", "--prefix", "ops", "--redis-url", server.url)
    assert_one_line(done, 2, "processor 'evnts' is not registered under prefix 'ops'", f"at {server.url}")
    done = run("status", "b1", "-p", "events", "--redis-url", server.url)  # prefix left out
    assert_one_line(done, 2, "under prefix 'rb'", f"at {server.url}")


def test_listing_a_prefix_or_db_with_nothing_registered_exits_1(
    server: RedisServer, events: redis_batcher.Processor
) -> None:
    wrong_db = server.url.rsplit("/", 1)[0] + "/3"
    for args, where in [
        (["ls", "--redis-url", server.url], f"prefix 'rb' at {server.url}"),
        (["ls", "--json", "--redis-url", server.url], f"prefix 'rb' at {server.url}"),
        (["ls", "--nodes", "--prefix", "ops", "--redis-url", wrong_db], f"prefix 'ops' at {wrong_db}"),
        (["dead", "ls", "--prefix", "ops", "--redis-url", wrong_db], f"prefix 'ops' at {wrong_db}"),
    ]:
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        assert result.stderr == f"Error: no processors registered under {where}\n"
    assert invoke("ls", "--prefix", "ops", "--redis-url", server.url).exit_code == 0


def test_ls_of_a_processor_without_active_batch_ids_says_so(
    server: RedisServer, events: redis_batcher.Processor
) -> None:
    args = ("ls", "-p", "events", "--prefix", "ops", "--redis-url", server.url)
    result = invoke(*args)
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr == "no active batch ids\n"
    result = invoke(*args, "--json")
    assert result.exit_code == 0 and result.stdout.strip() == "[]"
    events.add("b1", 1)
    result = invoke(*args)
    assert result.exit_code == 0 and result.stdout == "b1\n" and result.stderr == ""


# -- refused by Redis: login, permission, memory --------------------------------------------------


def test_a_refused_login_or_command_exits_1_with_one_line(
    server: RedisServer, db: redis.Redis, events: redis_batcher.Processor
) -> None:
    # "reader" may connect and PING, nothing else: reading the registry is refused (NOPERM)
    db.acl_setuser("reader", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+ping"])
    reader = f"redis://reader:{PASSWORD}@127.0.0.1:{server.port}/0"
    shown = f"redis://reader:***@127.0.0.1:{server.port}/0"
    done = run("ls", "--prefix", "ops", "--redis-url", reader)
    assert_one_line(done, 1, f"Error: permission denied by Redis at {shown}: ", "no permissions")
    wrong = f"redis://reader:wrong-pw@127.0.0.1:{server.port}/0"
    done = run("status", "b1", "-p", "events", "--prefix", "ops", "--redis-url", wrong)
    assert_one_line(
        done, 1, "Error: Redis refused the login at redis://reader:***@", "invalid username-password"
    )
    assert PASSWORD not in done.stderr + done.stdout and "wrong-pw" not in done.stderr
    assert db.hgetall("ops:processors").keys() == {b"events"}  # nothing written


def test_out_of_memory_exits_1_with_one_line(
    server: RedisServer, db: redis.Redis, events: redis_batcher.Processor
) -> None:
    events.add("b1", 1)
    db.config_set("maxmemory", "1")
    done = run("flush", "b1", "-p", "events", "--prefix", "ops", "--redis-url", server.url)
    db.config_set("maxmemory", "0")
    assert_one_line(done, 1, f"Error: Redis is out of memory at {server.url}: ", "maxmemory")
    assert [(b.status, b.item_count) for b in events.sequences("b1")] == [("accumulating", 1)]  # not sealed


# -- the worker -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("nocolon", "expected MODULE:ATTR"),
        ("tests.apps.no_such_app:batcher", "cannot import 'tests.apps.no_such_app'"),
        ("tests.apps.pinned:missing", "has no attribute 'missing'"),
        ("tests.apps.pinned:PREFIX", "is a str, not a Batcher or Processor"),
    ],
)
def test_a_bad_worker_target_is_a_usage_error(target: str, expected: str) -> None:
    assert_one_line(run("worker", target, "--burst"), 2, expected)


def test_demo_refuses_a_flush_interval_of_zero() -> None:
    # 0 would deliver every item alone (None is the "no timer" of the API; the demo has a timer)
    result = invoke("demo", "--flush-interval", "0")
    assert result.exit_code == 2
    assert "--flush-interval" in result.output and "x>0" in result.output


@pytest.mark.parametrize("target", ["tests.apps.pinned:batcher", "tests.apps.pinned:abatcher"])
def test_burst_with_redis_unreachable_exits_1_after_connect_retry(target: str) -> None:
    url = dead_url()
    began = time.monotonic()
    done = run("worker", target, "--burst", env={"APP_REDIS_URL": url})
    took = time.monotonic() - began
    assert_one_line(done, 1, f"Error: cannot reach Redis at {url}: ", "Error 111 connecting to 127.0.0.1")
    assert pinned.CONNECT_RETRY / 2 <= took < 20, took  # it retried for connect_retry, then gave up


# -- the application's own connection wins ---------------------------------------------------------


def test_redis_url_in_the_environment_does_not_redirect_the_worker(
    server: RedisServer, other_server: RedisServer, db: redis.Redis
) -> None:
    """The app (tests/apps/pinned.py) connects to ``server`` through its own setting;
    $REDIS_URL names ``other_server``: the worker serves the app's Redis. --redis-url and
    $REDIS_BATCHER_URL do redirect it."""
    db.acl_setuser(
        "ops", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"], commands=["+@all"]
    )
    app_url = f"redis://ops:{PASSWORD}@127.0.0.1:{server.port}/0"
    other = redis.Redis(host="127.0.0.1", port=other_server.port)
    other.flushall()
    own = redis_batcher.Batcher(server.url, prefix=pinned.PREFIX)
    proc = own.processor(name=pinned.PROCESSOR, max_batch_size=pinned.MAX_BATCH_SIZE, flush_interval=None)(
        lambda flush: None
    )
    proc.add_many("b1", list(range(pinned.MAX_BATCH_SIZE)))  # sealed: due now

    done = run(
        "worker",
        "tests.apps.pinned:batcher",
        "--burst",
        env={"APP_REDIS_URL": app_url, "REDIS_URL": other_server.url},
    )
    assert done.code == 0, done.stderr
    shown = f"redis://ops:***@127.0.0.1:{server.port}/0"
    assert f"worker serving pinned (concurrency 4, burst) at {shown}, prefix 'pinned'" in done.stderr
    assert PASSWORD not in done.stderr
    assert "1 delivered" in done.stderr
    assert [int(i) for i in db.lrange(pinned.DELIVERED_KEY, 0, -1)] == list(range(pinned.MAX_BATCH_SIZE))
    assert other.dbsize() == 0  # the other Redis was never written

    proc.add_many("b2", list(range(pinned.MAX_BATCH_SIZE)))
    for how in (["--redis-url", other_server.url], []):
        env = {"APP_REDIS_URL": app_url, "REDIS_URL": server.url}
        if not how:
            env["REDIS_BATCHER_URL"] = other_server.url
        done = run("worker", "tests.apps.pinned:batcher", "--burst", *how, env=env)
        assert done.code == 0, done.stderr
        assert f"burst) at {other_server.url}, prefix 'pinned'" in done.stderr
        assert "0 delivered" in done.stderr
        assert proc.status("b2") is not None  # left on the app's Redis
        assert other.hkeys("pinned:processors") == [b"pinned"]  # served the other one
        other.flushall()
    other.close()


def test_inspection_commands_read_redis_batcher_url_before_redis_url(
    server: RedisServer, other_server: RedisServer, events: redis_batcher.Processor
) -> None:
    redis.Redis(host="127.0.0.1", port=other_server.port).flushall()
    result = invoke("ls", "--prefix", "ops", env={"REDIS_URL": server.url})
    assert result.exit_code == 0 and "events" in result.stdout, result.output
    env = {"REDIS_URL": server.url, "REDIS_BATCHER_URL": other_server.url}
    result = invoke("ls", "--prefix", "ops", env=env)
    assert result.exit_code == 1 and f"at {other_server.url}" in result.stderr
    result = invoke("ls", "--prefix", "ops", "--redis-url", server.url, env=env)
    assert result.exit_code == 0 and "events" in result.stdout
