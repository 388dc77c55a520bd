"""One delivery of a flush, for both workers: reading its window, turning what the handler
returned or raised into an :class:`Outcome`, and retrying the ack or nack that records it
(:class:`SettleRetry`). No I/O happens here.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from . import ops
from .codec import MsgpackCodec, decode_item
from .definition import ProcessorDef
from .errors import MAX_ERROR_CHARS, DecodeError, NotReplicated, PartialFailure, error_text
from .models import Flush

log = logging.getLogger("redis_batcher.worker")

DRAIN_CHUNK = 10_000


@dataclass
class Outcome:
    """How one delivery ended, before it is recorded in Redis; ``exc``: what the handler raised
    (its traceback goes with the failure's log line)."""

    mode: str  # ack | fail | partial | decode | missing
    error: str | None
    indices: list[int]
    count: int
    exc: BaseException | None = field(default=None, repr=False, compare=False)


def backoff_seconds(proc: ProcessorDef, attempt: int) -> float:
    """``retry_backoff * 2**(attempt-1)`` capped at ``retry_backoff_max``, with 50-100% jitter."""
    cfg = proc.config
    raw = min(cfg.retry_backoff_max, cfg.retry_backoff * (2 ** min(max(attempt - 1, 0), 62)))
    return float(raw * random.uniform(0.5, 1.0))


class HandlerExit(Exception):
    """A handler raised a BaseException that is not an Exception (``sys.exit()``,
    ``KeyboardInterrupt`` raised in its thread, ...), carried as an Exception: asyncio lets
    SystemExit and KeyboardInterrupt out of a task through the event loop, ending the worker."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


def log_handler_exit(c: ops.Claimed, exc: BaseException) -> None:
    """A handler raised a BaseException that is not an Exception: it counts as a failed attempt
    like any error, logged with its traceback (it is likely a bug: code meant to end a process
    ran inside a handler)."""
    log.error(
        "%s %s: handler raised %s; counted as a failed attempt",
        c.processor.name,
        c.member,
        error_text(exc),
        exc_info=exc,
    )


def drain_ranges(cutoff: int) -> list[tuple[int, int]]:
    """LRANGE (start, stop) pairs reading a window of ``cutoff`` items in bounded chunks."""
    return [(i, min(cutoff, i + DRAIN_CHUNK) - 1) for i in range(0, cutoff, DRAIN_CHUNK)]


def decode_window(c: ops.Claimed, raw: Sequence[bytes]) -> tuple[list[Any], Outcome | None]:
    """Decode a delivery; an Outcome('decode') when some entries cannot be read, and
    Outcome('missing') when fewer were found than the window holds (the handler never sees a
    short batch: the next claim dead-letters what is left, as items_missing)."""
    if len(raw) < c.cutoff:
        error = f"{c.cutoff - len(raw)} of {c.cutoff} items are missing (evicted or deleted)"
        return [], Outcome("missing", error, [], len(raw))
    codec = c.processor.codec
    if isinstance(codec, MsgpackCodec):
        try:  # the common case in one call; on any error, item by item below
            return codec.decode_many(raw), None
        except Exception:
            pass
    items: list[Any] = []
    bad: list[int] = []
    errors: list[str] = []
    for i, data in enumerate(raw):
        try:
            items.append(decode_item(c.processor.codec, data, i))
        except DecodeError as exc:
            bad.append(i)
            errors.append(str(exc))
    if bad:
        return items, Outcome("decode", "; ".join(errors[:3])[:MAX_ERROR_CHARS], bad, len(raw))
    return items, None


def make_flush(c: ops.Claimed, items: list[Any]) -> Flush:
    return Flush(c.processor.name, c.base, c.sequence, items, c.attempt, c.flush_id, c.reason)


def classify(n_items: int, result: Any = None, exc: BaseException | None = None) -> Outcome:
    """Turn what a handler returned or raised into an Outcome."""
    raised = exc
    if exc is None and isinstance(result, PartialFailure):
        exc = result
    if exc is None:
        return Outcome("ack", None, [], n_items)
    if isinstance(exc, PartialFailure):
        failed = [i for i in exc.failed if 0 <= i < n_items]
        if len(failed) != len(exc.failed):
            error = f"PartialFailure named indices outside 0..{n_items - 1}: {exc.failed}"
            return Outcome("fail", error, [], n_items, raised)
        if not failed:
            return Outcome("ack", None, [], n_items)
        error = f"PartialFailure: {exc.message}"[:MAX_ERROR_CHARS]
        return Outcome("partial", error, failed, n_items, raised)
    return Outcome("fail", error_text(exc), [], n_items, raised)


class SettleRetry:
    """The retries of one ack or nack through Redis errors while the flush's lease lasts. An
    ack that asked for the next flush is retried as a plain ack (ops.without_claim)."""

    def __init__(self, c: ops.Claimed, call: ops.Call) -> None:
        self.c = c
        self.call = call  # what to run (again)
        self.reply: Any = None  # what to return once given up (see failed)
        self.delay = 0.05
        self.deadline = time.monotonic() + c.processor.config.lease_timeout

    def failed(self, exc: NotReplicated | RedisError) -> float | None:
        """Seconds to wait before running :attr:`call` again; None: stop and return
        :attr:`reply` (None: the result could not be recorded, the flush will be delivered
        again; or, when only the replicas did not confirm it, as recorded)."""
        c = self.c
        if isinstance(exc, NotReplicated):
            log.warning("%s %s: result recorded on the primary only: %s", c.processor.name, c.member, exc)
            self.reply = [b"ok"]
            return None
        if time.monotonic() > self.deadline:
            log.error(
                "%s %s: cannot record the result (%s); the lease will expire and the flush "
                "will be delivered again",
                c.processor.name,
                c.member,
                exc,
            )
            return None
        delay, self.delay = self.delay, min(self.delay * 2, 2.0)
        self.call = ops.without_claim(self.call)
        return delay
