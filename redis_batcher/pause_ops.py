"""Pausing a processor as data: the script call that pauses or resumes one partition, and the
multi-step operations (:data:`~.calls.Steps`) over every partition, without I/O. The sync
``Processor`` and the ``AsyncProcessor`` drive the same steps on their executors.

A paused partition keeps taking adds (sequences accumulate and seal as usual) while no claim
takes its flushes: claim.lua and the claim inside ack.lua check the partition's own flag
(``<pfx>paused``, :attr:`PartitionKeys.paused <redis_batcher.keys.PartitionKeys.paused>`), so
each claim stays within one slot on Redis Cluster. Pausing sets the flag of every partition,
one call each; resuming deletes them and wakes the workers of each partition that holds due
entries.
"""

from __future__ import annotations

from operator import methodcaller

from .calls import Call, Read, Run, Steps
from .definition import ProcessorDef
from .keys import PartitionKeys
from .scripts import scripts


def pause_call(part: PartitionKeys, pause: bool) -> Call:
    """pause.lua on one partition: replies 1 when its state changed."""
    return Call(scripts().pause, (part.paused, part.due, part.guard), (part.pfx, "1" if pause else "0"))


def pause_steps(proc: ProcessorDef, pause: bool) -> Steps[bool]:
    """Pause (``pause=True``) or resume every partition of ``proc``; True when any of them
    changed state."""
    changed = False
    for part in proc.keys.parts:
        reply = yield Run(pause_call(part, pause), writes=True)
        changed = changed or int(reply) == 1
    return changed


def paused_steps(proc: ProcessorDef) -> Steps[bool]:
    """Whether any partition of ``proc`` is paused (one ``EXISTS`` per partition)."""
    for part in proc.keys.parts:
        if (yield Read(part.paused, methodcaller("exists", part.paused))):
            return True
    return False
