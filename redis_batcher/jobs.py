"""Iterator jobs: durable, pausable walks over a data source in batches.

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

This module holds the shared pieces (models, key names, script calls, reply parsing), the sync
handles and the threaded :class:`JobRunner`; :mod:`redis_batcher.jobs_async` has the asyncio twins.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import threading
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import ops
from .errors import (
    ConfigError,
    CorruptData,
    DuplicateProcessor,
    InvalidJob,
    JobExists,
    JobNotFound,
    JobStateError,
    UnknownIterator,
)
from .executor import Executor
from .keys import GUARD, validate_name
from .models import ms_to_dt
from .options import seconds_option
from .scripts import scripts

log = logging.getLogger("redis_batcher.jobs")


class JobsHost(Protocol):
    """What the iterator jobs need of a sync :class:`~redis_batcher.Batcher`: its key prefix,
    client and executor, and the iterators defined on it (added under ``definitions_lock``)."""

    prefix: str
    executor: Executor
    iterators: dict[str, JobIterator]
    definitions_lock: threading.Lock

    @property
    def client(self) -> Any: ...


STATUSES = ("pending", "running", "paused", "completed", "failed", "cancelled")
MAX_JOB_ID_BYTES = 512
MAX_ERROR_CHARS = 2000
RATE_WINDOW_MS = 60_000


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
    max_retries: int
    retry_backoff: float
    retry_backoff_max: float
    lease_timeout: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> IteratorConfig:
        data = json.loads(raw)
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


def make_config(
    name: str,
    *,
    batch_size: int,
    delay_between_batches: float | timedelta,
    max_retries: int,
    retry_backoff: float | timedelta,
    retry_backoff_max: float | timedelta,
    lease_timeout: float | timedelta,
) -> IteratorConfig:
    """Validated iterator settings (:class:`ConfigError` on bad values)."""
    validate_name("iterator name", name)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries must be an int >= 0, got {max_retries!r}")
    backoff = _seconds("retry_backoff", retry_backoff, positive=True)
    backoff_max = _seconds("retry_backoff_max", retry_backoff_max, positive=True)
    if backoff_max < backoff:
        raise ConfigError(f"retry_backoff_max ({backoff_max}) must be >= retry_backoff ({backoff})")
    return IteratorConfig(
        name=name,
        batch_size=batch_size,
        delay_between_batches=_seconds("delay_between_batches", delay_between_batches, positive=False),
        max_retries=max_retries,
        retry_backoff=backoff,
        retry_backoff_max=backoff_max,
        lease_timeout=_seconds("lease_timeout", lease_timeout, positive=True),
    )


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


def as_text(value: Any) -> str:
    """``value`` as str (bytes decoded as UTF-8)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


def log_step_exit(iterator: str, job_id: str, exc: BaseException) -> None:
    """A step's traceback: at debug level for an Exception (the failure is logged once
    recorded), at error level for another BaseException (``sys.exit()`` in a step: a failed
    step like any other, but likely a bug)."""
    if isinstance(exc, Exception):
        log.debug("job step traceback", exc_info=exc)
    else:
        log.error(
            "%s %s: step raised %s; counted as a failed step", iterator, job_id, error_text(exc), exc_info=exc
        )


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- script calls ----------------------------------------------------------------------------------


def _call(name: str, keys: JobKeys, key: str, *args: str | int) -> ops.Call:
    return ops.Call(scripts().scripts[name], (key, keys.guard), tuple(args))


def start_call(keys: JobKeys, config: IteratorConfig, job_id: str, params_json: str) -> ops.Call:
    return _call(
        "job_start", keys, keys.job(job_id), keys.pfx, job_id, config.name, params_json, config.to_json()
    )


def claim_call(keys: JobKeys, config: IteratorConfig, limit: int, owner: str, label: str) -> ops.Call:
    return ops.Call(
        scripts().scripts["job_claim"],
        (keys.due, keys.guard),
        (keys.pfx, limit, _ms(config.lease_timeout), owner, label),
    )


def commit_call(
    keys: JobKeys,
    config: IteratorConfig,
    job_id: str,
    owner: str,
    cursor: str | None,
    count: int,
    exhausted: bool,
    step: int,
) -> ops.Call:
    """``step``: the step's number within this claim (1, 2, ...), so that a commit re-sent after
    a connection error that may have run is not counted twice."""
    return _call(
        "job_commit",
        keys,
        keys.job(job_id),
        keys.pfx,
        job_id,
        owner,
        "0" if cursor is None else "1",
        cursor or "",
        count,
        "1" if exhausted else "0",
        _ms(config.lease_timeout),
        step,
    )


def fail_call(keys: JobKeys, config: IteratorConfig, job_id: str, owner: str, error: str) -> ops.Call:
    return _call(
        "job_fail",
        keys,
        keys.job(job_id),
        keys.pfx,
        job_id,
        owner,
        error,
        config.max_retries,
        _ms(config.retry_backoff),
        _ms(config.retry_backoff_max),
    )


def owner_call(name: str, keys: JobKeys, job_id: str, owner: str) -> ops.Call:
    """job_finish / job_release: the lease holder's token is the only argument."""
    return _call(name, keys, keys.job(job_id), keys.pfx, job_id, owner)


def extend_call(keys: JobKeys, config: IteratorConfig, job_id: str, owner: str) -> ops.Call:
    return _call("job_extend", keys, keys.job(job_id), keys.pfx, job_id, owner, _ms(config.lease_timeout))


def control_call(action: str, keys: JobKeys, job_id: str) -> ops.Call:
    """job_pause / job_resume / job_cancel / job_delete."""
    return _call(f"job_{action}", keys, keys.job(validate_job_id(job_id)), keys.pfx, job_id)


# -- replies -------------------------------------------------------------------------------------


@dataclass
class Claimed:
    """A job leased to this worker by job_claim.lua."""

    job_id: str
    owner: str
    cursor: str | None
    processed: int
    retries: int
    params: Any
    exhausted: bool


def parse_claim(owner: str, reply: Sequence[Any]) -> tuple[int, list[Claimed]]:
    """(ms until the earliest remaining entry is runnable, -1 for none; the claimed jobs)."""
    out: list[Claimed] = []
    for i in range(1, len(reply), 6):
        job_id, cursor, processed, retries, params, exhausted = reply[i : i + 6]
        out.append(
            Claimed(
                job_id=as_text(job_id),
                owner=owner,
                cursor=None if cursor is None else as_text(cursor),
                processed=int(processed),
                retries=int(retries),
                params=json.loads(params),
                exhausted=as_text(exhausted) == "1",
            )
        )
    return int(reply[0]), out


def parse_start(iterator: str, job_id: str, reply: Sequence[Any]) -> None:
    if as_text(reply[0]) == "exists":
        raise JobExists(iterator, job_id, as_text(reply[1]))
    if as_text(reply[0]) == "corrupt":
        raise CorruptData(f"job {job_id!r} of {iterator!r}: {as_text(reply[1])}; nothing was written")


def parse_control(action: str, iterator: str, job_id: str, reply: Sequence[Any]) -> str:
    """The status the control script reports, or the exception its refusal means."""
    code, status = as_text(reply[0]), as_text(reply[1])
    if code == "corrupt":
        raise CorruptData(f"cannot {action} job {job_id!r} of {iterator!r}: {status}; nothing was written")
    if code == "missing":
        raise JobNotFound(f"no job {job_id!r} for iterator {iterator!r}")
    if code in ("invalid", "refused"):
        raise JobStateError(f"cannot {action} job {job_id!r} of {iterator!r}: it is {status}", status)
    return status


def rate(samples: Sequence[Any], processed: int, end_ms: float) -> float:
    """Items/s over the minute before ``end_ms`` from "<ms>:<processed>" samples and the current
    count: the growth since the oldest sample inside the window, over the time since it."""
    start = end_ms - RATE_WINDOW_MS
    oldest: tuple[int, int] | None = None
    for raw in samples:
        t_text, _, p_text = as_text(raw).partition(":")
        t, p = int(t_text), int(p_text)
        if t >= start and (oldest is None or t < oldest[0]):
            oldest = (t, p)
    if oldest is None or end_ms <= oldest[0]:
        return 0.0
    return max(processed - oldest[1], 0) * 1000.0 / (end_ms - oldest[0])


def parse_status(raw: dict[Any, Any], samples: Sequence[Any], now_ms: float) -> JobStatus:
    """A job hash (HGETALL) and its samples as a :class:`JobStatus`."""
    f = {as_text(k): as_text(v) for k, v in raw.items()}
    status = f["status"]
    processed = int(f.get("processed", "0"))
    last_run = int(f["last_run_at"]) if f.get("last_run_at") else None
    if status == "running":
        end = now_ms
    else:
        end = float(last_run) if last_run is not None else 0.0
    try:
        config: IteratorConfig | None = IteratorConfig.from_json(f["config"]) if "config" in f else None
    except (ValueError, TypeError):
        config = None
    return JobStatus(
        job_id=f.get("job_id", ""),
        iterator=f.get("iterator", ""),
        status=status,
        processed=processed,
        cursor=f.get("cursor"),
        retry_count=int(f.get("retries", "0")),
        error=f.get("error") or None,
        params=json.loads(f.get("params", "null")),
        config=config,
        created_at=ms_to_dt(f.get("created_at")),
        started_at=ms_to_dt(f.get("started_at")),
        updated_at=ms_to_dt(f.get("updated_at")),
        last_run_at=ms_to_dt(f.get("last_run_at")),
        finished_at=ms_to_dt(f.get("finished_at")),
        next_run_at=ms_to_dt(f.get("next_run_at")),
        worker=f.get("worker") or None,
        items_per_second=round(rate(samples, processed, end), 3) if end else 0.0,
        exhausted=f.get("exhausted") == "1",
    )


def step_saved(stats: JobStats, iterator: str, job_id: str, reply: Any, items: int) -> bool:
    """Count and log a job_commit.lua reply (None: it could not be written). True when the
    step was saved and the job goes on; False stops this runner's work on the job (its lease
    was lost, or the job was paused, cancelled, ... meanwhile)."""
    code = None if reply is None else as_text(reply)
    if code == "ok":
        stats.steps += 1
        stats.items += items
        return True
    if code == "lease_lost":
        stats.lease_lost += 1
        log.warning("%s %s: lease lost; another worker runs the job now", iterator, job_id)
    elif code == "corrupt":
        log.error("%s %s: its keys hold data this library did not write; step not saved", iterator, job_id)
    elif code is not None:
        log.info("%s %s: %s; stopping after the saved step", iterator, job_id, code)
    return False


def check_page(page: Any) -> Page:
    if not isinstance(page, Page):
        raise TypeError(f"next_batch must return a redis_batcher.Page, got {type(page).__name__}")
    if page.cursor is not None and not isinstance(page.cursor, str):
        raise TypeError(f"Page.cursor must be a str or None, got {type(page.cursor).__name__}")
    if isinstance(page.items, (str, bytes)) or not isinstance(page.items, Sequence):
        raise TypeError(f"Page.items must be a list, got {type(page.items).__name__}")
    return page


# -- sync handles ---------------------------------------------------------------------------------


class JobControlBase:
    """What the sync and asyncio job controls share: the iterator's name and keys, and the
    reads behind ``status`` and ``job_ids`` (queued on a pipeline, parsed here); each twin
    only runs the pipeline on its own client."""

    def __init__(self, batcher: Any, name: str) -> None:
        self.batcher = batcher
        self.name = validate_name("iterator name", name)
        self.keys = JobKeys(batcher.prefix, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def _queue_status(self, pipe: Any, job_id: str) -> Any:
        validate_job_id(job_id)
        pipe.hgetall(self.keys.job(job_id))
        pipe.lrange(self.keys.samples(job_id), 0, -1)
        return pipe

    @staticmethod
    def _read_status(replies: Sequence[Any]) -> JobStatus | None:
        raw, samples = replies
        return parse_status(raw, samples, time.time() * 1000.0) if raw else None

    def _missing(self, job_id: str) -> JobNotFound:  # deleted between a control script and a read
        return JobNotFound(f"no job {job_id!r} for iterator {self.name!r}")

    def _queue_ids(self, pipe: Any, status: str | None, limit: int) -> Any:
        check_limit(limit)
        chosen = validate_status(status)
        for s in STATUSES if chosen is None else (chosen,):
            pipe.zrevrange(self.keys.by_status(s), 0, limit - 1, withscores=True)
        return pipe

    @staticmethod
    def _read_ids(replies: Sequence[Any], limit: int) -> list[tuple[float, str]]:
        return sorted(((score, as_text(m)) for rows in replies for m, score in rows), reverse=True)[:limit]


class JobControl(JobControlBase):
    """Control of one iterator's jobs by name; needs no code of the iterator (the CLI uses it)."""

    batcher: JobsHost

    def _control(self, action: str, job_id: str) -> str:
        reply = self.batcher.executor.execute(control_call(action, self.keys, job_id))
        return parse_control(action, self.name, job_id, reply)

    def pause(self, job_id: str) -> JobStatus:
        """Pause a pending or running job (a step in progress is saved, then the worker stops).
        Pausing a paused job does nothing. :class:`JobStateError` for a finished job."""
        self._control("pause", job_id)
        return self._must_status(job_id)

    def resume(self, job_id: str) -> JobStatus:
        """Make a paused or failed job runnable again, its retry count reset."""
        self._control("resume", job_id)
        return self._must_status(job_id)

    def cancel(self, job_id: str) -> JobStatus:
        """Stop a job for good: status ``cancelled`` (final; it cannot be resumed)."""
        self._control("cancel", job_id)
        return self._must_status(job_id)

    def delete(self, job_id: str) -> bool:
        """Remove a job that is not running or paused (:class:`JobStateError` otherwise).
        False when there was no such job."""
        try:
            self._control("delete", job_id)
        except JobNotFound:
            return False
        return True

    def status(self, job_id: str) -> JobStatus | None:
        """The job, or None when there is no such job."""
        pipe = self._queue_status(self.batcher.client.pipeline(transaction=False), job_id)
        return self._read_status(pipe.execute())

    def _must_status(self, job_id: str) -> JobStatus:
        st = self.status(job_id)
        if st is None:
            raise self._missing(job_id)
        return st

    def job_ids(self, status: str | None = None, limit: int = 50) -> list[tuple[float, str]]:
        """(created_at ms, job id) of the newest ``limit`` jobs, in one status or all."""
        pipe = self._queue_ids(self.batcher.client.pipeline(transaction=False), status, limit)
        return self._read_ids(pipe.execute(), limit)

    def jobs(self, status: str | None = None, limit: int = 50) -> list[JobStatus]:
        """This iterator's jobs, newest first, optionally only those in ``status``."""
        out = []
        for _, job_id in self.job_ids(status, check_limit(limit)):
            st = self.status(job_id)
            if st is not None:
                out.append(st)
        return out


class JobIterator(JobControl):
    """What ``@batcher.iterator(...)`` returns: the iterator class with its settings, and the
    control methods of its jobs. ``JobIterator.cls`` is the decorated class."""

    def __init__(self, batcher: JobsHost, cls: type, config: IteratorConfig) -> None:
        super().__init__(batcher, config.name)
        self.cls = cls
        self.config = config

    def __call__(self) -> Any:
        """A new instance of the iterator class (the runner makes one per claim of a job)."""
        return self.cls()

    def start(self, job_id: str, params: Any = None) -> JobStatus:
        """Create job ``job_id`` (status ``pending``; a worker picks it up). ``params`` must be
        JSON-serialisable; steps see them as ``job.params``. :class:`JobExists` when the id is
        taken, :class:`InvalidJob` for a bad id or params (nothing is written then)."""
        validate_job_id(job_id)
        params_json = encode_params(params)
        self.batcher.client.hset(iterator_registry_key(self.batcher.prefix), self.name, self.config.to_json())
        reply = self.batcher.executor.execute(start_call(self.keys, self.config, job_id, params_json))
        parse_start(self.name, job_id, reply)
        return self._must_status(job_id)


def check_limit(limit: int) -> int:
    """``limit`` when it is an int >= 1; raises :class:`ConfigError` otherwise."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be an int >= 1, got {limit!r}")
    return limit


def define_iterator(batcher: JobsHost, cls: type, config: IteratorConfig) -> JobIterator:
    check_iterator_class(cls)
    with batcher.definitions_lock:
        if config.name in batcher.iterators:
            raise DuplicateProcessor(f"an iterator named {config.name!r} is already defined on this batcher")
        handle = JobIterator(batcher, cls, config)
        batcher.iterators[config.name] = handle
    return handle


def select_iterators(defined: dict[str, JobIterator], names: Iterable[str] | None) -> list[JobIterator]:
    """The iterators a worker runs: those called ``names`` (``[]``: none), or all defined.
    :class:`UnknownIterator` for a name that is not defined."""
    if names is None:
        return list(defined.values())
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in defined]
    if unknown:
        raise UnknownIterator(f"unknown iterator(s) {unknown}; defined: {sorted(defined)}")
    return [defined[n] for n in wanted]


def iterator_names(local: Iterable[str], registered: Iterable[Any]) -> list[str]:
    return sorted(set(local) | {as_text(n) for n in registered})


def list_jobs(batcher: JobsHost, status: str | None = None, limit: int = 50) -> list[JobStatus]:
    """Jobs of every iterator this batcher defines or the registry knows, newest first."""
    validate_status(status)
    check_limit(limit)
    names = iterator_names(batcher.iterators, batcher.client.hkeys(iterator_registry_key(batcher.prefix)))
    found: list[tuple[float, str, JobControl]] = []
    for name in names:
        control = JobControl(batcher, name)
        found.extend((score, job_id, control) for score, job_id in control.job_ids(status, limit))
    found.sort(key=lambda row: (row[0], row[1]), reverse=True)
    out = []
    for _, job_id, control in found[:limit]:
        st = control.status(job_id)
        if st is not None:
            out.append(st)
    return out


def control_for(batcher: JobsHost, iterator: str) -> JobControl:
    """The handle of a local iterator, else a :class:`JobControl` for a registered one."""
    if iterator in batcher.iterators:
        return batcher.iterators[iterator]
    if not batcher.client.hexists(iterator_registry_key(batcher.prefix), iterator):
        raise UnknownIterator(f"iterator {iterator!r} is not registered under prefix {batcher.prefix!r}")
    return JobControl(batcher, iterator)


def find_job(batcher: JobsHost, job_id: str, iterator: str | None = None) -> JobControl:
    """The control handle of the iterator owning ``job_id`` (searched when not named)."""
    validate_job_id(job_id)
    if iterator is not None:
        return control_for(batcher, iterator)
    names = iterator_names(batcher.iterators, batcher.client.hkeys(iterator_registry_key(batcher.prefix)))
    owners = [n for n in names if batcher.client.exists(JobKeys(batcher.prefix, n).job(job_id))]
    if not owners:
        raise JobNotFound(f"no job {job_id!r} under prefix {batcher.prefix!r}")
    if len(owners) > 1:
        raise JobNotFound(f"job id {job_id!r} exists for several iterators {owners}: name one")
    return control_for(batcher, owners[0])


# -- the threaded runner ---------------------------------------------------------------------------


@dataclass
class _Session:
    """A job this runner holds the lease of."""

    iterator: JobIterator
    claimed: Claimed
    thread: threading.Thread | None = None
    abandoned: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class JobRunnerBase:
    """Settings and bookkeeping the sync and asyncio job runners share."""

    def __init__(
        self,
        batcher: Any,
        iterators: Iterable[JobIterator],
        concurrency: int,
        poll_interval: float,
        grace_period: float,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not poll_interval > 0:
            raise ConfigError(f"poll_interval must be > 0, got {poll_interval!r}")
        self.batcher = batcher
        self.iterators = list(iterators)
        self.concurrency = concurrency
        self.poll_interval = float(poll_interval)
        self.grace_period = float(grace_period)
        self.label = worker_label()
        self.stats = JobStats()
        self._ended: set[str] = set()  # iterators whose job just ended: a retry may be due soon
        self._sessions: dict[tuple[str, str], Any] = {}  # (iterator, job id) -> its session
        # the iterator configs could not be written at start: retried with the lease renewals
        self.unregistered = False

    def _registry_fields(self) -> dict[str, str]:
        """The iterator registry's fields (name -> config JSON) this runner writes."""
        return {it.name: it.config.to_json() for it in self.iterators}

    def _registration_refused(self, exc: RedisError) -> None:
        """Redis refused the registry write (not a connection failure): the runner serves
        anyway and retries the write with its lease renewals."""
        self.unregistered = True
        if isinstance(exc, OutOfMemoryError):
            log.warning(
                "Redis is out of memory (%s); running jobs anyway, the iterator configs are "
                "registered once Redis accepts writes again",
                exc,
            )
        else:
            log.warning("cannot register the iterator configs (%s); running jobs anyway, retrying later", exc)

    @property
    def running(self) -> int:
        """Jobs this runner is running now."""
        return len(self._sessions)

    def _claimed(
        self, it: JobIterator, owner: str, reply: Any, now: float, due_at: dict[str, float]
    ) -> tuple[list[Claimed], bool]:
        """Record a claim reply: (jobs to run, more runnable now); schedules the next look at
        the iterator (at the next runnable job, at most poll_interval away)."""
        next_ms, claimed = parse_claim(owner, reply)
        wait = next_ms / 1000.0 if next_ms >= 0 else self.poll_interval
        due_at[it.name] = now + min(wait, self.poll_interval)
        return claimed, next_ms == 0

    @staticmethod
    def _claim_failed(it: JobIterator, exc: BaseException, now: float, due_at: dict[str, float]) -> None:
        log.warning("claiming jobs of %s failed: %s", it.name, exc)
        due_at[it.name] = now + 1.0


class JobRunner(JobRunnerBase):
    """Runs the jobs of a batcher's iterators: claims runnable jobs (``concurrency`` at a time,
    one thread each), renews their leases, and on :meth:`stop` lets each finish its step, then
    releases its lease so another worker resumes it at once. The :class:`~redis_batcher.Worker`
    starts one when its batcher has iterators."""

    def __init__(
        self,
        batcher: JobsHost,
        iterators: Iterable[JobIterator] | None = None,
        *,
        concurrency: int = 4,
        poll_interval: float = 1.0,
        grace_period: float = 30.0,
    ) -> None:
        chosen = iterators if iterators is not None else batcher.iterators.values()
        super().__init__(batcher, chosen, concurrency, poll_interval, grace_period)
        self.batcher: JobsHost = batcher
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control ----------------------------------------------------------------------------------

    def start(self, burst: bool = False) -> threading.Thread:
        """Run in a thread of its own (:meth:`wait` joins it)."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self.run, args=(burst,), name="rb-jobs", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop claiming; running steps finish (up to ``grace_period``), leases are released."""
        self._stopping.set()
        self._wake.set()

    def wait(self) -> None:
        """Block until the runner thread has ended (signals are still handled meanwhile)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.2)

    # -- main loop --------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> JobStats:
        """Serve until :meth:`stop`; ``burst=True``: return once no job is running and none is
        runnable now."""
        self.stats = JobStats()
        renew_every = min(it.config.lease_timeout for it in self.iterators) / 3.0
        next_renew = time.monotonic() + renew_every
        due_at = {it.name: 0.0 for it in self.iterators}
        try:
            self._register()
            while not self._stopping.is_set():
                self._wake.clear()
                now = time.monotonic()
                with self._lock:
                    ended, self._ended = self._ended, set()
                for name in ended:
                    due_at[name] = 0.0
                more = self._claim_round(now, due_at)
                if burst and not more and not self._sessions:
                    return self.stats
                if now >= next_renew:
                    self._renew()
                    if self.unregistered:
                        self._register_again()
                    next_renew = now + renew_every
                wait = min([*due_at.values(), next_renew, now + self.poll_interval]) - now
                if more and self.running < self.concurrency:
                    continue
                self._wake.wait(max(wait, 0.001))
        finally:
            self._shutdown(renew_every)
        return self.stats

    def _register(self) -> None:
        """Publish the iterator configs: waits while Redis cannot be reached; a refusal (a
        full Redis) is retried later."""
        self.unregistered = False
        delay = 0.1
        while not self._stopping.is_set():
            try:
                self._write_registry()
                return
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("cannot reach Redis (%s); retrying in %.1fs", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            except RedisError as exc:
                self._registration_refused(exc)
                return

    def _write_registry(self) -> None:
        self.batcher.client.hset(iterator_registry_key(self.batcher.prefix), mapping=self._registry_fields())

    def _register_again(self) -> None:
        try:
            self._write_registry()
        except RedisError as exc:
            log.debug("iterator configs still not registered: %s", exc)
            return
        self.unregistered = False
        log.info("iterator configs registered")

    def _claim_round(self, now: float, due_at: dict[str, float]) -> bool:
        """Claim from iterators that may have runnable jobs; True when more is runnable now."""
        more = False
        for it in self.iterators:
            free = self.concurrency - self.running
            if free <= 0:
                return True
            if due_at[it.name] > now or self._stopping.is_set():
                continue
            owner = ops.new_token()
            try:
                reply = claim_call(it.keys, it.config, free, owner, self.label).run(self.batcher.client)
            except RedisError as exc:
                self._claim_failed(it, exc, now, due_at)
                continue
            claimed, due_now = self._claimed(it, owner, reply, now, due_at)
            more = more or due_now
            for c in claimed:
                self._begin(it, c)
        return more

    def _begin(self, it: JobIterator, c: Claimed) -> None:
        session = _Session(it, c)
        with self._lock:
            self._sessions[(it.name, c.job_id)] = session
        session.thread = threading.Thread(target=self._session, args=(session,), name="rb-job", daemon=True)
        session.thread.start()

    def _renew(self) -> None:
        with self._lock:
            sessions = [s for s in self._sessions.values() if not s.abandoned]
        for s in sessions:
            it, c = s.iterator, s.claimed
            try:
                if not extend_call(it.keys, it.config, c.job_id, c.owner).run(self.batcher.client):
                    log.debug("%s %s: lease no longer ours", it.name, c.job_id)
            except RedisError as exc:
                log.warning("%s %s: heartbeat failed: %s", it.name, c.job_id, exc)

    def _shutdown(self, renew_every: float) -> None:
        deadline = time.monotonic() + self.grace_period
        next_renew = time.monotonic() + renew_every
        while self._sessions and time.monotonic() < deadline:
            self._wake.wait(0.05)
            self._wake.clear()
            if time.monotonic() >= next_renew:
                self._renew()
                next_renew = time.monotonic() + renew_every
        with self._lock:
            leftovers = list(self._sessions.values())
            for s in leftovers:
                s.abandoned = True
            self._sessions.clear()
        for s in leftovers:
            self._release(s, "step still running at shutdown")

    # -- one job ----------------------------------------------------------------------------------

    def _write(self, session: _Session, call: ops.Call) -> Any:
        """Run a step's script, retrying through Redis errors while the lease lasts; None when it
        could not be recorded (the lease will expire and the step will run again)."""
        delay = 0.05
        deadline = time.monotonic() + session.iterator.config.lease_timeout
        while True:
            try:
                return self.batcher.executor.execute(call)
            except RedisError as exc:
                if time.monotonic() > deadline:
                    log.error(
                        "%s %s: cannot record progress (%s)", call.script.name, session.claimed.job_id, exc
                    )
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _release(self, s: _Session, why: str) -> None:
        it, c = s.iterator, s.claimed
        try:
            release = owner_call("job_release", it.keys, c.job_id, c.owner)
            if self.batcher.executor.execute(release, wait=False):
                self.stats.released += 1
                log.info("%s %s: lease released (%s)", it.name, c.job_id, why)
        except RedisError as exc:
            log.warning("%s %s: could not release (%s); its lease will expire", it.name, c.job_id, exc)

    def _session(self, s: _Session) -> None:
        try:
            self._drive(s)
        except BaseException:  # a bug here must not kill the runner: the lease expires, another retries
            log.exception("%s %s: job runner error", s.iterator.name, s.claimed.job_id)
        finally:
            with self._lock:
                if self._sessions.get((s.iterator.name, s.claimed.job_id)) is s:
                    del self._sessions[(s.iterator.name, s.claimed.job_id)]
                self._ended.add(s.iterator.name)
            s.done.set()
            self._wake.set()

    def _drive(self, s: _Session) -> None:
        it, c = s.iterator, s.claimed
        cfg = it.config
        ctx = JobContext(c.job_id, it.name, c.params, c.cursor, c.processed, c.retries, cfg.batch_size)
        exhausted = c.exhausted
        step = 0
        try:
            instance = it()
            with_job = takes_job(instance.next_batch)
        except BaseException as exc:
            self._failed(s, exc)
            return
        while True:
            if s.abandoned:
                return
            if self._stopping.is_set():
                self._release(s, "worker stopping")
                return
            if exhausted:
                self._complete(s, instance, ctx)
                return
            try:
                args = (ctx.cursor, cfg.batch_size, ctx) if with_job else (ctx.cursor, cfg.batch_size)
                page = check_page(instance.next_batch(*args))
                items = list(page.items)
                if items:
                    instance.process(items, ctx)
            except BaseException as exc:  # a step may raise anything, sys.exit() too: retried
                self._failed(s, exc)
                return
            if s.abandoned:
                return
            step += 1
            reply = self._write(
                s, commit_call(it.keys, cfg, c.job_id, c.owner, page.cursor, len(items), page.done, step)
            )
            if not step_saved(self.stats, it.name, c.job_id, reply, len(items)):
                return
            ctx.cursor, ctx.processed, ctx.retry_count = page.cursor, ctx.processed + len(items), 0
            if page.done:
                exhausted = True
                continue
            if cfg.delay_between_batches > 0:
                if self._stopping.wait(cfg.delay_between_batches):
                    continue  # stopping: the loop head releases the lease
                if not self._still_ours(s):
                    return

    def _still_ours(self, s: _Session) -> bool:
        """After delay_between_batches: False (the lease given back) when the job was paused or
        cancelled during the wait, so no further step runs; False when the lease is gone."""
        it, c = s.iterator, s.claimed
        try:
            status, owner = self.batcher.client.hmget(it.keys.job(c.job_id), ["status", "owner"])
        except RedisError:
            return True  # the step's commit will find out
        if owner is None or as_text(owner) != c.owner:
            log.warning("%s %s: lease lost; another worker runs the job now", it.name, c.job_id)
            self.stats.lease_lost += 1
            return False
        if status is not None and as_text(status) != "running":
            self._release(s, f"job {as_text(status)}")
            return False
        return True

    def _complete(self, s: _Session, instance: Any, ctx: JobContext) -> None:
        it, c = s.iterator, s.claimed
        on_complete = getattr(instance, "on_complete", None)
        if on_complete is not None:
            try:
                on_complete(ctx)
            except BaseException as exc:
                self._failed(s, exc)
                return
        reply = self._write(s, owner_call("job_finish", it.keys, c.job_id, c.owner))
        if reply is not None and as_text(reply) == "completed":
            self.stats.completed += 1
            log.info("%s %s: completed, %d items", it.name, c.job_id, ctx.processed)

    def _failed(self, s: _Session, exc: BaseException) -> None:
        it, c = s.iterator, s.claimed
        self.stats.failures += 1
        log_step_exit(it.name, c.job_id, exc)
        reply = self._write(s, fail_call(it.keys, it.config, c.job_id, c.owner, error_text(exc)))
        if reply is None:
            return
        outcome, retries, delay_ms = as_text(reply[0]), int(reply[1]), int(reply[2])
        if outcome == "corrupt":
            log.error("%s %s: its keys hold data this library did not write; failure not recorded",
                      it.name, c.job_id)
        elif outcome == "failed":
            self.stats.failed += 1
            log.error("%s %s: failed after %d tries: %s", it.name, c.job_id, retries, error_text(exc))
        elif outcome == "retry":
            log.warning(
                "%s %s: step failed (%s); retry %d in %.1fs",
                it.name,
                c.job_id,
                error_text(exc),
                retries,
                delay_ms / 1000.0,
            )
