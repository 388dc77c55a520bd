"""Script calls as data: what to send for each operation and how to read the reply.

Both the sync API and any async twin build a :class:`Call` here, run it on their own client and
parse the reply here, so the two never drift apart. This module holds the producer's and the
worker's calls; dead letters (:mod:`.dead_ops`) and the layout stamp (:mod:`.layout_ops`) have
modules of their own, whose operations the executors and processors reach through this one.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .calls import Call as Call
from .calls import corrupt, pairs
from .connection import Arg
from .errors import BatchFull, BatchNotAccumulating, BatchNotFound, ConfigError, CorruptData
from .keys import PartitionKeys
from .models import (
    AddResult,
    BatchInfo,
    DeleteResult,
    FlushRecord,
    FlushResult,
    add_result,
    as_text,
    ms_to_dt,
)
from .scripts import scripts

if TYPE_CHECKING:
    # the functions below take the client-free definition (annotated "Processor" for short)
    from .definition import ProcessorDef as Processor

log = logging.getLogger("redis_batcher")


# -- producer side -----------------------------------------------------------------------------


def add_call(proc: Processor, base: str, encoded: Sequence[bytes], segments: Sequence[int] = ()) -> Call:
    """One add, or several coalesced adds (``segments`` = item count of each, in order)."""
    part = proc.keys.for_base(base)
    config = proc.add_config + ",".join(map(str, segments)) if len(segments) > 1 else proc.add_config_one
    return Call(scripts().add, (f"{part.pfx}b:{base}", part.guard), (base, config, *encoded))


def add_frame(proc: Processor, base: str, data: bytes) -> bytes:
    """``add_call(proc, base, [data])`` RESP-encoded as a link sends it (the same bytes as
    ``Script.framed``), built in one formatting step: a single add's hot path, where cold
    caches after each blocking read make every extra step dear."""
    part = proc.keys.for_base(base)
    key = f"{part.pfx}b:{base}".encode()
    raw = base.encode()
    return b"*8\r\n%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n" % (
        scripts().add.evalsha_head(2),
        len(key),
        key,
        part.guard_frame,
        len(raw),
        raw,
        proc.add_config_frame,
        len(data),
        data,
    )


def parse_add(proc: Processor, base: str, adding: int, reply: Any) -> AddResult:
    """The result of a single add (raises :class:`BatchFull`, :class:`CorruptData`)."""
    result = _parse_one_add(proc, base, adding, reply.decode() if isinstance(reply, bytes) else str(reply))
    if isinstance(result, BatchFull):
        raise result
    return result


_CORRUPT = "corrupt,"


def parse_add_segments(
    proc: Processor, base: str, sizes: Sequence[int], reply: Any
) -> list[AddResult | BatchFull | CorruptData]:
    """One result per coalesced add: its AddResult, or the BatchFull (or CorruptData: the
    whole call was refused) it must raise."""
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    if text.startswith(_CORRUPT):
        return [corrupt(text[len(_CORRUPT) :]) for _ in sizes]
    return [
        _parse_one_add(proc, base, size, entry) for size, entry in zip(sizes, text.split(";"), strict=True)
    ]


def combine_adds(base: str, results: Sequence[AddResult]) -> AddResult:
    """One AddResult for an add_many sent as several atomic chunks (in order)."""
    last = results[-1]
    sealed = sum(r.sealed for r in results)
    return AddResult(
        base, last.sequence, sum(r.added for r in results), last.pending, sealed > 0, last.status, sealed
    )


def _parse_one_add(proc: Processor, base: str, adding: int, entry: str) -> AddResult | BatchFull:
    if entry.startswith(_CORRUPT):
        raise corrupt(entry[len(_CORRUPT) :])
    fields = entry.split(",")
    if fields[0] == "full":
        limit = proc.config.max_pending if proc.config.max_pending is not None else -1
        return BatchFull(base, int(fields[1]), adding, limit)
    seq, pending, status, sealed, added = fields
    return add_result(
        base,
        int(seq),
        int(added),
        int(pending),
        sealed != "0",
        "flushing" if status == "F" else "accumulating",
        int(sealed),
    )


def flush_call(proc: Processor, base: str, seq: int | None) -> Call:
    part = proc.keys.for_base(base)
    return Call(
        scripts().flush,
        (part.head(base), part.due, part.guard),
        (part.pfx, base, "" if seq is None else seq),
    )


def retry_call(proc: Processor, base: str, seq: int | None) -> Call:
    part = proc.keys.for_base(base)
    return Call(
        scripts().retry,
        (part.head(base), part.due, part.guard),
        (part.pfx, base, "" if seq is None else seq),
    )


NOTHING_TO_RETRY = "Nothing waits for a retry"


def parse_flush(batch_id: str, base: str, reply: Sequence[Any]) -> FlushResult:
    """A flush.lua or retry.lua reply (raises :class:`BatchNotFound`,
    :class:`BatchNotAccumulating`, :class:`CorruptData`)."""
    if as_text(reply[0]) == "corrupt":
        raise corrupt(reply[3])
    code, seq, count, status = as_text(reply[0]), int(reply[1]), int(reply[2]), as_text(reply[3])
    sequence = None if seq < 0 else seq
    if code == "not_found":
        raise BatchNotFound(f"batch {batch_id!r} does not exist")
    if code == "not_accumulating":
        raise BatchNotAccumulating(batch_id, status)
    if code == "empty":
        return FlushResult(base, sequence, 0, False, status or None, "Batch is empty")
    if code == "none":
        return FlushResult(base, sequence, 0, False, status or None, NOTHING_TO_RETRY)
    return FlushResult(base, sequence, count, True, status, retried=tuple(int(r) for r in reply[4:]))


def status_call(proc: Processor, base: str) -> Call:
    part = proc.keys.for_base(base)
    return Call(scripts().status, (part.head(base), part.due, part.guard), (part.pfx, base))


def parse_status(base: str, reply: Sequence[Any]) -> tuple[list[BatchInfo], BatchInfo | None]:
    """Active sequences (ordered) and the last completed one, from a status.lua reply."""
    if not isinstance(reply[0], list) and as_text(reply[0]) == "corrupt":
        raise CorruptData(as_text(reply[1]))
    head = pairs(reply[0])
    now = int(reply[1])
    active: list[BatchInfo] = []
    for seq, flat, llen, added_at, due_ms in reply[2:]:
        meta = pairs(flat)
        due = int(float(as_text(due_ms))) if due_ms else None
        overdue = due is not None and due < now
        status = meta.get("status", "accumulating")
        if added_at:
            # add.lua records the accumulating sequence's last add in its open list's header
            meta["updated_at"] = max(meta.get("updated_at", "0"), as_text(added_at), key=int)
        count = int(meta["cutoff"]) if status == "flushing" and "cutoff" in meta else int(llen)
        active.append(
            BatchInfo(
                sequence=int(seq),
                status=status,
                item_count=count,
                created_at=ms_to_dt(meta.get("created_at")),
                updated_at=ms_to_dt(meta.get("updated_at")),
                batch_id=f"{base}::{int(seq)}",
                attempt=int(meta.get("attempt", 0)),
                last_error=meta.get("last_error"),
                next_attempt_at=ms_to_dt(meta.get("next_attempt_at")),
                reason=meta.get("reason"),
                deaths=int(meta.get("deaths", 0)),
                window=int(meta["window"]) if "window" in meta else None,
                flush_id=meta.get("flush_id"),
                due_at=ms_to_dt(due),
                overdue=overdue,
                overdue_since=ms_to_dt(due) if overdue else None,
            )
        )
    active.sort(key=lambda b: b.sequence)
    done = None
    if "done_seq" in head:
        done_at = ms_to_dt(head.get("done_at"))
        done = BatchInfo(
            sequence=int(head["done_seq"]),
            status="completed",
            item_count=int(head.get("done_items", 0)),
            created_at=ms_to_dt(head.get("done_created")),
            updated_at=done_at,
            batch_id=f"{base}::{head['done_seq']}",
        )
    return active, done


def history_range(proc: Processor, base: str, limit: int | None) -> tuple[str, int, int]:
    """The history key of ``base`` and the LRANGE bounds of its newest ``limit`` entries (every
    entry kept with ``None``); raises :class:`ConfigError` for a limit that is not an int >= 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive int or None, got {limit!r}")
    return proc.keys.for_base(base).history(base), 0, -1 if limit is None else limit - 1


def parse_history(raw: Sequence[bytes], key: str) -> list[FlushRecord]:
    """History entries (LRANGE of ``key``) as records; entries that are not flush records are
    skipped, with one logged warning naming the key and how many."""
    out: list[FlushRecord] = []
    skipped = 0
    for entry in raw:
        try:
            out.append(FlushRecord.from_json(entry))
        except ValueError:
            skipped += 1
    if skipped:
        log.warning("skipped %d unreadable flush-history entries in %s", skipped, key)
    return out


def delete_call(proc: Processor, base: str, seq: int | None) -> Call:
    part = proc.keys.for_base(base)
    return Call(
        scripts().delete,
        (part.head(base), part.history(base), part.ids, part.due, part.guard),
        (part.pfx, base, "" if seq is None else seq, proc.retention_s),
    )


def parse_delete(reply: Sequence[Any]) -> DeleteResult:
    deleted, reason = int(reply[0]), as_text(reply[1])
    if deleted < 0:
        raise corrupt(reason)
    return DeleteResult(bool(deleted), reason or None)


# -- worker side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A leased flush, as returned by claim.lua."""

    processor: Processor
    part: PartitionKeys
    member: str
    base: str
    sequence: int
    cutoff: int
    attempt: int
    flush_id: str
    reason: str
    owner: str
    raw: list[bytes] | None = None  # the window's entries when claim.lua returned them inline


# claim.lua returns windows of up to this many items with the claim itself
INLINE_MAX = 2000
# claim.lua's next_due_ms when at least 8 more sequences were due than it claimed (a backlog)
BACKLOG_DUE = -2
# claim.lua's next_due_ms when the partition's own keys hold something else (nothing claimed)
CORRUPT_DUE = -3


@dataclass(frozen=True)
class Quarantined:
    """A due member that claim.lua could not deliver as it was, moved to a dead letter."""

    member: str
    dead_id: str
    error: str


class _Tokens:
    """Lease owner tokens and flush id seeds: a random 64-bit prefix per process plus a counter.
    Unique across processes and machines like a random token, but without a system call per
    claim (a worker makes two per claim). A forked child picks a new prefix."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


new_token = _Tokens()
os.register_at_fork(after_in_child=new_token.reseed)


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _claim_args(proc: Processor, limit: int, owner: str) -> tuple[Arg, ...]:
    """claim.lua's ARGV[2..14] (also ack.lua's optional ARGV[9..21])."""
    cfg = proc.config
    return (
        limit,
        proc.lease_ms,
        owner,
        new_token(),
        proc.retention_s,
        cfg.max_batch_size,
        cfg.max_deaths,
        _flag(cfg.bisect_on_error),
        _flag(cfg.ordered),
        cfg.history_limit,
        INLINE_MAX,
        proc.dead_ttl_ms,
        proc.dead_max,
    )


def claim_call(proc: Processor, part: PartitionKeys, limit: int, owner: str) -> Call:
    return Call(
        scripts().claim, (part.due, part.paused, part.guard), (part.pfx, *_claim_args(proc, limit, owner))
    )


def parse_claim(
    proc: Processor,
    part: PartitionKeys,
    owner: str,
    reply: Sequence[Any],
    quarantined: list[Quarantined] | None = None,
) -> tuple[int, list[Claimed]]:
    """(ms until the next due entry: 0 due now, -1 none, BACKLOG_DUE due now and a backlog
    behind it; claimed flushes). Members the claim quarantined are appended to
    ``quarantined``. Raises :class:`CorruptData` when the partition's keys hold something else."""
    next_due = int(reply[0])
    if next_due == CORRUPT_DUE:
        raise CorruptData(f"{as_text(reply[1])}: nothing of {part.pfx} can be claimed until it is fixed")
    out = []
    for i in range(1, len(reply), 6):
        member = as_text(reply[i])
        if int(reply[i + 1]) < 0:
            if quarantined is not None:
                quarantined.append(Quarantined(member, as_text(reply[i + 3]), as_text(reply[i + 5])))
            continue
        window = reply[i + 5]
        if isinstance(window, bytes):
            raw: list[bytes] | None = msgpack.unpackb(window, raw=True, use_list=True)
        else:
            raw = list(window) if isinstance(window, list) else None
        base, _, seq = member.rpartition("::")
        out.append(
            Claimed(
                processor=proc,
                part=part,
                member=member,
                base=base,
                sequence=int(seq),
                cutoff=int(reply[i + 1]),
                attempt=int(reply[i + 2]),
                flush_id=as_text(reply[i + 3]),
                reason=as_text(reply[i + 4]),
                owner=owner,
                raw=raw,
            )
        )
    return next_due, out


_json_str: Any = json.encoder.encode_basestring_ascii


def _json_opt(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


def history_entry(c: Claimed, started_ms: int, duration_ms: float, success: bool, error: str | None) -> str:
    """One flush-history entry as compact JSON: the same text as ``json.dumps`` of the dict
    with ``separators=(",", ":")``, written out field by field (one per flush: cheaper than
    ``json.dumps``)."""
    return (
        f'{{"seq":{int(c.sequence)},"items":{int(c.cutoff)},"started_at":{int(started_ms)},'
        f'"duration_ms":{round(duration_ms, 3)!r},"success":{"true" if success else "false"},'
        f'"error":{_json_opt(error)},"attempt":{int(c.attempt)},"flush_id":{_json_opt(c.flush_id)},'
        f'"reason":{_json_opt(c.reason)}}}'
    )


ACK_ARGS = 8  # ack.lua's own ARGV (the optional claim's follow)


def ack_call(c: Claimed, entry: str, claim_owner: str | None = None) -> Call:
    """Acknowledge ``c``. With ``claim_owner``, the same script then claims the partition's next
    due flush for that owner (the reply goes on with claim.lua's reply: :func:`parse_ack`)."""
    proc = c.processor
    cfg = proc.config
    args: tuple[Arg, ...] = (
        c.part.pfx,
        c.member,
        c.owner,
        entry,
        cfg.history_limit,
        proc.retention_s,
        cfg.max_batch_size,
        _flag(cfg.ordered),
    )
    if claim_owner is not None:
        args += _claim_args(proc, 1, claim_owner)
    return Call(
        scripts().ack,
        (c.part.due, c.part.head(c.base), c.part.history(c.base), c.part.ids, c.part.paused, c.part.guard),
        args,
    )


def without_claim(call: Call) -> Call:
    """``call`` without the claim an ack asked for: what to send when that ack is retried after
    an error. (If the first one did run, the flush it claimed stays leased to a token nobody
    holds until the lease runs out; then it is delivered again, counted as a death.)"""
    if call.script is scripts().ack and len(call.args) > ACK_ARGS:
        return Call(call.script, call.keys, call.args[:ACK_ARGS])
    return call


def claim_part(reply: Sequence[Any]) -> Sequence[Any] | None:
    """The claim.lua reply inside an ack.lua reply that asked for the next flush (None when the
    ack claimed nothing because it was refused or was sent without ``claim_owner``)."""
    return reply[2:] if len(reply) > 2 else None


def marks(indices: Sequence[int], size: int) -> bytes:
    """A bitmap over ``size`` items with bit i (LSB first in each byte) set for each index: how
    nack.lua takes the items a partial failure or a decode failure names (one argument, however
    many there are)."""
    bits = bytearray((size + 7) // 8)
    for i in indices:
        bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def nack_call(
    c: Claimed, entry: str, delay_ms: int, error: str, mode: str = "fail", indices: Sequence[int] = ()
) -> Call:
    """mode: 'fail' (handler raised), 'partial' (``indices`` failed), 'decode' (``indices``
    cannot be decoded: quarantined), 'missing' (fewer items than the window were read: given
    back at once for the next claim to deal with, no try spent)."""
    proc = c.processor
    cfg = proc.config
    return Call(
        scripts().nack,
        (c.part.due, c.part.history(c.base), c.part.guard),
        (
            c.part.pfx,
            c.member,
            c.owner,
            entry,
            cfg.history_limit,
            delay_ms,
            error,
            mode,
            cfg.max_attempts,
            _flag(cfg.bisect_on_error),
            proc.retention_s,
            cfg.max_batch_size,
            _flag(cfg.ordered),
            proc.dead_ttl_ms,
            proc.dead_max,
            marks(indices, c.cutoff),
        ),
    )


def release_call(c: Claimed) -> Call:
    return Call(scripts().release, (c.part.due, c.part.guard), (c.part.pfx, c.member, c.owner))


def extend_call(c: Claimed) -> Call:
    return Call(
        scripts().extend, (c.part.due, c.part.guard), (c.part.pfx, c.member, c.owner, c.processor.lease_ms)
    )


def items_key(c: Claimed) -> str:
    return c.part.items(c.base, c.sequence)
