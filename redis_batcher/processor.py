"""A processor: a named handler plus the batching rules for the items sent to it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import ops
from .codec import Codec, encode_item
from .errors import ConfigError
from .keys import KeySpace, parse_batch_id
from .models import (
    AddResult,
    BatchInfo,
    BatchStatus,
    DeleteResult,
    Flush,
    FlushRecord,
    FlushResult,
    ProcessorConfig,
)

if TYPE_CHECKING:
    from .batcher import Batcher

Handler = Callable[[Flush], Any]


class Processor:
    """Adds items for a handler and inspects its batches. Created by :meth:`Batcher.processor`.

    Calling the processor object calls the handler directly, which keeps handlers unit-testable.
    """

    def __init__(self, batcher: Batcher, handler: Handler, config: ProcessorConfig, codec: Codec) -> None:
        self.batcher = batcher
        self.handler = handler
        self.config = config
        self.codec = codec
        self.name = config.name
        self.keys = KeySpace(batcher.prefix, config.name, config.partitions)
        self.interval_ms = -1 if config.flush_interval is None else round(config.flush_interval * 1000)
        self.lease_ms = round(config.lease_timeout * 1000)
        self.retention_s = max(1, round(config.retention))
        self.__doc__ = getattr(handler, "__doc__", None)
        self.__wrapped__ = handler

    def __repr__(self) -> str:
        return f"<Processor {self.name!r} max_batch_size={self.config.max_batch_size}>"

    def __call__(self, flush: Flush) -> Any:
        return self.handler(flush)

    # -- producing ------------------------------------------------------------------------------

    def encode(self, items: Iterable[Any]) -> list[bytes]:
        """Encode items, raising before anything is written if one is invalid."""
        limit = self.config.max_item_bytes
        return [encode_item(self.codec, item, limit) for item in items]

    def add(self, batch_id: str, item: Any) -> AddResult:
        """Append one item to ``batch_id``: one round trip (a single EVALSHA)."""
        base, _ = parse_batch_id(batch_id)
        data = encode_item(self.codec, item, self.config.max_item_bytes)
        self.batcher._ensure_registered(self)
        return ops.parse_add(base, ops.add_call(self, base, (data,)).run(self.batcher.client))

    def add_many(self, batch_id: str, items: Iterable[Any]) -> AddResult:
        """Append many items in order, in one round trip. Full sequences are sealed on the way,
        so no flush ever holds more than ``max_batch_size`` items."""
        base, _ = parse_batch_id(batch_id)
        encoded = self.encode(items)
        if not encoded:
            return AddResult(base, None, 0, 0, False, None, 0)
        self.batcher._ensure_registered(self)
        return ops.parse_add(base, ops.add_call(self, base, encoded).run(self.batcher.client))

    def flush(self, batch_id: str) -> FlushResult:
        """Seal the accumulating sequence of ``batch_id`` (or the named ``base::N``) now.

        Raises :class:`BatchNotFound` for an unknown id and :class:`BatchNotAccumulating` when
        ``base::N`` is already flushing or completed; an id with nothing accumulating returns
        ``flushed=False, reason="Batch is empty"``.
        """
        base, seq = parse_batch_id(batch_id)
        self.batcher._ensure_registered(self)
        reply = ops.flush_call(self, base, seq).run(self.batcher.client)
        return ops.parse_flush(batch_id, base, reply)

    # -- inspecting -----------------------------------------------------------------------------

    def _snapshot(self, batch_id: str) -> tuple[str, list[BatchInfo], BatchInfo | None]:
        base, _ = parse_batch_id(batch_id)
        reply = ops.status_call(self, base).run(self.batcher.client)
        active, done = ops.parse_status(base, reply)
        return base, active, done

    def status(self, batch_id: str) -> BatchStatus | None:
        """Active sequences of the base id with counts and times, or ``None`` if none is active."""
        base, active, done = self._snapshot(batch_id)
        if not active:
            return None
        return BatchStatus(base, active, self.config, done)

    def sequences(self, batch_id: str) -> list[BatchInfo]:
        """Every known sequence of the base id: the last completed one, then the active ones."""
        _, active, done = self._snapshot(batch_id)
        return ([done] if done else []) + active

    def history(self, batch_id: str, limit: int = 20) -> list[FlushRecord]:
        """Flush attempts of the base id, newest first (successes and failures)."""
        if not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive int, got {limit!r}")
        base, _ = parse_batch_id(batch_id)
        key, start, stop = ops.history_range(self, base, limit)
        return ops.parse_history(self.batcher.client.lrange(key, start, stop))

    def delete(self, batch_id: str) -> DeleteResult:
        """Delete a base id (head, history) or one ``base::N`` sequence.

        Refused, with ``deleted=False`` and a reason, while a sequence is flushing or still holds
        items, so deleting never drops an item.
        """
        base, seq = parse_batch_id(batch_id)
        return ops.parse_delete(ops.delete_call(self, base, seq).run(self.batcher.client))

    def batch_ids(self) -> Iterator[str]:
        """Base ids with at least one active sequence (SSCAN over each partition, never KEYS)."""
        client = self.batcher.client
        for part in self.keys.parts:
            for raw in client.sscan_iter(part.ids, count=500):
                yield raw.decode() if isinstance(raw, bytes) else raw

    def pending(self, batch_id: str) -> int:
        """Items of the base id not yet delivered."""
        st = self.status(batch_id)
        return 0 if st is None else st.pending
