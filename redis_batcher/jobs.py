"""Iterator jobs, sync handles: start, pause, resume, cancel, delete and list jobs of an
iterator defined on a :class:`~redis_batcher.Batcher` (see :mod:`redis_batcher.job_model` for
the concepts and key layout; :mod:`redis_batcher.job_runner` runs the jobs in a worker)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .errors import (
    ConfigError,
    DuplicateProcessor,
    JobNotFound,
    UnknownIterator,
)
from .executor import Executor
from .job_model import (
    STATUSES,
    IteratorConfig,
    JobKeys,
    JobOptions,
    JobStatus,
    check_iterator_class,
    encode_params,
    iterator_registry_key,
    job_overrides,
    validate_job_id,
    validate_status,
)
from .job_ops import control_call, parse_control, parse_start, parse_status, start_call
from .keys import validate_name
from .models import as_text

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no runtime dependency: annotations are not evaluated
    from typing_extensions import Unpack


class JobsHost(Protocol):
    """What the iterator jobs need of a sync :class:`~redis_batcher.Batcher`: its key prefix,
    client and executor, and the iterators defined on it (added under ``definitions_lock``)."""

    prefix: str
    executor: Executor
    iterators: dict[str, JobIterator]
    definitions_lock: threading.Lock

    @property
    def client(self) -> Any: ...


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

    def start(self, job_id: str, params: Any = None, **overrides: Unpack[JobOptions]) -> JobStatus:
        """Create job ``job_id`` (status ``pending``; a worker picks it up). ``params`` must be
        JSON-serialisable; steps see them as ``job.params``. The keywords (``batch_size``,
        ``delay_between_batches``, ``max_attempts`` or ``max_retries``, ``retry_backoff``,
        ``retry_backoff_max``: :class:`~redis_batcher.job_model.JobOptions`) override the
        iterator's settings for this job; they are stored with it, so every worker uses them.
        :class:`JobExists` when the id is taken, :class:`InvalidJob` for a bad id or params,
        :class:`ConfigError` for a bad setting (nothing is written then)."""
        validate_job_id(job_id)
        params_json = encode_params(params)
        config, overrides_json = job_overrides(self.config, overrides)
        self.batcher.client.hset(iterator_registry_key(self.batcher.prefix), self.name, self.config.to_json())
        call = start_call(self.keys, config, job_id, params_json, overrides_json)
        reply = self.batcher.executor.execute(call)
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
