"""What the workers' logs need beyond the standard library: the periodic summary of what a
worker did (:class:`FlushSummary`; each flush is logged at DEBUG, a failure at WARNING with its
traceback) and a formatter writing one JSON object per record, for log shippers
(:class:`JsonFormatter`, ``redis-batcher worker --log-format json``)::

    import logging
    from redis_batcher.logs import JsonFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger("redis_batcher").addHandler(handler)
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone

from .models import WorkerStats

SUMMARY_INTERVAL = 60.0  # seconds between two summaries of a worker (at most; see FlushSummary)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message`` and, when the record carries one, ``exc_info`` (the traceback as
    text) and ``stack_info``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class FlushSummary:
    """The periodic summary line of a worker: flushes delivered, their items, failed flushes
    and dead letters since the last summary, once ``interval`` seconds have passed (and at
    stop), only when something happened. Safe to call from the heartbeat thread and the main
    one."""

    def __init__(self, interval: float = SUMMARY_INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._since = 0.0
        self._seen = (0, 0, 0, 0)

    def reset(self, now: float) -> None:
        """Start counting at ``now`` (monotonic seconds) from fresh stats."""
        with self._lock:
            self._since, self._seen = now, (0, 0, 0, 0)

    def line(self, stats: WorkerStats, now: float, final: bool = False) -> str | None:
        """The summary due at ``now`` (``final``: at stop, however soon), or None: not due yet,
        or nothing happened since the last one."""
        current = (stats.delivered, stats.items, stats.failed, stats.dead_lettered + stats.quarantined)
        with self._lock:
            elapsed = now - self._since
            if not final and elapsed < self.interval:
                return None
            delta = [after - before for after, before in zip(current, self._seen, strict=True)]
            self._since, self._seen = now, current
        if not any(delta):
            return None
        delivered, items, failed, dead = delta
        span = f"{elapsed:.1f}" if elapsed < 10 else f"{elapsed:.0f}"
        return (
            f"summary of the last {span}s: {delivered} flushes delivered ({items} items), "
            f"{failed} failed, {dead} dead-lettered"
        )
