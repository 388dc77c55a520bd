"""The data layout's version stamp as data: the multi-step operations (:data:`~.calls.Steps`)
that check it, stamp it and upgrade data of layout 1, without I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .calls import Read, Steps
from .errors import LayoutMismatch, LayoutUpgradeRefused
from .keys import LAYOUT, layout1_prefixes, layout_key, registry_key
from .models import as_text


def layout_steps(prefix: str, evicting: bool = False) -> Steps[int]:
    """Check that Redis holds :data:`~redis_batcher.keys.LAYOUT` under ``prefix``, stamping it
    when Redis holds no data of the prefix yet; raise :class:`LayoutMismatch` otherwise. A
    registry without a stamp is data of layout 1, written before layouts were stamped."""
    key = layout_key(prefix)
    registry = registry_key(prefix)
    # the registry is read before the stamp: a process stamps before it registers, so a
    # registry seen without a stamp read after it is layout 1's, never a process starting now
    registered = yield Read(registry, lambda c: c.exists(registry))
    found = yield Read(key, lambda c: c.get(key))
    if found is None:
        # under an evicting policy (allow_eviction) the stamp may have been evicted: a registry
        # without it cannot be told from layout 1's, so it is stamped again
        if registered and not evicting:
            raise LayoutMismatch(prefix, 1, LAYOUT)
        # SET NX: of two processes stamping a new prefix at once, both see the same version
        if (yield Read(key, lambda c: c.set(key, LAYOUT, nx=True))):
            return LAYOUT
        found = yield Read(key, lambda c: c.get(key))
    version = parse_layout(found)
    if version != LAYOUT:
        raise LayoutMismatch(prefix, version, LAYOUT)
    return version


def upgrade_layout_steps(prefix: str, partitions: dict[str, int]) -> Steps[int | None]:
    """Stamp :data:`~redis_batcher.keys.LAYOUT` on data of layout 1 (``partitions``: each
    registered processor's partition count), once nothing is left under layout 1's key names
    (queued sequences, active ids, dead letters of processors with several partitions).
    Returns the version found before (None: layout 1, unstamped); raises
    :class:`LayoutUpgradeRefused` naming what is left, or :class:`LayoutMismatch` for a
    layout this version cannot upgrade from."""
    key = layout_key(prefix)
    found = yield Read(key, lambda c: c.get(key))
    if found is not None:
        version = parse_layout(found)
        if version != LAYOUT:
            raise LayoutMismatch(prefix, version, LAYOUT)
        return LAYOUT
    left: list[str] = []
    for name, count in sorted(partitions.items()):
        for pfx in layout1_prefixes(prefix, name, count):
            for key_name in (pfx + "due", pfx + "ids", pfx + "dead"):
                if (yield Read(key_name, _exists(key_name))):
                    left.append(key_name)
    if left:
        raise LayoutUpgradeRefused(prefix, left)
    yield Read(key, lambda c: c.set(key, LAYOUT))
    return None


def _exists(key: str) -> Callable[[Any], Any]:
    return lambda c: c.exists(key)


def parse_layout(value: Any) -> int | str:
    """A layout stamp's version, or its text when it is not a version."""
    text = as_text(value) if value is not None else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 6 else text
