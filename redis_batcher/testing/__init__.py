"""Helpers for testing code that uses redis-batcher.

- :class:`RedisServer` / :class:`RedisClusterServers`: throwaway redis-server processes (and
  clusters) on free loopback ports, as context managers.
- :func:`drain`: deliver what is due (optionally everything that accumulates) and return once
  the handlers ran, in the calling thread's time: no worker process needed.
- A pytest plugin (:mod:`redis_batcher.testing.plugin`, loaded automatically where
  redis-batcher is installed) with the fixtures ``rb_redis_server``, ``rb_batcher`` (a
  :class:`~redis_batcher.Batcher` on that server, under a prefix of its own) and
  ``rb_fake_batcher`` (one on ``fakeredis``, when installed with ``fakeredis[lua]``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..batcher import Batcher
from ..errors import BatchNotAccumulating, BatchNotFound
from ..worker import Worker, WorkerStats
from .servers import (
    RedisClusterServers,
    RedisServer,
    RedisServerError,
    find_redis_server,
    free_cluster_port,
    free_port,
)

__all__ = [
    "RedisClusterServers",
    "RedisServer",
    "RedisServerError",
    "drain",
    "find_redis_server",
    "free_cluster_port",
    "free_port",
]


def drain(
    batcher: Batcher, processors: Iterable[str] | None = None, *, everything: bool = False
) -> WorkerStats:
    """Deliver every flush that is due now to its handler and return once none is due and no
    handler runs (a burst :class:`~redis_batcher.Worker`). With ``everything=True``, every
    accumulating sequence is sealed first (as ``flush()`` would), so all added items are
    delivered without waiting for ``flush_interval``. ``processors`` limits it to some names."""
    chosen = list(processors) if processors is not None else None
    if everything:
        for name, proc in batcher.processors.items():
            if chosen is not None and name not in chosen:
                continue
            for batch_id in list(proc.batch_ids()):
                try:
                    proc.flush(batch_id)
                except (BatchNotFound, BatchNotAccumulating):
                    pass  # delivered or deleted meanwhile
    return Worker(batcher, processors=chosen, iterators=[]).run(burst=True)
