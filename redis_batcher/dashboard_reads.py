"""What the web dashboard (``redis-batcher dashboard``) shows, read through a sync
:class:`~redis_batcher.Batcher` at a cost per page that does not grow with the number of batch
ids: the overview's figures come from :func:`redis_batcher.overview.backlog_steps` (seven
commands per partition), a processor's batch ids are one ``SSCAN`` page (a cursor, never ``KEYS``) plus
one status call per id shown, a batch id's page reads its sequences, its history and a bounded
preview of each sequence's items. From Python::

    from redis_batcher import Batcher, dashboard_reads

    page = dashboard_reads.ids_page(Batcher(url).remote("events"), partition=0, cursor=0)
    for row in page.rows:
        print(row.batch_id, row.pending)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import methodcaller
from typing import Any

from . import overview
from .batcher import Batcher
from .calls import Read, Steps
from .codec import Codec
from .errors import ConfigError
from .job_model import JobStatus
from .jobs import find_job
from .models import BatchInfo, DeadLetter, FlushRecord, ProcessorConfig, as_text
from .processor import Processor
from .worker_registry import WorkerInfo

# batch ids per processor page: one status call each
PAGE_SIZE = 25
# sequences of one batch id whose items are previewed, and items shown of each
PREVIEW_SEQUENCES = 10
PREVIEW_ITEMS = 20
HISTORY_ROWS = 20
DEAD_LIMIT = 50
JOB_LIMIT = 50
# characters of one item's text in a preview
ITEM_TEXT = 300


@dataclass(frozen=True)
class ProcessorRow:
    """One processor of the overview: its config and its :class:`~redis_batcher.overview.Backlog`."""

    name: str
    config: ProcessorConfig
    backlog: overview.Backlog


@dataclass(frozen=True)
class Overview:
    """The overview page: every readable registered processor, by name; the registry entries
    that could not be read (one line each); the live workers."""

    prefix: str
    processors: list[ProcessorRow]
    skipped: list[str]
    workers: list[WorkerInfo]


def read_overview(batcher: Batcher) -> Overview:
    """The overview: one ``HGETALL`` of the registry, seven commands per partition of each
    processor, two for the worker registry."""
    found = overview.registry(batcher)
    now = time.time()
    rows = [
        ProcessorRow(name, config, batcher.executor.drive(overview.backlog_steps(batcher.remote(name), now)))
        for name, config in sorted(found.configs.items())
    ]
    return Overview(batcher.prefix, rows, found.skipped(), batcher.workers())


def processor_backlog(proc: Processor) -> overview.Backlog:
    """The :class:`~redis_batcher.overview.Backlog` of one processor: seven commands per partition."""
    return proc.batcher.executor.drive(overview.backlog_steps(proc, time.time()))


@dataclass(frozen=True)
class IdRow:
    """One batch id of a processor page: its sequences (the last completed one first, then the
    active ones)."""

    batch_id: str
    sequences: list[BatchInfo]

    @property
    def active(self) -> list[BatchInfo]:
        return [s for s in self.sequences if s.status != "completed"]

    @property
    def pending(self) -> int:
        """Items not delivered yet, over its active sequences."""
        return sum(s.item_count for s in self.active)

    @property
    def accumulating(self) -> bool:
        return any(s.status == "accumulating" for s in self.sequences)


@dataclass(frozen=True)
class IdsPage:
    """One page of a processor's active batch ids: those one ``SSCAN`` of partition
    ``partition`` returned from ``cursor``; ``next``, the (partition, cursor) of the next page
    (None: this was the last)."""

    processor: str
    partitions: int
    partition: int
    cursor: int
    rows: list[IdRow]
    next: tuple[int, int] | None


def _sscan(key: str, cursor: int, count: int) -> Steps[tuple[int, list[Any]]]:
    found: tuple[int, list[Any]] = yield Read(key, methodcaller("sscan", key, cursor, count=count))
    return found


def ids_page(proc: Processor, partition: int = 0, cursor: int = 0, count: int = PAGE_SIZE) -> IdsPage:
    """The page of ``proc``'s active batch ids at (``partition``, ``cursor``): one ``SSCAN``
    with ``COUNT count`` and one status call per id it returns (``SSCAN`` returns about
    ``count``, or a small set whole), however many ids the processor has."""
    parts = proc.keys.parts
    if not 0 <= partition < len(parts) or cursor < 0 or count < 1:
        raise ConfigError(
            f"no page at partition {partition}, cursor {cursor} of processor {proc.name!r} "
            f"({len(parts)} partition(s))"
        )
    following, raw = proc.batcher.executor.drive(_sscan(parts[partition].ids, cursor, count))
    ids = sorted(as_text(r) for r in raw)
    rows = [IdRow(bid, proc.sequences(bid)) for bid in ids]
    if following:
        nxt: tuple[int, int] | None = (partition, int(following))
    else:
        nxt = (partition + 1, 0) if partition + 1 < len(parts) else None
    return IdsPage(proc.name, len(parts), partition, cursor, rows, nxt)


@dataclass(frozen=True)
class ItemPreview:
    """One stored item: ``text``, what the codec decoded (as JSON, else ``repr``), or the
    entry's bytes in hex when it cannot be decoded (``decoded`` false)."""

    index: int
    text: str
    decoded: bool


@dataclass(frozen=True)
class SequenceView:
    """A sequence of a batch id and a preview of its first items (``items`` None: not
    previewed; ``more``, items left out)."""

    info: BatchInfo
    items: list[ItemPreview] | None
    more: int


@dataclass(frozen=True)
class BatchView:
    """The batch id page: its sequences, its flush history (newest first), whether the
    processor is paused."""

    processor: str
    batch_id: str
    sequences: list[SequenceView]
    history: list[FlushRecord]
    paused: bool


def _short(text: str) -> str:
    return text if len(text) <= ITEM_TEXT else text[: ITEM_TEXT - 1] + "…"


def item_text(value: Any) -> str:
    """A decoded item as one line: JSON when it is JSON-able, else ``repr``."""
    if isinstance(value, (bytes, bytearray)):
        return _short(repr(bytes(value)))
    try:
        return _short(json.dumps(value, ensure_ascii=False, sort_keys=True))
    except (TypeError, ValueError):
        return _short(repr(value))


def preview_items(codec: Codec, entries: Sequence[bytes], start: int = 0) -> list[ItemPreview]:
    """``entries`` decoded by ``codec``; an entry it cannot decode is shown in hex."""
    out = []
    for i, raw in enumerate(entries, start):
        try:
            out.append(ItemPreview(i, item_text(codec.decode(raw)), True))
        except Exception:  # any codec's failure: the entry is shown as stored
            out.append(ItemPreview(i, _short(bytes(raw).hex(" ")), False))
    return out


def items_steps(proc: Processor, base: str, info: BatchInfo, limit: int) -> Steps[list[bytes] | None]:
    """The first ``limit`` stored items of sequence ``info`` of ``base``: one ``LRANGE`` of its
    list, or of the open list (behind its header) while it accumulates. None when it was sealed
    between the status read and this one (the open list then belongs to the next sequence)."""
    part = proc.keys.for_base(base)
    if info.status != "accumulating":
        key = part.items(base, info.sequence)
        entries: list[bytes] = yield Read(key, methodcaller("lrange", key, 0, limit - 1))
        return entries
    key = part.open_items(base)
    entries = yield Read(key, methodcaller("lrange", key, 0, limit))
    if not entries or as_text(entries[0]).split(":", 1)[0] != str(info.sequence):
        return None
    return list(entries[1:])


def batch_view(proc: Processor, batch_id: str) -> BatchView:
    """The batch id page of ``batch_id`` (a base id): its status call, one ``LRANGE`` of its
    history and one per previewed sequence, one ``EXISTS`` per partition for the pause."""
    seqs = proc.sequences(batch_id)
    views = []
    for k, info in enumerate(seqs):
        if info.status == "completed" or k >= PREVIEW_SEQUENCES:
            views.append(SequenceView(info, None, 0))
            continue
        entries = proc.batcher.executor.drive(items_steps(proc, batch_id, info, PREVIEW_ITEMS))
        items = None if entries is None else preview_items(proc.codec, entries)
        views.append(SequenceView(info, items, max(info.item_count - len(items or []), 0)))
    history = proc.history(batch_id, limit=HISTORY_ROWS)
    return BatchView(proc.name, batch_id, views, history, proc.paused())


def dead_letters(batcher: Batcher, names: Iterable[str] | None = None) -> list[DeadLetter]:
    """The newest :data:`DEAD_LIMIT` dead letters of the processors named (default: all)."""
    return overview.dead_letters(batcher, DEAD_LIMIT, names)


def dead_letter_items(proc: Processor, letter: DeadLetter) -> list[ItemPreview]:
    """A dead letter's items as the codec decoded them (entries it could not: in hex)."""
    out = []
    for i, item in enumerate(letter.items or []):
        if isinstance(item, bytes):  # left undecoded by the codec
            out.extend(preview_items(proc.codec, [item], i))
        else:
            out.append(ItemPreview(i, item_text(item), True))
    return out


def jobs(batcher: Batcher, status: str | None = None) -> list[JobStatus]:
    """The newest :data:`JOB_LIMIT` iterator jobs (of one ``status``, default all)."""
    return batcher.jobs(status=status, limit=JOB_LIMIT)


def job_action(batcher: Batcher, iterator: str, job_id: str, action: str) -> JobStatus:
    """Pause, resume or cancel a job (``action``); its new status."""
    if action not in ("pause", "resume", "cancel"):
        raise ConfigError(f"unknown job action {action!r}: pause, resume or cancel")
    control = find_job(batcher, job_id, iterator)
    result: JobStatus = getattr(control, action)(job_id)
    return result
