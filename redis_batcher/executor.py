"""The sync executor: runs the I/O-free calls of :mod:`redis_batcher.ops` (script calls and
multi-step operations) on a sync redis-py client, with the ``connect_retry`` policy, NOSCRIPT
handling, ``WAIT`` for replicas, the per-node links of a cluster and the checks due before the
first write (memory policy, data layout, the processor registry). A :class:`~redis_batcher.Batcher`
holds one; its processors, iterator jobs and workers run their calls through it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, TypeVar

import redis
from redis.exceptions import ClusterError, NoScriptError, RedisClusterException, RedisError

from . import calls, layout_ops, ops
from .connection import Link, checkout
from .definition import ProcessorDef
from .errors import NotReplicated, NotSentError, raise_not_sent, raise_outcome_unknown
from .executor_core import REDIRECTED, RETRIED, Backoff, ExecutorCore, Finished, advance, not_run, redirected
from .keys import registry_key
from .models import AddResult
from .policy import judge_memory_policy, read_memory_policy

T = TypeVar("T")


class Executor(ExecutorCore):
    """Runs calls on one sync client (see the module's docstring). ``client`` is bound by
    :meth:`bind`; ``link`` (the client's :class:`~redis_batcher.connection.Link`, None when
    the client does not allow one) and ``node_links`` (a cluster's, per primary) carry the
    script calls."""

    def __post_init__(self) -> None:
        self.link: Link | None = None
        # on a cluster, a link per primary (by node name), as redis-py's slot table says
        self.node_links: dict[str, Link] = {}
        self._links_lock = threading.Lock()

    def bind(self, client: Any, *, links: bool = True) -> None:
        """Run calls on ``client`` from now on (closing the links of the previous one); the
        checks before the first write are due again. ``links=False``: no link (a client
        that only stands in for one)."""
        self.rebind(client, isinstance(client, redis.RedisCluster))
        self.close_links()
        # script calls on a connection this thread keeps, taken from the client's pool (see
        # connection.Link); on a cluster, from the pool of the primary serving the call's slot
        self.link = Link(client) if links and Link.supports(client) else None

    def close_links(self) -> None:
        """Close the links (the client itself stays open)."""
        if self.link is not None:
            self.link.close()
        with self._links_lock:
            links, self.node_links = list(self.node_links.values()), {}
        for link in links:
            link.close()

    def drive(self, steps: calls.Steps[T]) -> T:
        """Answer the requests of an :mod:`ops` multi-step operation, and return its result."""
        step = advance(steps, None)
        while not isinstance(step, Finished):
            if isinstance(step, calls.Read):
                with calls.reading(step.key):
                    reply = self.command(step.key, partial(step.send, self.client))
            else:
                if step.writes:
                    self.first_write()
                reply = self.execute(step.call)
            step = advance(steps, reply)
        return step.value

    # -- running scripts --------------------------------------------------------------------------

    def retrying(self, attempt: Callable[[], T], *, idempotent: bool = False) -> T:
        """Run ``attempt`` under the ``connect_retry`` policy: retried with backoff, for up to
        ``connect_retry`` seconds from its first failure, while it raises :class:`NotSentError`
        (and, for an ``idempotent`` command such as a read, :class:`OutcomeUnknownError` too);
        then that error is raised. Any other error is raised at once."""
        retryable = RETRIED[idempotent]
        backoff: Backoff | None = None
        while True:
            try:
                return attempt()
            except retryable:
                backoff = backoff or Backoff(self.connect_retry)
                pause = backoff.pause()
                if pause is None:
                    raise
                time.sleep(pause)

    def _pool(self, key: str | None) -> Any:
        """The redis-py connection pool a command on ``key`` goes through."""
        client = self.client
        if self.is_cluster:
            node = client.get_node_from_key(key) if key is not None else client.get_default_node()
            return client.get_redis_connection(node).connection_pool
        return client.connection_pool

    def sent(self, key: str | None, send: Callable[[], T], pool: Any = None) -> T:
        """Run ``send`` (a command through redis-py) with its failures classified: a connection
        of the pool it uses is connected (or checked) first, so that failing to reach Redis is
        known to have sent nothing (:class:`NotSentError`); a failure after that cannot be told
        apart from a lost reply (:class:`OutcomeUnknownError`)."""
        try:
            pool = pool if pool is not None else self._pool(key)
            pool.release(checkout(pool))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise_not_sent(exc)
        try:
            return send()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise_outcome_unknown(exc)

    def command(self, key: str | None, send: Callable[[], T]) -> T:
        """A plain command that may safely run twice (a read, or a write of the same value),
        under the ``connect_retry`` policy."""
        return self.retrying(lambda: self.sent(key, send), idempotent=True)

    def link_for(self, key: str) -> Link | None:
        """The link of a script call on ``key``: the client's; on a cluster, the one of the
        primary that serves ``key``'s slot according to redis-py's slot table (None when the
        table has none: redis-py's own path then finds it)."""
        if not self.is_cluster:
            return self.link
        try:
            node = self.client.get_node_from_key(key)
        except RedisClusterException:
            return None
        link = self.node_links.get(node.name)
        if link is None:
            with self._links_lock:
                link = self.node_links.get(node.name)
                if link is None:
                    client = self.client.get_redis_connection(node)
                    if not Link.supports(client):
                        return None
                    link = self.node_links[node.name] = Link(client)
        return link

    def learn_route(self, key: str) -> None:
        """A cluster node did not run a call on ``key`` (it answered a redirection, or the
        call was never sent): a read of ``key`` through redis-py's cluster client lets it
        learn the slot's node (it follows MOVED and ASK, and renews its table after a failed
        connection) before :meth:`retrying` sends the call again."""
        try:
            self.client.exists(key)
        except RedisError:
            pass  # the retry finds out

    def execute(self, call: ops.Call, *, wait: bool = True) -> Any:
        """Run a script call under the ``connect_retry`` policy (retried only while it was never
        sent, see :meth:`retrying`), and ``WAIT`` for ``wait_replicas`` replicas when configured
        (same round trip, same connection: on a cluster, the primary that ran the script)."""
        key = call.keys[0]

        def run() -> Any:
            link = self.link_for(key)
            if wait and self.wait_replicas:
                if link is not None:
                    reply, acked = call.script.call_and_wait_direct(
                        link, call.keys, call.args, self.wait_replicas, self.wait_timeout_ms
                    )
                else:
                    target = self.client
                    if self.is_cluster:  # WAIT counts the writes of its own connection
                        target = self.client.get_redis_connection(self.client.get_node_from_key(key))
                    reply, acked = self.sent(
                        key,
                        lambda: call.script.call_and_wait(
                            target, call.keys, call.args, self.wait_replicas, self.wait_timeout_ms
                        ),
                    )
                if acked < self.wait_replicas:
                    raise NotReplicated(self.wait_replicas, acked)
                return reply
            if link is not None:
                return call.script.call_direct(link, call.keys, call.args)
            return self.sent(key, lambda: call.run(self.client))

        def attempt() -> Any:
            if not self.is_cluster:
                return run()
            try:
                return run()
            except NotSentError:
                self.learn_route(key)
                raise
            except (*REDIRECTED, ClusterError) as exc:
                if not redirected(exc):
                    raise
                self.learn_route(key)
                raise not_run(exc) from exc

        return self.retrying(attempt)

    def run_once(self, call: ops.Call) -> Any:
        """Run a script call once, no retry and no WAIT (the worker's claims and lease
        renewals: their callers handle errors and carry on), on this thread's connection of
        the link when there is one."""
        key = call.keys[0]
        link = self.link_for(key)
        try:
            if link is not None:
                return call.script.call_direct(link, call.keys, call.args)
            return call.run(self.client)
        except NotSentError:
            if self.is_cluster:
                self.learn_route(key)
            raise
        except (*REDIRECTED, ClusterError) as exc:
            if not self.is_cluster or not redirected(exc):
                raise
            self.learn_route(key)
            raise not_run(exc) from exc

    def run_add(self, proc: ProcessorDef, base: str, encoded: list[bytes]) -> AddResult:
        """Add ``encoded`` items to ``base`` of ``proc``: a single add without WAIT over the
        link in one framed request, anything else as a script call (:meth:`execute`)."""
        link = self.link if not self.is_cluster else self.link_for(proc.keys.for_base(base).head(base))
        if link is not None and len(encoded) == 1 and not self.wait_replicas:
            # a single add over this thread's connection, framed in one step (ops.add_frame);
            # NOSCRIPT, a request never sent and a cluster's redirection take the general way
            # (which retries the latter two)
            try:
                reply = link.request(ops.add_frame(proc, base, encoded[0]))
                return ops.parse_add(proc, base, 1, reply)
            except (NoScriptError, NotSentError, *REDIRECTED):
                pass
        reply = self.execute(ops.add_call(proc, base, encoded))
        return ops.parse_add(proc, base, len(encoded), reply)

    # -- before writing ---------------------------------------------------------------------------------

    def first_write(self) -> None:
        """Before the first write on its connection: :meth:`check_memory_policy`
        and :meth:`check_layout`."""
        if not self.policy_checked:
            self.check_memory_policy()
            self.policy_checked = True
        if not self.layout_checked:
            self.check_layout()

    def check_layout(self) -> int:
        """Check that Redis holds this version's data layout under the prefix (stamping it on
        a Redis without data of the prefix); raise :class:`LayoutMismatch` otherwise, before
        anything is written. A batcher runs this before its first write; workers run it when
        they start. Returns the layout version."""
        version = self.drive(layout_ops.layout_steps(self.prefix, self.allow_eviction))
        self.layout_checked = True
        return version

    def ensure_registered(self, proc: ProcessorDef) -> None:
        """Publish ``proc``'s config to the registry unless done on this connection (after
        :meth:`first_write`'s checks)."""
        if proc.name in self.registered:
            return
        self.first_write()
        key = registry_key(self.prefix)
        self.command(key, lambda: self.client.hset(key, proc.name, proc.config.to_json()))
        self.registered.add(proc.name)

    def check_memory_policy(self) -> None:
        """Refuse a Redis that may evict queued items: raises :class:`EvictionPolicyError`
        when the server's ``maxmemory-policy`` is neither ``noeviction`` nor a ``volatile-*``
        policy (on Redis Cluster: any primary's), unless ``allow_eviction=True`` (then it logs
        a warning). The policy is read from ``INFO memory``, else ``CONFIG GET``; a server that
        answers neither (an ACL, a Redis-like server without them) is not refused.

        A batcher runs this before its first write; workers run it when they start."""
        key = registry_key(self.prefix)
        if self.is_cluster:
            targets = [
                (node.name, self.client.get_redis_connection(node)) for node in self.client.get_primaries()
            ]
        else:
            targets = [(None, self.client)]
        for node, target in targets:
            pool = target.connection_pool if node is not None else None
            policy = self.retrying(
                partial(self.sent, key, partial(read_memory_policy, target), pool), idempotent=True
            )
            self.policy_logged = judge_memory_policy(
                policy, node, allow_eviction=self.allow_eviction, logged=self.policy_logged
            )
        self.policy_checked = True


class ExecutorHost(Protocol):
    """What runs calls for a processor or an iterator: a :class:`~redis_batcher.Batcher` (its
    key ``prefix``, its ``client`` and its :class:`Executor`)."""

    @property
    def prefix(self) -> str: ...

    @property
    def client(self) -> Any: ...

    @property
    def executor(self) -> Executor: ...

