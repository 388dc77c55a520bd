"""The one thin layer through which Python talks to the Lua scripts.

Each atomic operation is a file in the top-level ``lua/`` directory (shipped inside the wheel as
``redis_batcher/lua``). ``_common.lua`` is prepended to each. Scripts run with EVALSHA; when the
server answers NOSCRIPT (after ``SCRIPT FLUSH``, a restart or a failover) the call is repeated
once with EVAL, which also puts the script back into the server's cache. EVAL is routed like
EVALSHA, so this works unchanged on Redis Cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

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

    async def call_async(self, client: Any, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run on an asyncio redis-py client."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


class ScriptTable:
    """All scripts, loaded once per process."""

    def __init__(self, directory: Path | None = None) -> None:
        directory = directory or lua_dir()
        common = (directory / "_common.lua").read_text()
        self.scripts: dict[str, Script] = {}
        for name in SCRIPT_NAMES:
            body = (directory / f"{name}.lua").read_text()
            self.scripts[name] = Script(name, common + "\n" + body)
        jobs_common = common + "\n" + (directory / "_jobs.lua").read_text()
        for name in JOB_SCRIPT_NAMES:
            body = (directory / f"{name}.lua").read_text()
            self.scripts[name] = Script(name, jobs_common + "\n" + body)
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
