"""Processors served by the benchmark worker processes (``benchmarks.apps:batcher``).

Handlers append their timing samples (ms, one per line) to files in the directory named by
``BENCH_SAMPLES_DIR`` (set by ``benchmarks.worker``): one ``O_APPEND`` write per sample, a few
µs. They used to RPUSH them to Redis with redis-py, which cost the worker ~150 µs of CPU and
Redis a command per flush: the instrument competed with the system it measured.
"""

from __future__ import annotations

import os
import time

import redis_batcher

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SAMPLES_ENV = "BENCH_SAMPLES_DIR"
batcher = redis_batcher.Batcher(URL, prefix="bench")
_files: dict[str, int] = {}


def sample(kind: str, ms: float) -> None:
    """Append one sample to ``$BENCH_SAMPLES_DIR/<kind>`` (atomic per line: O_APPEND)."""
    fd = _files.get(kind)
    if fd is None:
        path = os.path.join(os.environ[SAMPLES_ENV], kind)
        fd = _files.setdefault(kind, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    os.write(fd, b"%.3f\n" % ms)


@batcher.processor(name="idle", max_batch_size=1000, flush_interval=3600.0)
def idle(flush: redis_batcher.Flush) -> None:
    """Never due during a benchmark: these ids only make the delay queue large."""


@batcher.processor(name="wake", max_batch_size=10, flush_interval=None)
def wake(flush: redis_batcher.Flush) -> None:
    """Seal -> handler start: the sealing add's client timestamp is the last item."""
    sample("seal_ms", (time.time() - flush.items[-1]["t"]) * 1000.0)


@batcher.processor(name="interval", max_batch_size=1000, flush_interval=1.0)
def interval(flush: redis_batcher.Flush) -> None:
    """Interval lateness: handler start minus (first item's add time + 1 s)."""
    sample("late_ms", (time.time() - flush.items[0]["t"] - 1.0) * 1000.0)
