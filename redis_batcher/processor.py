"""A processor: a named handler plus the batching rules for the items sent to it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from . import calls, dead_ops, ops, pause_ops
from .codec import Codec, encode_item, encode_items
from .definition import ADD_CHUNK, Handler, ProcessorDef
from .executor import ExecutorHost
from .keys import parse_batch_id
from .models import (
    AddResult,
    BatchInfo,
    BatchStatus,
    DeadLetter,
    DeleteResult,
    FlushRecord,
    FlushResult,
    ProcessorConfig,
)

__all__ = ["ADD_CHUNK", "Handler", "Processor"]

class Processor(ProcessorDef):
    """Adds items for a handler and inspects its batches. Created by :meth:`Batcher.processor`.

    Calling the processor object calls the handler directly, which keeps handlers unit-testable.
    """

    def __init__(
        self, batcher: ExecutorHost, handler: Handler, config: ProcessorConfig, codec: Codec
    ) -> None:
        super().__init__(batcher.prefix, handler, config, codec)
        self.batcher = batcher

    # -- producing ------------------------------------------------------------------------------

    def encode(self, items: Iterable[Any]) -> list[bytes]:
        """Encode items, raising before anything is written if one is invalid."""
        return encode_items(self.codec, items, self.config.max_item_bytes)

    def add(self, batch_id: str, item: Any) -> AddResult:
        """Append one item to ``batch_id``: one round trip (a single EVALSHA).

        Raises :class:`BatchFull` (nothing written) when ``max_pending`` would be exceeded."""
        base, _ = parse_batch_id(batch_id)
        data = encode_item(self.codec, item, self.config.max_item_bytes)
        self.batcher.executor.ensure_registered(self)
        return self.batcher.executor.run_add(self, base, [data])

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
        self.batcher.executor.ensure_registered(self)
        if len(encoded) <= ADD_CHUNK:
            return self.batcher.executor.run_add(self, base, encoded)
        chunks = [encoded[i : i + ADD_CHUNK] for i in range(0, len(encoded), ADD_CHUNK)]
        return ops.combine_adds(base, [self.batcher.executor.run_add(self, base, chunk) for chunk in chunks])

    def flush(self, batch_id: str) -> FlushResult:
        """Seal the accumulating sequence of ``batch_id`` (or the named ``base::N``) now, and
        make its sequences that wait for a retry due now too (as :meth:`retry`), in one atomic
        call: everything the base id holds is delivered at once. A named ``base::N`` that waits
        for a retry is retried.

        Raises :class:`BatchNotFound` for an unknown id and :class:`BatchNotAccumulating` when
        ``base::N`` is completed, or flushing without waiting for a retry (a worker holds it,
        or it is due already); an id with nothing accumulating and nothing waiting returns
        ``flushed=False, reason="Batch is empty"``. ``FlushResult.retried`` names the
        sequences retried.
        """
        base, seq = parse_batch_id(batch_id)
        self.batcher.executor.ensure_registered(self)
        reply = self.batcher.executor.execute(ops.flush_call(self, base, seq))
        return ops.parse_flush(batch_id, base, reply)

    def retry(self, batch_id: str) -> FlushResult:
        """Make the sequences of ``batch_id`` that wait for a retry (a failed delivery's
        backoff) due now, or only the named ``base::N``; the accumulating one is left alone.
        Their attempt counts are kept, so ``max_attempts`` goes on counting.

        ``FlushResult.retried`` names them; with none waiting, ``flushed=False`` and
        ``reason="Nothing waits for a retry"``. Raises :class:`BatchNotFound` for an unknown id.
        """
        base, seq = parse_batch_id(batch_id)
        self.batcher.executor.ensure_registered(self)
        reply = self.batcher.executor.execute(ops.retry_call(self, base, seq))
        return ops.parse_flush(batch_id, base, reply)

    # -- pausing --------------------------------------------------------------------------------

    def pause(self) -> bool:
        """Stop the workers from claiming this processor's flushes until :meth:`resume`.

        Adds go on: sequences accumulate and seal (by size, interval or :meth:`flush`) and wait.
        Flushes already claimed finish normally. Every partition is paused (one call each).
        Returns False when it was paused already."""
        return self.batcher.executor.drive(pause_ops.pause_steps(self, True))

    def resume(self) -> bool:
        """Let the workers claim again: what became due meanwhile is delivered at once (the
        workers are woken). Returns False when it was not paused."""
        return self.batcher.executor.drive(pause_ops.pause_steps(self, False))

    def paused(self) -> bool:
        """Whether the processor is paused (any of its partitions: a pause cut short by an error
        leaves some paused; :meth:`resume` resumes them all)."""
        return self.batcher.executor.drive(pause_ops.paused_steps(self))

    # -- inspecting -----------------------------------------------------------------------------

    def _snapshot(self, batch_id: str) -> tuple[str, list[BatchInfo], BatchInfo | None]:
        base, _ = parse_batch_id(batch_id)
        reply = self.batcher.executor.execute(ops.status_call(self, base), wait=False)
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

    def history(self, batch_id: str, limit: int | None = 20) -> list[FlushRecord]:
        """Flush attempts of the base id, newest first (successes and failures): the newest
        ``limit``, or every one kept (up to ``history_limit``) with ``None``."""
        key, start, stop = ops.history_range(self, parse_batch_id(batch_id)[0], limit)
        client = self.batcher.client
        with calls.reading(key):
            raw = self.batcher.executor.command(key, lambda: client.lrange(key, start, stop))
        return ops.parse_history(raw, key)

    def delete(self, batch_id: str) -> DeleteResult:
        """Delete a base id (head, history) or one ``base::N`` sequence.

        Refused, with ``deleted=False`` and a reason, while a sequence is flushing or still holds
        items, so deleting never drops an item.
        """
        base, seq = parse_batch_id(batch_id)
        self.batcher.executor.first_write()
        return ops.parse_delete(self.batcher.executor.execute(ops.delete_call(self, base, seq)))

    def batch_ids(self) -> Iterator[str]:
        """Base ids with at least one active sequence (SSCAN over each partition, never KEYS)."""
        client = self.batcher.client
        for part in self.keys.parts:
            with calls.reading(part.ids):
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
        return self.batcher.executor.drive(dead_ops.dead_letters_steps(self, limit))

    def dead_letter(self, dead_id: str) -> DeadLetter:
        """One dead letter with its items (entries the codec cannot read stay ``bytes``)."""
        return self.batcher.executor.drive(dead_ops.dead_letter_steps(self, dead_id))

    def replay_dead(self, dead_id: str) -> int:
        """Put a dead letter's items back into its batch id as a new sequence, due now.

        Returns the new sequence number."""
        return self.batcher.executor.drive(dead_ops.replay_dead_steps(self, dead_id))

    def purge_dead(self, dead_id: str | None = None) -> int:
        """Delete one dead letter, or all of them with ``None``. Returns how many were deleted."""
        return self.batcher.executor.drive(dead_ops.purge_dead_steps(self, dead_id))

