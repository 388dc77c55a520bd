"""The producer's hot path to Redis: script calls on a connection the calling thread keeps.

redis-py spends far more client time around a small command than on it: pool checkout and
release, a readiness poll that toggles the socket's blocking mode, observability hooks, generic
packing, a parser several calls deep and reply callbacks. Measured on the benchmark machine, a
bare socket round trip costs ~11 µs of client CPU and the same RPUSH through ``redis.Redis``
~180 µs. An add is one EVALSHA with a short string reply, so :class:`DirectLink` connects with
redis-py (host, auth, TLS, db, RESP version, timeouts: the client's own pool settings) and then
frames commands and reads RESP2 replies itself. :class:`AsyncDirectLink` does the same for
``redis.asyncio`` clients (over the connection's stream): lone adds, and the group commit's
pipelined script calls.

Replies are what redis-py gives with ``decode_responses=False``; error replies raise the same
exception classes (an error reply keeps the connection in step). Any other failure closes the
connection, and nothing is ever re-sent: a script that may have run never runs twice. A
failure while connecting or writing the request raises :class:`~redis_batcher.errors.NotSentError`
(the command did not run), one while waiting for the reply
:class:`~redis_batcher.errors.OutcomeUnknownError`.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import select
import socket
import ssl
import struct
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import ConnectionError, InvalidResponse, ResponseError, TimeoutError

from .errors import raise_not_sent, raise_outcome_unknown

Arg = str | bytes | int | float  # a command argument

_RECV = 65536
# a connection that answered less than this many seconds ago is used without the liveness
# check (one system call of the three an add costs); a server restart inside that window
# fails one call with OutcomeUnknownError (the request went out on a closed connection), and
# the next call reconnects
RECHECK_IDLE = 1.0
# Linux enforces a blocking socket's timeouts itself (SO_RCVTIMEO/SO_SNDTIMEO): see _kernel_timeouts
_KERNEL_TIMEOUTS = sys.platform.startswith("linux")
_pid = os.getpid()  # this process's id, renewed in a forked child (a system call per call saved)


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _kernel_timeouts(sock: Any) -> None:
    """Hand a plain TCP or Unix socket's timeout to the kernel: with a Python-level timeout,
    every send and receive is preceded by a poll() (two more system calls per round trip, each
    letting go of the GIL: under a worker's threads, that is most of its system time). The
    socket becomes blocking with SO_SNDTIMEO/SO_RCVTIMEO set to the same timeout; a timed-out
    call then fails with EAGAIN, raised as redis-py's TimeoutError. TLS sockets keep theirs."""
    timeout = sock.gettimeout()
    if not _KERNEL_TIMEOUTS or not timeout or timeout <= 0 or isinstance(sock, ssl.SSLSocket):
        return
    usec = max(round(timeout * 1e6), 1)
    tv = struct.pack("ll", usec // 1_000_000, usec % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.settimeout(None)


_DIGITS: dict[int, bytes] = {}  # decimal digits of the integers packed so far (most recur)
_HEADS: dict[int, bytes] = {}  # b"$<n>" bulk-string headers by length (items are mostly alike)
_CACHE_MAX = 4096


def pack(command: Sequence[Arg], head: bytes = b"", head_count: int = 0) -> bytes:
    """RESP-encode one command (bulk strings; str as UTF-8, numbers in decimal).

    ``head`` is the command's first ``head_count`` arguments already encoded (a script's
    ``EVALSHA sha numkeys``: see :func:`frames`), ``command`` the rest. Each argument adds its
    header and its data to one list joined by CRLF: for an add_many of 100 items ~1.6x faster
    than appending three pieces per argument, and no slower for a single add."""
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


def _parse(buf: bytearray, pos: int, parse_error: Any) -> tuple[Any, int] | None:
    """One RESP2 reply from ``buf[pos:]``: (value, end position), or None while incomplete.
    Bulk strings are bytes, integers int, nil None, arrays lists; error replies are exception
    objects (from redis-py's ``parse_error``, so the classes match redis-py's)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = int(buf[pos + 1 : end])
        pos = end + 2
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            return None
        return bytes(buf[pos : pos + n]), pos + n + 2
    if kind == 42:  # * array
        n = int(buf[pos + 1 : end])
        pos = end + 2
        if n < 0:
            return None, pos
        items: list[Any] = []
        size = len(buf)
        for _ in range(n):
            if pos >= size:
                return None
            kind = buf[pos]
            if kind == 36 or kind == 58:  # bulk strings and integers inline (script replies)
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    return None
                m = int(buf[pos + 1 : end])
                pos = end + 2
                if kind == 58:
                    items.append(m)
                elif m < 0:
                    items.append(None)
                elif size < pos + m + 2:
                    return None
                else:
                    items.append(bytes(buf[pos : pos + m]))
                    pos += m + 2
                continue
            got = _parse(buf, pos, parse_error)
            if got is None:
                return None
            item, pos = got
            items.append(item)
        return items, pos
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 43:  # + simple string
        return bytes(buf[pos + 1 : end]), end + 2
    if kind == 45:  # - error
        return parse_error(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise InvalidResponse(f"Protocol error, got {bytes(buf[pos:end])[:40]!r}")


def _whole_bulk(data: bytes) -> bytes | None:
    """The value of ``data`` when it is exactly one bulk string reply, else None (a nil too):
    the common case of a script call's reply, read whole at once, taken without the general
    parser."""
    if data[:1] == b"$":
        end = data.find(b"\r\n")
        n = int(data[1:end]) if end > 0 else -1
        if n >= 0 and len(data) == end + n + 4:
            return data[end + 2 : end + 2 + n]
    return None


def _pop(buf: bytearray, got: tuple[Any, int]) -> Any:
    """Remove a parsed reply from the buffer; return it (an error reply as its exception)."""
    value, end = got
    del buf[:end]
    return value


def _take(buf: bytearray, got: tuple[Any, int]) -> Any:
    value = _pop(buf, got)
    if isinstance(value, Exception):
        # top-level error replies raise, as redis-py's do: not only ResponseErrors (a server
        # still loading its data answers LOADING, which redis-py maps to BusyLoadingError,
        # a ConnectionError; returned as a value, a caller would parse it as a reply)
        raise value
    return value


class _Replies:
    """The buffer of one connection's RESP2 replies (``_parse``/``_take`` read it); no I/O of
    its own: the sync and asyncio readers below feed it."""

    __slots__ = ("buf", "parse_error")

    def __init__(self, parse_error: Any) -> None:
        self.parse_error = parse_error
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Bytes just read; none means the server closed the connection."""
        if not data:
            raise ConnectionError("Connection closed by server.")
        self.buf += data


class _Reader(_Replies):
    """RESP2 replies from one blocking socket; also what :meth:`DirectLink.request` checks on
    every call: the process that made it, the link's generation, the time of its last use."""

    __slots__ = ("gen", "pid", "sock", "used")

    def __init__(self, sock: Any, parse_error: Any, gen: int = 0) -> None:
        super().__init__(parse_error)
        self.sock = sock
        self.pid = _pid
        self.gen = gen
        self.used = 0.0

    def reply(self) -> Any:
        buf = self.buf
        while not buf or (got := _parse(buf, 0, self.parse_error)) is None:
            try:
                data = self.sock.recv(_RECV)
            except (builtins.TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO
                raise TimeoutError("Timeout reading from socket") from None
            except OSError as exc:
                raise ConnectionError(f"Error while reading from socket: {exc}") from exc
            if not buf and (value := _whole_bulk(data)) is not None:
                return value
            self.feed(data)
        return _take(buf, got)


class _AsyncReader(_Replies):
    """RESP2 replies from an asyncio stream."""

    __slots__ = ("stream",)

    def __init__(self, stream: Any, parse_error: Any) -> None:
        super().__init__(parse_error)
        self.stream = stream

    async def reply(self) -> Any:
        buf = self.buf
        while not buf or (got := _parse(buf, 0, self.parse_error)) is None:
            data = await self._read()
            if not buf and (value := _whole_bulk(data)) is not None:
                return value
            self.feed(data)
        return _take(buf, got)

    async def replies(self, count: int) -> list[Any]:
        """The next ``count`` replies, as a pipeline gives them: an error reply is its
        exception object, not raised (the connection stays in step)."""
        buf = self.buf
        out: list[Any] = []
        while len(out) < count:
            got = _parse(buf, 0, self.parse_error)
            if got is None:
                self.feed(await self._read())
                continue
            out.append(_pop(buf, got))
        return out

    async def _read(self) -> bytes:
        try:
            data: bytes = await self.stream.read(_RECV)
        except OSError as exc:
            raise ConnectionError(f"Error while reading from socket: {exc}") from exc
        return data


def _alive(conn: Any) -> bool:
    """True when an idle connection has nothing to read: not closed by the server, no stray
    reply. One zero-timeout select (redis-py's can_read toggles the socket's blocking mode
    around a read: three system calls). TLS sockets may hold decrypted bytes the kernel does
    not see: they take redis-py's way."""
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
    """Per-thread connections for script calls on a plain ``redis.Redis`` client (see the
    module docstring). Connections are per process (a forked child opens its own) and are
    closed by :meth:`close`."""

    def __init__(self, client: redis.Redis) -> None:
        pool: Any = client.connection_pool
        # the client's pool: what a server's abilities are remembered on (scripts.variant)
        self.connection_pool: Any = pool
        self._make: Any = lambda: pool.connection_class(**pool.connection_kwargs)
        self._local = threading.local()
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._gen = 0

    @staticmethod
    def supports(client: Any) -> bool:
        """True for a ``redis.Redis`` speaking RESP2 on a standard pool of TCP, TLS or Unix
        connections (not a cluster, Sentinel, client-side cache or a test double)."""
        if type(client) is not redis.Redis:
            return False
        pool: Any = getattr(client, "connection_pool", None)
        return (
            type(pool) in (redis.ConnectionPool, redis.BlockingConnectionPool)
            and pool.connection_class in _DIRECT_CONNECTIONS
            and getattr(pool, "cache", None) is None
            and str(pool.connection_kwargs.get("protocol") or 2) == "2"
        )

    def _reader(self) -> _Reader:
        """This thread's reader, its connection (re)made or checked first when needed: the
        slow path of :meth:`request`."""
        local = self._local
        conn = getattr(local, "conn", None)
        reader: _Reader | None = getattr(local, "reader", None)
        if conn is None or conn.pid != _pid:
            conn = local.conn = self._make()
            reader = local.reader = None
            with self._lock:
                self._open.add(conn)
        elif (
            conn._sock is not None
            and reader is not None
            and time.monotonic() - reader.used > RECHECK_IDLE
            and not _alive(conn)
        ):
            # like the pool's checkout: a socket the server closed (idle timeout, restart)
            # is replaced now, before anything is sent
            conn.disconnect()
        if conn._sock is None:
            conn.connect()  # a failure here sent nothing
        if reader is None or reader.sock is not conn._sock or reader.gen != self._gen:
            _kernel_timeouts(conn._sock)
            reader = local.reader = _Reader(conn._sock, conn._parser.parse_error, self._gen)
        return reader

    def call(self, command: Sequence[Arg]) -> Any:
        """Send one command and return its reply."""
        return self.request(pack(command))

    def request(self, data: bytes) -> Any:
        """Send one RESP-encoded command (:func:`pack`) and return its reply."""
        now = time.monotonic()
        reader: _Reader | None = getattr(self._local, "reader", None)
        # the common case is checked on the reader alone (one thread-local lookup: under load
        # every lookup after a blocking read costs cache misses): made in this process, not
        # closed since (close() starts a new generation), used less than RECHECK_IDLE ago
        if (
            reader is None
            or reader.pid != _pid
            or reader.gen != self._gen
            or now - reader.used > RECHECK_IDLE
        ):
            try:
                reader = self._reader()
            except (ConnectionError, TimeoutError) as exc:
                raise_not_sent(exc)
        try:
            try:
                reader.sock.sendall(data)
            except (builtins.TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO
                # one command: the server never runs a request whose last bytes it lacks
                raise_not_sent(TimeoutError("Timeout writing to socket"))
            except OSError as exc:
                failed = ConnectionError(f"Error while writing to socket: {exc}")
                failed.__cause__ = exc
                raise_not_sent(failed)  # its cause: failed, whose cause is exc
            try:
                reply = reader.reply()
            except (ConnectionError, TimeoutError) as exc:
                raise_outcome_unknown(exc)
            reader.used = now
            return reply
        except ResponseError:
            raise  # an error reply: the connection is in step
        except BaseException:
            self._local.conn.disconnect()
            self._local.reader = None
            raise

    def close(self) -> None:
        """Close every connection this link opened (in any thread)."""
        self._gen += 1  # every thread's reader is made anew (on a new connection) on next use
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            conn.disconnect()


async def _async_stale(conn: Any) -> bool:
    """An idle asyncio connection the server closed, or with bytes nobody asked for. The event
    loop may not have seen an EOF yet, so the socket itself is asked (one zero-timeout select)."""
    try:
        if await conn.can_read():
            return True
    except ConnectionError:
        return True
    writer: Any = getattr(conn, "_writer", None)
    if writer is None:
        return False
    sock = writer.get_extra_info("socket")
    if sock is None or writer.get_extra_info("sslcontext") is not None:
        return False  # TLS: decrypted bytes may wait in the SSL layer; can_read answered
    try:
        readable, _, _ = select.select((sock,), (), (), 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


_Idle = tuple[Any, "_AsyncReader | None", float]
# asyncio.timeout (Python 3.11+) arms a timer on the calling task; asyncio.wait_for runs the read
# as a task of its own: three more event loop iterations per round trip (measured: a lone add on
# a default client ~1.6x the sync add's latency with wait_for, ~1.5x without)
_timeout: Any = getattr(asyncio, "timeout", None)


class AsyncDirectLink:
    """:class:`DirectLink` for ``redis.asyncio.Redis``: idle connections are kept per event
    loop and taken by one call at a time (concurrent lone adds each get their own). A call
    cancelled or failed mid-flight closes its connection (its reply may still be on the way);
    an error reply keeps it."""

    def __init__(self, client: Any) -> None:
        pool: Any = client.connection_pool
        self.connection_pool: Any = pool  # as DirectLink's
        self._make: Any = lambda: pool.connection_class(**pool.connection_kwargs)
        # per event loop: idle (connection, its reader or None, monotonic time of last use)
        self._idle: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Idle]] = (
            weakref.WeakKeyDictionary()
        )
        # the last loop's entry, found without a weak-key lookup (which makes a weakref per call)
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], list[_Idle]] | None = None

    @staticmethod
    def supports(client: Any) -> bool:
        """True for a ``redis.asyncio.Redis`` on a standard pool of TCP, TLS or Unix connections."""
        import redis.asyncio as aioredis
        from redis.asyncio import connection as aioconn

        if type(client) is not aioredis.Redis:
            return False
        pool: Any = getattr(client, "connection_pool", None)
        return (
            type(pool) in (aioconn.ConnectionPool, aioconn.BlockingConnectionPool)
            and pool.connection_class
            in (aioconn.Connection, aioconn.SSLConnection, aioconn.UnixDomainSocketConnection)
            and getattr(pool, "cache", None) is None
        )

    async def call(self, command: Sequence[Arg]) -> Any:
        """Send one command and return its raw reply."""
        return await self.request(pack(command))

    async def request(self, data: bytes, count: int = 0) -> Any:
        """Send one RESP-encoded command (:func:`pack`) and return its raw reply (an error
        reply raises).

        With ``count``: ``data`` is that many commands sent in one write, a pipeline, and the
        result is the list of their replies in order, an error reply as its exception object
        (as redis-py's ``execute(raise_on_error=False)``)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            idle = last[1]
        else:
            idle = self._idle.setdefault(loop, [])
            self._last = (weakref.ref(loop), idle)
        conn, reader, used = idle.pop() if idle else (self._make(), None, 0.0)
        keep = False
        try:
            try:
                # as in DirectLink: only a connection idle for RECHECK_IDLE is checked first
                if conn.is_connected and time.monotonic() - used > RECHECK_IDLE and await _async_stale(conn):
                    await conn.disconnect()
                if not conn.is_connected:
                    await conn.connect()  # a failure here sent nothing
            except (ConnectionError, TimeoutError) as exc:
                raise_not_sent(exc)
            if reader is None or reader.stream is not conn._reader:
                reader = _AsyncReader(conn._reader, conn._parser.parse_error)
            try:
                writer = conn._writer
                writer.write(data)
                if writer.transport.get_write_buffer_size():  # not all sent at once: flow control
                    await writer.drain()
            except OSError as exc:
                failed = ConnectionError(f"Error while writing to socket: {exc}")
                failed.__cause__ = exc
                # several commands in one write: a partial write may hold whole ones, which run
                if count > 1:
                    raise_outcome_unknown(failed)
                raise_not_sent(failed)
            read = reader.replies(count) if count else reader.reply()
            try:
                if conn.socket_timeout:  # redis-py's default is 5 s: nearly always
                    try:
                        if _timeout is not None:
                            async with _timeout(conn.socket_timeout):
                                reply = await read
                        else:
                            reply = await asyncio.wait_for(read, conn.socket_timeout)
                    except asyncio.TimeoutError:
                        raise TimeoutError("Timeout reading from socket") from None
                else:
                    reply = await read
            except (ConnectionError, TimeoutError) as exc:
                raise_outcome_unknown(exc)
            keep = True
            return reply
        except ResponseError:
            keep = True  # an error reply: the connection is in step
            raise
        finally:
            if keep:
                idle.append((conn, reader, time.monotonic()))
            else:
                await conn.disconnect(nowait=True)

    async def close(self) -> None:
        """Close this event loop's idle connections."""
        loop = asyncio.get_running_loop()
        self._last = None
        for conn, _, _ in self._idle.pop(loop, []):
            await conn.disconnect()
