"""Prometheus metrics (``worker --metrics-port``, :mod:`redis_batcher.metrics`) and the
OpenTelemetry spans around deliveries, against a real redis-server: a worker subprocess scraped
over HTTP, the Redis-side collector's cost per scrape counted with INFO commandstats, the
asyncio worker through the API, and the CLI without prometheus-client installed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry import trace
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import redis_batcher as rb
from redis_batcher import Batcher, Worker
from redis_batcher import asyncio as aio
from redis_batcher.metrics import RedisCollector, WorkerMetrics
from redis_batcher.testing import RedisServer
from tests.apps import metered
from tests.conftest import ROOT, cli_command, subprocess_env

from .test_worker import running, wait_for
from .test_worker_registry import running_async

APP = "tests.apps.metered:batcher"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> Samples:
    """Every sample of ``http://127.0.0.1:<port>/metrics``, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def registry_samples(registry: CollectorRegistry) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def test_worker_process_serves_worker_and_redis_metrics_over_http(
    redis_server: RedisServer,
    real_client: redis.Redis,
    tmp_path: Path,
    cli_procs: list[subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    log = tmp_path / "worker.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cli_command("worker", APP, "--redis-url", redis_server.url, "--metrics-port", str(port)),
            cwd=ROOT,
            env=subprocess_env(redis_server.url),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    cli_procs.append(proc)
    producer = Batcher(redis_server.url, prefix=metered.PREFIX)
    p = producer.processor(
        name=metered.PROCESSOR,
        max_batch_size=2,
        flush_interval=None,
        max_attempts=2,
        retry_backoff=0.05,
        partitions=2,
    )(lambda flush: None)
    p.add_many("good", [1, 2, 3, 4])  # two flushes sealed by size
    p.add_many("poison", ["bad", "bad"])  # fails twice, then a dead letter
    p.add("manual", 5)
    p.flush("manual")  # one flush sealed by hand

    def scraped() -> Samples:
        try:
            return scrape(port)
        except OSError:
            assert proc.poll() is None, log.read_text()
            return {}

    labels = {"processor": metered.PROCESSOR, "reason": "size"}
    wait_for(
        lambda: sample(scraped(), "redis_batcher_flushes_dead_lettered_total", **labels) == 1, timeout=20
    )
    wait_for(lambda: sample(scraped(), "redis_batcher_flushes_delivered_total", **labels) == 2, timeout=10)
    got = scraped()
    assert sample(got, "redis_batcher_items_delivered_total", **labels) == 4
    assert sample(got, "redis_batcher_flush_failures_total", **labels) == 2
    assert sample(got, "redis_batcher_flush_retries_total", **labels) == 1
    assert sample(got, "redis_batcher_handler_duration_seconds_count", **labels) == 4
    assert sample(got, "redis_batcher_batch_size_items_sum", **labels) == 4 + 2 * 2
    assert sample(got, "redis_batcher_batch_size_items_bucket", le="2.0", **labels) == 4
    manual = {"processor": metered.PROCESSOR, "reason": "manual"}
    wait_for(lambda: sample(scraped(), "redis_batcher_flushes_delivered_total", **manual) == 1)
    got = scraped()
    assert sample(got, "redis_batcher_items_delivered_total", **manual) == 1
    # the Redis-side gauges of the same prefix, read at this scrape
    proc_label = {"processor": metered.PROCESSOR}
    assert sample(got, "redis_batcher_redis_up") == 1
    assert sample(got, "redis_batcher_dead_letters", **proc_label) == 1
    assert sample(got, "redis_batcher_workers", **proc_label) == 1
    assert sample(got, "redis_batcher_backlog_flushes", **proc_label) == 0
    assert sample(got, "redis_batcher_paused", **proc_label) == 0
    proc.terminate()
    assert proc.wait(20) == 0, log.read_text()
    # the failing handler's tracebacks are logged with its failures; the shutdown shows none
    text = log.read_text()
    assert "warm shutdown" in text and "Traceback" not in text.split("warm shutdown", 1)[1], text
    producer.close()


# the measurement's own commands, and a new connection's handshake (the pool may open one)
NOT_COUNTED = {"info", "config", "hello", "client", "ping", "auth", "select"}


def commands_run(client: redis.Redis) -> dict[str, int]:
    """Commands the server ran since its stats were reset, by name (see NOT_COUNTED)."""
    stats = client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    return {name: n for name, n in calls.items() if name.split("|")[0] not in NOT_COUNTED}


def scrape_cost(client: redis.Redis, registry: CollectorRegistry) -> tuple[dict[str, int], Samples]:
    client.config_resetstat()
    samples = registry_samples(registry)
    return commands_run(client), samples


def test_redis_side_scrape_costs_the_same_for_1_and_50_batch_ids(
    redis_server: RedisServer, real_client: redis.Redis
) -> None:
    batcher = Batcher(redis_server.url, prefix="scrape")
    p = batcher.processor(name="costly", max_batch_size=1000, flush_interval=60, partitions=4)(lambda f: None)
    batcher.processor(name="other", max_batch_size=10, flush_interval=60)(lambda f: None)
    batcher.register()
    registry = CollectorRegistry()
    registry.register(RedisCollector(batcher))
    p.add_many("id-0", [1, 2])
    one, samples = scrape_cost(real_client, registry)
    labels = {"processor": "costly"}
    assert sample(samples, "redis_batcher_scheduled_flushes", **labels) == 1
    assert sample(samples, "redis_batcher_backlog_flushes", **labels) == 0
    assert sample(samples, "redis_batcher_oldest_overdue_seconds", **labels) == 0
    assert sample(samples, "redis_batcher_workers", **labels) == 0
    for i in range(1, 50):
        p.add(f"id-{i}", [i])
    for i in range(10):
        p.flush(f"id-{i}")  # due now, and no worker to take them
    time.sleep(0.05)
    fifty, samples = scrape_cost(real_client, registry)
    assert fifty == one
    # the registry; the worker index (no worker: no MGET); 7 commands per partition (4 + 1)
    assert sum(one.values()) == 1 + 1 + 7 * 5, one
    assert sample(samples, "redis_batcher_active_batch_ids", **labels) == 50
    assert sample(samples, "redis_batcher_backlog_flushes", **labels) == 10
    assert sample(samples, "redis_batcher_scheduled_flushes", **labels) == 40
    # the ten flushed ids' items (one each, id-0 two) are sealed; the 40 others accumulate
    assert sample(samples, "redis_batcher_pending_items", **labels) == 11
    overdue = sample(samples, "redis_batcher_oldest_overdue_seconds", **labels)
    assert overdue is not None and 0.04 <= overdue < 30
    p.pause()
    _, samples = scrape_cost(real_client, registry)
    assert sample(samples, "redis_batcher_paused", **labels) == 1
    assert sample(samples, "redis_batcher_paused", processor="other") == 0
    batcher.close()


def test_a_scrape_with_redis_unreachable_reports_it_down() -> None:
    batcher = Batcher(f"redis://127.0.0.1:{free_port()}/0", prefix="down", connect_retry=0)
    registry = CollectorRegistry()
    registry.register(RedisCollector(batcher))  # registering reads nothing
    samples = registry_samples(registry)
    assert sample(samples, "redis_batcher_redis_up") == 0
    assert not [k for k in samples if k[0] == "redis_batcher_backlog_flushes"]


class RecordedSpan(trace.NonRecordingSpan):
    """A span that keeps what a tracer was asked to record (the API alone records nothing)."""

    def __init__(self, name: str, kind: trace.SpanKind, attributes: Any) -> None:
        super().__init__(trace.INVALID_SPAN_CONTEXT)
        self.name, self.kind, self.attributes = name, kind, dict(attributes or {})
        self.status: trace.Status | None = None
        self.ended = False

    def is_recording(self) -> bool:
        return True

    def set_status(self, status: Any, description: str | None = None) -> None:
        self.status = status

    def end(self, end_time: int | None = None) -> None:
        self.ended = True


SPANS: list[RecordedSpan] = []


class RecordingTracer(trace.NoOpTracer):
    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        span = RecordedSpan(name, kwargs.get("kind", trace.SpanKind.INTERNAL), kwargs.get("attributes"))
        SPANS.append(span)
        return span


class RecordingProvider(trace.NoOpTracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return RecordingTracer()


@pytest.fixture
def spans() -> Iterator[list[RecordedSpan]]:
    trace.set_tracer_provider(RecordingProvider())  # once per process: later calls are ignored
    if not isinstance(trace.get_tracer_provider(), RecordingProvider):
        pytest.skip("another tracer provider is set in this process")
    SPANS.clear()
    yield SPANS


def test_asyncio_worker_reports_to_its_observer_and_spans_each_delivery(
    redis_server: RedisServer, real_client: redis.Redis, spans: list[RecordedSpan]
) -> None:
    abatcher = aio.Batcher(redis_server.url, prefix="ametrics")
    current: list[Any] = []

    @abatcher.processor(name="evts", max_batch_size=3, flush_interval=None, max_attempts=1)
    async def handle(flush: rb.Flush) -> None:
        current.append(trace.get_current_span())
        if "bad" in flush.items:
            raise ValueError("bad item")

    producer = Batcher(redis_server.url, prefix="ametrics")
    p = producer.processor(name="evts", max_batch_size=3, flush_interval=None, max_attempts=1)(lambda f: None)
    registry = CollectorRegistry()
    worker = aio.Worker(abatcher, observer=WorkerMetrics(registry))
    labels = {"processor": "evts", "reason": "size"}
    with running_async(worker, abatcher):
        p.add_many("a", [1, 2, 3, 4, 5, 6])
        p.add_many("b", ["bad", 1, 2])
        wait_for(lambda: registry.get_sample_value("redis_batcher_flushes_dead_lettered_total", labels) == 1)
        wait_for(lambda: registry.get_sample_value("redis_batcher_flushes_delivered_total", labels) == 2)
    assert registry.get_sample_value("redis_batcher_items_delivered_total", labels) == 6
    assert registry.get_sample_value("redis_batcher_flush_failures_total", labels) == 1
    assert registry.get_sample_value("redis_batcher_flush_retries_total", labels) is None
    assert registry.get_sample_value("redis_batcher_handler_duration_seconds_count", labels) == 3
    # one span per delivery, current while the handler ran, failed for the failed one
    assert len(spans) == 3 and all(s.ended for s in spans)
    assert sorted(map(id, current)) == sorted(map(id, spans))
    assert {s.name for s in spans} == {"process evts"} and {s.kind for s in spans} == {
        trace.SpanKind.CONSUMER
    }
    by_id = {
        (s.attributes["redis_batcher.batch_id"], s.attributes["redis_batcher.sequence"]): s for s in spans
    }
    assert set(by_id) == {("a", 0), ("a", 1), ("b", 0)}
    failed = by_id["b", 0]
    assert failed.status is not None and failed.status.status_code == trace.StatusCode.ERROR
    assert by_id["a", 0].status is None
    assert failed.attributes["messaging.batch.message_count"] == 3
    assert failed.attributes["redis_batcher.attempt"] == 1
    assert failed.attributes["messaging.destination.name"] == "evts"
    producer.close()


def test_sync_worker_spans_each_delivery_with_the_handler_inside(
    real_batcher: Batcher, spans: list[RecordedSpan]
) -> None:
    current: list[Any] = []
    p = real_batcher.processor(name="sync-traced", max_batch_size=2, flush_interval=None)(
        lambda flush: current.append(trace.get_current_span())
    )
    p.add_many("x", [1, 2])
    with running(Worker(real_batcher, processors=["sync-traced"])):
        wait_for(lambda: len(current) == 1)
    assert len(spans) == 1 and current[0] is spans[0] and spans[0].ended
    assert spans[0].attributes["redis_batcher.reason"] == "size"


def test_without_prometheus_client_the_worker_names_the_extra(redis_server: RedisServer) -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import redis_batcher, redis_batcher.metrics as m\n"
        "try:\n"
        "    m.WorkerMetrics()\n"
        "except redis_batcher.ConfigError as exc:\n"
        "    print('api:', exc)\n"
        "from redis_batcher.cli import main\n"
        f"main(['worker', '{APP}', '--redis-url', '{redis_server.url}', '--metrics-port', '9'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(redis_server.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "api: Prometheus metrics need prometheus-client" in done.stdout
    assert "pip install 'redis-batcher[metrics]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_sequences_a_claim_quarantines_count_as_dead_letters(
    real_batcher: Batcher, real_client: redis.Redis
) -> None:
    p = real_batcher.processor(name="damaged", max_batch_size=2, flush_interval=None)(lambda f: None)
    p.add_many("ok", [1, 2])
    p.add_many("bad", [1, 2])
    part = p.keys.for_base("bad")
    real_client.delete(part.meta("bad", 0))
    real_client.set(part.meta("bad", 0), "junk")  # its state is no hash: the claim quarantines it
    registry = CollectorRegistry()
    Worker(real_batcher, observer=WorkerMetrics(registry)).run(burst=True)
    quarantine = {"processor": "damaged", "reason": "quarantine"}
    assert registry.get_sample_value("redis_batcher_flushes_dead_lettered_total", quarantine) == 1
    delivered = {"processor": "damaged", "reason": "size"}
    assert registry.get_sample_value("redis_batcher_flushes_delivered_total", delivered) == 1
    assert [d.reason for d in p.dead_letters()] == ["quarantine"]
