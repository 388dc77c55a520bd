"""The one thin layer through which Python talks to the Lua scripts.

Each atomic operation is a file in the top-level ``lua/`` directory (shipped inside the wheel as
``redis_batcher/lua``). ``_common.lua`` is prepended to each. Scripts run with EVALSHA; when the
server answers NOSCRIPT (after ``SCRIPT FLUSH``, a restart or a failover) the call is repeated
once with EVAL, which also puts the script back into the server's cache. EVAL is routed like
EVALSHA, so this works unchanged on Redis Cluster.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

SCRIPT_NAMES = (
    "add",
    "flush",
    "claim",
    "ack",
    "nack",
    "extend",
    "release",
    "status",
    "delete",
    "replay",
    "purge",
)
# iterator jobs (redis_batcher.jobs): _jobs.lua is prepended to these after _common.lua
JOB_SCRIPT_NAMES = (
    "job_start",
    "job_claim",
    "job_commit",
    "job_fail",
    "job_finish",
    "job_extend",
    "job_release",
    "job_pause",
    "job_resume",
    "job_cancel",
    "job_delete",
)

Arg = str | bytes | int | float


def lua_dir() -> Path:
    """Where the ``.lua`` files are: inside the installed package, else the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "lua", here.parent / "lua"):
        if (candidate / "_common.lua").is_file():
            return candidate
    raise FileNotFoundError(f"redis-batcher Lua scripts not found next to {here}")


class Script:
    """One Lua script: its full source and SHA1."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run on a sync redis-py client (``Redis`` or ``RedisCluster``)."""
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)

    def call_and_wait(
        self, client: Any, keys: Sequence[str], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """Run and ``WAIT replicas timeout_ms`` in one pipelined round trip.

        Returns (script reply, replicas that acknowledged)."""
        for command in ("EVALSHA", "EVAL"):
            pipe = client.pipeline(transaction=False)
            head = self.sha if command == "EVALSHA" else self.source
            pipe.execute_command(command, head, len(keys), *keys, *args)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            try:
                reply, acked = pipe.execute()
            except NoScriptError:
                continue
            return reply, int(acked)
        raise AssertionError("unreachable: EVAL never answers NOSCRIPT")

    def call_direct(self, link: DirectLink, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run over a :class:`DirectLink` (this thread's own connection)."""
        try:
            return link.call((b"EVALSHA", self.sha, len(keys), *keys, *args))
        except NoScriptError:
            return link.call((b"EVAL", self.source, len(keys), *keys, *args))

    async def call_async(self, client: Any, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run on an asyncio redis-py client."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


def _pack(command: Sequence[Arg]) -> bytes:
    """RESP-encode one command (bulk strings; str as UTF-8, numbers in decimal)."""
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _alive(conn: Any) -> bool:
    """True when a connection has nothing to read: not closed by the server, no stray reply.
    One zero-timeout select (redis-py's can_read toggles the socket's blocking mode around a
    read: three system calls on every add). TLS sockets may hold decrypted bytes the kernel
    does not see: they take redis-py's way."""
    if isinstance(conn, redis.SSLConnection):
        try:
            return not conn.can_read()
        except (ConnectionError, OSError):
            return False
    try:
        readable, _, _ = select.select((conn._sock,), (), (), 0)
    except (OSError, ValueError):
        return False
    return not readable  # readable: EOF (closed) or bytes nobody asked for


_DIRECT_CONNECTIONS = (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection)


class DirectLink:
    """Per-thread connections for script calls on a plain ``redis.Redis`` client.

    redis-py spends most of a small command's client time outside the socket: pool checkout
    and release, a readiness poll, observability hooks, argument packing and reply callbacks.
    An add is one EVALSHA whose reply is a short string, so the producer's hot path sends it
    pre-packed on a connection this thread keeps (made from the client's own pool settings:
    host, auth, TLS, db, timeouts) and reads the raw reply. Replies and errors are those of
    the client: a script error raises ``ResponseError`` and keeps the connection; any other
    failure closes it, and the next call reconnects. Connections are per process (a forked
    child opens its own) and are closed by :meth:`close`.
    """

    def __init__(self, client: redis.Redis) -> None:
        pool: Any = client.connection_pool
        self._make: Any = lambda: pool.connection_class(**pool.connection_kwargs)
        self._local = threading.local()
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    @staticmethod
    def supports(client: Any) -> bool:
        """True for a ``redis.Redis`` on a standard pool of TCP, TLS or Unix connections (not a
        cluster, Sentinel, client-side cache or a test double)."""
        if type(client) is not redis.Redis:
            return False
        pool: Any = getattr(client, "connection_pool", None)
        return (
            type(pool) in (redis.ConnectionPool, redis.BlockingConnectionPool)
            and pool.connection_class in _DIRECT_CONNECTIONS
            and getattr(pool, "cache", None) is None
        )

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.pid != os.getpid():
            conn = self._make()
            self._local.conn = conn
            with self._lock:
                self._open.add(conn)
        elif conn._sock is not None and not _alive(conn):
            # like the pool's checkout: a socket the server closed (idle timeout, restart)
            # is replaced now, before anything is sent
            conn.disconnect()
        if conn._sock is None:
            conn.connect()  # a failure here sent nothing
        return conn

    def call(self, command: Sequence[Arg]) -> Any:
        """Send one command and return its raw reply."""
        conn = self._connection()
        try:
            conn.send_packed_command((_pack(command),), check_health=False)
            return conn.read_response()
        except ResponseError:
            raise  # an error reply: the connection is in step
        except BaseException:
            conn.disconnect()
            raise

    def close(self) -> None:
        """Close every connection this link opened (in any thread)."""
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            conn.disconnect()


_HELPER = re.compile(r"^local function (\w+)\(", re.M)


def link_helpers(libraries: Sequence[str], body: str) -> str:
    """Each library's header (what precedes its first ``local function``: comments, shared
    constants) plus only the helpers ``body`` uses, directly or through other helpers, in file
    order. Redis runs a script's whole chunk on every call, so each unused helper would cost a
    closure per call (all of ``_common.lua``'s: ~3.6 µs on an add)."""
    headers: list[str] = []
    blocks: dict[str, str] = {}
    for text in libraries:
        found = list(_HELPER.finditer(text))
        headers.append(text[: found[0].start()] if found else text)
        ends = [m.start() for m in found[1:]] + [len(text)]
        blocks.update({m.group(1): text[m.start() : end] for m, end in zip(found, ends, strict=True)})
    needed: set[str] = set()
    todo = [body, *headers]
    while todo:
        text = todo.pop()
        for name, block in blocks.items():
            if name not in needed and re.search(rf"\b{name}\b", text):
                needed.add(name)
                todo.append(block)
    out: list[str] = []
    for header, text in zip(headers, libraries, strict=True):
        out.append(header)
        out.extend(b for n, b in blocks.items() if n in needed and b in text)
    return "\n".join(out)


class ScriptTable:
    """All scripts, loaded once per process."""

    def __init__(self, directory: Path | None = None) -> None:
        directory = directory or lua_dir()
        common = (directory / "_common.lua").read_text()
        self.scripts: dict[str, Script] = {}
        for name in SCRIPT_NAMES:
            body = (directory / f"{name}.lua").read_text()
            self.scripts[name] = Script(name, link_helpers([common], body) + "\n" + body)
        jobs_common = (directory / "_jobs.lua").read_text()
        for name in JOB_SCRIPT_NAMES:
            body = (directory / f"{name}.lua").read_text()
            self.scripts[name] = Script(name, link_helpers([common, jobs_common], body) + "\n" + body)
        self.add = self.scripts["add"]
        self.flush = self.scripts["flush"]
        self.claim = self.scripts["claim"]
        self.ack = self.scripts["ack"]
        self.nack = self.scripts["nack"]
        self.extend = self.scripts["extend"]
        self.status = self.scripts["status"]
        self.delete = self.scripts["delete"]
        self.release = self.scripts["release"]
        self.replay = self.scripts["replay"]
        self.purge = self.scripts["purge"]


_TABLE: ScriptTable | None = None


def scripts() -> ScriptTable:
    """The process-wide script table."""
    global _TABLE
    if _TABLE is None:
        _TABLE = ScriptTable()
    return _TABLE
