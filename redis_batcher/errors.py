"""Exceptions raised by redis-batcher. Every one derives from :class:`BatcherError`."""

from __future__ import annotations

from typing import NoReturn

import redis.exceptions


class BatcherError(Exception):
    """Base class of every error raised by redis-batcher."""


class ConfigError(BatcherError, ValueError):
    """A processor, batcher or worker was configured with an invalid value."""


class EvictionPolicyError(ConfigError):
    """Redis runs with a ``maxmemory-policy`` that may evict queued items (anything but
    ``noeviction`` or a ``volatile-*`` policy) and ``allow_eviction`` was not given.

    Nothing was written. ``policy`` is the policy found, ``node`` the server (Redis Cluster:
    the primary) that reported it, when known."""

    def __init__(self, policy: str, node: str | None = None) -> None:
        where = f" on {node}" if node else ""
        super().__init__(
            f"Redis maxmemory-policy is {policy!r}{where}: it can evict queued items; set "
            "maxmemory-policy noeviction (or a volatile-* policy: redis-batcher sets no TTL on "
            "undelivered items), or pass allow_eviction=True to accept that evicted items are lost"
        )
        self.policy = policy
        self.node = node


class LayoutMismatch(BatcherError):
    """Redis holds data of another version of redis-batcher's key layout than this process
    writes (``<prefix>:layout``). Raised before anything is written, so that two versions
    never mix their layouts during a rolling deploy; see README, *Upgrading*.

    ``found`` is the version in Redis (1: data written before the layout was stamped),
    ``expected`` this process's."""

    def __init__(self, prefix: str, found: int | str, expected: int) -> None:
        if isinstance(found, int) and found > expected:
            todo = f"upgrade this process to the redis-batcher version that writes layout {found}"
        elif isinstance(found, int):
            todo = (
                "stop the processes of the older version once they have drained, then run "
                "`redis-batcher layout --upgrade`"
            )
        else:
            todo = f"the stamp is not a layout version: check what wrote {prefix}:layout"
        super().__init__(
            f"Redis holds redis-batcher data layout {found} under prefix {prefix!r}, this "
            f"process writes layout {expected}: {todo} (README, Upgrading)"
        )
        self.prefix = prefix
        self.found = found
        self.expected = expected


class LayoutUpgradeRefused(BatcherError):
    """``redis-batcher layout --upgrade`` found data still stored under the previous layout's
    key names (``keys``, at most ten shown): drain it with the version that wrote it first."""

    def __init__(self, prefix: str, keys: list[str]) -> None:
        shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        super().__init__(
            f"data under prefix {prefix!r} is still stored under layout 1's key names ({shown}): "
            "let the workers of the version that wrote it drain it (or delete it), then upgrade"
        )
        self.prefix = prefix
        self.keys = keys


class DuplicateProcessor(ConfigError):
    """Two processors with the same name were registered on one :class:`Batcher`."""


class UnknownProcessor(BatcherError, LookupError):
    """A processor name that no :class:`Batcher` (or the Redis registry) knows."""


class InvalidBatchId(BatcherError, ValueError):
    """A batch id is empty, too long, contains control characters or is not a string."""


class ItemError(BatcherError, ValueError):
    """An item cannot be accepted; nothing was written to Redis."""


class ItemEncodeError(ItemError):
    """The codec cannot serialise an item (e.g. an object msgpack does not know)."""


class ItemTooLarge(ItemError):
    """An encoded item is larger than the processor's ``max_item_bytes``."""


class DecodeError(BatcherError):
    """A stored entry cannot be decoded by the processor's codec."""


class BatchNotFound(BatcherError, LookupError):
    """The batch id (or ``base::N`` sequence) does not exist."""


class BatchNotAccumulating(BatcherError):
    """A manual flush named a sequence that is no longer accumulating."""

    def __init__(self, batch_id: str, status: str) -> None:
        super().__init__(f"batch {batch_id!r} is not accumulating (current status: {status})")
        self.batch_id = batch_id
        self.status = status


class BatchFull(BatcherError):
    """``add``/``add_many`` would take a batch id over its processor's ``max_pending``.

    Nothing was written. ``pending`` is how many undelivered items the batch id holds.
    """

    def __init__(self, batch_id: str, pending: int, adding: int, limit: int) -> None:
        super().__init__(
            f"batch {batch_id!r} holds {pending} undelivered items; adding {adding} would exceed "
            f"max_pending={limit}"
        )
        self.batch_id = batch_id
        self.pending = pending
        self.adding = adding
        self.limit = limit


class DeadLetterNotFound(BatcherError, LookupError):
    """No dead letter with that id (already replayed or purged?)."""


class NotReplicated(BatcherError):
    """``WAIT`` confirmed fewer replicas than ``wait_replicas`` before its timeout.

    The write itself happened on the primary; it may be lost if the primary fails now.
    """

    def __init__(self, wanted: int, got: int) -> None:
        super().__init__(f"write reached {got} replica(s), wanted {wanted}")
        self.wanted = wanted
        self.got = got


class PartialFailure(BatcherError):
    """Raise (or return) from a handler when only some items failed.

    ``failed`` are indices into ``flush.items``. Only those items are retried (with backoff, up
    to ``max_attempts``, then dead-lettered); the others count as delivered.
    """

    def __init__(self, failed: list[int] | tuple[int, ...] | set[int], message: str = "") -> None:
        self.failed = sorted({int(i) for i in failed})
        text = message or f"{len(self.failed)} item(s) failed"
        super().__init__(text)
        self.message = text


class UnknownIterator(BatcherError, LookupError):
    """An iterator name that neither this batcher nor the Redis registry knows."""


class InvalidJob(BatcherError, ValueError):
    """A job id or its params cannot be accepted; nothing was written to Redis."""


class JobExists(BatcherError):
    """``start`` named a job id that already exists for this iterator (in any status)."""

    def __init__(self, iterator: str, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id!r} of iterator {iterator!r} already exists (status: {status})")
        self.iterator = iterator
        self.job_id = job_id
        self.status = status


class JobNotFound(BatcherError, LookupError):
    """No job with that id for this iterator."""


class JobStateError(BatcherError):
    """The job's status does not allow the operation (deleting a running or paused job, pausing
    a completed one, ...). ``status`` is the job's status when it was refused."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class NotSentError(BatcherError):
    """A command never reached Redis: connecting or writing the request failed (or a server
    still loading its data refused it). It did not run, so retrying is safe; the batcher has
    already retried it for ``connect_retry`` seconds. The redis-py error is ``__cause__``.

    Raised as :class:`NotSentConnectionError` or :class:`NotSentTimeoutError`, which are also
    redis-py's ``ConnectionError`` / ``TimeoutError``."""


class NotSentConnectionError(NotSentError, redis.exceptions.ConnectionError):
    """:class:`NotSentError` for a redis-py ``ConnectionError``."""


class NotSentTimeoutError(NotSentError, redis.exceptions.TimeoutError):
    """:class:`NotSentError` for a redis-py ``TimeoutError``."""


class NotSentClusterError(NotSentError, redis.exceptions.ClusterError):
    """:class:`NotSentError` for a Redis Cluster node that answered without running the
    command (MOVED, ASK, TRYAGAIN while its slot migrates, CLUSTERDOWN)."""


class OutcomeUnknownError(BatcherError):
    """A command was sent but its reply was lost (the connection broke or timed out while
    waiting for it). It may or may not have run: re-sending an add may duplicate its items.
    The batcher never retries these; the caller decides. The redis-py error is ``__cause__``.

    Raised as :class:`OutcomeUnknownConnectionError` or :class:`OutcomeUnknownTimeoutError`,
    which are also redis-py's ``ConnectionError`` / ``TimeoutError``."""


class OutcomeUnknownConnectionError(OutcomeUnknownError, redis.exceptions.ConnectionError):
    """:class:`OutcomeUnknownError` for a redis-py ``ConnectionError``."""


class OutcomeUnknownTimeoutError(OutcomeUnknownError, redis.exceptions.TimeoutError):
    """:class:`OutcomeUnknownError` for a redis-py ``TimeoutError``."""


# connection failures that are server replies, not lost connections: raised unchanged
_PASS_THROUGH = (redis.exceptions.AuthenticationError,)


def transport_failure(exc: BaseException) -> bool:
    """True for a redis-py connection or timeout error that :func:`not_sent` /
    :func:`outcome_unknown` classify (not one already classified, not a refused login)."""
    return (
        isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))
        and not isinstance(exc, (NotSentError, OutcomeUnknownError, *_PASS_THROUGH))
    )


def _chained(new: BaseException, cause: BaseException) -> BaseException:
    new.__cause__ = cause  # as `raise new from cause`
    return new


def not_sent(exc: BaseException) -> BaseException:
    """``exc`` as the :class:`NotSentError` of its kind, with ``exc`` as its ``__cause__`` (to
    be raised); anything else is returned unchanged."""
    if not transport_failure(exc):
        return exc
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        text = f"{exc} (refused while loading: the command did not run)"
        return _chained(NotSentConnectionError(text), exc)
    text = f"{exc} (not sent: the command did not run; retrying is safe)"
    if isinstance(exc, redis.exceptions.TimeoutError):
        return _chained(NotSentTimeoutError(text), exc)
    return _chained(NotSentConnectionError(text), exc)


def outcome_unknown(exc: BaseException) -> BaseException:
    """``exc`` as the :class:`OutcomeUnknownError` of its kind, with ``exc`` as its
    ``__cause__``; a server still loading its data (its refusal is an answer) as
    :class:`NotSentError`; anything else unchanged."""
    if not transport_failure(exc):
        return exc
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return not_sent(exc)
    text = f"{exc} (sent, outcome unknown: the command may have run)"
    if isinstance(exc, redis.exceptions.TimeoutError):
        return _chained(OutcomeUnknownTimeoutError(text), exc)
    return _chained(OutcomeUnknownConnectionError(text), exc)


def raise_not_sent(exc: BaseException) -> NoReturn:
    """Raise :func:`not_sent` of ``exc`` (call it in the ``except`` clause that caught it)."""
    raise not_sent(exc)


def raise_outcome_unknown(exc: BaseException) -> NoReturn:
    """Raise :func:`outcome_unknown` of ``exc`` (call it in the ``except`` clause that caught it)."""
    raise outcome_unknown(exc)


class CorruptData(BatcherError):
    """Keys of the batcher hold data it did not write (another type, a field that is not a
    number, ...). Nothing was written; the message names the key. A due sequence in that state
    is quarantined as a dead letter by the worker instead (reason ``quarantine``)."""


# the longest error text kept with a flush or job (history, dead letters, job state)
MAX_ERROR_CHARS = 2000


def error_text(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"``, cut at :data:`MAX_ERROR_CHARS`."""
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
