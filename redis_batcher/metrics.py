"""Prometheus metrics, with ``prometheus-client`` (``pip install 'redis-batcher[metrics]'``).

Two parts, both registered in a ``prometheus_client`` registry (default: its global
``REGISTRY``, which its ``start_http_server`` and ASGI/WSGI apps serve):

- :class:`WorkerMetrics`, what a worker did: pass it as a worker's ``observer``
  (``Worker(batcher, observer=WorkerMetrics())``, sync or asyncio); it counts flushes, items,
  failures, retries and dead letters and times handlers, labelled ``processor`` and ``reason``
  (what sealed the flush: ``size``, ``interval``, ``manual``, ...).
- :class:`RedisCollector`, what Redis holds, read at each scrape: backlog, scheduled
  sequences, active batch ids, items sealed and not yet delivered, the oldest overdue entry's
  age, dead letters, paused processors and live workers, by ``processor``. A scrape costs
  seven commands per partition and two for the worker registry, however many batch ids there
  are.

``redis-batcher worker APP --metrics-port 9108`` serves both on ``/metrics``. The names and what
to alert on are in ``docs/monitoring.md``. Nothing here runs on the producer's ``add()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from redis.exceptions import RedisError

from . import asyncio as aio
from . import ops, overview
from .batcher import Batcher
from .delivery import Outcome
from .errors import BatcherError, ConfigError

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily, Metric

    INSTALLED = True
except ImportError:  # the optional extra is not installed: see require()
    INSTALLED = False

__all__ = ["RedisCollector", "WorkerMetrics", "require", "serve"]

log = logging.getLogger("redis_batcher.metrics")

MISSING = "Prometheus metrics need prometheus-client: pip install 'redis-batcher[metrics]'"
LABELS = ("processor", "reason")
# seconds: from a fast in-process handler to a slow downstream bulk write
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 50_000)


def require() -> None:
    """Raise :class:`ConfigError` naming the extra when ``prometheus-client`` is not installed."""
    if not INSTALLED:
        raise ConfigError(MISSING)


class WorkerMetrics:
    """A worker observer (:class:`~redis_batcher.instrument.WorkerObserver`) keeping Prometheus
    counters and histograms of the results the worker recorded, in ``registry`` (default: the
    global one). Share one between the workers of a process: the metrics are registered once."""

    def __init__(self, registry: Any = None) -> None:
        require()
        reg = prometheus_client.REGISTRY if registry is None else registry

        def counter(name: str, doc: str) -> Any:
            return prometheus_client.Counter(name, doc, LABELS, registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return prometheus_client.Histogram(name, doc, LABELS, registry=reg, buckets=buckets)

        self.delivered = counter("redis_batcher_flushes_delivered", "Flushes whose handler succeeded.")
        self.items = counter("redis_batcher_items_delivered", "Items handled successfully.")
        self.failures = counter(
            "redis_batcher_flush_failures",
            "Failed deliveries: the handler raised, timed out or reported a partial failure.",
        )
        self.retries = counter("redis_batcher_flush_retries", "Failed deliveries scheduled to run again.")
        self.dead = counter(
            "redis_batcher_flushes_dead_lettered",
            "Dead letters written by this worker (attempts exhausted, undecodable or damaged data).",
        )
        self.duration = histogram(
            "redis_batcher_handler_duration_seconds",
            "How long a delivery took: reading its items and running the handler.",
            DURATION_BUCKETS,
        )
        self.size = histogram("redis_batcher_batch_size_items", "Items per delivered flush.", SIZE_BUCKETS)

    def flush_settled(self, c: ops.Claimed, outcome: Outcome, code: str, seconds: float) -> None:
        """Count one recorded result (see :class:`~redis_batcher.instrument.WorkerObserver`)."""
        labels = (c.processor.name, c.reason or "size")
        if outcome.mode == "decode":  # the handler did not run; each entry is its own dead letter
            self.dead.labels(*labels).inc(len(outcome.indices))
            return
        if outcome.mode != "missing":  # the handler ran
            self.duration.labels(*labels).observe(seconds)
            self.size.labels(*labels).observe(outcome.count)
        if outcome.mode == "ack":
            self.delivered.labels(*labels).inc()
            self.items.labels(*labels).inc(outcome.count)
            return
        self.failures.labels(*labels).inc()
        if outcome.mode == "partial":
            self.items.labels(*labels).inc(outcome.count - len(outcome.indices))
        if code == "dead":
            self.dead.labels(*labels).inc()
        elif outcome.mode != "missing":
            self.retries.labels(*labels).inc()

    def flush_quarantined(self, processor: str, member: str) -> None:
        """Count a sequence a claim moved to the dead letters (reason ``quarantine``)."""
        self.dead.labels(processor, "quarantine").inc()


def _gauge(name: str, doc: str) -> Any:
    return GaugeMetricFamily(name, doc, labels=["processor"])


class RedisCollector:
    """A ``prometheus_client`` collector reading what Redis holds at each scrape (see
    :func:`redis_batcher.overview.backlogs`): ``registry.register(RedisCollector(batcher))``.
    ``processors``: only these (default: every processor registered under the prefix). A scrape
    that cannot read Redis reports ``redis_batcher_redis_up 0`` and logs why."""

    def __init__(self, batcher: Batcher, processors: list[str] | None = None) -> None:
        require()
        self.batcher = batcher
        self.processors = processors

    def describe(self) -> Iterator[Metric]:
        """The metric names, without reading Redis (registering calls this, not :meth:`collect`)."""
        yield from self._families().values()
        yield GaugeMetricFamily("redis_batcher_redis_up", "")

    def _families(self) -> dict[str, Any]:
        return {
            "due": _gauge("redis_batcher_backlog_flushes", "Sequences due now that no worker holds."),
            "scheduled": _gauge(
                "redis_batcher_scheduled_flushes",
                "Sequences waiting for their interval or a retry, or held by a worker.",
            ),
            "active": _gauge("redis_batcher_active_batch_ids", "Batch ids with an active sequence."),
            "pending": _gauge(
                "redis_batcher_pending_items",
                "Items of sealed sequences not yet delivered (accumulating items count once sealed).",
            ),
            "overdue": _gauge(
                "redis_batcher_oldest_overdue_seconds",
                "How long the oldest sequence due and not held by a worker has waited (0: none).",
            ),
            "dead": _gauge("redis_batcher_dead_letters", "Dead letters kept."),
            "paused": _gauge("redis_batcher_paused", "1 while the processor is paused."),
            "workers": _gauge("redis_batcher_workers", "Live workers serving the processor."),
        }

    def collect(self) -> Iterator[Metric]:
        """Read Redis now and yield the gauges."""
        up = GaugeMetricFamily("redis_batcher_redis_up", "1 when the last scrape could read Redis.")
        try:
            rows = overview.backlogs(self.batcher, self.processors)
            workers = self.batcher.workers()
        except (RedisError, BatcherError) as exc:
            log.warning("metrics: cannot read Redis at %s: %s", self.batcher.target, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        fams = self._families()
        for name, b in rows.items():
            serving = sum(1 for w in workers if name in w.processors)
            for key, value in (
                ("due", b.due_now),
                ("scheduled", b.scheduled),
                ("active", b.active_batch_ids),
                ("pending", b.pending_items),
                ("overdue", b.oldest_overdue or 0.0),
                ("dead", b.dead_letters),
                ("paused", int(b.paused)),
                ("workers", serving),
            ):
                fams[key].add_metric([name], value)
        yield up
        yield from fams.values()


def sync_batcher(batcher: Batcher | aio.Batcher) -> Batcher:
    """A sync batcher reading what ``batcher`` serves (the collector runs in the HTTP server's
    thread): ``batcher`` itself, or for an asyncio one, a sync client of the same server."""
    if isinstance(batcher, Batcher):
        return batcher
    if batcher.url is not None:
        return Batcher(batcher.url, prefix=batcher.prefix, cluster=batcher.is_cluster)
    if batcher.is_cluster:
        raise ConfigError("the Redis-side metrics of an asyncio cluster client need --redis-url")
    kwargs = dict(batcher.client.connection_pool.connection_kwargs)
    return Batcher(redis.Redis(**kwargs), prefix=batcher.prefix)


def serve(batcher: Batcher | aio.Batcher, port: int, host: str = "127.0.0.1") -> WorkerMetrics:
    """Serve ``/metrics`` on ``host:port`` with prometheus-client's HTTP server (a daemon thread):
    the worker-side metrics (returned, to pass as the worker's ``observer``) and a
    :class:`RedisCollector` of ``batcher``'s prefix."""
    require()
    metrics = WorkerMetrics()
    prometheus_client.REGISTRY.register(RedisCollector(sync_batcher(batcher)))
    try:
        prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    return metrics
