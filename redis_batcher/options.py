"""Checks of user-given options, shared by the batchers and the iterator jobs (no I/O), and
the keywords of ``Batcher.processor``: :class:`ProcessorOptions` gives each its type, default,
check and meaning, in one place."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, TypedDict, get_type_hints

from .codec import Codec, resolve_codec
from .errors import ConfigError
from .keys import MAX_PARTITIONS, validate_name


def seconds_option(
    name: str, value: float | timedelta | None, *, allow_none: bool, positive: bool = False
) -> float | None:
    """``value`` (a number of seconds or a timedelta) as float seconds; ``None`` only when
    ``allow_none``. Raises :class:`ConfigError` for anything else, a negative value, or zero
    when ``positive``."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} must not be None")
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def positive_int(name: str, value: object) -> int:
    """``value`` when it is an int >= 1 (not a bool); raises :class:`ConfigError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


def flag(name: str, value: object) -> bool:
    """``value`` when it is True or False; raises :class:`ConfigError` otherwise."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


# -- the keywords of Batcher.processor --------------------------------------------------------------

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Option:
    """A keyword's ``default`` and its ``check``: ``check(name, value)`` returns the value as
    the processor's config keeps it, or raises :class:`ConfigError`."""

    default: Any
    check: Check


def _seconds_check(*, allow_none: bool, positive: bool = False) -> Check:
    """The check of a duration option (see :func:`seconds_option`)."""
    return lambda name, value: seconds_option(name, value, allow_none=allow_none, positive=positive)


_seconds = _seconds_check(allow_none=False)
_positive_seconds = _seconds_check(allow_none=False, positive=True)
_positive_seconds_or_none = _seconds_check(allow_none=True, positive=True)


def optional(check: Check) -> Check:
    """``check``, with ``None`` accepted as it is."""
    return lambda name, value: None if value is None else check(name, value)


def _interval(name: str, value: float | timedelta | None) -> float | None:
    # the seed's flushIntervalMs 0 means "no timer"; 0 here would make every sequence due on
    # its first item, so a port that copies it is refused rather than silently unbatched
    seconds = seconds_option(name, value, allow_none=True)
    if seconds == 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}; use None for no interval timer")
    return seconds


def _partitions(name: str, value: object) -> int:
    count = positive_int(name, value)
    if count > MAX_PARTITIONS:
        raise ConfigError(f"{name} must be at most {MAX_PARTITIONS}, got {count}")
    return count


def _name(name: str, value: object) -> str:
    return validate_name("processor name", value)


def _codec(name: str, value: str | Codec) -> Codec:
    return resolve_codec(value)


class ProcessorOptions(TypedDict, total=False):
    """The keywords of :meth:`redis_batcher.Batcher.processor` and of the asyncio batcher's,
    all optional: each one's type, then its default and check, then what it means. Durations
    are seconds or a ``timedelta``."""

    name: Annotated[str | None, Option(None, optional(_name))]
    """Unique per batcher, without braces or whitespace; ``None``: the handler's
    ``module.qualname``."""
    max_batch_size: Annotated[int, Option(100, positive_int)]
    """A sequence is sealed and delivered when it holds this many items."""
    flush_interval: Annotated[float | timedelta | None, Option(30.0, _interval)]
    """Time after a sequence's first item at which it is delivered even if not full; ``None``:
    only size and manual flushes (``0`` is refused: it would deliver every item on its own)."""
    partitions: Annotated[int, Option(1, _partitions)]
    """Hash-tagged shards of the processor (spread one hot processor over a cluster)."""
    codec: Annotated[str | Codec, Option("msgpack", _codec)]
    """``"msgpack"``, ``"json"`` or a :class:`~redis_batcher.Codec`."""
    max_item_bytes: Annotated[int, Option(1 << 20, positive_int)]
    """The largest encoded item accepted."""
    history_limit: Annotated[int, Option(100, positive_int)]
    """Flush records kept per batch id."""
    retention: Annotated[float | timedelta, Option(timedelta(days=7), _positive_seconds)]
    """How long a finished batch id's head and history stay."""
    lease_timeout: Annotated[float | timedelta, Option(60.0, _positive_seconds)]
    """How long a claimed flush is owned by a worker without a heartbeat."""
    retry_backoff: Annotated[float, Option(1.0, _positive_seconds)]
    """A failed flush is retried after ``retry_backoff * 2**(attempt-1)`` seconds (with
    jitter), capped at ``retry_backoff_max``."""
    retry_backoff_max: Annotated[float, Option(300.0, _seconds)]
    """The longest pause before a retry (see ``retry_backoff``)."""
    max_attempts: Annotated[int, Option(10, positive_int)]
    """After this many failed deliveries the items go to the dead-letter store."""
    max_deaths: Annotated[int, Option(3, positive_int)]
    """The same, counting deliveries whose worker died (or lost its lease) in the handler, so
    a poison item that crashes the process cannot crash-loop the workers."""
    handler_timeout: Annotated[float | timedelta | None, Option(None, _positive_seconds_or_none)]
    """A handler running longer counts as failed (its late result is ignored); ``None``: no
    limit."""
    bisect_on_error: Annotated[bool, Option(False, flag)]
    """A failing delivery of several items is split in halves (retried at once, without
    spending attempts) to isolate poison items."""
    ordered: Annotated[bool, Option(False, flag)]
    """Deliver the sequences of one batch id one at a time, in order; a retrying sequence
    holds back the later ones."""
    max_pending: Annotated[int | None, Option(None, optional(positive_int))]
    """``add`` raises :class:`~redis_batcher.BatchFull` instead of letting one batch id hold
    more undelivered items than this; ``None``: no limit."""
    dead_letter_ttl: Annotated[
        float | timedelta | None, Option(timedelta(days=180), _positive_seconds_or_none)
    ]
    """How long a dead letter is kept; ``None``: until purged or replayed."""
    max_dead_letters: Annotated[int | None, Option(10_000, optional(positive_int))]
    """At most this many dead letters per partition, the oldest dropped first; ``None``: no
    limit. With ``dead_letter_ttl``, this keeps a failing processor from filling Redis."""
    flush_idle: Annotated[float | timedelta | None, Option(None, _positive_seconds_or_none)]
    """Debounce: a sequence is delivered once this long passed without an add to it, never
    later than ``flush_interval`` after its first item nor past ``max_batch_size``; less than
    ``flush_interval``. ``None``: off."""


PROCESSOR_OPTIONS: dict[str, Option] = {
    name: hint.__metadata__[0] for name, hint in get_type_hints(ProcessorOptions, include_extras=True).items()
}


def processor_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every processor option, checked in turn: the value in ``options`` (the keywords of a
    call, where an unknown one is a ``TypeError`` as for any function), else the default.
    ``codec`` comes out as a :class:`~redis_batcher.Codec`, durations as float seconds."""
    for key in options:
        if key not in PROCESSOR_OPTIONS:
            raise TypeError(f"Batcher.processor() got an unexpected keyword argument {key!r}")
    settings = {
        name: option.check(name, options.get(name, option.default))
        for name, option in PROCESSOR_OPTIONS.items()
    }
    check_flush_idle(settings["flush_idle"], settings["flush_interval"])
    return settings


def check_flush_idle(idle: float | None, interval: float | None) -> None:
    """``flush_idle`` below ``flush_interval``: at or above it, the interval always comes first
    and the option would do nothing. Raises :class:`ConfigError`."""
    if idle is not None and interval is not None and idle >= interval:
        raise ConfigError(
            f"flush_idle ({idle:g} s) must be less than flush_interval ({interval:g} s), "
            "which caps it; flush_idle=None turns it off"
        )
