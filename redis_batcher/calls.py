"""What the I/O-free layer asks an executor to run: one script invocation (:class:`Call`), one
plain read (:class:`Read`), and operations of several dependent round trips written as
generators of them (:data:`Steps`).

The executors answer a :data:`Steps` generator (``Executor.drive``, ``AsyncExecutor.drive``), so
the sync and asyncio APIs share each operation's logic and not just its parsing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from .connection import Arg
from .errors import CorruptData
from .models import as_text
from .scripts import Script

T = TypeVar("T")


@contextlib.contextmanager
def reading(key: str) -> Iterator[None]:
    """Around a plain read of one of the batcher's keys: a key holding another type raises
    :class:`CorruptData` naming it, not a bare WRONGTYPE error."""
    try:
        yield
    except ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            raise CorruptData(f"{key} holds a value of another type than this library writes there") from None
        raise


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A flat ``[field, value, ...]`` reply (HGETALL as a script returns it) as text pairs."""
    return {as_text(flat[i]): as_text(flat[i + 1]) for i in range(0, len(flat), 2)}


def corrupt(what: Any) -> CorruptData:
    """The error for a script reply naming a key that holds something else."""
    return CorruptData(f"{as_text(what)}; nothing was written (delete or rename that key)")


class Call:
    """One script invocation (a slotted class: built on every add, so kept cheap)."""

    __slots__ = ("args", "keys", "script")

    def __init__(self, script: Script, keys: tuple[str, ...], args: tuple[Arg, ...]) -> None:
        self.script = script
        self.keys = keys
        self.args = args

    def run(self, client: Any) -> Any:
        return self.script(client, self.keys, self.args)


@dataclass(frozen=True)
class Read:
    """A plain read of ``key``: its reply is ``send(client)`` (run as an idempotent command,
    inside :func:`reading`)."""

    key: str
    send: Callable[[Any], Any]


@dataclass(frozen=True)
class Run:
    """A script call; ``writes``: it may add data, so the memory policy is checked first."""

    call: Call
    writes: bool = False


Step = Read | Run
Steps = Generator[Step, Any, T]
