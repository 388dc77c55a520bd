"""How the threaded worker (:mod:`redis_batcher.worker`) paces its handler threads: the hold
and the spread limit (docs/how-it-works.md). Decisions only, from what the worker measures: how
much of their time recent handlers computed, and whether its threads wait for a CPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from . import ops
from .batcher import Batcher
from .worker_core import WorkerCore

# The hold (docs/how-it-works.md): while handlers compute and no backlog is due (ops.BACKLOG_DUE),
# a flush due within HOLD s of a handler's start is left for its ack, sparing a thread wake-up.
HOLD = 0.002
# Handlers count as computing when busy on the CPU for this share of their time (GIL-bound).
COMPUTING = 0.25
# The spread limit: on a saturated machine a backlog of computing handlers runs on at most this
# many threads; two keep the GIL busy, a third only waits for it and for a CPU.
COMPUTING_THREADS = 2


@dataclass
class Running:
    """A claimed flush the threaded worker is working on."""

    claimed: ops.Claimed
    started: float | None = None  # time.monotonic() when the handler started; None: queued
    chained: bool = False  # claimed by the ack of the flush its thread ran before
    abandoned: bool = False  # timed out or released: whatever the thread does next is ignored
    settling: bool = False  # the thread is recording its result; the watchdog leaves it alone


class Pacing(WorkerCore[Batcher]):
    """The pacing decisions of the threaded worker, on its state (set up by the worker)."""

    _lock: threading.Lock  # guards _inflight
    _inflight: dict[str, Running]
    _cpu_share: float  # of the recent handlers' time, how much they computed (see HOLD)
    _crowded: bool  # handler threads wait for a CPU (see COMPUTING_THREADS)

    def _hold_until(self, now: float) -> float:
        """Until when to leave what is due to the handlers running now (see HOLD); 0: no hold
        (nothing due, not _computing, or a partition with something due has no young handler
        whose ack would claim it: an ack claims from its own partition only)."""
        due = {idx for idx, at in enumerate(self.due_at) if at <= now}
        if not due or not self._computing():
            return 0.0
        young: dict[int, float] = {}
        with self._lock:
            for r in self._inflight.values():
                start = now if r.started is None else r.started
                if not r.abandoned and (r.chained if r.started is None else now - start < HOLD):
                    idx = self.part_index[r.claimed.part.pfx]
                    young[idx] = min(young.get(idx, start), start)
        if not due <= young.keys():
            return 0.0
        return min(young[idx] for idx in due) + HOLD

    def _computing(self) -> bool:
        """Hold (see HOLD): recent handlers computed rather than waited, so more threads would
        not run them faster (the GIL), only wake one another; and no claim found a backlog due
        (ops.BACKLOG_DUE: then every thread is worth it)."""
        return self._handlers_compute() and not any(self.backlog)

    def _handlers_compute(self) -> bool:
        """Recent handlers computed (busy on the CPU for at least COMPUTING of their time) and
        no prefetch was asked for: the condition shared by the hold and the spread limit."""
        return self.prefetch_multiplier == 1 and self._cpu_share >= COMPUTING

    def _slots(self) -> int:
        """How many flushes may be in flight at once: ``capacity``, or COMPUTING_THREADS while
        computing handlers work through a backlog on a saturated machine."""
        if self._handlers_compute() and self._crowded and any(self.backlog):
            return min(self.capacity, COMPUTING_THREADS)
        return self.capacity

    def _spread(self, task: tuple[str, Running] | None) -> bool:
        """More is due than this thread took: should another thread take some? Not when this
        thread goes on with the next one and we hold (_computing)."""
        return task is None or not self._computing()
