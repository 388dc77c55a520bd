"""The producer's connection layer: script calls on a connection the calling thread (or event
loop) keeps, through redis-py's public connection API.

redis-py spends most of a small command's client time around it: a pool checkout and release
per command (each checkout polls the socket), the retry wrapper, reply callbacks, observability
hooks and generic packing. A script call here takes a connection from the client's own pool
once and keeps it: :class:`Link` pins one per thread, :class:`AsyncLink` keeps as many per
event loop as calls run at once. Each call packs its arguments itself (:func:`pack`), writes
them with the connection's ``send_packed_command`` and reads the reply with its
``read_response``. Everything else is redis-py's: connecting (TCP, TLS, Unix socket, a
Sentinel's current primary), the handshake (AUTH with ACL users, SELECT, HELLO 3 for RESP3),
the parser (hiredis when installed), ``socket_timeout`` and the ``health_check_interval`` PING.
Replies are what ``read_response`` gives (``decode_responses=False``), RESP2 or RESP3; an error
reply raises redis-py's exception for it and keeps the connection in step.

Nothing is ever re-sent, and whether a command may have run is decided by where it failed:
taking or connecting a connection, the health check, or writing one command (the server never
runs a command whose last bytes it lacks) raise :class:`~redis_batcher.errors.NotSentError`;
a failure while waiting for the reply (or while writing several commands at once, of which
the first may have gone out whole) raises :class:`~redis_batcher.errors.OutcomeUnknownError`.
redis-py drops a connection that failed mid-request, so the next call on it reconnects.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import BusyLoadingError, ConnectionError, ResponseError, TimeoutError

from .errors import not_sent, raise_not_sent, raise_outcome_unknown

Arg = str | bytes | int | float  # a command argument

# a connection unused for longer than this is handed back to the pool and taken again, which
# makes the pool check it (a server that closed it on idle timeout or restarted is noticed
# before a request goes out); under load the check would cost a poll per call
RECHECK_IDLE = 1.0
_pid = os.getpid()  # this process's id, renewed in a forked child (a system call per call saved)


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


# -- packing -------------------------------------------------------------------------------------

_DIGITS: dict[int, bytes] = {}  # decimal digits of the integers packed so far (most recur)
_HEADS: dict[int, bytes] = {}  # b"$<n>" bulk-string headers by length (items are mostly alike)
_CACHE_MAX = 4096


def pack(command: Sequence[Arg], head: bytes = b"", head_count: int = 0) -> bytes:
    """RESP-encode one command (bulk strings; str as UTF-8, numbers in decimal), the bytes
    redis-py's ``pack_command`` makes, in less time.

    ``head`` is the command's first ``head_count`` arguments already encoded (a script's
    ``EVALSHA sha numkeys``: see :func:`frames`), ``command`` the rest. Each argument adds its
    header and its data to one list joined by CRLF once: two appends per argument, not three."""
    parts: list[bytes] = []
    append = parts.append
    heads = _HEADS
    arg: Any
    for arg in command:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode()
        elif kind is int:
            # a script call's integer arguments are mostly settings: the same few values
            data = _DIGITS.get(arg)
            if data is None:
                data = b"%d" % arg
                if len(_DIGITS) < _CACHE_MAX:
                    _DIGITS[arg] = data
        else:
            data = repr(arg).encode()
        n = len(data)
        frame = heads.get(n)
        if frame is None:
            frame = b"$%d" % n
            if len(heads) < _CACHE_MAX:
                heads[n] = frame
        append(frame)
        append(data)
    append(b"")  # the last argument's CRLF
    return b"*%d\r\n%b%b" % (len(command) + head_count, head, b"\r\n".join(parts))


def frames(args: Sequence[Arg]) -> bytes:
    """The RESP bulk strings of ``args`` without the array header: a ``head`` for :func:`pack`."""
    return pack(args).split(b"\r\n", 1)[1]


# -- taking connections from a pool --------------------------------------------------------------

_NAMED: dict[type, bool] = {}


def _takes_a_command_name(pool: Any) -> bool:
    """True for redis-py's pools before 5.3, whose ``get_connection`` requires a command name;
    later ones take none (and warn when given one)."""
    kind = type(pool)
    named = _NAMED.get(kind)
    if named is None:
        try:
            params = list(inspect.signature(pool.get_connection).parameters.values())
        except (TypeError, ValueError):
            params = []
        named = bool(params) and params[0].default is inspect.Parameter.empty
        _NAMED[kind] = named
    return named


def checkout(pool: Any) -> Any:
    """A connected connection of a sync pool, checked by the pool (``get_connection``)."""
    if _takes_a_command_name(pool):
        return pool.get_connection("EVALSHA")
    return pool.get_connection()


async def acheckout(pool: Any) -> Any:
    """:func:`checkout` for a ``redis.asyncio`` pool."""
    if _takes_a_command_name(pool):
        return await pool.get_connection("EVALSHA")
    return await pool.get_connection()


def _reply_value(exc: BaseException) -> BaseException:
    """An error reply inside a pipeline, as the value in its place: a server still loading its
    data refused that command (NotSentError); any other error reply is the command's."""
    return not_sent(exc) if isinstance(exc, BusyLoadingError) else exc


# -- sync ----------------------------------------------------------------------------------------


class _Pin:
    """The connection one thread of one process keeps, with the link generation it belongs to
    and when it last answered."""

    __slots__ = ("__weakref__", "conn", "finalizer", "gen", "pid", "released", "used")

    def __init__(self, conn: Any, gen: int) -> None:
        self.conn = conn
        self.gen = gen
        self.pid = _pid
        self.used = time.monotonic()
        self.released = False
        self.finalizer: Any = None


def _give_back(pool: Any, conn: Any, pid: int) -> None:
    """A pin's thread ended: its connection goes back to the pool (of this process only: a
    forked child's pool forgets the parent's connections by itself)."""
    if pid == _pid:
        try:
            pool.release(conn)
        except Exception:  # a finalizer must not raise; the pool may be gone already
            pass


class Link:
    """Script calls over a connection pinned per thread, taken from a ``redis.Redis`` client's
    own pool (see the module docstring). A thread keeps its connection until it ends (then the
    connection goes back to the pool) or :meth:`close`. A forked child takes its own."""

    def __init__(self, client: Any) -> None:
        # the client's pool: what a server's abilities are remembered on (scripts.variant)
        self.connection_pool: Any = client.connection_pool
        self._local = threading.local()
        self._pins: weakref.WeakSet[_Pin] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._gen = 0

    @staticmethod
    def supports(client: Any) -> bool:
        """True for a ``redis.Redis`` (any pool and connection class: Sentinel-built clients
        too). Not for a subclass: its ``execute_command`` may be what the application relies
        on (tracing, a test double), so it keeps redis-py's path; nor for a cluster client,
        nor with client-side caching (its connections tie each reply to the command redis-py
        sent last, which needs Redis 7.4 to be tested)."""
        pool = getattr(client, "connection_pool", None)
        return (
            type(client) is redis.Redis
            and isinstance(pool, redis.ConnectionPool)
            and getattr(pool, "cache", None) is None
        )

    def _pin(self, old: _Pin | None) -> _Pin:
        """This thread's connection, (re)taken from the pool: the slow path of a call."""
        if old is not None:
            self._local.pin = None  # given back: never used again, even if no other is taken
            self._unpin(old)
        pool = self.connection_pool
        try:
            conn = checkout(pool)
        except (ConnectionError, TimeoutError) as exc:
            raise_not_sent(exc)
        pin = _Pin(conn, self._gen)
        pin.finalizer = weakref.finalize(pin, _give_back, pool, conn, _pid)
        pin.finalizer.atexit = False
        with self._lock:
            self._pins.add(pin)
        self._local.pin = pin
        return pin

    def _unpin(self, pin: _Pin, disconnect: bool = False) -> None:
        with self._lock:
            if pin.released:
                return
            pin.released = True
            self._pins.discard(pin)
        pin.finalizer.detach()
        if pin.pid != _pid:
            return  # the parent's connection, in a forked child: not this process's to use
        if disconnect:
            pin.conn.disconnect()
        self.connection_pool.release(pin.conn)

    def _conn(self) -> _Pin:
        pin: _Pin | None = getattr(self._local, "pin", None)
        # the common case is checked on the pin alone: made in this process, not closed since
        # (close() starts a new generation), used less than RECHECK_IDLE ago
        if (
            pin is None
            or pin.pid != _pid
            or pin.gen != self._gen
            or time.monotonic() - pin.used > RECHECK_IDLE
        ):
            pin = self._pin(pin)
        return pin

    def call(self, command: Sequence[Arg]) -> Any:
        """Send one command and return its reply."""
        return self.request(pack(command))

    def request(self, data: bytes) -> Any:
        """Send one RESP-encoded command (:func:`pack`) and return its reply."""
        pin = self._conn()
        conn = pin.conn
        try:
            # connects (a connection redis-py dropped after a failure), runs the health check
            # when due, then writes: a failure anywhere here sent nothing that could run
            conn.send_packed_command((data,))
        except (ConnectionError, TimeoutError) as exc:
            raise_not_sent(exc)
        try:
            reply = conn.read_response()
        except ResponseError:
            raise  # an error reply: the connection is in step
        except (ConnectionError, TimeoutError) as exc:
            raise_outcome_unknown(exc)
        pin.used = time.monotonic()
        return reply

    def pipeline(self, data: bytes, count: int) -> list[Any]:
        """Send ``count`` RESP-encoded commands in one write; their replies in order, an error
        reply as its exception object (as redis-py's ``execute(raise_on_error=False)``)."""
        pin = self._conn()
        conn = pin.conn
        try:
            conn.connect()  # a no-op when connected
            conn.check_health()
        except (ConnectionError, TimeoutError) as exc:
            raise_not_sent(exc)
        try:
            conn.send_packed_command((data,), check_health=False)
        except (ConnectionError, TimeoutError) as exc:
            if count > 1:
                raise_outcome_unknown(exc)  # the first commands may have gone out whole
            raise_not_sent(exc)
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(conn.read_response())
                except (ResponseError, BusyLoadingError) as exc:
                    replies.append(_reply_value(exc))
        except (ConnectionError, TimeoutError) as exc:
            raise_outcome_unknown(exc)
        pin.used = time.monotonic()
        return replies

    def close(self) -> None:
        """Disconnect every thread's connection and give it back to the pool; each thread
        takes a new one on its next call."""
        with self._lock:
            self._gen += 1
            pins = list(self._pins)
        for pin in pins:
            self._unpin(pin, disconnect=True)


# -- asyncio -------------------------------------------------------------------------------------


class ClusterNodePool:
    """The connections of one node of a ``redis.asyncio.RedisCluster``, as :class:`AsyncLink`
    takes them from a pool: through the node's own ``acquire_connection`` and ``release``,
    connected (and a connection the server closed while it was free, reconnected) first."""

    def __init__(self, node: Any) -> None:
        self.node = node

    @staticmethod
    def supports(node: Any) -> bool:
        """Whether ``node`` hands its connections back publicly (``release``: redis-py 6+)."""
        return callable(getattr(node, "release", None))

    async def get_connection(self) -> Any:
        conn = self.node.acquire_connection()
        try:
            await conn.connect()  # a no-op when connected
            # as redis-py's pools check a connection they hand out: one with data waiting
            # was closed by the server (or holds a reply nobody read): connect again
            # (can_read since redis-py 8, can_read_destructive before)
            can_read = getattr(conn, "can_read", None) or conn.can_read_destructive
            try:
                stale = await can_read()
            except (ConnectionError, TimeoutError, OSError):
                stale = True
            if stale:
                await conn.disconnect()
                await conn.connect()
        except BaseException:
            self.node.release(conn)
            raise
        return conn

    async def release(self, conn: Any) -> None:
        self.node.release(conn)


class AsyncLink:
    """:class:`Link` for ``redis.asyncio.Redis``: connections taken from the client's pool are
    kept per event loop, each used by one call at a time (concurrent calls each take one), and
    handed back to the pool by :meth:`close`. ``pool`` instead of a client: the connections
    of a :class:`ClusterNodePool`."""

    def __init__(self, client: Any = None, *, pool: Any = None) -> None:
        self.connection_pool: Any = pool if pool is not None else client.connection_pool  # as Link's
        # per event loop: idle (connection, monotonic time of its last reply)
        self._idle: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[tuple[Any, float]]] = (
            weakref.WeakKeyDictionary()
        )
        # the last loop's entry, found without a weak-key lookup (which makes a weakref per call)
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], list[tuple[Any, float]]] | None = None
        self._gen = 0

    @staticmethod
    def supports(client: Any) -> bool:
        """True for a ``redis.asyncio.Redis`` (not a subclass: see :meth:`Link.supports`)."""
        import redis.asyncio as aioredis

        return type(client) is aioredis.Redis and isinstance(
            getattr(client, "connection_pool", None), aioredis.ConnectionPool
        )

    def _idle_list(self) -> list[tuple[Any, float]]:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        idle = self._idle.setdefault(loop, [])
        self._last = (weakref.ref(loop), idle)
        return idle

    async def _take(self, idle: list[tuple[Any, float]]) -> Any:
        pool = self.connection_pool
        try:
            if idle:
                conn, used = idle.pop()
                if time.monotonic() - used <= RECHECK_IDLE:
                    return conn
                # taken again below, which makes the pool check it: a close by the server
                # that the event loop has seen is noticed before anything is sent
                await pool.release(conn)
            return await acheckout(pool)
        except (ConnectionError, TimeoutError) as exc:
            raise_not_sent(exc)

    async def call(self, command: Sequence[Arg]) -> Any:
        """Send one command and return its reply."""
        return await self.request(pack(command))

    async def request(self, data: bytes, count: int = 0) -> Any:
        """Send one RESP-encoded command (:func:`pack`) and return its reply (an error reply
        raises).

        With ``count``: ``data`` is that many commands sent in one write, a pipeline, and the
        result is the list of their replies in order, an error reply as its exception object
        (as redis-py's ``execute(raise_on_error=False)``)."""
        idle = self._idle_list()
        gen = self._gen
        conn = None
        if idle:  # the common case without a coroutine of its own: a connection used just now
            conn, used = idle[-1]
            if time.monotonic() - used <= RECHECK_IDLE:
                idle.pop()
            else:
                conn = None
        if conn is None:
            conn = await self._take(idle)
        done = False
        try:
            if count:
                reply: Any = await self._pipeline(conn, data, count)
            else:
                try:
                    await conn.send_packed_command(data)  # as in Link.request: sent nothing
                except (ConnectionError, TimeoutError) as exc:
                    raise_not_sent(exc)
                try:
                    reply = await conn.read_response()
                except ResponseError:
                    done = True  # an error reply: the connection is in step
                    raise
                except (ConnectionError, TimeoutError) as exc:
                    raise_outcome_unknown(exc)
            done = True
            return reply
        finally:
            if not done and conn.is_connected:
                # failed or cancelled mid-call where redis-py kept the connection: its reply
                # may still come, so it must not serve another call
                await conn.disconnect()
            if gen == self._gen:
                idle.append((conn, time.monotonic() if done else 0.0))
            else:
                await self.connection_pool.release(conn)  # close() ran meanwhile

    @staticmethod
    async def _pipeline(conn: Any, data: bytes, count: int) -> list[Any]:
        try:
            if not conn.is_connected:
                await conn.connect()
            await conn.check_health()
        except (ConnectionError, TimeoutError) as exc:
            raise_not_sent(exc)
        try:
            await conn.send_packed_command(data, check_health=False)
        except (ConnectionError, TimeoutError) as exc:
            if count > 1:
                raise_outcome_unknown(exc)  # the first commands may have gone out whole
            raise_not_sent(exc)
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(await conn.read_response())
                except (ResponseError, BusyLoadingError) as exc:
                    replies.append(_reply_value(exc))
        except (ConnectionError, TimeoutError) as exc:
            raise_outcome_unknown(exc)
        return replies

    async def close(self) -> None:
        """Disconnect this event loop's idle connections and hand them back to the pool (calls
        in flight hand theirs back when they end)."""
        loop = asyncio.get_running_loop()
        self._gen += 1
        self._last = None
        for conn, _ in self._idle.pop(loop, []):
            await conn.disconnect()
            await self.connection_pool.release(conn)
