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
