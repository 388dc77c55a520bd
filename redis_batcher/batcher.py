"""The entry point: a Redis connection, a key prefix and the processors defined on it."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, overload

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry

from . import ops
from .codec import Codec, codec_name, resolve_codec
from .connection import Link, checkout
from .errors import (
    ConfigError,
    DuplicateProcessor,
    EvictionPolicyError,
    NotReplicated,
    NotSentClusterError,
    NotSentError,
    OutcomeUnknownError,
    UnknownProcessor,
    raise_not_sent,
    raise_outcome_unknown,
)
from .keys import MAX_PARTITIONS, layout_key, registry_key, validate_name
from .models import AddResult, ProcessorConfig
from .processor import Handler, Processor, _drive

if TYPE_CHECKING:
    from .jobs import JobIterator, JobStatus

DEFAULT_URL = "redis://127.0.0.1:6379/0"
T = TypeVar("T")

# a cluster node's answers to a command it did not run: the slot is served by another node, is
# moving, or the cluster is down. The call is safe to send again once redis-py knows the slot's
# node (Batcher._rerouted).
REDIRECTED = (MovedError, AskError, TryAgainError, ClusterDownError)


def redirected(exc: BaseException) -> bool:
    """A cluster node did not run a single command: it answered a redirection, or redis-py's
    cluster client gave up on it after redirections alone (``ClusterError("TTL exhausted.")``:
    MOVED, ASK, TRYAGAIN each time), as while a slot migrates for longer than its retries."""
    gave_up = isinstance(exc, ClusterError) and str(exc).startswith("TTL exhausted")
    return gave_up or isinstance(exc, REDIRECTED)


log = logging.getLogger("redis_batcher")


def default_url() -> str:
    """``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``."""
    return os.environ.get("REDIS_URL") or DEFAULT_URL


def _seconds(
    name: str, value: float | timedelta | None, *, allow_none: bool, positive: bool = False
) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} must not be None")
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def policy_from_info(info: Any) -> str | None:
    """``maxmemory_policy`` of an ``INFO memory`` reply (None when it has none)."""
    return _text(info.get("maxmemory_policy")) if isinstance(info, dict) else None


def policy_from_config(reply: Any) -> str | None:
    """``maxmemory-policy`` of a ``CONFIG GET maxmemory-policy`` reply (None when absent)."""
    if isinstance(reply, dict):
        for key, value in reply.items():
            if _text(key) == "maxmemory-policy":
                return _text(value)
    return None


def policy_evicts(policy: str) -> bool:
    """True for a ``maxmemory-policy`` that may evict keys without a TTL, the only kind the
    library's undelivered items are."""
    return policy != "noeviction" and not policy.startswith("volatile-")


def judge_memory_policy(batcher: Any, policy: str | None, node: str | None) -> None:
    """Refuse an evicting ``policy`` (read from ``node``, None: the only server) unless
    ``batcher.allow_eviction``; say once, in ``batcher._policy_logged``, when the server could
    not tell or eviction is allowed. Shared by the sync and asyncio batchers."""
    if policy is None:
        if not batcher._policy_logged:
            batcher._policy_logged = True
            log.debug("Redis does not report its maxmemory-policy (INFO and CONFIG refused)")
        return
    if not policy_evicts(policy):
        return
    if not batcher.allow_eviction:
        raise EvictionPolicyError(policy, node)
    if not batcher._policy_logged:
        batcher._policy_logged = True
        log.warning(
            "Redis maxmemory-policy is %r%s: queued items can be evicted (allow_eviction=True)",
            policy,
            f" on {node}" if node else "",
        )


def read_memory_policy(client: Any) -> str | None:
    """The ``maxmemory-policy`` of the server behind a sync client: from ``INFO memory`` (which
    managed services allow), else ``CONFIG GET``; None when it answers neither."""
    try:
        policy = policy_from_info(client.info("memory"))
    except ResponseError:  # an unknown command (a Redis-like server), an ACL refusal
        policy = None
    if policy is None:
        try:
            policy = policy_from_config(client.config_get("maxmemory-policy"))
        except ResponseError:
            policy = None
    return policy


def parse_registry(raw: dict[Any, Any]) -> tuple[dict[str, ProcessorConfig], dict[str, str]]:
    """A ``<prefix>:processors`` hash (HGETALL) as (configs by name, unreadable entries: name
    -> reason). An entry that is not a processor config is reported, never raised."""
    configs: dict[str, ProcessorConfig] = {}
    bad: dict[str, str] = {}
    for key, value in raw.items():
        try:
            name = key.decode() if isinstance(key, bytes) else str(key)
        except UnicodeDecodeError:
            bad[repr(key)] = "the name is not UTF-8"
            continue
        try:
            configs[name] = ProcessorConfig.from_json(value)
        except ValueError as exc:
            bad[name] = str(exc)
    return configs, bad


class _Unconnected:
    """The client of a batcher made by :meth:`Batcher.definitions_only`: any use is refused
    with a :class:`ConfigError` saying so (rather than a connection to some default server)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and friends probe for optional protocols
            raise AttributeError(name)
        raise ConfigError(
            "this batcher has no Redis connection: it only holds definitions; use the async "
            "processor (or pass a connected sync Batcher as definitions=)"
        )

    def __repr__(self) -> str:
        return "<no Redis connection>"


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Batcher:
    """Holds the Redis client and the processors.

    ``connection`` is a URL (``redis://``, ``rediss://``, ``unix://``), an existing
    ``redis.Redis`` / ``redis.RedisCluster`` client, or ``None`` for ``$REDIS_URL`` /
    ``redis://127.0.0.1:6379/0``. ``prefix`` namespaces every key. Pass ``cluster=True`` with a
    URL to connect to Redis Cluster.
    """

    def __init__(
        self,
        connection: str | redis.Redis | redis.RedisCluster | None = None,
        *,
        prefix: str = "rb",
        cluster: bool = False,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        connect_retry: float = 10.0,
        allow_eviction: bool = False,
        **redis_options: Any,
    ) -> None:
        self.prefix = validate_name("prefix", prefix)
        if not isinstance(allow_eviction, bool):
            raise ConfigError(f"allow_eviction must be True or False, got {allow_eviction!r}")
        self.allow_eviction = allow_eviction
        if isinstance(wait_replicas, bool) or not isinstance(wait_replicas, int) or wait_replicas < 0:
            raise ConfigError(f"wait_replicas must be an int >= 0, got {wait_replicas!r}")
        self.wait_replicas = wait_replicas
        wait_s = _seconds("wait_timeout", wait_timeout, allow_none=False, positive=True) or 1.0
        self.wait_timeout_ms = max(1, round(wait_s * 1000))  # WAIT n 0 would block forever
        self.connect_retry = _seconds("connect_retry", connect_retry, allow_none=False) or 0.0
        self.client: Any = None
        self.url: str | None = None
        self.is_cluster = False
        self.processors: dict[str, Processor] = {}
        self.iterators: dict[str, JobIterator] = {}  # iterator jobs (redis_batcher.jobs)
        self._registered: set[str] = set()
        self._policy_checked = False  # check_memory_policy passed on this connection
        self._layout_checked = False  # check_layout passed on this connection
        self._policy_logged = False  # the server could not tell its policy: said once
        self._lock = threading.Lock()
        self._link: Link | None = None
        # on a cluster, a link per primary (by node name), as redis-py's slot table says
        self._node_links: dict[str, Link] = {}
        self._links_lock = threading.Lock()
        self.connect(connection, cluster=cluster, **redis_options)

    @classmethod
    def definitions_only(cls, *, prefix: str = "rb") -> Batcher:
        """A batcher without a Redis connection that only holds processor and iterator
        definitions: what an asyncio batcher keeps them on when given none. Anything that would
        talk to Redis through it raises :class:`ConfigError`; :meth:`connect` makes it a normal
        batcher."""
        unconnected: Any = _Unconnected()
        return cls(unconnected, prefix=prefix)

    def connect(
        self,
        connection: str | redis.Redis | redis.RedisCluster | None = None,
        *,
        cluster: bool = False,
        **redis_options: Any,
    ) -> None:
        """(Re)bind the batcher to a URL or client; the CLI uses this for ``--redis-url``."""
        if isinstance(connection, _Unconnected):  # definitions_only()
            self.client, self.url, self.is_cluster = connection, None, False
            self._registered.clear()
            return
        if connection is None:
            connection = default_url()
        if isinstance(connection, str):
            # never let redis-py re-send a command after a connection error: a script that ran
            # but whose reply was lost would run twice (a duplicated add). Connection attempts
            # that failed before anything was sent are retried by _execute instead. (Script
            # calls never go through these retries: see connection.Link and scripts._routing.)
            redis_options.setdefault("retry", Retry(NoBackoff(), 0))
            if cluster:
                client: Any = redis.RedisCluster.from_url(connection, **redis_options)
            else:
                client = redis.Redis.from_url(connection, **redis_options)
            url: str | None = connection
        else:
            client, url = connection, None
        kwargs: dict[str, Any] = getattr(client, "get_connection_kwargs", dict)()
        if kwargs.get("decode_responses"):
            raise ConfigError("redis-batcher needs a client with decode_responses=False (items are bytes)")
        self.client = client
        self.url = url
        self.is_cluster = isinstance(client, redis.RedisCluster)
        self._close_links()
        # script calls on a connection this thread keeps, taken from the client's pool (see
        # connection.Link); on a cluster, from the pool of the primary serving the call's slot
        self._link = Link(client) if Link.supports(client) else None
        self._registered.clear()
        self._policy_checked = False
        self._layout_checked = False

    # -- running scripts --------------------------------------------------------------------------

    def _retrying(self, attempt: Callable[[], T], *, idempotent: bool = False) -> T:
        """Run ``attempt`` under the ``connect_retry`` policy: retried with backoff, for up to
        ``connect_retry`` seconds from its first failure, while it raises :class:`NotSentError`
        (and, for an ``idempotent`` command such as a read, :class:`OutcomeUnknownError` too);
        then that error is raised. Any other error is raised at once."""
        retryable: tuple[type[BaseException], ...] = (
            (NotSentError, OutcomeUnknownError) if idempotent else (NotSentError,)
        )
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return attempt()
            except retryable:
                if deadline is None:
                    deadline = time.monotonic() + self.connect_retry
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _pool(self, key: str | None) -> Any:
        """The redis-py connection pool a command on ``key`` goes through."""
        client = self.client
        if self.is_cluster:
            node = client.get_node_from_key(key) if key is not None else client.get_default_node()
            return client.get_redis_connection(node).connection_pool
        return client.connection_pool

    def _sent(self, key: str | None, send: Callable[[], T], pool: Any = None) -> T:
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

    def _command(self, key: str | None, send: Callable[[], T]) -> T:
        """A plain command that may safely run twice (a read, or a write of the same value),
        under the ``connect_retry`` policy."""
        return self._retrying(lambda: self._sent(key, send), idempotent=True)

    def _link_for(self, key: str) -> Link | None:
        """The link of a script call on ``key``: the client's; on a cluster, the one of the
        primary that serves ``key``'s slot according to redis-py's slot table (None when the
        table has none: redis-py's own path then finds it)."""
        if not self.is_cluster:
            return self._link
        try:
            node = self.client.get_node_from_key(key)
        except RedisClusterException:
            return None
        link = self._node_links.get(node.name)
        if link is None:
            with self._links_lock:
                link = self._node_links.get(node.name)
                if link is None:
                    client = self.client.get_redis_connection(node)
                    if not Link.supports(client):
                        return None
                    link = self._node_links[node.name] = Link(client)
        return link

    def _learn_route(self, key: str) -> None:
        """A cluster node did not run a call on ``key`` (it answered a redirection, or the
        call was never sent): a read of ``key`` through redis-py's cluster client lets it
        learn the slot's node (it follows MOVED and ASK, and renews its table after a failed
        connection) before :meth:`_retrying` sends the call again."""
        try:
            self.client.exists(key)
        except RedisError:
            pass  # the retry finds out

    def _execute(self, call: ops.Call, *, wait: bool = True) -> Any:
        """Run a script call under the ``connect_retry`` policy (retried only while it was never
        sent, see :meth:`_retrying`), and ``WAIT`` for ``wait_replicas`` replicas when configured
        (same round trip, same connection: on a cluster, the primary that ran the script)."""
        key = call.keys[0]

        def run() -> Any:
            link = self._link_for(key)
            if wait and self.wait_replicas:
                if link is not None:
                    reply, acked = call.script.call_and_wait_direct(
                        link, call.keys, call.args, self.wait_replicas, self.wait_timeout_ms
                    )
                else:
                    target = self.client
                    if self.is_cluster:  # WAIT counts the writes of its own connection
                        target = self.client.get_redis_connection(self.client.get_node_from_key(key))
                    reply, acked = self._sent(
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
            return self._sent(key, lambda: call.run(self.client))

        def attempt() -> Any:
            if not self.is_cluster:
                return run()
            try:
                return run()
            except NotSentError:
                self._learn_route(key)
                raise
            except (*REDIRECTED, ClusterError) as exc:
                if not redirected(exc):
                    raise
                self._learn_route(key)
                raise NotSentClusterError(f"Redis Cluster answered {exc}; the script did not run") from exc

        return self._retrying(attempt)

    def _run_once(self, call: ops.Call) -> Any:
        """Run a script call once, no retry and no WAIT (the worker's claims and lease
        renewals: their callers handle errors and carry on), on this thread's connection of
        the link when there is one."""
        key = call.keys[0]
        link = self._link_for(key)
        try:
            if link is not None:
                return call.script.call_direct(link, call.keys, call.args)
            return call.run(self.client)
        except NotSentError:
            if self.is_cluster:
                self._learn_route(key)
            raise
        except (*REDIRECTED, ClusterError) as exc:
            if not self.is_cluster or not redirected(exc):
                raise
            self._learn_route(key)
            raise NotSentClusterError(f"Redis Cluster answered {exc}; the script did not run") from exc

    def _run_add(self, proc: Processor, base: str, encoded: list[bytes]) -> AddResult:
        link = self._link if not self.is_cluster else self._link_for(proc.keys.for_base(base).head(base))
        if link is not None and len(encoded) == 1 and not self.wait_replicas:
            # a single add over this thread's connection, framed in one step (ops.add_frame);
            # NOSCRIPT, a request never sent and a cluster's redirection take the general way
            # (which retries the latter two)
            try:
                reply = link.request(ops.add_frame(proc, base, encoded[0]))
                return ops.parse_add(proc, base, 1, reply)
            except (NoScriptError, NotSentError, *REDIRECTED):
                pass
        reply = self._execute(ops.add_call(proc, base, encoded))
        return ops.parse_add(proc, base, len(encoded), reply)

    def __repr__(self) -> str:
        return f"<Batcher prefix={self.prefix!r} processors={sorted(self.processors)}>"

    @overload
    def processor(self, fn: Handler, /) -> Processor: ...

    @overload
    def processor(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        max_batch_size: int = 100,
        flush_interval: float | timedelta | None = 30.0,
        partitions: int = 1,
        codec: str | Codec = "msgpack",
        max_item_bytes: int = 1 << 20,
        history_limit: int = 100,
        retention: float | timedelta = timedelta(days=7),
        lease_timeout: float | timedelta = 60.0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        max_attempts: int = 10,
        max_deaths: int = 3,
        handler_timeout: float | timedelta | None = None,
        bisect_on_error: bool = False,
        ordered: bool = False,
        max_pending: int | None = None,
        dead_letter_ttl: float | timedelta | None = timedelta(days=180),
        max_dead_letters: int | None = 10_000,
    ) -> Callable[[Handler], Processor]: ...

    def processor(
        self,
        fn: Handler | None = None,
        /,
        *,
        name: str | None = None,
        max_batch_size: int = 100,
        flush_interval: float | timedelta | None = 30.0,
        partitions: int = 1,
        codec: str | Codec = "msgpack",
        max_item_bytes: int = 1 << 20,
        history_limit: int = 100,
        retention: float | timedelta = timedelta(days=7),
        lease_timeout: float | timedelta = 60.0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        max_attempts: int = 10,
        max_deaths: int = 3,
        handler_timeout: float | timedelta | None = None,
        bisect_on_error: bool = False,
        ordered: bool = False,
        max_pending: int | None = None,
        dead_letter_ttl: float | timedelta | None = timedelta(days=180),
        max_dead_letters: int | None = 10_000,
    ) -> Processor | Callable[[Handler], Processor]:
        """Decorator that turns ``handler(flush)`` into a :class:`Processor`.

        ``max_batch_size``: a sequence is sealed and delivered when it holds this many items.
        ``flush_interval``: seconds (or timedelta) after a sequence's first item at which it is
        delivered even if not full; ``None`` = only size and manual flushes.
        ``partitions``: hash-tagged shards of the processor (spread one hot processor over a
        cluster). ``codec``: ``"msgpack"`` (default), ``"json"`` or a :class:`Codec`.
        ``max_item_bytes``: largest encoded item accepted. ``history_limit``: flush records kept
        per batch id. ``retention``: how long a finished batch id's head and history stay.
        ``lease_timeout``: how long a claimed flush is owned by a worker without a heartbeat.
        ``retry_backoff``/``retry_backoff_max``: failed flushes are retried after
        ``retry_backoff * 2**(attempt-1)`` seconds (with jitter), capped at ``retry_backoff_max``.
        ``max_attempts``: after this many failed deliveries the items go to the dead-letter store.
        ``max_deaths``: same, counting deliveries whose worker died (or lost its lease) in the
        handler, so a poison item that crashes the process cannot crash-loop the workers.
        ``handler_timeout``: a handler running longer counts as failed (its late result is
        ignored). ``bisect_on_error``: a failing delivery of several items is split in halves
        (retried at once, without spending attempts) to isolate poison items.
        ``ordered``: deliver the sequences of one batch id one at a time, in order; a retrying
        sequence holds back the later ones. ``max_pending``: ``add`` raises :class:`BatchFull`
        instead of letting one batch id hold more undelivered items than this.
        ``dead_letter_ttl``: how long a dead letter is kept (``None``: until purged or replayed);
        ``max_dead_letters``: at most this many per partition, the oldest dropped first
        (``None``: no limit). Both keep a failing processor from filling Redis.
        """
        # validate everything eagerly: bad configuration fails at import time, not in production
        size = _positive_int("max_batch_size", max_batch_size)
        interval = _seconds("flush_interval", flush_interval, allow_none=True)
        parts = _positive_int("partitions", partitions)
        if parts > MAX_PARTITIONS:
            raise ConfigError(f"partitions must be at most {MAX_PARTITIONS}, got {parts}")
        codec_obj = resolve_codec(codec)
        item_limit = _positive_int("max_item_bytes", max_item_bytes)
        hist = _positive_int("history_limit", history_limit)
        keep = _seconds("retention", retention, allow_none=False, positive=True)
        lease = _seconds("lease_timeout", lease_timeout, allow_none=False, positive=True)
        backoff = _seconds("retry_backoff", retry_backoff, allow_none=False, positive=True)
        backoff_max = _seconds("retry_backoff_max", retry_backoff_max, allow_none=False)
        attempts = _positive_int("max_attempts", max_attempts)
        deaths = _positive_int("max_deaths", max_deaths)
        timeout = _seconds("handler_timeout", handler_timeout, allow_none=True, positive=True)
        pending_cap = None if max_pending is None else _positive_int("max_pending", max_pending)
        dead_ttl = _seconds("dead_letter_ttl", dead_letter_ttl, allow_none=True, positive=True)
        dead_cap = None if max_dead_letters is None else _positive_int("max_dead_letters", max_dead_letters)
        for flag_name, flag in (("bisect_on_error", bisect_on_error), ("ordered", ordered)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{flag_name} must be True or False, got {flag!r}")
        assert keep is not None and lease is not None and backoff is not None and backoff_max is not None
        if name is not None:
            validate_name("processor name", name)

        def decorate(handler: Handler) -> Processor:
            if not callable(handler):
                raise ConfigError(f"processor handler must be callable, got {handler!r}")
            pname = name or f"{handler.__module__}.{handler.__qualname__}"
            validate_name("processor name", pname)
            config = ProcessorConfig(
                name=pname,
                max_batch_size=size,
                flush_interval=interval,
                partitions=parts,
                codec=codec_name(codec_obj),
                max_item_bytes=item_limit,
                history_limit=hist,
                retention=keep,
                lease_timeout=lease,
                retry_backoff=backoff,
                retry_backoff_max=backoff_max,
                max_attempts=attempts,
                max_deaths=deaths,
                handler_timeout=timeout,
                bisect_on_error=bisect_on_error,
                ordered=ordered,
                max_pending=pending_cap,
                dead_letter_ttl=dead_ttl,
                max_dead_letters=dead_cap,
            )
            with self._lock:
                if pname in self.processors:
                    raise DuplicateProcessor(
                        f"a processor named {pname!r} is already defined on this batcher"
                    )
                proc = Processor(self, handler, config, codec_obj)
                self.processors[pname] = proc
            return proc

        if fn is not None:
            return decorate(fn)
        return decorate

    def get_processor(self, name: str) -> Processor:
        """The processor called ``name`` (raises :class:`UnknownProcessor`)."""
        try:
            return self.processors[name]
        except KeyError:
            raise UnknownProcessor(f"no processor named {name!r}; known: {sorted(self.processors)}") from None

    def batch_ids(self, processor: str) -> Iterator[str]:
        """Active base ids of a processor, iterated with SSCAN over each partition (never KEYS)."""
        return self.get_processor(processor).batch_ids()

    # -- registry ---------------------------------------------------------------------------------

    def _first_write(self) -> None:
        """Before this batcher's first write on its connection: :meth:`check_memory_policy`
        and :meth:`check_layout`."""
        if not self._policy_checked:
            self.check_memory_policy()
            self._policy_checked = True
        if not self._layout_checked:
            self.check_layout()

    def check_layout(self) -> int:
        """Check that Redis holds this version's data layout under the prefix (stamping it on
        a Redis without data of the prefix); raise :class:`LayoutMismatch` otherwise, before
        anything is written. A batcher runs this before its first write; workers run it when
        they start. Returns the layout version."""
        version = _drive(self, ops.layout_steps(self.prefix, self.allow_eviction))
        self._layout_checked = True
        return version

    def _ensure_registered(self, proc: Processor) -> None:
        if proc.name in self._registered:
            return
        self._first_write()
        key = registry_key(self.prefix)
        self._command(key, lambda: self.client.hset(key, proc.name, proc.config.to_json()))
        self._registered.add(proc.name)

    def register(self, processors: Iterable[Processor] | None = None) -> None:
        """Publish processor configs to ``<prefix>:processors`` (the CLI reads it)."""
        for proc in processors if processors is not None else list(self.processors.values()):
            self._registered.discard(proc.name)
            self._ensure_registered(proc)

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
            policy = self._retrying(
                partial(self._sent, key, partial(read_memory_policy, target), pool), idempotent=True
            )
            judge_memory_policy(self, policy, node)
        self._policy_checked = True

    def _registry(self) -> tuple[dict[str, ProcessorConfig], dict[str, str]]:
        """The registry as (configs, unreadable entries: name -> reason)."""
        key = registry_key(self.prefix)
        return parse_registry(self._command(key, lambda: self.client.hgetall(key)))

    def layout(self) -> int | str | None:
        """The data layout version stamped under the prefix (None: none; a str: not a
        version), read without stamping anything."""
        key = layout_key(self.prefix)
        found = self._command(key, lambda: self.client.get(key))
        return None if found is None else ops.parse_layout(found)

    def upgrade_layout(self) -> int | None:
        """Stamp this version's layout on data written before layouts were stamped, once
        nothing is left under the old key names (``redis-batcher layout --upgrade``). Returns
        the version found before (None: unstamped). See :func:`redis_batcher.ops.upgrade_layout_steps`."""
        configs, _ = self._registry()
        steps = ops.upgrade_layout_steps(self.prefix, {n: c.partitions for n, c in configs.items()})
        found = _drive(self, steps)
        self._layout_checked = False
        return found

    def registered(self) -> dict[str, ProcessorConfig]:
        """Processor configs found in Redis, written by any producer or worker of this prefix.
        Entries that are not processor configs are skipped with a logged warning."""
        configs, bad = self._registry()
        for name, reason in bad.items():
            log.warning(
                "skipped registry entry %s of %s: %s", name, registry_key(self.prefix), reason
            )
        return configs

    def _close_links(self) -> None:
        if self._link is not None:
            self._link.close()
        with self._links_lock:
            links, self._node_links = list(self._node_links.values()), {}
        for link in links:
            link.close()

    def close(self) -> None:
        """Close the connection pool and the producer connections."""
        if isinstance(self.client, _Unconnected):
            return  # a definitions_only batcher: nothing to close
        self._close_links()
        self.client.close()

    def remote(self, name: str) -> Processor:
        """A processor rebuilt from the Redis registry, for inspecting and flushing batches
        without importing the application (as the CLI does). Its handler cannot be called."""
        if name in self.processors:
            return self.processors[name]
        configs, bad = self._registry()
        if name in bad:
            key = registry_key(self.prefix)
            raise UnknownProcessor(
                f"the registry entry of processor {name!r} in {key} cannot be read ({bad[name]}); "
                f"start one of its producers or workers to register it again, or HDEL {key} {name}"
            )
        if name not in configs:
            raise UnknownProcessor(f"processor {name!r} is not registered under prefix {self.prefix!r}")
        config = configs[name]
        try:
            codec_obj = resolve_codec(config.codec)
        except ConfigError:
            codec_obj = resolve_codec("msgpack")

        def unavailable(flush: Any) -> None:
            raise UnknownProcessor(
                f"processor {name!r} was loaded from the registry; its handler is not here"
            )

        return Processor(self, unavailable, config, codec_obj)

    # -- iterator jobs (redis_batcher.jobs) --------------------------------------------------------

    def iterator(
        self,
        *,
        name: str,
        batch_size: int = 100,
        delay_between_batches: float | timedelta = 0.1,
        max_retries: int = 5,
        retry_backoff: float | timedelta = 1.0,
        retry_backoff_max: float | timedelta = 30.0,
        lease_timeout: float | timedelta = 60.0,
    ) -> Callable[[type], JobIterator]:
        """Class decorator defining an iterator (see README "Iterator jobs"); returns a
        :class:`~redis_batcher.jobs.JobIterator` with ``start``/``pause``/``resume``/``cancel``/
        ``status``/``delete``/``jobs``. The class has ``next_batch(cursor, batch_size, job) ->
        Page`` (or ``next_batch(cursor, batch_size)``), ``process(items, job)`` and optionally
        ``on_complete(job)``.

        ``batch_size``: passed to ``next_batch``. ``delay_between_batches``: pause after each
        saved step. ``max_retries``: how many times a failing step is retried; the job fails
        at the ``max_retries + 1``-th failure in a row (``max_retries=0``: at the first
        failure). Retry n waits ``retry_backoff * 2**(n-1)`` seconds, capped at
        ``retry_backoff_max``. ``lease_timeout``: how long a job stays owned by a worker that
        stopped renewing it (a dead worker's job is resumed by another after this)."""
        from .jobs import define_iterator, make_config

        config = make_config(
            name,
            batch_size=batch_size,
            delay_between_batches=delay_between_batches,
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            lease_timeout=lease_timeout,
        )

        def decorate(cls: type) -> JobIterator:
            return define_iterator(self, cls, config)

        return decorate

    def jobs(self, status: str | None = None, limit: int = 50) -> list[JobStatus]:
        """Iterator jobs under this prefix (of every iterator defined here or registered in
        Redis), newest first; ``status`` picks one of pending, running, paused, completed,
        failed, cancelled."""
        from .jobs import list_jobs

        return list_jobs(self, status, limit)
