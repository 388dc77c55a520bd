"""Hooks for metrics and tracing, for both workers and without I/O: the
:class:`WorkerObserver` a worker reports each recorded result to (what
:class:`redis_batcher.metrics.WorkerMetrics` counts), and an OpenTelemetry span around each
delivery when ``opentelemetry-api`` is installed (nothing otherwise; no SDK is needed: the
application's own tracer provider, if it sets one, receives the spans).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from . import ops
from .delivery import Outcome

try:
    from opentelemetry import trace

    TRACING = True
except ImportError:  # tracing is optional
    TRACING = False

TRACER_NAME = "redis_batcher"


class WorkerObserver(Protocol):
    """Told of each flush whose result a worker recorded in Redis (from the worker's handler
    threads or its event loop: keep it quick and thread-safe)."""

    def flush_settled(self, c: ops.Claimed, outcome: Outcome, code: str, seconds: float) -> None:
        """``outcome``: how the delivery ended; ``code``: what Redis did with it (``ok``,
        ``retry``, ``bisect``, ``moving``, ``dead``, ...); ``seconds``: the delivery's duration."""

    def flush_quarantined(self, processor: str, member: str) -> None:
        """A claim found sequence ``member`` (``base::N``) of ``processor`` undeliverable (its
        keys hold something else) and moved it to the dead letters (reason ``quarantine``)."""


def reply_code(reply: Any) -> str:
    """The first word of an ack or nack reply (``ok``, ``retry``, ``dead``, ...)."""
    first = reply[0]
    return first.decode() if isinstance(first, bytes) else str(first)


@contextmanager
def _span(c: ops.Claimed) -> Iterator[Callable[[Outcome], Outcome]]:
    """A CONSUMER span named ``process <processor>`` (the messaging conventions' name),
    current while the delivery runs, so the handler's own spans are its children; the callable
    it gives marks the span failed for an outcome other than ``ack``."""
    attributes: dict[str, Any] = {
        "messaging.system": "redis_batcher",
        "messaging.operation": "process",
        "messaging.destination.name": c.processor.name,
        "messaging.batch.message_count": c.cutoff,
        "redis_batcher.batch_id": c.base,
        "redis_batcher.sequence": c.sequence,
        "redis_batcher.attempt": c.attempt,
        "redis_batcher.flush_id": c.flush_id,
        "redis_batcher.reason": c.reason or "size",
    }
    tracer = trace.get_tracer(TRACER_NAME)
    kind = trace.SpanKind.CONSUMER
    with tracer.start_as_current_span(
        f"process {c.processor.name}", kind=kind, attributes=attributes
    ) as span:

        def ended(outcome: Outcome) -> Outcome:
            if outcome.mode != "ack":
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error))
            return outcome

        yield ended


def traced(c: ops.Claimed, deliver: Callable[[ops.Claimed], Outcome]) -> Outcome:
    """``deliver(c)`` inside a span when OpenTelemetry is installed (the sync worker)."""
    if not TRACING:
        return deliver(c)
    with _span(c) as ended:
        return ended(deliver(c))


async def traced_async(c: ops.Claimed, deliver: Callable[[ops.Claimed], Awaitable[Outcome]]) -> Outcome:
    """``await deliver(c)`` inside a span when OpenTelemetry is installed (the asyncio worker)."""
    if not TRACING:
        return await deliver(c)
    with _span(c) as ended:
        return ended(await deliver(c))
