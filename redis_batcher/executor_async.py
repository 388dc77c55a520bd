"""The asyncio executor: the twin of :mod:`redis_batcher.executor` on a ``redis.asyncio``
client. It runs the I/O-free calls of :mod:`redis_batcher.ops` with the ``connect_retry``
policy, NOSCRIPT handling and ``WAIT`` for replicas, group-commits concurrent adds into one
round trip, and makes the checks due before the first write. An asyncio
:class:`~redis_batcher.asyncio.Batcher` holds one; its processors, jobs and worker run their
calls through it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.exceptions import ClusterError, NoScriptError, RedisClusterException, RedisError, ResponseError

from . import calls, layout_ops, ops
from .connection import AsyncLink, ClusterNodePool, acheckout, pack
from .definition import ADD_CHUNK, ProcessorDef
from .errors import NotReplicated, NotSentClusterError, NotSentError, raise_not_sent, raise_outcome_unknown
from .executor_core import REDIRECTED, RETRIED, Backoff, ExecutorCore, Finished, advance, not_run, redirected
from .keys import registry_key
from .models import AddResult
from .policy import judge_memory_policy, policy_from_config, policy_from_info

T = TypeVar("T")


async def read_memory_policy(send: Callable[..., Awaitable[Any]]) -> str | None:
    """The ``maxmemory-policy`` a server reports, asked through ``send(*command)``: from
    ``INFO memory``, else ``CONFIG GET``; None when it answers neither."""
    try:
        policy = policy_from_info(_one_reply(await send("INFO", "memory")))
    except ResponseError:  # an unknown command (a Redis-like server), an ACL refusal
        policy = None
    if policy is None:
        try:
            policy = policy_from_config(_one_reply(await send("CONFIG GET", "maxmemory-policy")))
        except ResponseError:
            policy = None
    return policy


def _one_reply(reply: Any) -> Any:
    """A reply of one node: redis-py's cluster client may key it by the node's name."""
    if isinstance(reply, dict) and len(reply) == 1:
        (value,) = reply.values()
        if isinstance(value, dict):
            return value
    return reply


@dataclass
class _Pending:
    proc: ProcessorDef
    base: str
    encoded: list[bytes]
    future: asyncio.Future[AddResult]


@dataclass
class _Group:
    proc: ProcessorDef
    base: str
    pending: list[_Pending] = field(default_factory=list)
    size: int = 0  # items in this group


class AsyncExecutor(ExecutorCore):
    """Runs calls on one ``redis.asyncio`` client (see the module's docstring). ``client`` is
    bound by :meth:`bind`; ``link`` (the client's :class:`~redis_batcher.connection.AsyncLink`,
    None when the client does not allow one) and ``node_links`` (a cluster's, per primary)
    carry the script calls."""

    def __post_init__(self) -> None:
        self.link: AsyncLink | None = None
        self.node_links: dict[str, AsyncLink] = {}
        self._queue: list[_Pending] = []
        self._scheduled = False
        # group commit's state (see add): whether callers send at once (not before a leader
        # has found itself alone), and round trips of adds in flight
        self._eager = False
        self._adds_in_flight = 0
        # whether this client's round trips let the event loop run (None: not known yet); one
        # that answers without (an in-process fake) leaves nobody time to queue behind a
        # caller that sent at once, so callers then always collect
        self._trips_yield: bool | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, client: Any) -> None:
        """Run calls on ``client`` from now on; the checks before the first write are due
        again. (The links of a previous client are dropped, not closed: closing is awaited,
        see :meth:`close_links`.)"""
        self.rebind(client, isinstance(client, aioredis.RedisCluster))
        # script calls on connections this event loop keeps, taken from the client's pool (see
        # connection.AsyncLink); on a cluster, from the node serving the call's slot
        self.link = AsyncLink(client) if AsyncLink.supports(client) else None
        self._trips_yield = None  # see __post_init__
        self.node_links = {}

    async def close_links(self) -> None:
        """Close the links (the client itself stays open)."""
        if self.link is not None:
            await self.link.close()
        links, self.node_links = list(self.node_links.values()), {}
        for link in links:
            await link.close()

    async def ensure_registered(self, proc: ProcessorDef) -> None:
        """Publish ``proc``'s config to the registry unless done on this connection (after
        :meth:`first_write`'s checks)."""
        if proc.name not in self.registered:
            await self.first_write()
            key = registry_key(self.prefix)
            await self.command(key, lambda: self.client.hset(key, proc.name, proc.config.to_json()))
            self.registered.add(proc.name)

    async def first_write(self) -> None:
        """Before the first write on its connection: :meth:`check_memory_policy`
        and :meth:`check_layout`."""
        if not self.policy_checked:
            await self.check_memory_policy()
            self.policy_checked = True
        if not self.layout_checked:
            await self.check_layout()

    async def check_layout(self) -> int:
        """As :meth:`redis_batcher.Batcher.check_layout`, awaited: raises
        :class:`~redis_batcher.LayoutMismatch` when Redis holds another version's data layout
        under the prefix."""
        version = await self.drive(layout_ops.layout_steps(self.prefix, self.allow_eviction))
        self.layout_checked = True
        return version

    async def check_memory_policy(self) -> None:
        """As :meth:`redis_batcher.Batcher.check_memory_policy`, awaited: raises
        :class:`~redis_batcher.EvictionPolicyError` when Redis (any primary of a cluster) may
        evict queued items, unless ``allow_eviction=True``."""
        key = registry_key(self.prefix)
        client = self.client
        if self.is_cluster:
            await client.initialize()
            for node in client.get_primaries():
                send = functools.partial(client.execute_command, target_nodes=node)
                policy = await self.retrying(
                    functools.partial(self.sent, key, functools.partial(read_memory_policy, send), node),
                    idempotent=True,
                )
                self.policy_logged = judge_memory_policy(
                    policy, node.name, allow_eviction=self.allow_eviction, logged=self.policy_logged
                )
        else:
            policy = await self.retrying(
                lambda: self.sent(key, lambda: read_memory_policy(client.execute_command)),
                idempotent=True,
            )
            self.policy_logged = judge_memory_policy(
                policy, None, allow_eviction=self.allow_eviction, logged=self.policy_logged
            )
        self.policy_checked = True

    # -- running scripts --------------------------------------------------------------------------

    async def retrying(self, attempt: Callable[[], Awaitable[T]], *, idempotent: bool = False) -> T:
        """As the sync executor's: retried with backoff, for up to ``connect_retry`` seconds
        from its first failure, while it raises :class:`~redis_batcher.NotSentError` (and, when
        ``idempotent``, :class:`~redis_batcher.OutcomeUnknownError`); then that is raised."""
        retryable = RETRIED[idempotent]
        backoff: Backoff | None = None
        while True:
            try:
                return await attempt()
            except retryable:
                backoff = backoff or Backoff(self.connect_retry)
                pause = backoff.pause()
                if pause is None:
                    raise
                await asyncio.sleep(pause)

    async def sent(self, key: str | None, send: Callable[[], Awaitable[T]], node: Any = None) -> T:
        """Await ``send`` (a command through redis-py) with its failures classified, as the
        sync executor's ``sent``: a connection it can use is connected (or checked) first, so
        that failing to reach Redis is known to have sent nothing."""
        client = self.client
        try:
            if self.is_cluster:
                await client.initialize()
                if node is None:
                    node = client.get_node_from_key(key) if key is not None else client.get_default_node()
                if ClusterNodePool.supports(node):  # else nothing tells a failure's side
                    conn = node.acquire_connection()
                    try:
                        await conn.connect()
                    finally:
                        node.release(conn)
            else:
                pool = client.connection_pool
                await pool.release(await acheckout(pool))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise_not_sent(exc)
        try:
            return await send()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise_outcome_unknown(exc)

    async def command(self, key: str | None, send: Callable[[], Awaitable[T]]) -> T:
        """A plain command that may safely run twice, under the ``connect_retry`` policy."""
        return await self.retrying(lambda: self.sent(key, send), idempotent=True)

    async def node_link(self, key: str) -> AsyncLink | None:
        """On a cluster, the link of the primary serving ``key``'s slot according to redis-py's
        slot table (None when the table has none)."""
        await self.client.initialize()
        try:
            node = self.client.get_node_from_key(key)
        except RedisClusterException:
            return None
        link = self.node_links.get(node.name)
        if link is None and ClusterNodePool.supports(node):
            link = self.node_links[node.name] = AsyncLink(pool=ClusterNodePool(node))
        return link

    async def learn_route(self, key: str) -> None:
        """As the sync executor's: a read of ``key`` through the cluster client lets redis-py
        learn the slot's node after a redirection or a node that could not be reached."""
        try:
            await self.client.exists(key)
        except RedisError:
            pass  # the retry finds out

    async def _execute_on_node(self, call: ops.Call, wait: bool) -> Any:
        """A script call on a cluster, over the link of the primary serving its slot (and its
        ``WAIT`` there, on the same connection), retried as the sync executor's after a
        redirection or a send that failed."""
        key = call.keys[0]

        async def attempt() -> Any:
            link = await self.node_link(key)
            try:
                if link is None:
                    if wait and self.wait_replicas:
                        raise NotSentClusterError(f"no node of the cluster serves the slot of {key}")
                    return await self.sent(
                        key, lambda: call.script.call_async(self.client, call.keys, call.args)
                    )
                if wait and self.wait_replicas:
                    reply, acked = await call.script.call_and_wait_async_direct(
                        link, call.keys, call.args, self.wait_replicas, self.wait_timeout_ms
                    )
                    if acked < self.wait_replicas:
                        raise NotReplicated(self.wait_replicas, acked)
                    return reply
                return await call.script.call_async_direct(link, call.keys, call.args)
            except NotSentError:
                await self.learn_route(key)
                raise
            except (*REDIRECTED, ClusterError) as exc:
                if not redirected(exc):
                    raise
                await self.learn_route(key)
                raise not_run(exc) from exc

        return await self.retrying(attempt)

    async def execute(self, call: ops.Call, *, wait: bool = True) -> Any:
        """Run one script call (NOSCRIPT recovery, WAIT when configured) under the
        ``connect_retry`` policy (retried only while it was never sent)."""
        if self.is_cluster:
            return await self._execute_on_node(call, wait)
        if wait and self.wait_replicas:
            replies = await self.pipeline([call])
            if isinstance(replies[0], Exception):
                raise replies[0]
            return replies[0]
        link = self.link

        def attempt() -> Awaitable[Any]:
            if link is not None:
                return call.script.call_async_direct(link, call.keys, call.args)
            return self.sent(call.keys[0], lambda: call.script.call_async(self.client, call.keys, call.args))

        return await self.retrying(attempt)

    async def pipeline(self, calls: Sequence[ops.Call]) -> list[Any]:
        """Run calls pipelined in one round trip; each reply is a value or the exception of that
        call alone. Calls that met NOSCRIPT are repeated with EVAL."""

        link = self.link
        conn: Any = link if link is not None else self.client  # the script variants' choice

        async def once(batch: Sequence[ops.Call], use_eval: bool) -> list[Any]:
            out: list[Any]
            if link is not None:
                # framed here, sent in one write on a connection the link keeps, each reply
                # read with redis-py's read_response: no pipeline object, no retry wrapper
                frames = [c.script.framed(c.keys, c.args, source=use_eval, conn=conn) for c in batch]
                if self.wait_replicas:
                    frames.append(pack((b"WAIT", self.wait_replicas, self.wait_timeout_ms)))
                out = await link.request(b"".join(frames), len(frames))
            else:
                pipe = self.client.pipeline(transaction=False)
                for call in batch:
                    v = call.script.variant(conn)
                    head = v.source if use_eval else v.sha
                    pipe.execute_command(
                        "EVAL" if use_eval else "EVALSHA", head, len(call.keys), *call.keys, *call.args
                    )
                if self.wait_replicas:
                    pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                out = await self.sent(batch[0].keys[0], lambda: pipe.execute(raise_on_error=False))
            if self.wait_replicas:
                acked = out.pop()
                if not isinstance(acked, Exception) and int(acked) < self.wait_replicas:
                    out = [
                        r if isinstance(r, Exception) else NotReplicated(self.wait_replicas, int(acked))
                        for r in out
                    ]
            return out

        replies: list[Any] = await self.retrying(lambda: once(calls, False))
        # only the calls that met NOSCRIPT are sent again (with EVAL): the others already ran
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            again = await self.retrying(lambda: once([calls[i] for i in missing], True))
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
            # a flagged script the server cannot compile (Redis < 7) did not run: once more,
            # now without its shebang
            refused = [
                i for i in missing if calls[i].script.fall_back(conn, calls[i].script.best, replies[i])
            ]
            if refused:
                again = await self.retrying(lambda: once([calls[i] for i in refused], True))
                for i, reply in zip(refused, again, strict=True):
                    replies[i] = reply
        return replies

    # -- group commit ----------------------------------------------------------------------------

    async def add(self, proc: ProcessorDef, base: str, encoded: list[bytes]) -> AddResult:
        """Group commit. The first caller of a loop iteration leads: it yields once, so that
        every other coroutine ready in this iteration can join, then sends what was collected.
        Alone, it sends its EVALSHA itself (no task, no pipeline). With company, the send runs
        as a task of its own that the leader awaits shielded, so cancelling one caller can
        neither cut the round trip in half nor strand the others.

        While calls come one at a time (the last leader found nobody to join it and nothing is
        in flight), a caller skips the yield and sends at once: a lone caller's round trip
        costs no extra loop iteration. Adds made while it is in flight queue behind it and go
        out together when its reply is in, so a batch id's adds keep their order."""
        if (
            self._eager
            and not self._scheduled
            and not self._adds_in_flight
            and not self.wait_replicas
            and self._trips_yield is not False
            and proc.name in self.registered
        ):
            self._scheduled = True
            self._adds_in_flight += 1
            yielded: list[bool] = []
            if self._trips_yield is None:
                asyncio.get_running_loop().call_soon(yielded.append, True)
            try:
                reply = await self._alone(proc, base, encoded)
            finally:
                if self._trips_yield is None:
                    self._trips_yield = bool(yielded)
                self._adds_in_flight -= 1
                batch, self._queue, self._scheduled = self._queue, [], False
                if batch:  # company arrived: collect again from now on
                    self._eager = False
                    self._spawn(self._send(batch))
            return ops.parse_add(proc, base, len(encoded), reply)
        future: asyncio.Future[AddResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(proc, base, encoded, future))
        if self._scheduled:
            return await future  # a leader is collecting this iteration's adds
        self._scheduled = True
        try:
            # a callback queued now runs after every callback already queued: each coroutine
            # made ready in this iteration (or before) adds before this one goes on
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            batch, self._queue, self._scheduled = self._queue, [], False
            others = [p for p in batch if p.future is not future]
            if others:  # the leader leaves; the adds it collected are still sent
                self._spawn(self._send(others))
            raise
        batch, self._queue, self._scheduled = self._queue, [], False
        self._eager = len(batch) == 1 and not self._adds_in_flight
        if len(batch) == 1 and not self.wait_replicas and proc.name in self.registered:
            self._adds_in_flight += 1
            try:
                reply = await self._alone(proc, base, encoded)
            finally:
                self._adds_in_flight -= 1
            return ops.parse_add(proc, base, len(encoded), reply)
        await asyncio.shield(self._spawn(self._send(batch)))
        return await future

    def _alone(self, proc: ProcessorDef, base: str, encoded: list[bytes]) -> Awaitable[Any]:
        """The script call of one caller's add on its own: one EVALSHA, no pipeline, sent by
        the caller's task (a plain function: no coroutine frame of its own on the hot path)."""
        if self.link is not None and len(encoded) == 1:
            return self._add_one(self.link, proc, base, encoded[0])
        return self.execute(ops.add_call(proc, base, encoded))

    async def _add_one(self, link: AsyncLink, proc: ProcessorDef, base: str, data: bytes) -> Any:
        """A lone single add framed in one step (as the sync executor's); NOSCRIPT and a
        request never sent take the general way (which retries the latter)."""
        try:
            return await link.request(ops.add_frame(proc, base, data))
        except (NoScriptError, NotSentError):
            pass
        return await self.execute(ops.add_call(proc, base, [data]))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _send(self, batch: list[_Pending]) -> None:
        self._adds_in_flight += 1
        try:
            await self._send_batch(batch)
        finally:
            self._adds_in_flight -= 1

    async def _send_batch(self, batch: list[_Pending]) -> None:
        try:
            for proc in {p.proc.name: p.proc for p in batch}.values():
                await self.ensure_registered(proc)
        except BaseException as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        groups: list[_Group] = []
        open_groups: dict[tuple[str, str], _Group] = {}
        for p in batch:
            if p.future.cancelled():
                continue  # cancelled before it was sent: nothing of it is written
            key = (p.proc.name, p.base)
            g = open_groups.get(key)
            # one script call per batch id, but never more than ADD_CHUNK items in one call
            if g is None or g.size + len(p.encoded) > ADD_CHUNK:
                g = open_groups[key] = _Group(p.proc, p.base)
                groups.append(g)
            g.pending.append(p)
            g.size += len(p.encoded)
        if not groups:
            return
        ordered = groups
        calls = [
            ops.add_call(
                g.proc,
                g.base,
                [e for p in g.pending for e in p.encoded],
                [len(p.encoded) for p in g.pending],
            )
            for g in ordered
        ]
        try:
            if len(calls) == 1 and not self.wait_replicas:
                replies: list[Any] = [await self.execute(calls[0])]
            elif self.is_cluster:
                # each call (and its WAIT) on the primary that runs it, with its own retries: a
                # pipeline through redis-py's cluster client fails as a whole once a redirection
                # of one call runs out, though the others ran
                runs = [self.execute(c) for c in calls]
                replies = list(await asyncio.gather(*runs, return_exceptions=True))
                for reply in replies:
                    if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                        raise reply
            else:
                replies = await self.pipeline(calls)
        except BaseException as exc:  # the whole round trip failed: every caller in it is concerned
            for g in ordered:
                for p in g.pending:
                    if not p.future.done():
                        p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for g, reply in zip(ordered, replies, strict=True):
            if isinstance(reply, Exception):
                results: list[Any] = [reply] * len(g.pending)
            else:
                results = ops.parse_add_segments(g.proc, g.base, [len(p.encoded) for p in g.pending], reply)
            for p, result in zip(g.pending, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)

    async def drive(self, steps: calls.Steps[T]) -> T:
        """Answer the requests of an :mod:`redis_batcher.ops` multi-step operation (as
        :meth:`redis_batcher.executor.Executor.drive` does on a sync client)."""
        step = advance(steps, None)
        while not isinstance(step, Finished):
            if isinstance(step, calls.Read):
                with calls.reading(step.key):
                    reply = await self.command(step.key, functools.partial(step.send, self.client))
            else:
                if step.writes:
                    await self.first_write()
                reply = await self.execute(step.call)
            step = advance(steps, reply)
        return step.value
