"""What every system of ``benchmarks.end_to_end`` shares: the items, the batch ids and the
handler's bookkeeping.

Each handler (redis-batcher's, the WATCH/MULTI consumer's, the celery-batches task's) calls
:func:`record` once per batch: it appends the batch's item ids (uint32, 4 bytes each) to
``<pid>.ids`` and the handling time (a float64) to ``<pid>.times`` in the directory named by
``E2E_STATS_DIR``, one ``O_APPEND`` write each. The benchmark reads them (:class:`Ledger`): items
handled = bytes / 4, batches = time records, the last handling time = their maximum, and the
ids themselves for exact counts (lost = ids that never came back, duplicates = ids handled
more than once). Earlier versions sent this to the Redis under test, first as a ``SADD`` per
id, then as a pipelined round trip per batch; both cost the handlers more CPU (~250-400 µs
per batch with redis-py, more under thread contention) than the systems spent on the batch,
and loaded the Redis being measured.
"""

from __future__ import annotations

import array
import collections
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

STATS_DIR_ENV = "E2E_STATS_DIR"

N_BATCH_IDS = 20
BATCH_IDS = [f"b{i:02d}" for i in range(N_BATCH_IDS)]

URL_ENV = "E2E_REDIS_URL"


def make_item(item_id: int) -> dict[str, Any]:
    """A small event (~100 bytes as msgpack, like benchmarks.add_path's) with a unique id."""
    return {
        "id": item_id,
        "user": "user:000042",
        "type": "click",
        "page": "/products/12345?ref=home",
        "ts": 1795876429.123,
        "session": "9f8e7d6c5b4a",
    }


def batch_id_for(call: int, producer: int) -> str:
    """Batch id of a producer's ``call``-th add: round robin, producers offset from each other."""
    return BATCH_IDS[(call + producer * (N_BATCH_IDS // 4)) % N_BATCH_IDS]


def pack_ids(ids: list[int]) -> bytes:
    packed = array.array("I", ids)
    if packed.itemsize != 4:  # pragma: no cover - every platform we run on has a 4-byte uint
        raise RuntimeError("array('I') is not 4 bytes here")
    return packed.tobytes()


_files: tuple[int, int] | None = None
_files_pid = 0
_files_lock = threading.Lock()


def _open_files() -> tuple[int, int]:
    global _files, _files_pid
    with _files_lock:
        if _files is None or _files_pid != os.getpid():
            base = os.path.join(os.environ[STATS_DIR_ENV], str(os.getpid()))
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            _files = (os.open(base + ".ids", flags, 0o644), os.open(base + ".times", flags, 0o644))
            _files_pid = os.getpid()
        return _files


def record(ids: list[int]) -> None:
    """A handler's whole bookkeeping for one batch: two appends to this process's files."""
    if not ids:
        return
    ids_fd, times_fd = _files if _files is not None and _files_pid == os.getpid() else _open_files()
    os.write(ids_fd, pack_ids(ids))
    os.write(times_fd, struct.pack("<d", time.time()))


class Ledger:
    """The benchmark's view of what every handler process recorded in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _paths(self, suffix: str) -> list[Path]:
        return sorted(self.directory.glob(f"*{suffix}"))

    def clear(self) -> None:
        """Empty every file (handler processes keep their descriptors: O_APPEND writes go on at
        the new end)."""
        for path in self._paths(".ids") + self._paths(".times"):
            os.truncate(path, 0)

    def handled(self) -> int:
        """Items handled so far, duplicates included."""
        return sum(p.stat().st_size for p in self._paths(".ids")) // 4

    def _read(self, suffix: str, typecode: str) -> array.array[Any]:
        out = array.array(typecode)
        for path in self._paths(suffix):
            data = path.read_bytes()
            out.frombytes(data[: len(data) - len(data) % out.itemsize])  # a write in progress
        return out

    def calls(self) -> int:
        """Handler calls (batches) so far."""
        return len(self._read(".times", "d"))

    def last(self) -> float | None:
        """The latest handling time (epoch seconds), None before any."""
        times = self._read(".times", "d")
        return max(times) if times else None

    def handled_ids(self, expected: int) -> tuple[int, int, int]:
        """(handled, unique, duplicates) among the ids 0..expected-1 handled so far."""
        ids = self._read(".ids", "I")
        counts = collections.Counter(ids)
        unique = sum(1 for i in counts if i < expected)
        return len(ids), unique, len(ids) - unique
