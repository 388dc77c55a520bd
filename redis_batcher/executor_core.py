"""What the sync and asyncio executors share, without I/O: their settings and the state of
the checks due before the first write on a connection (:class:`ExecutorCore`), the
``connect_retry`` schedule (:class:`Backoff`), a cluster's redirections, the stepping of the
multi-step operations of :mod:`redis_batcher.ops`, and the settings as attributes of a
batcher (:class:`ExecutorAttributes`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.exceptions import AskError, ClusterDownError, ClusterError, MovedError, TryAgainError

from .calls import Step, Steps
from .errors import ConfigError, NotSentClusterError, NotSentError, OutcomeUnknownError
from .options import flag, seconds_option

T = TypeVar("T")
E = TypeVar("E", bound="ExecutorCore")

# a cluster node's answers to a command it did not run: the slot is served by another node, is
# moving, or the cluster is down. The call is safe to send again once redis-py knows the slot's
# node (the executors' learn_route).
REDIRECTED = (MovedError, AskError, TryAgainError, ClusterDownError)

# what the connect_retry policy retries, as RETRIED[idempotent]: a call that was never sent;
# for a command that may safely run twice (a read), also one whose outcome is unknown
RETRIED: tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]] = (
    (NotSentError,),
    (NotSentError, OutcomeUnknownError),
)


def redirected(exc: BaseException) -> bool:
    """A cluster node did not run a single command: it answered a redirection, or redis-py's
    cluster client gave up on it after redirections alone (``ClusterError("TTL exhausted.")``:
    MOVED, ASK, TRYAGAIN each time), as while a slot migrates for longer than its retries."""
    gave_up = isinstance(exc, ClusterError) and str(exc).startswith("TTL exhausted")
    return gave_up or isinstance(exc, REDIRECTED)


def not_run(exc: BaseException) -> NotSentClusterError:
    """The error for a script call that a cluster node answered with ``exc``, a redirection
    (see :func:`redirected`): it did not run, so it may be sent again."""
    return NotSentClusterError(f"Redis Cluster answered {exc}; the script did not run")


def check_client(client: Any) -> None:
    """Refuse a client that decodes replies (:class:`ConfigError`): items are bytes."""
    kwargs: dict[str, Any] = getattr(client, "get_connection_kwargs", dict)()
    if kwargs.get("decode_responses"):
        raise ConfigError("redis-batcher needs a client with decode_responses=False (items are bytes)")


def redacted_url(url: str) -> str:
    """``url`` with its password (in the user info or a ``password=`` query) shown as ``***``,
    for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL: it may hold anything
        return "<unparsable URL>"
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = parts.query
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def client_from_url(factory: Any, url: str, options: dict[str, Any]) -> Any:
    """``factory.from_url(url, **options)`` (a redis-py client class); a URL it cannot parse
    raises :class:`ConfigError` naming it, password hidden."""
    try:
        return factory.from_url(url, **options)
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {redacted_url(url)!r}: {exc}") from exc


def client_target(client: Any) -> str:
    """Where a client given by the application connects, read from its connection settings
    (never the password): ``redis://host:port/db``, ``unix://path?db=N`` or, for Redis
    Cluster, its default node."""
    try:
        node = client.get_default_node() if hasattr(client, "get_default_node") else None
        kwargs: dict[str, Any] = getattr(client, "get_connection_kwargs", dict)()
    except ConfigError:  # a batcher that only holds definitions
        return "no Redis connection"
    if node is not None:
        return f"Redis Cluster node {node.name}"
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={db}"
    if "host" in kwargs:
        return f"redis://{kwargs['host']}:{kwargs.get('port', 6379)}/{db}"
    return type(client).__name__


class Backoff:
    """The ``connect_retry`` schedule of one call, from its first failure: pauses of 50 ms,
    doubling up to 1 s, while the next attempt starts within ``budget`` seconds."""

    def __init__(self, budget: float) -> None:
        self.deadline = time.monotonic() + budget
        self.delay = 0.05

    def pause(self) -> float | None:
        """The pause before the next attempt; None when the budget is spent (the caller
        raises the last failure)."""
        delay = self.delay
        if time.monotonic() + delay > self.deadline:
            return None
        self.delay = min(delay * 2, 1.0)
        return delay


@dataclass(frozen=True)
class Finished(Generic[T]):
    """What a multi-step operation returned."""

    value: T


def advance(steps: Steps[T], reply: Any) -> Step | Finished[T]:
    """Send ``reply`` (None to start) to a multi-step operation of :mod:`redis_batcher.calls`:
    its next request, or what it returned."""
    try:
        return steps.send(reply)
    except StopIteration as done:
        return Finished(done.value)


@dataclass(kw_only=True, eq=False, repr=False)
class ExecutorCore:
    """The settings of an executor (``WAIT`` for ``wait_replicas`` replicas for up to
    ``wait_timeout_ms``; retry what was never sent for ``connect_retry`` seconds; accept an
    evicting ``maxmemory-policy`` when ``allow_eviction``) and, per connection, the state of
    the checks due before its first write."""

    prefix: str
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000
    connect_retry: float = 10.0
    allow_eviction: bool = False
    client: Any = field(default=None, init=False)
    is_cluster: bool = field(default=False, init=False)
    # processors registered on this connection
    registered: set[str] = field(default_factory=set, init=False)
    policy_checked: bool = field(default=False, init=False)  # check_memory_policy passed
    layout_checked: bool = field(default=False, init=False)  # check_layout passed
    # the server could not tell its policy, or it evicts and that is allowed: said once
    policy_logged: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        """A subclass sets up its own state here (``__init__`` calls it last)."""

    @classmethod
    def from_options(
        cls: type[E],
        *,
        prefix: str,
        wait_replicas: int,
        wait_timeout: float,
        connect_retry: float,
        allow_eviction: bool,
    ) -> E:
        """An executor with a batcher's options, checked (:class:`ConfigError`); the
        ``wait_timeout`` in seconds."""
        flag("allow_eviction", allow_eviction)
        if isinstance(wait_replicas, bool) or not isinstance(wait_replicas, int) or wait_replicas < 0:
            raise ConfigError(f"wait_replicas must be an int >= 0, got {wait_replicas!r}")
        wait_s = seconds_option("wait_timeout", wait_timeout, allow_none=False, positive=True) or 1.0
        return cls(
            prefix=prefix,
            wait_replicas=wait_replicas,
            wait_timeout_ms=max(1, round(wait_s * 1000)),  # WAIT n 0 would block forever
            connect_retry=seconds_option("connect_retry", connect_retry, allow_none=False) or 0.0,
            allow_eviction=allow_eviction,
        )

    def rebind(self, client: Any, is_cluster: bool) -> None:
        """Run calls on ``client`` from now on: the checks before the first write are due
        again."""
        self.client = client
        self.is_cluster = is_cluster
        self.registered.clear()
        self.policy_checked = False
        self.layout_checked = False


class ExecutorAttributes:
    """The client and the settings of a batcher's ``executor`` (sync or asyncio), as
    attributes of the batcher."""

    executor: ExecutorCore
    url: str | None  # the URL the batcher was given (None: a client)

    @property
    def target(self) -> str:
        """The Redis server the batcher talks to, for logs and messages: its URL with any
        password hidden, or where the client it was given connects."""
        return redacted_url(self.url) if self.url is not None else client_target(self.client)

    @property
    def client(self) -> Any:
        """The redis-py client: ``redis.Redis`` / ``redis.RedisCluster``, or their
        ``redis.asyncio`` twins for an asyncio batcher."""
        return self.executor.client

    @property
    def is_cluster(self) -> bool:
        """True when the client is a Redis Cluster client."""
        return self.executor.is_cluster

    @property
    def allow_eviction(self) -> bool:
        """Whether an evicting ``maxmemory-policy`` is accepted (with a warning)."""
        return self.executor.allow_eviction

    @allow_eviction.setter
    def allow_eviction(self, value: bool) -> None:
        self.executor.allow_eviction = value

    @property
    def wait_replicas(self) -> int:
        """How many replicas a write waits for (``WAIT``); 0: none."""
        return self.executor.wait_replicas

    @wait_replicas.setter
    def wait_replicas(self, value: int) -> None:
        self.executor.wait_replicas = value

    @property
    def wait_timeout_ms(self) -> int:
        """How long a ``WAIT`` for replicas lasts, in milliseconds."""
        return self.executor.wait_timeout_ms

    @wait_timeout_ms.setter
    def wait_timeout_ms(self, value: int) -> None:
        self.executor.wait_timeout_ms = value

    @property
    def connect_retry(self) -> float:
        """For how many seconds a call that could not be sent is retried."""
        return self.executor.connect_retry

    @connect_retry.setter
    def connect_retry(self, value: float) -> None:
        self.executor.connect_retry = value
