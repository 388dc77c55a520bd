"""Exceptions raised by redis-batcher. Every one derives from :class:`BatcherError`."""

from __future__ import annotations


class BatcherError(Exception):
    """Base class of every error raised by redis-batcher."""


class ConfigError(BatcherError, ValueError):
    """A processor, batcher or worker was configured with an invalid value."""


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


class CorruptData(BatcherError):
    """Keys of the batcher hold data it did not write (another type, a field that is not a
    number, ...). Nothing was written; the message names the key. A due sequence in that state
    is quarantined as a dead letter by the worker instead (reason ``quarantine``)."""
