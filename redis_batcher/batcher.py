"""The entry point: a Redis connection, a key prefix and the processors defined on it."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import layout_ops
from .codec import Codec, codec_name, resolve_codec
from .definition import Handler
from .errors import (
    ConfigError,
    DuplicateProcessor,
    UnknownProcessor,
)
from .executor import Executor
from .executor_core import ExecutorAttributes, check_client, client_from_url
from .job_model import DEFAULT_RETRY_BACKOFF, DEFAULT_RETRY_BACKOFF_MAX, JobStatus, make_config
from .jobs import JobIterator, define_iterator, list_jobs
from .keys import layout_key, registry_key, validate_name
from .models import ProcessorConfig
from .options import ProcessorOptions, processor_options
from .processor import Processor
from .worker_registry import WorkerInfo, workers_steps

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no runtime dependency: annotations are not evaluated
    from typing_extensions import Unpack

DEFAULT_URL = "redis://127.0.0.1:6379/0"
T = TypeVar("T")

log = logging.getLogger("redis_batcher")


def default_url() -> str:
    """``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``."""
    return os.environ.get("REDIS_URL") or DEFAULT_URL


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


class Batcher(ExecutorAttributes):
    """Holds the Redis client and the processors.

    ``connection`` is a URL (``redis://``, ``rediss://``, ``unix://``), an existing
    ``redis.Redis`` / ``redis.RedisCluster`` client, or ``None`` for ``$REDIS_URL`` /
    ``redis://127.0.0.1:6379/0``. ``prefix`` namespaces every key. Pass ``cluster=True`` with a
    URL to connect to Redis Cluster. A URL redis-py cannot parse raises :class:`ConfigError`.
    """

    executor: Executor

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
        # the I/O: script calls, retries, WAIT and the checks before the first write
        self.executor = Executor.from_options(
            prefix=self.prefix,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
            connect_retry=connect_retry,
            allow_eviction=allow_eviction,
        )
        self.url: str | None = None
        self.processors: dict[str, Processor] = {}
        self.iterators: dict[str, JobIterator] = {}  # iterator jobs (redis_batcher.jobs)
        # guards the definitions (processors, iterators) while they are added
        self.definitions_lock = threading.Lock()
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
            self.url = None
            self.executor.bind(connection, links=False)
            return
        if connection is None:
            connection = default_url()
        if isinstance(connection, str):
            # never let redis-py re-send a command after a connection error: a script that ran
            # but whose reply was lost would run twice (a duplicated add). Connection attempts
            # that failed before anything was sent are retried by Executor.execute instead. (Script
            # calls never go through these retries: see connection.Link and scripts._routing.)
            redis_options.setdefault("retry", Retry(NoBackoff(), 0))
            factory = redis.RedisCluster if cluster else redis.Redis
            client: Any = client_from_url(factory, connection, redis_options)
            url: str | None = connection
        else:
            client, url = connection, None
        check_client(client)
        self.url = url
        self.executor.bind(client)

    def __repr__(self) -> str:
        return f"<Batcher prefix={self.prefix!r} processors={sorted(self.processors)}>"

    @overload
    def processor(self, fn: Handler, /) -> Processor: ...

    @overload
    def processor(
        self, fn: None = None, /, **options: Unpack[ProcessorOptions]
    ) -> Callable[[Handler], Processor]: ...

    def processor(
        self, fn: Handler | None = None, /, **options: Unpack[ProcessorOptions]
    ) -> Processor | Callable[[Handler], Processor]:
        """Decorator that turns ``handler(flush)`` into a :class:`Processor`. The keywords,
        all optional, are those of :class:`~redis_batcher.options.ProcessorOptions`: the
        batching rules (``max_batch_size``, ``flush_interval``), retries and dead letters,
        ordering, limits; each is described there."""
        # validate everything eagerly: bad configuration fails at import time, not in production
        settings = processor_options(options)
        name: str | None = settings.pop("name")
        codec_obj: Codec = settings["codec"]
        settings["codec"] = codec_name(codec_obj)

        def decorate(handler: Handler) -> Processor:
            if not callable(handler):
                raise ConfigError(f"processor handler must be callable, got {handler!r}")
            pname = name or f"{handler.__module__}.{handler.__qualname__}"
            validate_name("processor name", pname)
            config = ProcessorConfig(name=pname, **settings)
            with self.definitions_lock:
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

    def check_layout(self) -> int:
        """Check that Redis holds this version's data layout under the prefix (stamping it on
        a Redis without data of the prefix); raise :class:`LayoutMismatch` otherwise, before
        anything is written. A batcher runs this before its first write; workers run it when
        they start. Returns the layout version."""
        return self.executor.check_layout()

    def register(self, processors: Iterable[Processor] | None = None) -> None:
        """Publish processor configs to ``<prefix>:processors`` (the CLI reads it)."""
        for proc in processors if processors is not None else list(self.processors.values()):
            self.executor.registered.discard(proc.name)
            self.executor.ensure_registered(proc)

    def check_memory_policy(self) -> None:
        """Refuse a Redis that may evict queued items (:class:`EvictionPolicyError`); see
        :meth:`Executor.check_memory_policy <redis_batcher.executor.Executor.check_memory_policy>`."""
        self.executor.check_memory_policy()

    def registry_entries(self) -> tuple[dict[str, ProcessorConfig], dict[str, str]]:
        """The processor registry in Redis as (configs by name, unreadable entries: name ->
        reason); :meth:`registered` logs the latter and returns the former."""
        key = registry_key(self.prefix)
        return parse_registry(self.executor.command(key, lambda: self.client.hgetall(key)))

    def layout(self) -> int | str | None:
        """The data layout version stamped under the prefix (None: none; a str: not a
        version), read without stamping anything."""
        key = layout_key(self.prefix)
        found = self.executor.command(key, lambda: self.client.get(key))
        return None if found is None else layout_ops.parse_layout(found)

    def upgrade_layout(self) -> int | None:
        """Stamp this version's layout on data written before layouts were stamped, once
        nothing is left under the old key names (``redis-batcher layout --upgrade``). Returns
        the version found before (None: unstamped). See :func:`redis_batcher.ops.upgrade_layout_steps`."""
        configs, _ = self.registry_entries()
        steps = layout_ops.upgrade_layout_steps(self.prefix, {n: c.partitions for n, c in configs.items()})
        found = self.executor.drive(steps)
        self.executor.layout_checked = False
        return found

    def workers(self) -> list[WorkerInfo]:
        """The live workers of this prefix, sync and asyncio, by id, as their last heartbeat
        recorded them (two reads however many there are; see
        :mod:`redis_batcher.worker_registry`)."""
        return self.executor.drive(workers_steps(self.prefix))

    def registered(self) -> dict[str, ProcessorConfig]:
        """Processor configs found in Redis, written by any producer or worker of this prefix.
        Entries that are not processor configs are skipped with a logged warning."""
        configs, bad = self.registry_entries()
        for name, reason in bad.items():
            log.warning(
                "skipped registry entry %s of %s: %s", name, registry_key(self.prefix), reason
            )
        return configs

    def close(self) -> None:
        """Close the connection pool and the producer connections."""
        if isinstance(self.client, _Unconnected):
            return  # a definitions_only batcher: nothing to close
        self.executor.close_links()
        self.client.close()

    def remote(self, name: str) -> Processor:
        """A processor rebuilt from the Redis registry, for inspecting and flushing batches
        without importing the application (as the CLI does). Its handler cannot be called."""
        if name in self.processors:
            return self.processors[name]
        configs, bad = self.registry_entries()
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
        max_attempts: int | None = None,
        max_retries: int | None = None,
        retry_backoff: float | timedelta = DEFAULT_RETRY_BACKOFF,
        retry_backoff_max: float | timedelta = DEFAULT_RETRY_BACKOFF_MAX,
        lease_timeout: float | timedelta = 60.0,
    ) -> Callable[[type], JobIterator]:
        """Class decorator defining an iterator (see README "Iterator jobs"); returns a
        :class:`~redis_batcher.jobs.JobIterator` with ``start``/``pause``/``resume``/``cancel``/
        ``status``/``delete``/``jobs``. The class has ``next_batch(cursor, batch_size, job) ->
        Page`` (or ``next_batch(cursor, batch_size)``), ``process(items, job)`` and optionally
        ``on_complete(job)``.

        ``batch_size``: passed to ``next_batch``. ``delay_between_batches``: pause after each
        saved step. ``max_attempts`` (default 5): how many times a step runs; the job fails at
        the ``max_attempts``-th failure in a row. ``max_retries=N`` is the seed's spelling of
        the same, N attempts (0 like 1); give one of the two. After failure n the step waits
        ``retry_backoff * 2**(n-1)`` seconds (2, 4, 8, 16 s by default), capped at
        ``retry_backoff_max``. ``lease_timeout``: how long a job stays owned by a worker that
        stopped renewing it (a dead worker's job is resumed by another after this). ``start``
        may override all but ``lease_timeout`` for one job."""
        config = make_config(
            name,
            batch_size=batch_size,
            delay_between_batches=delay_between_batches,
            max_attempts=max_attempts,
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
        return list_jobs(self, status, limit)
