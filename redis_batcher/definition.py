"""A processor's definition: its name, handler, config, codec and key space, with the script
arguments derived from them. It holds no Redis client: :mod:`redis_batcher.ops` builds its
script calls from it, and the sync and asyncio processors add the I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .codec import Codec
from .connection import frames
from .keys import KeySpace
from .models import Flush, ProcessorConfig

Handler = Callable[[Flush], Any]

# the most items one add script call carries (a larger add_many is split in chunks this size)
ADD_CHUNK = 10_000


class ProcessorDef:
    """A processor as the scripts see it: ``name``, ``handler``, ``config``, ``codec`` and
    ``keys`` (its :class:`~redis_batcher.keys.KeySpace` under ``prefix``), plus the script
    arguments computed once from the config. Calling it calls the handler."""

    def __init__(self, prefix: str, handler: Handler, config: ProcessorConfig, codec: Codec) -> None:
        self.handler = handler
        self.config = config
        self.codec = codec
        self.name = config.name
        self.keys = KeySpace(prefix, config.name, config.partitions)
        self.interval_ms = -1 if config.flush_interval is None else round(config.flush_interval * 1000)
        self.lease_ms = round(config.lease_timeout * 1000)
        self.retention_s = max(1, round(config.retention))
        # dead-letter limits as the scripts take them (0: none)
        ttl = config.dead_letter_ttl
        self.dead_ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        self.dead_max = 0 if config.max_dead_letters is None else config.max_dead_letters
        pending_cap = -1 if config.max_pending is None else config.max_pending
        # add.lua's packed config argument (one argument instead of three on the hot path);
        # flush_idle adds a field only for the processors that set it
        self.add_config = f"{config.max_batch_size} {self.interval_ms} {pending_cap} "
        if config.flush_idle is not None:
            self.add_config += f"{max(1, round(config.flush_idle * 1000))} "
        self.add_config_one = self.add_config + "-"  # one add (no coalesced segments)
        self.add_config_frame = frames((self.add_config_one,))  # the same, RESP-encoded (ops.add_frame)
        self.__doc__ = getattr(handler, "__doc__", None)
        self.__wrapped__ = handler

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} max_batch_size={self.config.max_batch_size}>"

    def __call__(self, flush: Flush) -> Any:
        return self.handler(flush)
