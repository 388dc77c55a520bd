"""The one thin layer through which Python talks to the Lua scripts.

Each atomic operation is a file in the top-level ``lua/`` directory (shipped inside the wheel as
``redis_batcher/lua``). The helpers of ``_common.lua`` (and ``_jobs.lua`` for the iterator-job
scripts) that a script uses are prepended to it. Scripts run with EVALSHA; when the server
answers NOSCRIPT (after ``SCRIPT FLUSH``, a restart or a failover) the call is repeated once
with EVAL, which also puts the script back into the server's cache. EVAL is routed like
EVALSHA, so this works unchanged on Redis Cluster. A call goes out through a redis-py client,
or through :mod:`redis_batcher.wire` (the producer's per-thread connections) where it applies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from . import wire
from .wire import Arg, AsyncDirectLink, DirectLink

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
        self._heads: dict[int, bytes] = {}  # numkeys -> "EVALSHA sha numkeys", RESP-encoded

    def evalsha_head(self, numkeys: int) -> bytes:
        """``EVALSHA sha numkeys`` as RESP bulk strings (no array header), framed once per
        script and key count."""
        head = self._heads.get(numkeys)
        if head is None:
            head = self._heads[numkeys] = wire.frames((b"EVALSHA", self.sha, numkeys))
        return head

    def _evalsha(self, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
        """``EVALSHA sha numkeys keys... args...`` RESP-encoded for a link."""
        return wire.pack((*keys, *args), self.evalsha_head(len(keys)), 3)

    def framed(self, keys: Sequence[str], args: Sequence[Arg], *, source: bool = False) -> bytes:
        """This script's call RESP-encoded for a link: ``EVALSHA``, or with ``source``
        ``EVAL`` with the full source (after NOSCRIPT)."""
        if source:
            return wire.pack((b"EVAL", self.source, len(keys), *keys, *args))
        return self._evalsha(keys, args)

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
            return link.request(self._evalsha(keys, args))
        except NoScriptError:
            return link.request(self.framed(keys, args, source=True))

    async def call_async_direct(self, link: AsyncDirectLink, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run over an :class:`AsyncDirectLink`."""
        try:
            return await link.request(self._evalsha(keys, args))
        except NoScriptError:
            return await link.request(self.framed(keys, args, source=True))

    async def call_async(self, client: Any, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run on an asyncio redis-py client."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


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
