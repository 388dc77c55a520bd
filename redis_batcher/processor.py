"""A processor: a named handler plus the batching rules for the items sent to it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from . import ops
from .codec import Codec, encode_item, encode_items
from .connection import frames
from .errors import ConfigError
from .keys import KeySpace, parse_batch_id
from .models import (
    AddResult,
    BatchInfo,
    BatchStatus,
    DeadLetter,
    DeleteResult,
    Flush,
    FlushRecord,
    FlushResult,
    ProcessorConfig,
)

if TYPE_CHECKING:
    from .batcher import Batcher

Handler = Callable[[Flush], Any]

T = TypeVar("T")

ADD_CHUNK = 10_000


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
        # dead-letter limits as the scripts take them (0: none)
        ttl = config.dead_letter_ttl
        self.dead_ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        self.dead_max = 0 if config.max_dead_letters is None else config.max_dead_letters
        pending_cap = -1 if config.max_pending is None else config.max_pending
        # add.lua's packed config argument (one argument instead of three on the hot path)
        self.add_config = f"{config.max_batch_size} {self.interval_ms} {pending_cap} "
        self.add_config_one = self.add_config + "-"  # one add (no coalesced segments)
        self.add_config_frame = frames((self.add_config_one,))  # the same, RESP-encoded (ops.add_frame)
        self.__doc__ = getattr(handler, "__doc__", None)
        self.__wrapped__ = handler

    def __repr__(self) -> str:
        return f"<Processor {self.name!r} max_batch_size={self.config.max_batch_size}>"

    def __call__(self, flush: Flush) -> Any:
        return self.handler(flush)

    # -- producing ------------------------------------------------------------------------------

    def encode(self, items: Iterable[Any]) -> list[bytes]:
        """Encode items, raising before anything is written if one is invalid."""
        return encode_items(self.codec, items, self.config.max_item_bytes)

    def add(self, batch_id: str, item: Any) -> AddResult:
        """Append one item to ``batch_id``: one round trip (a single EVALSHA).

        Raises :class:`BatchFull` (nothing written) when ``max_pending`` would be exceeded."""
        base, _ = parse_batch_id(batch_id)
        data = encode_item(self.codec, item, self.config.max_item_bytes)
        self.batcher._ensure_registered(self)
        return self.batcher._run_add(self, base, [data])

    def add_many(self, batch_id: str, items: Iterable[Any]) -> AddResult:
        """Append many items in order. Full sequences are sealed on the way, so no flush ever
        holds more than ``max_batch_size`` items.

        Up to ``ADD_CHUNK`` (10,000) items go in one atomic round trip; a larger call is split
        into chunks of that size, each atomic, so no script call can block Redis for long.
        Every item is encoded (and checked) before the first chunk is written."""
        base, _ = parse_batch_id(batch_id)
        encoded = self.encode(items)
        if not encoded:
            return AddResult(base, None, 0, 0, False, None, 0)
        self.batcher._ensure_registered(self)
        if len(encoded) <= ADD_CHUNK:
            return self.batcher._run_add(self, base, encoded)
        chunks = [encoded[i : i + ADD_CHUNK] for i in range(0, len(encoded), ADD_CHUNK)]
        return ops.combine_adds(base, [self.batcher._run_add(self, base, chunk) for chunk in chunks])

    def flush(self, batch_id: str) -> FlushResult:
        """Seal the accumulating sequence of ``batch_id`` (or the named ``base::N``) now.

        Raises :class:`BatchNotFound` for an unknown id and :class:`BatchNotAccumulating` when
        ``base::N`` is already flushing or completed; an id with nothing accumulating returns
        ``flushed=False, reason="Batch is empty"``.
        """
        base, seq = parse_batch_id(batch_id)
        self.batcher._ensure_registered(self)
        reply = self.batcher._execute(ops.flush_call(self, base, seq))
        return ops.parse_flush(batch_id, base, reply)

    # -- inspecting -----------------------------------------------------------------------------

    def _snapshot(self, batch_id: str) -> tuple[str, list[BatchInfo], BatchInfo | None]:
        base, _ = parse_batch_id(batch_id)
        reply = self.batcher._execute(ops.status_call(self, base), wait=False)
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
        client = self.batcher.client
        with ops.reading(key):
            raw = self.batcher._command(key, lambda: client.lrange(key, start, stop))
        return ops.parse_history(raw, key)

    def delete(self, batch_id: str) -> DeleteResult:
        """Delete a base id (head, history) or one ``base::N`` sequence.

        Refused, with ``deleted=False`` and a reason, while a sequence is flushing or still holds
        items, so deleting never drops an item.
        """
        base, seq = parse_batch_id(batch_id)
        self.batcher._first_write()
        return ops.parse_delete(self.batcher._execute(ops.delete_call(self, base, seq)))

    def batch_ids(self) -> Iterator[str]:
        """Base ids with at least one active sequence (SSCAN over each partition, never KEYS)."""
        client = self.batcher.client
        for part in self.keys.parts:
            with ops.reading(part.ids):
                found = list(client.sscan_iter(part.ids, count=500))
            for raw in found:
                yield raw.decode() if isinstance(raw, bytes) else raw

    def pending(self, batch_id: str) -> int:
        """Items of the base id not yet delivered."""
        st = self.status(batch_id)
        return 0 if st is None else st.pending

    # -- dead letters ---------------------------------------------------------------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead letters of this processor, newest first (without their items)."""
        return _drive(self.batcher, ops.dead_letters_steps(self, limit))

    def dead_letter(self, dead_id: str) -> DeadLetter:
        """One dead letter with its items (entries the codec cannot read stay ``bytes``)."""
        return _drive(self.batcher, ops.dead_letter_steps(self, dead_id))

    def replay_dead(self, dead_id: str) -> int:
        """Put a dead letter's items back into its batch id as a new sequence, due now.

        Returns the new sequence number."""
        return _drive(self.batcher, ops.replay_dead_steps(self, dead_id))

    def purge_dead(self, dead_id: str | None = None) -> int:
        """Delete one dead letter, or all of them with ``None``. Returns how many were deleted."""
        return _drive(self.batcher, ops.purge_dead_steps(self, dead_id))


def _drive(batcher: Batcher, steps: ops.Steps[T]) -> T:
    """Answer the requests of an :mod:`ops` multi-step operation through a sync batcher."""
    reply: Any = None
    while True:
        try:
            step = steps.send(reply)
        except StopIteration as done:
            result: T = done.value
            return result
        if isinstance(step, ops.Read):
            with ops.reading(step.key):
                reply = batcher._command(step.key, partial(step.send, batcher.client))
        else:
            if step.writes:
                batcher._first_write()
            reply = batcher._execute(step.call)
