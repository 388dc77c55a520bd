"""The heartbeat of a worker's record in the worker registry (:mod:`redis_batcher.worker_registry`),
as the threaded worker runs it (a thread of its own) and as the asyncio worker does (a task).

Every ``beat_interval`` a beat writes the worker's record and re-publishes the processor
configs it serves, so a Redis restarted without persistence gets them back; a worker that
stops cleanly deletes its record at once. A beat that fails is logged and tried again at the
next one: it never stops the worker.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from . import worker_registry
from .errors import BatcherError
from .worker_core import WorkerCore

Beating = WorkerCore[Any]


def beat_thread(worker: Beating, register: Callable[[], None], done: threading.Event) -> None:
    """Beat until ``done`` is set, then delete the record (the body of the threaded worker's
    beat thread; ``register`` publishes the processor configs)."""
    while True:
        record, now_ms = worker.beat_record()
        try:
            worker_registry.beat(worker.client, worker.identity, record, now_ms).execute()
            if worker.processors:
                register()
            worker.beat_done()
        except (RedisError, BatcherError) as exc:
            worker.beat_done(exc)
        if done.wait(worker.beat_interval):
            break
    try:
        worker_registry.leave(worker.client, worker.identity).execute()
    except (RedisError, BatcherError) as exc:
        worker.beat_done(exc)


async def beat_task(
    worker: Beating, register: Callable[[], Awaitable[None]], stopping: Callable[[], bool]
) -> None:
    """Beat until cancelled or ``stopping()`` (the asyncio worker's beat task); :func:`leave`
    deletes the record. ``stopping`` ends it too because a cancellation that lands inside a
    redis-py call can come out as a Redis timeout error, which a beat survives."""
    while not stopping():
        record, now_ms = worker.beat_record()
        try:
            await worker_registry.beat(worker.client, worker.identity, record, now_ms).execute()
            if worker.processors:
                await register()
            worker.beat_done()
        except (RedisError, BatcherError) as exc:
            worker.beat_done(exc)
        if stopping():  # the cancellation was swallowed by the beat: do not sleep a whole interval
            break
        await asyncio.sleep(worker.beat_interval)


async def leave(worker: Beating) -> None:
    """Delete the asyncio worker's record (a clean stop: listed no more at once)."""
    try:
        await worker_registry.leave(worker.client, worker.identity).execute()
    except (RedisError, BatcherError) as exc:
        worker.beat_done(exc)
