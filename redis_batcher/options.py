"""Checks of user-given options, shared by the batchers and the iterator jobs (no I/O)."""

from __future__ import annotations

import math
from datetime import timedelta

from .errors import ConfigError


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
