"""The connection layer (redis_batcher/connection.py) against real redis-servers: replies on
RESP2 and RESP3 connections, the client's health checks, and the ways a client reaches its
server (Unix socket, ACL user, database number, TLS, Sentinel), sync and asyncio."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import redis_batcher as rb
from redis_batcher import Batcher, connection
from redis_batcher import asyncio as aio
from redis_batcher.testing import RedisServer, free_port

pytestmark = pytest.mark.timeout(120)

MAP_SCRIPT = "redis.setresp(3); return {map={a=1}}"


def make(batcher: Any, name: str = "c") -> Any:
    return batcher.processor(name=name, max_batch_size=3, flush_interval=None)(lambda flush: None)


# -- replies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_script_replies_on_resp2_and_resp3(redis_server: RedisServer, protocol: int) -> None:
    batcher = Batcher(redis.Redis(port=redis_server.port, protocol=protocol), prefix=f"r{protocol}")
    link = batcher.executor.link
    assert link is not None
    assert link.call((b"EVAL", "return nil", 0)) is None
    assert link.call((b"EVAL", "return false", 0)) is None  # Lua false is a nil reply
    assert link.call((b"EVAL", "return {1, 'x', {2}}", 0)) == [1, b"x", [2]]
    # a map: a RESP3 connection reads it as a dict, RESP2 as the flat list
    assert link.call((b"EVAL", MAP_SCRIPT, 0)) == ({b"a": 1} if protocol == 3 else [b"a", 1])
    with pytest.raises(redis.ResponseError, match="boom"):
        link.call((b"EVAL", "return redis.error_reply('boom')", 0))
    assert link.call((b"PING",)) in (b"PONG", "PONG")  # in step after the error reply
    # the batcher's own replies read the same on both
    proc = make(batcher)
    assert proc.add("a", 1).pending == 1
    assert proc.add_many("a", [2, 3, 4]).sealed == 1
    assert proc.status("a").pending == 4  # type: ignore[union-attr]
    assert proc.flush("a").item_count == 1
    assert rb.Worker(batcher).run(burst=True).delivered == 2
    batcher.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_async_script_replies_on_resp2_and_resp3(redis_server: RedisServer, protocol: int) -> None:
    async def main() -> None:
        ab = aio.Batcher(aioredis.Redis(port=redis_server.port, protocol=protocol), prefix=f"a{protocol}")
        link = ab.executor.link
        assert link is not None
        assert await link.call((b"EVAL", "return nil", 0)) is None
        assert await link.call((b"EVAL", "return false", 0)) is None
        assert await link.call((b"EVAL", "return {1, 'x', {2}}", 0)) == [1, b"x", [2]]
        assert await link.call((b"EVAL", MAP_SCRIPT, 0)) == ({b"a": 1} if protocol == 3 else [b"a", 1])
        with pytest.raises(redis.ResponseError, match="boom"):
            await link.call((b"EVAL", "return redis.error_reply('boom')", 0))
        # a pipeline: the error reply in its place, the others read after it
        replies = await link.request(
            connection.pack((b"EVAL", "return false", 0))
            + connection.pack((b"EVAL", "return redis.error_reply('bad')", 0))
            + connection.pack((b"EVAL", MAP_SCRIPT, 0)),
            3,
        )
        assert replies[0] is None and isinstance(replies[1], redis.ResponseError)
        assert replies[2] == ({b"a": 1} if protocol == 3 else [b"a", 1])
        proc = make(ab)
        assert (await proc.add("a", 1)).pending == 1
        results = await asyncio.gather(*(proc.add(f"g{i % 2}", i) for i in range(6)))  # a pipeline
        assert sorted(r.pending for r in results) == [1, 1, 2, 2, 3, 3]
        assert (await proc.status("a")).pending == 1  # type: ignore[union-attr]
        assert (await proc.flush("a")).item_count == 1
        await ab.aclose()

    asyncio.run(main())


# -- health checks ---------------------------------------------------------------------------------


def kill_others(admin: redis.Redis) -> None:
    assert admin.client_kill_filter(_type="normal", skipme=True) >= 1


@pytest.mark.parametrize("interval", [None, 0.2])
def test_health_check_interval_is_honoured(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, interval: float | None
) -> None:
    """A connection the server closed, idle past the client's health_check_interval: the
    PING before the add finds it closed and the add goes out on a new connection. Without
    a health check (and before the link's own recheck), the add is sent into the closed
    connection: its outcome is unknown."""
    monkeypatch.setattr(connection, "RECHECK_IDLE", 60.0)  # only the health check may help
    options = {} if interval is None else {"health_check_interval": interval}
    batcher = Batcher(redis_server.url, prefix=f"h{interval}", **options)
    admin = redis.Redis(port=redis_server.port)
    proc = make(batcher, "h")
    proc.add("a", 1)
    kill_others(admin)
    time.sleep(0.3)
    if interval is None:
        with pytest.raises(rb.OutcomeUnknownConnectionError):
            proc.add("a", 2)
        assert proc.add("a", 3).pending == 2
    else:
        assert proc.add("a", 2).pending == 2
    batcher.close()
    admin.close()


@pytest.mark.parametrize("interval", [None, 0.2])
def test_async_health_check_interval_is_honoured(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, interval: float | None
) -> None:
    monkeypatch.setattr(connection, "RECHECK_IDLE", 60.0)
    options = {} if interval is None else {"health_check_interval": interval}

    async def main() -> None:
        ab = aio.Batcher(redis_server.url, prefix=f"ah{interval}", **options)
        admin = redis.Redis(port=redis_server.port)
        proc = make(ab, "h")
        await proc.add("a", 1)
        kill_others(admin)
        await asyncio.sleep(0.3)
        if interval is None:
            with pytest.raises(rb.BatcherError) as raised:
                await proc.add("a", 2)
            # the closed connection was written to (outcome unknown) or found closed first
            assert isinstance(raised.value, (rb.OutcomeUnknownError, rb.NotSentError))
            assert (await proc.add("a", 3)).pending in (2, 3)
        else:
            assert (await proc.add("a", 2)).pending == 2
        await ab.aclose()
        admin.close()

    asyncio.run(main())


# -- ways to reach a server ------------------------------------------------------------------------


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    path = str(tmp_path / "redis.sock")
    server = RedisServer(extra_args=["--unixsocket", path, "--unixsocketperm", "700"])
    with server:
        admin = redis.Redis(port=server.port)
        # an ACL user of its own password, limited to the batcher's keys
        admin.acl_setuser(
            "producer",
            enabled=True,
            passwords=["+s3cret"],
            keys=["rb:*"],
            channels=["*"],
            commands=["+@all", "-@dangerous", "+info", "+config|get"],
        )
        admin.close()
        yield server, path


def stored_in(server: RedisServer, db: int) -> list[bytes]:
    probe = redis.Redis(port=server.port, db=db)
    try:
        return sorted(probe.scan_iter("rb:*"))
    finally:
        probe.close()


def test_unix_socket_acl_user_and_db_number(unix_server: tuple[RedisServer, str]) -> None:
    server, path = unix_server
    for url, db in (
        (f"unix://producer:s3cret@{path}?db=3", 3),
        (f"redis://producer:s3cret@127.0.0.1:{server.port}/5", 5),
    ):
        batcher = Batcher(url)
        assert batcher.executor.link is not None
        proc = make(batcher, "u")
        assert proc.add("a", 1).pending == 1
        assert proc.add_many("a", [2]).pending == 2
        assert stored_in(server, db) and not stored_in(server, 0)
        batcher.close()
    with pytest.raises(redis.AuthenticationError):  # a refused login is raised as it is
        make(Batcher(f"unix://producer:wrong@{path}?db=3", connect_retry=0.0), "u").add("a", 1)


def test_async_unix_socket_acl_user_and_db_number(unix_server: tuple[RedisServer, str]) -> None:
    server, path = unix_server

    async def main() -> None:
        for url in (f"unix://producer:s3cret@{path}?db=4", f"redis://producer:s3cret@127.0.0.1:{server.port}/6"):
            ab = aio.Batcher(url)
            assert ab.executor.link is not None
            proc = make(ab, "u")
            assert (await proc.add("a", 1)).pending == 1
            assert [r.pending for r in await asyncio.gather(proc.add("a", 2), proc.add("a", 3))] == [2, 3]
            await ab.aclose()

    asyncio.run(main())
    assert stored_in(server, 4) and stored_in(server, 6) and not stored_in(server, 0)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, str]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make test certificates")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=rb-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    tls_port = free_port()
    server = RedisServer(
        extra_args=[
            "--tls-port", str(tls_port), "--tls-cert-file", str(d / "server.crt"),
            "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", str(d / "ca.crt"),
            "--tls-auth-clients", "no",
        ]
    )  # fmt: skip
    try:
        server.start()
    except rb.BatcherError as exc:  # a redis-server built without TLS
        pytest.skip(f"redis-server cannot serve TLS: {exc}")
    try:
        yield server, tls_port, str(d / "ca.crt")
    finally:
        server.close()


def test_tls(tls_server: tuple[RedisServer, int, str]) -> None:
    server, tls_port, ca = tls_server
    batcher = Batcher(f"rediss://127.0.0.1:{tls_port}/0", ssl_ca_certs=ca)
    assert batcher.executor.link is not None
    proc = make(batcher, "t")
    assert proc.add("a", 1).pending == 1
    assert proc.add_many("a", [2, 3]).sealed == 1
    batcher.close()

    async def main() -> None:
        ab = aio.Batcher(f"rediss://127.0.0.1:{tls_port}/0", ssl_ca_certs=ca)
        proc = make(ab, "t")
        assert (await proc.add("b", 1)).pending == 1
        results = await asyncio.gather(*(proc.add("c", i) for i in range(2)))
        assert sorted(r.pending for r in results) == [1, 2]
        await ab.aclose()

    asyncio.run(main())
    assert stored_in(server, 0)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[int]:
    """A primary and one Sentinel (``redis-server --sentinel``) watching it as "main"."""
    with RedisServer() as primary:
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\nsentinel monitor main 127.0.0.1 {primary.port} 1\n"
        )
        proc = subprocess.Popen(
            [primary.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            probe = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    if probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "main"):
                        break
                except redis.ConnectionError:
                    pass
                assert time.monotonic() < deadline, "the sentinel did not start"
                time.sleep(0.05)
            probe.close()
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def test_sentinel_built_clients(sentinel: int) -> None:
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel
    from redis.sentinel import Sentinel

    client = Sentinel([("127.0.0.1", sentinel)]).master_for("main")
    batcher = Batcher(client, prefix="s")
    assert batcher.executor.link is not None  # its pool finds the primary through the Sentinel
    proc = make(batcher, "s")
    assert proc.add("a", 1).pending == 1
    assert proc.add_many("a", [2]).pending == 2
    batcher.close()

    async def main() -> None:
        ab = aio.Batcher(AsyncSentinel([("127.0.0.1", sentinel)]).master_for("main"), prefix="s")
        assert ab.executor.link is not None
        aproc = make(ab, "s")
        assert (await aproc.add("a", 3)).pending == 3
        # the sequence sealed at 3 items: the next one holds these
        assert sorted(r.pending for r in await asyncio.gather(aproc.add("a", 4), aproc.add("a", 5))) == [1, 2]
        await ab.aclose()

    asyncio.run(main())


def test_the_links_leave_pools_usable_for_redis_py_commands(redis_server: RedisServer) -> None:
    """A pinned connection is checked out of the client's pool: the client's own commands
    (through the same pool) take others, and close() hands it back."""
    client = redis.Redis(port=redis_server.port, client_name="rb-pool")
    batcher = Batcher(client, prefix="p")
    proc = make(batcher, "p")
    proc.add("a", 1)
    assert client.ping()
    names = [c for c in client.client_list() if c.get("name") == "rb-pool"]
    assert len(names) == 2  # the pinned one and the one client_list() went through
    batcher.close()
    assert client.ping()
