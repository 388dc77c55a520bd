"""The redis-batcher app served by the end-to-end benchmark's worker processes::

    E2E_MAX_BATCH_SIZE=100 E2E_FLUSH_INTERVAL=none \\
        python -m redis_batcher worker benchmarks.e2e_app:batcher --redis-url URL --concurrency 4

The processor's batching rules come from environment variables read at import time
(``E2E_MAX_BATCH_SIZE``, ``E2E_FLUSH_INTERVAL`` in seconds or ``none``); producers build the
same processor with :func:`define`. The handler does nothing but the shared bookkeeping
(:func:`benchmarks.e2e_common.record`): two appends to local files per batch.
"""

from __future__ import annotations

import os

import redis_batcher
from benchmarks.e2e_common import URL_ENV, record

PREFIX = "e2erb"
PROCESSOR = "e2e"
SIZE_ENV = "E2E_MAX_BATCH_SIZE"
INTERVAL_ENV = "E2E_FLUSH_INTERVAL"


def parse_interval(raw: str | None) -> float | None:
    """``none`` (or empty) -> None (size and manual flushes only), else seconds."""
    if raw is None or raw.strip().lower() in ("", "none"):
        return None
    return float(raw)


def define(
    batcher: redis_batcher.Batcher, max_batch_size: int, flush_interval: float | None
) -> redis_batcher.Processor:
    """The benchmark's processor on ``batcher``: a no-op handler plus the bookkeeping."""

    @batcher.processor(name=PROCESSOR, max_batch_size=max_batch_size, flush_interval=flush_interval)
    def handle(flush: redis_batcher.Flush) -> None:
        record([item["id"] for item in flush.items])

    return handle


# Connects lazily; the worker CLI rebinds it with --redis-url.
batcher = redis_batcher.Batcher(os.environ.get(URL_ENV) or None, prefix=PREFIX)
processor = define(
    batcher, int(os.environ.get(SIZE_ENV) or 100), parse_interval(os.environ.get(INTERVAL_ENV, "none"))
)
