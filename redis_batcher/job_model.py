"""Iterator jobs, the pieces without I/O: models, key names, validation and configuration.

An *iterator* is a class with ``next_batch`` / ``process`` (and optionally ``on_complete``)
registered with :meth:`redis_batcher.Batcher.iterator`; a *job* is one walk of it, started with
``MyIterator.start(job_id, params=...)``. Workers (``redis-batcher worker``) run runnable jobs
next to their processors. Every step is ``next_batch`` -> ``process`` -> one Lua script that
saves the cursor and counts, but only while the worker still holds the job's lease.

Key layout (prefix ``rb``, iterator ``backfill``; one hash tag per iterator)::

    rb:iterators                        HASH  iterator name -> JSON config (registry for the CLI)
    rb:{jobs:backfill}:due              ZSET  runnable job ids -> runnable-at / lease expiry (ms)
    rb:{jobs:backfill}:j:<job id>       HASH  job state (status, cursor, processed, retries, ...)
    rb:{jobs:backfill}:r:<job id>       LIST  progress samples "<ms>:<processed>", newest first
    rb:{jobs:backfill}:status:<status>  ZSET  job ids in that status -> created_at (ms)
    rb:{jobs:backfill}:guard            never written: declared last by every job script

:mod:`redis_batcher.job_ops` builds the script calls and reads their replies;
:mod:`redis_batcher.jobs` has the sync handles and :mod:`redis_batcher.jobs_async` the asyncio
ones; :mod:`redis_batcher.job_runner_core` decides how jobs run, and
:mod:`redis_batcher.job_runner` (threads) and :mod:`redis_batcher.job_runner_async` (asyncio)
carry that out.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, TypedDict

from .errors import (
    ConfigError,
    InvalidJob,
    error_text,
)
from .keys import GUARD, validate_name
from .options import positive_int, seconds_option

log = logging.getLogger("redis_batcher.jobs")


STATUSES = ("pending", "running", "paused", "completed", "failed", "cancelled")
MAX_JOB_ID_BYTES = 512
RATE_WINDOW_MS = 60_000
# the seed's schedule: 5 attempts of a step, retry n after 2 s * 2**(n-1), at most 30 s
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_BACKOFF = 2.0
DEFAULT_RETRY_BACKOFF_MAX = 30.0


# -- models ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """What ``next_batch`` returns: the items of one step, the cursor to resume after them
    (``None``: no cursor) and ``done=True`` when the data source has nothing after this page."""

    items: Sequence[Any]
    cursor: str | None = None
    done: bool = False


@dataclass
class JobContext:
    """What every step of a job receives: its id, iterator name and params, and its progress
    *before* the current step (``cursor``, ``processed``; ``retry_count`` failures in a row)."""

    job_id: str
    iterator: str
    params: Any
    cursor: str | None
    processed: int
    retry_count: int
    batch_size: int


@dataclass(frozen=True)
class IteratorConfig:
    """An iterator's settings, as stored in the ``<prefix>:iterators`` registry and, as a
    snapshot taken at ``start``, with each job."""

    name: str
    batch_size: int
    delay_between_batches: float
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float
    lease_timeout: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> IteratorConfig:
        data = json.loads(raw)
        if "max_attempts" not in data and isinstance(data.get("max_retries"), int):
            # written by a version whose max_retries=N allowed N + 1 attempts
            data["max_attempts"] = data["max_retries"] + 1
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class JobStatus:
    """A job as stored in Redis. Times are aware UTC datetimes. ``items_per_second`` is the
    processing rate over the last minute (0.0 when nothing was processed in it). ``error`` is
    the last step error (kept after a successful retry; the reason when ``failed``). ``worker``
    is the host:pid that claimed the job last; ``exhausted`` is true once the data source said
    done (``on_complete`` still to run while the job is running)."""

    job_id: str
    iterator: str
    status: str
    processed: int
    cursor: str | None
    retry_count: int
    error: str | None
    params: Any
    config: IteratorConfig | None
    created_at: datetime | None
    started_at: datetime | None
    updated_at: datetime | None
    last_run_at: datetime | None
    finished_at: datetime | None
    next_run_at: datetime | None
    worker: str | None
    items_per_second: float
    exhausted: bool = False


@dataclass
class JobStats:
    """Counters of one job runner."""

    steps: int = 0
    items: int = 0
    failures: int = 0
    completed: int = 0
    failed: int = 0
    released: int = 0
    lease_lost: int = 0


# -- names, validation -----------------------------------------------------------------------------


class JobKeys:
    """Key names of one iterator's jobs; ``pfx`` is what the scripts prepend to derived keys."""

    def __init__(self, prefix: str, iterator: str) -> None:
        self.pfx = f"{prefix}:{{jobs:{iterator}}}:"
        self.due = self.pfx + "due"
        self.guard = self.pfx + GUARD  # declared last by every script (keys.GUARD)

    def job(self, job_id: str) -> str:
        return f"{self.pfx}j:{job_id}"

    def samples(self, job_id: str) -> str:
        return f"{self.pfx}r:{job_id}"

    def by_status(self, status: str) -> str:
        return f"{self.pfx}status:{status}"


def iterator_registry_key(prefix: str) -> str:
    """The HASH where iterators publish their configuration for the CLI."""
    return f"{prefix}:iterators"


def validate_job_id(job_id: object) -> str:
    """A job id: a non-empty str of at most 512 UTF-8 bytes without control characters."""
    if not isinstance(job_id, str) or not job_id:
        raise InvalidJob(f"job id must be a non-empty str, got {job_id!r}")
    try:
        size = len(job_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidJob(f"job id is not valid unicode: {exc}") from None
    if size > MAX_JOB_ID_BYTES:
        raise InvalidJob(f"job id is {size} bytes, the limit is {MAX_JOB_ID_BYTES}")
    if any(unicodedata.category(ch) == "Cc" for ch in job_id):
        raise InvalidJob(f"job id {job_id!r} contains control characters")
    return job_id


def encode_params(params: Any) -> str:
    """params as strict JSON (no NaN/Infinity), or :class:`InvalidJob`."""
    try:
        return json.dumps(params, allow_nan=False, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"job params must be JSON-serialisable: {exc}") from None


def validate_status(status: str | None) -> str | None:
    if status is not None and status not in STATUSES:
        raise ConfigError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    return status


def _seconds(name: str, value: float | timedelta, *, positive: bool) -> float:
    """The processors' check of a duration option (seconds or a timedelta), never None here."""
    return float(seconds_option(name, value, allow_none=False, positive=positive) or 0.0)


def attempts_of(max_attempts: int | None, max_retries: int | None) -> int:
    """The attempts a step gets: ``max_attempts`` (an int >= 1), or ``max_retries`` with the
    seed's meaning (``max_retries=N``: N attempts, 0 like 1), or 5 when neither is given.
    :class:`ConfigError` for both, or a bad value."""
    if max_attempts is not None and max_retries is not None:
        raise ConfigError("give max_attempts or max_retries, not both (max_retries=N means N attempts)")
    if max_retries is not None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be an int >= 0, got {max_retries!r}")
        return max(max_retries, 1)
    if max_attempts is None:
        return DEFAULT_MAX_ATTEMPTS
    return positive_int("max_attempts", max_attempts)


def make_config(
    name: str,
    *,
    batch_size: int,
    delay_between_batches: float | timedelta,
    max_attempts: int | None = None,
    max_retries: int | None = None,
    retry_backoff: float | timedelta,
    retry_backoff_max: float | timedelta,
    lease_timeout: float | timedelta,
) -> IteratorConfig:
    """Validated iterator settings (:class:`ConfigError` on bad values); see
    :func:`attempts_of` for ``max_attempts`` and ``max_retries``."""
    validate_name("iterator name", name)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    attempts = attempts_of(max_attempts, max_retries)
    backoff = _seconds("retry_backoff", retry_backoff, positive=True)
    backoff_max = _seconds("retry_backoff_max", retry_backoff_max, positive=True)
    if backoff_max < backoff:
        raise ConfigError(f"retry_backoff_max ({backoff_max}) must be >= retry_backoff ({backoff})")
    return IteratorConfig(
        name=name,
        batch_size=batch_size,
        delay_between_batches=_seconds("delay_between_batches", delay_between_batches, positive=False),
        max_attempts=attempts,
        retry_backoff=backoff,
        retry_backoff_max=backoff_max,
        lease_timeout=_seconds("lease_timeout", lease_timeout, positive=True),
    )


class JobOptions(TypedDict, total=False):
    """The settings one job may override at ``start``, each checked as the iterator's own
    (see :meth:`redis_batcher.Batcher.iterator`); the job keeps them, so whichever worker
    claims it uses them. ``lease_timeout`` is the iterator's for all its jobs."""

    batch_size: int
    delay_between_batches: float | timedelta
    max_attempts: int
    max_retries: int
    """The seed's spelling of ``max_attempts`` (N attempts), stored as ``max_attempts``."""
    retry_backoff: float | timedelta
    retry_backoff_max: float | timedelta


JOB_OPTIONS = tuple(JobOptions.__annotations__)


def job_config(base: IteratorConfig, overrides: Mapping[str, Any]) -> IteratorConfig:
    """``base`` with a job's ``overrides`` (:class:`JobOptions`), checked as the iterator's own
    settings are: :class:`ConfigError` for a bad value, ``TypeError`` for an unknown name."""
    for key in overrides:
        if key not in JOB_OPTIONS:
            raise TypeError(f"start() got an unexpected keyword argument {key!r}")
    settings: dict[str, Any] = {
        "batch_size": base.batch_size,
        "delay_between_batches": base.delay_between_batches,
        "retry_backoff": base.retry_backoff,
        "retry_backoff_max": base.retry_backoff_max,
    }
    if "max_attempts" not in overrides and "max_retries" not in overrides:
        settings["max_attempts"] = base.max_attempts
    settings.update(overrides)
    return make_config(base.name, lease_timeout=base.lease_timeout, **settings)


def job_overrides(base: IteratorConfig, overrides: Mapping[str, Any]) -> tuple[IteratorConfig, str]:
    """The config a job started with ``overrides`` runs with, and the overrides as stored with
    it (JSON of the checked values, ``max_retries`` as ``max_attempts``; ``""`` for none)."""
    config = job_config(base, overrides)
    if not overrides:
        return config, ""
    names = {"max_attempts" if key == "max_retries" else key for key in overrides}
    return config, json.dumps({key: getattr(config, key) for key in sorted(names)})


def check_iterator_class(cls: Any) -> None:
    if not isinstance(cls, type):
        raise ConfigError(f"@iterator decorates a class, got {cls!r}")
    for method in ("next_batch", "process"):
        if not callable(getattr(cls, method, None)):
            raise ConfigError(f"iterator class {cls.__qualname__} has no {method}() method")


def takes_job(method: Any) -> bool:
    """Whether a bound ``next_batch`` accepts the job as a third argument. The issue's (and the
    seed's) ``next_batch(cursor, batch_size)`` is called without it; ``next_batch(cursor,
    batch_size, job)`` gets the :class:`JobContext` (for ``job.params``)."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): pass the job
        return True
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional for p in params) >= 3


def log_step_exit(iterator: str, job_id: str, exc: BaseException) -> None:
    """Log a step that raised another BaseException than an Exception (``sys.exit()`` in a
    step: a failed step like any other, but likely a bug), with its traceback. An Exception's
    traceback is logged with the failure once it is recorded."""
    if not isinstance(exc, Exception):
        log.error(
            "%s %s: step raised %s; counted as a failed step", iterator, job_id, error_text(exc), exc_info=exc
        )


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
