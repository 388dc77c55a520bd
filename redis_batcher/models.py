"""Value objects returned by the public API. Times are timezone-aware UTC datetimes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


def _json_object(raw: str | bytes) -> dict[str, Any]:
    """A JSON object stored in Redis; ``ValueError`` for anything else (bytes that are not
    UTF-8 included)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object: {type(data).__name__}")
    return data


def ms_to_dt(value: Any) -> datetime | None:
    """Epoch milliseconds (as stored in Redis) to an aware UTC datetime."""
    if value is None or value == b"" or value == "":
        return None
    return datetime.fromtimestamp(int(value) / 1000.0, tz=timezone.utc)


@dataclass(frozen=True)
class ProcessorConfig:
    """A processor's settings, as stored in the ``<prefix>:processors`` registry."""

    name: str
    max_batch_size: int
    flush_interval: float | None
    partitions: int
    codec: str
    max_item_bytes: int
    history_limit: int
    retention: float
    lease_timeout: float
    retry_backoff: float
    retry_backoff_max: float
    max_attempts: int = 10
    max_deaths: int = 3
    handler_timeout: float | None = None
    bisect_on_error: bool = False
    ordered: bool = False
    max_pending: int | None = None
    dead_letter_ttl: float | None = 180 * 86400.0
    max_dead_letters: int | None = 10_000
    flush_idle: float | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ProcessorConfig:
        """Parse a registry entry; raises ``ValueError`` for one that is not a config."""
        data = _json_object(raw)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        try:
            return cls(**known)
        except TypeError as exc:  # a required field is missing
            raise ValueError(f"not a processor config: {exc}") from None


@dataclass(frozen=True)
class AddResult:
    """Outcome of ``add``/``add_many``.

    ``sequence`` received the last item and now holds ``pending`` items; ``status`` is
    ``"flushing"`` when that item sealed it. ``flushed`` is true when the call sealed at least
    one sequence (``sealed`` says how many).
    """

    batch_id: str
    sequence: int | None
    added: int
    pending: int
    flushed: bool
    status: str | None
    sealed: int = 0


_new = object.__new__


def add_result(
    batch_id: str, sequence: int, added: int, pending: int, flushed: bool, status: str, sealed: int
) -> AddResult:
    """``AddResult(...)`` for the add hot path: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``, which is slow; this fills the instance's ``__dict__``
    directly (same object: equality, hash and repr are the dataclass's)."""
    result: AddResult = _new(AddResult)
    fields = result.__dict__
    fields["batch_id"] = batch_id
    fields["sequence"] = sequence
    fields["added"] = added
    fields["pending"] = pending
    fields["flushed"] = flushed
    fields["status"] = status
    fields["sealed"] = sealed
    return result


@dataclass(frozen=True)
class FlushResult:
    """Outcome of a manual ``flush`` or ``retry``: ``flushed`` is false with ``reason`` when
    nothing was made due. ``retried`` names the sequences that waited for a retry (a failed
    delivery's backoff) and are due now, their attempt counts kept; ``item_count`` counts the
    items made due (the sealed sequence's and the retried ones'); ``sequence`` is the sealed
    one, else the first retried one."""

    batch_id: str
    sequence: int | None
    item_count: int
    flushed: bool
    status: str | None
    reason: str | None = None
    retried: tuple[int, ...] = ()


@dataclass(frozen=True)
class BatchInfo:
    """One sequence ``base::N`` of a batch id."""

    sequence: int
    status: str
    item_count: int
    created_at: datetime | None
    updated_at: datetime | None
    batch_id: str = ""
    attempt: int = 0
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    reason: str | None = None
    deaths: int = 0
    window: int | None = None
    # the id its next delivery carries, fixed when it was sealed (None while accumulating)
    flush_id: str | None = None
    # when it is due (its interval timer, a retry's backoff), or while a worker holds it when
    # that worker's lease runs out; None when it waits for nothing of its own (ordered: parked)
    due_at: datetime | None = None
    # due in the past and no worker holding it: no worker is claiming (none running, or the
    # processor paused), or the one that held it died; overdue_since is then due_at
    overdue: bool = False
    overdue_since: datetime | None = None


@dataclass(frozen=True)
class BatchStatus:
    """Active sequences (accumulating or flushing) of a base id, plus the processor config."""

    batch_id: str
    batches: list[BatchInfo]
    config: ProcessorConfig
    last_completed: BatchInfo | None = None

    @property
    def pending(self) -> int:
        """Items not yet delivered, over all active sequences."""
        return sum(b.item_count for b in self.batches)


@dataclass(frozen=True)
class FlushRecord:
    """One entry of a base id's flush history (newest first)."""

    sequence: int
    item_count: int
    started_at: datetime
    duration_ms: float
    success: bool
    error: str | None
    attempt: int
    flush_id: str = ""
    reason: str | None = None

    @classmethod
    def from_json(cls, raw: str | bytes) -> FlushRecord:
        """Parse a history entry; raises ``ValueError`` for one that is not a flush record."""
        d = _json_object(raw)
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"not a flush record: {exc!r}") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> FlushRecord:
        started = ms_to_dt(d["started_at"])
        if started is None:
            raise ValueError("no started_at")
        return cls(
            sequence=int(d["seq"]),
            item_count=int(d["items"]),
            started_at=started,
            duration_ms=float(d["duration_ms"]),
            success=bool(d["success"]),
            error=d.get("error"),
            attempt=int(d.get("attempt", 1)),
            flush_id=str(d.get("flush_id", "")),
            reason=d.get("reason"),
        )


@dataclass(frozen=True)
class DeleteResult:
    """Outcome of ``delete``: ``reason`` says why nothing was deleted."""

    deleted: bool
    reason: str | None = None


@dataclass(frozen=True)
class Flush:
    """What a handler receives: one sequence's items, in add order."""

    processor: str
    batch_id: str
    sequence: int
    items: list[Any]
    attempt: int
    flush_id: str
    reason: str = ""

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class DeadLetter:
    """Items that could not be delivered, kept with why: ``reason`` is ``max_attempts`` (the
    handler kept failing), ``max_deaths`` (workers kept dying in the handler) or
    ``decode_error`` (the codec cannot read the entry). ``items`` is filled by
    ``Processor.dead_letter(id)``; entries that cannot be decoded stay ``bytes``."""

    id: str
    processor: str
    batch_id: str
    sequence: int
    item_count: int
    reason: str
    error: str
    attempts: int
    deaths: int
    flush_id: str
    created_at: datetime | None
    dead_at: datetime | None
    items: list[Any] | None = None


def as_text(value: Any) -> str:
    """``value`` as str (bytes decoded as UTF-8): what redis-py returns without decoding."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class WorkerStats:
    """Counters of one worker run."""

    delivered: int = 0
    failed: int = 0
    items: int = 0
    lease_lost: int = 0
    dead_lettered: int = 0
    partial: int = 0
    timed_out: int = 0
    released: int = 0
    quarantined: int = 0
    claims: int = 0  # claim calls sent (an ack that claims the next flush not counted)
