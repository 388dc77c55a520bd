"""The one thin layer through which Python talks to the Lua scripts.

Each atomic operation is a file in the top-level ``lua/`` directory (shipped inside the wheel as
``redis_batcher/lua``); the keys they use are described in ``docs/data-layout.md``. The helpers
they share are in ``lua/includes/``, one file per helper, and each file names the helpers it
calls with ``--- @include "<name>"`` lines (BullMQ's convention): a script is sent with exactly
those, resolved recursively (:class:`Includes`). Scripts run with EVALSHA; when the server
answers NOSCRIPT (after ``SCRIPT FLUSH``, a restart or a failover) the call is repeated once
with EVAL, which also puts the script back into the server's cache. EVAL is routed like
EVALSHA, so this works unchanged on Redis Cluster. A call goes out over a link of
:mod:`redis_batcher.connection` (a connection the calling thread or event loop keeps) where the
client has one, else through redis-py's client: on Redis Cluster with the key's node named as
the target, which turns off the cluster client's own retries (a re-sent script runs twice).

Script flags: a ``.lua`` file may start with a Redis 7 shebang line (``#!lua
flags=allow-oom``: the bookkeeping that frees memory or only rewrites a few fields keeps
working while Redis is full). The shebang stays the first line of the composed script.
Servers that cannot compile a shebang (Redis < 7, test doubles) answer EVAL with a Lua syntax
error before running anything; the call is then made with the same script without its shebang,
and that variant is used from then on for that connection pool (or cluster client) only:
other clients, and other servers in the same process, keep their own choice.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import NoScriptError, ResponseError

from .connection import Arg, AsyncLink, Link, frames, pack

SCRIPT_NAMES = (
    "add",
    "flush",
    "retry",
    "claim",
    "ack",
    "nack",
    "extend",
    "release",
    "status",
    "delete",
    "replay",
    "purge",
    "pause",
)
# iterator jobs (redis_batcher.jobs)
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


# the folder of lua_dir() that holds the include files
INCLUDES = "includes"


def lua_dir() -> Path:
    """Where the ``.lua`` files are: inside the installed package, else the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "lua", here.parent / "lua"):
        if (candidate / "add.lua").is_file() and (candidate / INCLUDES).is_dir():
            return candidate
    raise FileNotFoundError(f"redis-batcher Lua scripts not found next to {here}")


# id() of the connection pools (clients without one: the client) whose server cannot compile a
# script with a shebang; each entry leaves with its pool (weakref.finalize)
_NO_FLAGS: set[int] = set()


def _server_of(conn: Any) -> Any:
    """What the flag fallback is remembered on: the connection pool of a client or link (a
    client and its links share it), else the object itself (cluster clients)."""
    pool = getattr(conn, "connection_pool", None)
    return conn if pool is None else pool


def flags_unsupported(conn: Any) -> bool:
    """True once ``conn``'s server was found unable to compile a script with a shebang."""
    return id(_server_of(conn)) in _NO_FLAGS


def _remember_no_flags(conn: Any) -> None:
    owner = _server_of(conn)
    key = id(owner)
    if key in _NO_FLAGS:
        return
    try:
        weakref.finalize(owner, _NO_FLAGS.discard, key)
    except TypeError:  # cannot be weakly referenced: remembered for the process's life
        pass
    _NO_FLAGS.add(key)


def _shebang_refused(exc: BaseException) -> bool:
    """An EVAL error meaning the server's Lua parser met the shebang: the script never ran.
    Lua's own message (Redis < 7: "Error compiling script ... unexpected symbol near '#'",
    fakeredis: "error loading code: ... unexpected symbol near '#'")."""
    return isinstance(exc, ResponseError) and "near '#'" in str(exc)


class ScriptVariant:
    """One source text of a script, its SHA1 and its framed ``EVALSHA sha numkeys`` heads."""

    __slots__ = ("_heads", "sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._heads: dict[int, bytes] = {}  # numkeys -> "EVALSHA sha numkeys", RESP-encoded

    def evalsha_head(self, numkeys: int) -> bytes:
        """``EVALSHA sha numkeys`` as RESP bulk strings (no array header), framed once per
        key count."""
        head = self._heads.get(numkeys)
        if head is None:
            head = self._heads[numkeys] = frames((b"EVALSHA", self.sha, numkeys))
        return head

    def framed(self, keys: Sequence[str], args: Sequence[Arg], *, source: bool = False) -> bytes:
        """``EVALSHA sha numkeys keys... args...`` RESP-encoded for a link, or with ``source``
        ``EVAL`` with the full source."""
        if source:
            return pack((b"EVAL", self.source, len(keys), *keys, *args))
        return pack((*keys, *args), self.evalsha_head(len(keys)), 3)


class Script:
    """One Lua script: its full source and SHA1 (``source``/``sha``: with the shebang, when its
    file has one; ``plain``: the variant without it, for servers without script flags)."""

    def __init__(self, name: str, source: str, shebang: str = "") -> None:
        self.name = name
        self.plain = ScriptVariant(source)
        self.best = ScriptVariant(f"{shebang}\n{source}") if shebang else self.plain
        self.source = self.best.source
        self.sha = self.best.sha

    @property
    def flagged(self) -> bool:
        """The script declares Redis 7 script flags (a shebang)."""
        return self.best is not self.plain

    def variant(self, conn: Any) -> ScriptVariant:
        """The variant to send over ``conn`` (a client or link): the flagged one unless its
        server was found unable to compile it."""
        if self.best is self.plain or id(_server_of(conn)) not in _NO_FLAGS:
            return self.best
        return self.plain

    def fall_back(self, conn: Any, used: ScriptVariant, exc: BaseException) -> bool:
        """After an EVAL of ``used`` failed with ``exc``: True when it was the flagged variant
        and the server could not compile its shebang (the plain one is remembered for
        ``conn``'s pool and must be sent now); False when ``exc`` is the call's real outcome."""
        if used is self.plain or not _shebang_refused(exc):
            return False
        _remember_no_flags(conn)
        return True

    def load(self, client: Any) -> ScriptVariant:
        """``SCRIPT LOAD`` into ``client``'s server the variant it accepts (learning it as a
        call would); returns that variant."""
        v = self.variant(client)
        try:
            client.script_load(v.source)
        except ResponseError as exc:
            if not self.fall_back(client, v, exc):
                raise
            v = self.plain
            client.script_load(v.source)
        return v

    def evalsha_head(self, numkeys: int) -> bytes:
        """The preferred variant's ``EVALSHA sha numkeys`` (see :meth:`ScriptVariant.evalsha_head`)."""
        return self.best.evalsha_head(numkeys)

    def _evalsha(self, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
        """``EVALSHA sha numkeys keys... args...`` RESP-encoded for a link."""
        return self.best.framed(keys, args)

    def framed(
        self, keys: Sequence[str], args: Sequence[Arg], *, source: bool = False, conn: Any = None
    ) -> bytes:
        """This script's call RESP-encoded for a link: ``EVALSHA``, or with ``source``
        ``EVAL`` with the full source (after NOSCRIPT); the variant ``conn`` uses, if given."""
        return (self.best if conn is None else self.variant(conn)).framed(keys, args, source=source)

    def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run on a sync redis-py client (``Redis`` or ``RedisCluster``)."""
        v = self.variant(client)
        target = _routing(client, keys)
        try:
            return client.execute_command("EVALSHA", v.sha, len(keys), *keys, *args, **target)
        except NoScriptError:
            pass
        try:
            return client.execute_command("EVAL", v.source, len(keys), *keys, *args, **target)
        except ResponseError as exc:
            if not self.fall_back(client, v, exc):
                raise
        return client.execute_command("EVAL", self.plain.source, len(keys), *keys, *args, **target)

    def call_and_wait(
        self, client: Any, keys: Sequence[str], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """Run and ``WAIT replicas timeout_ms`` in one pipelined round trip.

        Returns (script reply, replicas that acknowledged)."""
        v = self.variant(client)
        use_eval = False
        while True:
            pipe = client.pipeline(transaction=False)
            if use_eval:
                pipe.execute_command("EVAL", v.source, len(keys), *keys, *args)
            else:
                pipe.execute_command("EVALSHA", v.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            try:
                reply, acked = pipe.execute()
            except NoScriptError:
                use_eval = True  # EVAL never answers NOSCRIPT
                continue
            except ResponseError as exc:
                if not (use_eval and self.fall_back(client, v, exc)):
                    raise
                v = self.plain  # at most once: the plain variant never falls back
                continue
            return reply, int(acked)

    def call_direct(self, link: Link, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run over a :class:`~redis_batcher.connection.Link` (this thread's own connection)."""
        v = self.variant(link)
        try:
            return link.request(v.framed(keys, args))
        except NoScriptError:
            pass
        try:
            return link.request(v.framed(keys, args, source=True))
        except ResponseError as exc:
            if not self.fall_back(link, v, exc):
                raise
        return link.request(self.plain.framed(keys, args, source=True))

    def call_and_wait_direct(
        self, link: Link, keys: Sequence[str], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """:meth:`call_and_wait` over a :class:`~redis_batcher.connection.Link`: the script
        call and ``WAIT`` in one write."""
        v = self.variant(link)
        wait = pack((b"WAIT", replicas, timeout_ms))
        use_eval = False
        while True:
            reply, acked = link.pipeline(v.framed(keys, args, source=use_eval) + wait, 2)
            if isinstance(reply, NoScriptError) and not use_eval:
                use_eval = True  # EVAL never answers NOSCRIPT
                continue
            if use_eval and isinstance(reply, ResponseError) and self.fall_back(link, v, reply):
                v = self.plain  # at most once: the plain variant never falls back
                continue
            for value in (reply, acked):
                if isinstance(value, Exception):
                    raise value
            return reply, int(acked)

    async def call_and_wait_async_direct(
        self, link: AsyncLink, keys: Sequence[str], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """:meth:`call_and_wait_direct` over an :class:`~redis_batcher.connection.AsyncLink`."""
        v = self.variant(link)
        wait = pack((b"WAIT", replicas, timeout_ms))
        use_eval = False
        while True:
            reply, acked = await link.request(v.framed(keys, args, source=use_eval) + wait, 2)
            if isinstance(reply, NoScriptError) and not use_eval:
                use_eval = True  # EVAL never answers NOSCRIPT
                continue
            if use_eval and isinstance(reply, ResponseError) and self.fall_back(link, v, reply):
                v = self.plain  # at most once: the plain variant never falls back
                continue
            for value in (reply, acked):
                if isinstance(value, Exception):
                    raise value
            return reply, int(acked)

    async def call_async_direct(self, link: AsyncLink, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run over an :class:`~redis_batcher.connection.AsyncLink`."""
        v = self.variant(link)
        try:
            return await link.request(v.framed(keys, args))
        except NoScriptError:
            pass
        try:
            return await link.request(v.framed(keys, args, source=True))
        except ResponseError as exc:
            if not self.fall_back(link, v, exc):
                raise
        return await link.request(self.plain.framed(keys, args, source=True))

    async def call_async(self, client: Any, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run on an asyncio redis-py client."""
        v = self.variant(client)
        target = await _async_routing(client, keys)
        try:
            return await client.execute_command("EVALSHA", v.sha, len(keys), *keys, *args, **target)
        except NoScriptError:
            pass
        try:
            return await client.execute_command("EVAL", v.source, len(keys), *keys, *args, **target)
        except ResponseError as exc:
            if not self.fall_back(client, v, exc):
                raise
        return await client.execute_command("EVAL", self.plain.source, len(keys), *keys, *args, **target)


def _routing(client: Any, keys: Sequence[str]) -> dict[str, Any]:
    """redis-py's options for a script call on ``client``: on a cluster client, the node of the
    call's first key as its target. redis-py's cluster clients (5.x to 8.x) retry after a
    connection error or timeout only the commands they route themselves, and a script whose
    reply was lost must not run twice; MOVED and ASK are still followed."""
    if isinstance(client, redis.RedisCluster) and keys:
        cluster: Any = client  # its methods are untyped
        return {"target_nodes": cluster.get_node_from_key(keys[0])}
    return {}


async def _async_routing(client: Any, keys: Sequence[str]) -> dict[str, Any]:
    """:func:`_routing` for ``redis.asyncio`` clients (a cluster client learns its nodes first)."""
    import redis.asyncio as aioredis

    if isinstance(client, aioredis.RedisCluster) and keys:
        await client.initialize()
        return {"target_nodes": client.get_node_from_key(keys[0])}
    return {}


class IncludeError(ValueError):
    """A Lua file's ``--- @include`` lines cannot be resolved: a malformed or repeated line, a name
    with no file in ``lua/includes/``, or includes that form a cycle."""


_INCLUDE = re.compile(r'--- @include "([A-Za-z0-9_]+)"')


def parse_includes(text: str, where: str) -> tuple[list[str], str]:
    """The names a Lua file's ``--- @include "<name>"`` lines give, in their order, and the file's
    text with those lines taken out. ``where`` names the file in errors."""
    names: list[str] = []
    kept: list[str] = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.startswith("--- @include"):
            kept.append(line)
            continue
        found = _INCLUDE.fullmatch(line.rstrip())
        if found is None:
            raise IncludeError(f'{where}:{n}: expected --- @include "<name>", got {line!r}')
        if found.group(1) in names:
            raise IncludeError(f"{where}:{n}: {found.group(1)!r} is included twice")
        names.append(found.group(1))
    return names, "\n".join(kept)


class Includes:
    """The include files of a ``lua/includes/`` folder, each read once.

    A script's includes are resolved recursively: every helper it names, and what those name,
    in one deterministic order -- depth first in the order of the ``--- @include`` lines, each
    file after the files it includes and only once (a Lua ``local function`` must be defined
    before the functions that call it). Redis runs a script's whole chunk on every call, so each
    helper a script does not use would cost a closure per call: a file includes exactly what it
    calls (tests/test_packaging.py checks that)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, tuple[list[str], str]] = {}  # name -> (its includes, its text)

    def _file(self, name: str, needed_by: str) -> tuple[list[str], str]:
        got = self._files.get(name)
        if got is None:
            path = self.directory / f"{name}.lua"
            try:
                text = path.read_text()
            except FileNotFoundError:
                raise IncludeError(f'{needed_by} includes "{name}", but there is no {path}') from None
            if text.startswith("#!"):
                raise IncludeError(f"{path}: an include file cannot have a shebang")
            got = self._files[name] = parse_includes(text, str(path))
        return got

    def resolve(self, names: Sequence[str], where: str) -> list[str]:
        """Every include file that ``names`` (the includes of ``where``) need, dependencies
        first. Raises :class:`IncludeError` for an unknown name or a cycle."""
        order: list[str] = []
        done: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            if name in done:
                return
            if name in path:
                cycle = " -> ".join([*path[path.index(name) :], name])
                raise IncludeError(f"{where}: the includes form a cycle: {cycle}")
            deps, _ = self._file(name, f"{INCLUDES}/{path[-1]}.lua" if path else where)
            for dep in deps:
                visit(dep, [*path, name])
            done.add(name)
            order.append(name)

        for name in names:
            visit(name, [])
        return order

    def assemble(self, text: str, where: str) -> str:
        """``text`` (a script without its shebang) with its include lines replaced by the
        resolved include files, in place of the first one (after the script's header)."""
        names, _ = parse_includes(text, where)
        if not names:
            return text
        lines = text.split("\n")
        first = next(i for i, line in enumerate(lines) if line.startswith("--- @include"))
        head, body = "\n".join(lines[:first]), parse_includes("\n".join(lines[first:]), where)[1]
        helpers = [self._file(name, where)[1].strip("\n") for name in self.resolve(names, where)]
        return "\n\n".join(part for part in (head, *helpers, body.lstrip("\n")) if part)


def split_shebang(text: str) -> tuple[str, str]:
    """(the first line when it is a shebang, else ''; the rest). Redis reads a shebang only on
    a script's first line, so it is taken off the file and put back before the composed text."""
    if not text.startswith("#!"):
        return "", text
    shebang, _, rest = text.partition("\n")
    if not shebang.startswith("#!lua"):
        raise ValueError(f"a Lua script's shebang must start with '#!lua', got {shebang!r}")
    return shebang, rest


class ScriptTable:
    """All scripts, loaded once per process."""

    def __init__(self, directory: Path | None = None) -> None:
        directory = directory or lua_dir()
        includes = Includes(directory / INCLUDES)
        self.scripts: dict[str, Script] = {}
        for name in (*SCRIPT_NAMES, *JOB_SCRIPT_NAMES):
            shebang, body = split_shebang((directory / f"{name}.lua").read_text())
            self.scripts[name] = Script(name, includes.assemble(body, f"{name}.lua"), shebang)
        self.add = self.scripts["add"]
        self.flush = self.scripts["flush"]
        self.retry = self.scripts["retry"]
        self.claim = self.scripts["claim"]
        self.ack = self.scripts["ack"]
        self.nack = self.scripts["nack"]
        self.extend = self.scripts["extend"]
        self.status = self.scripts["status"]
        self.delete = self.scripts["delete"]
        self.release = self.scripts["release"]
        self.replay = self.scripts["replay"]
        self.purge = self.scripts["purge"]
        self.pause = self.scripts["pause"]


_TABLE: ScriptTable | None = None


def scripts() -> ScriptTable:
    """The process-wide script table."""
    global _TABLE
    if _TABLE is None:
        _TABLE = ScriptTable()
    return _TABLE
