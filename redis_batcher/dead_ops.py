"""Dead letters as data: the script calls and multi-step operations (:data:`~.calls.Steps`) that
list, show, replay and purge them, without I/O. The sync ``Processor`` and the
``AsyncProcessor`` drive the same steps on their executors."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from operator import methodcaller
from typing import TYPE_CHECKING, Any

from .calls import Call, Read, Run, Steps, corrupt, pairs
from .codec import decode_item
from .errors import ConfigError, DeadLetterNotFound, DecodeError
from .keys import PartitionKeys
from .models import DeadLetter, as_text, ms_to_dt
from .scripts import scripts

if TYPE_CHECKING:
    # the functions below take the client-free definition (annotated "Processor" for short)
    from .definition import ProcessorDef as Processor

DEAD_PURGE_CHUNK = 100


def parse_dead_letter(proc: Processor, dead_id: str, flat: Any) -> DeadLetter | None:
    """A dead letter's metadata hash (a dict, or a flat field/value list) as a
    :class:`DeadLetter` without items; None for an empty hash (no such dead letter)."""
    meta = flat if isinstance(flat, dict) else pairs(flat)
    meta = {as_text(k): as_text(v) for k, v in meta.items()}
    if not meta:
        return None
    return DeadLetter(
        id=dead_id,
        processor=proc.name,
        batch_id=meta.get("batch_id", ""),
        sequence=int(meta.get("sequence", -1)),
        item_count=int(meta.get("count", 0)),
        reason=meta.get("reason", ""),
        error=meta.get("error", ""),
        attempts=int(meta.get("attempts", 0)),
        deaths=int(meta.get("deaths", 0)),
        flush_id=meta.get("flush_id", ""),
        created_at=ms_to_dt(meta.get("created_at")),
        dead_at=ms_to_dt(meta.get("dead_at")),
    )


def replay_call(proc: Processor, part: PartitionKeys, dead_id: str, base: str) -> Call:
    return Call(
        scripts().replay,
        (part.head(base), part.ids, part.due, part.history(base), part.guard),
        (part.pfx, dead_id, base, proc.config.max_batch_size),
    )


def purge_call(part: PartitionKeys, ids: Sequence[str]) -> Call:
    return Call(scripts().purge, (part.dead, part.guard), (part.pfx, *ids))


def parse_purge(reply: Any) -> int:
    if isinstance(reply, list):
        raise corrupt(reply[1])
    return int(reply)


def check_replay(reply: Sequence[Any]) -> None:
    """Raise :class:`CorruptData` for a replay.lua reply that found keys holding something else."""
    if as_text(reply[0]) == "corrupt":
        raise corrupt(reply[1])


def dead_letters_steps(proc: Processor, limit: int) -> Steps[list[DeadLetter]]:
    """Dead letters of ``proc``, newest first, without their items."""
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive int, got {limit!r}")
    found: list[tuple[float, PartitionKeys, str]] = []
    for part in proc.keys.parts:
        newest = yield Read(part.dead, methodcaller("zrevrange", part.dead, 0, limit - 1, withscores=True))
        found.extend((score, part, as_text(raw)) for raw, score in newest)
    found.sort(key=lambda t: t[0], reverse=True)
    out = []
    for _, part, dead_id in found[:limit]:
        meta = part.dead_meta(dead_id)
        letter = parse_dead_letter(proc, dead_id, (yield Read(meta, methodcaller("hgetall", meta))))
        if letter is not None:
            out.append(letter)
    return out


def _find_dead(proc: Processor, dead_id: str) -> Steps[tuple[PartitionKeys, DeadLetter]]:
    if not isinstance(dead_id, str) or not dead_id:
        raise DeadLetterNotFound(f"no dead letter {dead_id!r}")
    for part in proc.keys.parts:
        meta = part.dead_meta(dead_id)
        letter = parse_dead_letter(proc, dead_id, (yield Read(meta, methodcaller("hgetall", meta))))
        if letter is not None:
            return part, letter
    raise DeadLetterNotFound(f"no dead letter {dead_id!r} in processor {proc.name!r}")


def dead_letter_steps(proc: Processor, dead_id: str) -> Steps[DeadLetter]:
    """One dead letter with its items (entries the codec cannot read stay ``bytes``)."""
    part, letter = yield from _find_dead(proc, dead_id)
    key = part.dead_items(dead_id)
    raw = yield Read(key, methodcaller("lrange", key, 0, -1))
    items: list[Any] = []
    for i, data in enumerate(raw):
        try:
            items.append(decode_item(proc.codec, data, i))
        except DecodeError:
            items.append(data)
    return dataclasses.replace(letter, items=items)


def replay_dead_steps(proc: Processor, dead_id: str) -> Steps[int]:
    """Put a dead letter's items back as a new sequence of its batch id; its number."""
    part, letter = yield from _find_dead(proc, dead_id)
    reply = yield Run(replay_call(proc, part, dead_id, letter.batch_id), writes=True)
    check_replay(reply)
    if as_text(reply[0]) != "ok":
        raise DeadLetterNotFound(f"no dead letter {dead_id!r} (replayed or purged meanwhile?)")
    return int(reply[1])


def purge_dead_steps(proc: Processor, dead_id: str | None) -> Steps[int]:
    """Delete one dead letter, or all of them with ``None``; how many were deleted."""
    if dead_id is not None:
        part, _ = yield from _find_dead(proc, dead_id)
        return parse_purge((yield Run(purge_call(part, [dead_id]))))
    total = 0
    for part in proc.keys.parts:
        while True:
            oldest = yield Read(part.dead, methodcaller("zrange", part.dead, 0, DEAD_PURGE_CHUNK - 1))
            if not oldest:
                break
            total += parse_purge((yield Run(purge_call(part, [as_text(r) for r in oldest]))))
    return total
