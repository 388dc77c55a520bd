"""Key names, hash tags, partitions and batch-id rules.

Every key of one processor partition shares one hash tag, so each Lua script touches a single
Cluster slot. The tag is ``{<processor>:<partition>}``, with a ``~<n>`` suffix when that is what
puts the partition's slot into its share of the slot space (see :func:`partition_tag`).
Layout (prefix ``rb``, processor ``events``, one partition)::

    rb:processors                      HASH  processor name -> JSON config (registry for the CLI)
    rb:{events:0}:due                  ZSET  delay queue: "base::N" -> due / lease-expiry time (ms)
    rb:{events:0}:ids                  SET   base ids with at least one active sequence
    rb:{events:0}:b:<base>             HASH  head record of a base id
    rb:{events:0}:h:<base>             LIST  flush history, newest first (JSON)
    rb:{events:0}:s:<base>::<N>        HASH  state of sequence N
    rb:{events:0}:i:<base>::<N>        LIST  encoded items of sequence N, in add order
    rb:{events:0}:dead                 ZSET  dead-letter ids -> time they died (ms)
    rb:{events:0}:d:<id>               HASH  dead letter: batch_id, sequence, count, reason, error, ...
    rb:{events:0}:di:<id>              LIST  its items
    rb:{events:0}:woke                 STRING the wake-up token: set while a wake-up is unanswered
                                       (add.lua); the woken worker that deletes it claims
    rb:{events:0}:paused               STRING set while the partition is paused (the time it was
                                       paused, ms): claims take none of its flushes
    rb:{events:0}:pending              STRING items of the sealed sequences not yet delivered
                                       (advisory, for metrics; absent = 0)
    rb:{events:0}:wake                 wake-up channel of the partition: sharded pub/sub
                                       (SPUBLISH/SSUBSCRIBE) on Redis 7+, else plain
    rb:{events:0}:guard                never written: the last key every script declares, so
                                       that no script runs while the slot migrates (:data:`GUARD`)
    rb:layout                          STRING the data layout's version (:data:`LAYOUT`)
    rb:{workers}                       ZSET  worker registry: worker id -> record expiry (ms)
    rb:{workers}:<worker id>           STRING a live worker's heartbeat record (JSON, expires)
                                       (see :mod:`redis_batcher.worker_registry`)
"""

from __future__ import annotations

import binascii
import functools
import re
import unicodedata
import zlib
from dataclasses import dataclass

from .errors import ConfigError, InvalidBatchId

MAX_BATCH_ID_BYTES = 1024
MAX_PARTITIONS = 256
CLUSTER_SLOTS = 16384
# the version of the key layout below, stamped in Redis at <prefix>:layout; 2: partitions'
# hash tags spread over the slot space (1, unstamped: "{<processor>:<partition>}" alone)
LAYOUT = 2
# The name, after a partition's (or iterator's) key prefix, of a key that no script ever
# writes yet every script declares last in KEYS. While a slot migrates, Redis Cluster runs a
# script only where all its declared keys exist, so the guard makes it answer TRYAGAIN or ASK
# before any script of the slot runs, never half-way (see docs/data-layout.md).
GUARD = "guard"
_SEQ_SUFFIX = re.compile(r"^(.*)::(\d+)$", re.DOTALL)
_NAME_FORBIDDEN = re.compile(r"[{}\s]")


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def validate_name(kind: str, value: object, max_len: int = 200) -> str:
    """Validate a processor name or key prefix: no braces, whitespace or control characters."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{kind} must be a non-empty string, got {value!r}")
    if len(value) > max_len or _NAME_FORBIDDEN.search(value) or _has_control(value):
        raise ConfigError(
            f"{kind} {value!r} is invalid: at most {max_len} characters, "
            "no braces, whitespace or control characters"
        )
    return value


def parse_batch_id(batch_id: object) -> tuple[str, int | None]:
    """Split ``"base::N"`` into ``("base", N)``; a plain id gives ``(id, None)``.

    Raises :class:`InvalidBatchId` for non-strings, empty ids, ids over 1 KiB (UTF-8) and ids
    containing control characters.
    """
    if not isinstance(batch_id, str):
        raise InvalidBatchId(f"batch id must be a str, got {type(batch_id).__name__}")
    # fast path for the common case (a short printable id without '::'): one call per add
    if 0 < len(batch_id) <= MAX_BATCH_ID_BYTES // 4 and batch_id.isprintable() and "::" not in batch_id:
        return batch_id, None
    if not batch_id:
        raise InvalidBatchId("batch id must not be empty")
    try:
        size = len(batch_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidBatchId(f"batch id is not valid unicode: {exc}") from None
    if size > MAX_BATCH_ID_BYTES:
        raise InvalidBatchId(f"batch id is {size} bytes, the limit is {MAX_BATCH_ID_BYTES}")
    if _has_control(batch_id):
        raise InvalidBatchId(f"batch id {batch_id!r} contains control characters")
    match = _SEQ_SUFFIX.match(batch_id)
    if match is None:
        return batch_id, None
    base = match.group(1)
    if not base:
        raise InvalidBatchId(f"batch id {batch_id!r} has an empty base before '::'")
    return base, int(match.group(2))


def partition_of(base: str, partitions: int) -> int:
    """Stable partition of a base id (CRC-32 of its UTF-8 bytes), the same in every process."""
    if partitions == 1:
        return 0
    return zlib.crc32(base.encode("utf-8")) % partitions


def key_slot(key: str) -> int:
    """Redis Cluster's slot of a key (CRC16 of its hash tag, or of the key without one)."""
    data = key.encode("utf-8")
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % CLUSTER_SLOTS


def slot_range(partition: int, partitions: int) -> tuple[int, int]:
    """The share of the slot space partition ``partition`` of ``partitions`` belongs to,
    ``[first, end)``: the slots cut into that many equal consecutive ranges."""
    return partition * CLUSTER_SLOTS // partitions, (partition + 1) * CLUSTER_SLOTS // partitions


@functools.lru_cache(maxsize=4096)
def partition_tag(processor: str, partition: int, partitions: int) -> str:
    """The hash tag (without braces) of a processor partition's keys.

    ``<processor>:<partition>`` when its slot lies in the middle half of the partition's
    :func:`slot_range`, else the first ``<processor>:<partition>~<n>`` (n = 1, 2, ...) whose
    slot does. A cluster whose slots are sliced evenly over its primaries, as
    ``redis-cli --cluster create`` and ``--cluster rebalance`` do, then holds the partitions
    evenly; the middle half leaves room for slices that are not exactly even. With a single
    partition the whole slot space is its range, so its tag is always ``<processor>:0``."""
    first, end = slot_range(partition, partitions)
    if partitions > 1:
        quarter = (end - first) // 4
        first, end = first + quarter, end - quarter
    tag, n = f"{processor}:{partition}", 0
    while not first <= binascii.crc_hqx(tag.encode("utf-8"), 0) % CLUSTER_SLOTS < end:
        n += 1
        tag = f"{processor}:{partition}~{n}"
    return tag


@dataclass(frozen=True)
class PartitionKeys:
    """Key names of one processor partition; ``pfx`` is what scripts prepend to derived keys."""

    pfx: str

    @functools.cached_property
    def guard(self) -> str:
        """The migration guard every script declares last (:data:`GUARD`)."""
        return self.pfx + GUARD

    @functools.cached_property
    def guard_frame(self) -> bytes:
        """:attr:`guard` as a RESP bulk string (the single add's frame, ``ops.add_frame``)."""
        raw = self.guard.encode()
        return b"$%d\r\n%b\r\n" % (len(raw), raw)

    @property
    def due(self) -> str:
        return self.pfx + "due"

    @property
    def ids(self) -> str:
        return self.pfx + "ids"

    @property
    def dead(self) -> str:
        return self.pfx + "dead"

    @property
    def woke(self) -> str:
        """The partition's wake-up token (see :meth:`WorkerCore.on_wake
        <redis_batcher.worker_core.WorkerCore.on_wake>`)."""
        return self.pfx + "woke"

    @property
    def paused(self) -> str:
        """Set while the partition is paused: claims take none of its flushes (``pause.lua``)."""
        return self.pfx + "paused"

    @property
    def pending(self) -> str:
        """The partition's count of sealed, undelivered items (``includes/pending_delta.lua``)."""
        return self.pfx + "pending"

    @property
    def wake(self) -> str:
        """The partition's wake-up channel (its hash tag: the partition's slot)."""
        return self.pfx + "wake"

    def dead_meta(self, dead_id: str) -> str:
        return f"{self.pfx}d:{dead_id}"

    def dead_items(self, dead_id: str) -> str:
        return f"{self.pfx}di:{dead_id}"

    def head(self, base: str) -> str:
        return f"{self.pfx}b:{base}"

    def history(self, base: str) -> str:
        return f"{self.pfx}h:{base}"

    def meta(self, base: str, seq: int) -> str:
        return f"{self.pfx}s:{base}::{seq}"

    def items(self, base: str, seq: int) -> str:
        """A sealed sequence's items (an accumulating one's are in :meth:`open_items`)."""
        return f"{self.pfx}i:{base}::{seq}"

    def open_items(self, base: str) -> str:
        """The accumulating sequence's list: a header entry ``"<N>:<last add ms>"``, then its items."""
        return f"{self.pfx}o:{base}"


class KeySpace:
    """Key names of one processor across its partitions."""

    def __init__(self, prefix: str, processor: str, partitions: int) -> None:
        self.prefix = prefix
        self.processor = processor
        self.partitions = partitions
        tags = [partition_tag(processor, k, partitions) for k in range(partitions)]
        self.parts = [PartitionKeys(f"{prefix}:{{{tag}}}:") for tag in tags]
        self.channels = [part.wake for part in self.parts]  # wake-up channels, by partition

    def for_base(self, base: str) -> PartitionKeys:
        return self.parts[partition_of(base, self.partitions)]


def registry_key(prefix: str) -> str:
    """The HASH where processors publish their configuration for the CLI and workers."""
    return f"{prefix}:processors"


def layout_key(prefix: str) -> str:
    """The STRING holding the version of the data layout of ``prefix`` (:data:`LAYOUT`)."""
    return f"{prefix}:layout"


def layout1_prefixes(prefix: str, processor: str, partitions: int) -> list[str]:
    """Key prefixes of the partitions whose keys layout 1 named differently: a processor of
    several partitions had the hash tag ``{<processor>:<partition>}`` for every partition."""
    if partitions == 1:
        return []
    return [
        f"{prefix}:{{{processor}:{k}}}:"
        for k in range(partitions)
        if partition_tag(processor, k, partitions) != f"{processor}:{k}"
    ]
