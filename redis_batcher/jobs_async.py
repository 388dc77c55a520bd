"""The asyncio twins of :mod:`redis_batcher.jobs`: awaited job control and listing (the runner
is :mod:`redis_batcher.job_runner_async`).

The same scripts, key layout and reply parsing as the sync side. Iterator *definitions* live on
the sync definitions batcher (like processors), so one class serves both clients.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol

from .errors import JobNotFound
from .executor_async import AsyncExecutor
from .job_model import (
    IteratorConfig,
    JobOptions,
    JobStatus,
    encode_params,
    iterator_registry_key,
    job_overrides,
    validate_job_id,
    validate_status,
)
from .job_ops import control_call, parse_control, parse_start, start_call
from .jobs import JobControlBase, JobIterator, JobsHost, check_limit, iterator_names

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no runtime dependency: annotations are not evaluated
    from typing_extensions import Unpack


class AsyncJobsHost(Protocol):
    """What the asyncio iterator jobs need of an asyncio :class:`~redis_batcher.asyncio.Batcher`:
    its key ``prefix``, ``client`` and :class:`~redis_batcher.executor_async.AsyncExecutor`, and
    the sync batcher holding the iterator ``definitions``."""

    @property
    def prefix(self) -> str: ...

    @property
    def client(self) -> Any: ...

    @property
    def executor(self) -> AsyncExecutor: ...

    @property
    def definitions(self) -> JobsHost: ...


class AsyncJobControl(JobControlBase):
    """Awaited control of one iterator's jobs by name."""

    batcher: AsyncJobsHost

    async def _control(self, action: str, job_id: str) -> str:
        reply = await self.batcher.executor.execute(control_call(action, self.keys, job_id))
        return parse_control(action, self.name, job_id, reply)

    async def pause(self, job_id: str) -> JobStatus:
        await self._control("pause", job_id)
        return await self._must_status(job_id)

    async def resume(self, job_id: str) -> JobStatus:
        await self._control("resume", job_id)
        return await self._must_status(job_id)

    async def cancel(self, job_id: str) -> JobStatus:
        await self._control("cancel", job_id)
        return await self._must_status(job_id)

    async def delete(self, job_id: str) -> bool:
        try:
            await self._control("delete", job_id)
        except JobNotFound:
            return False
        return True

    async def status(self, job_id: str) -> JobStatus | None:
        pipe = self._queue_status(self.batcher.client.pipeline(transaction=False), job_id)
        return self._read_status(await pipe.execute())

    async def _must_status(self, job_id: str) -> JobStatus:
        st = await self.status(job_id)
        if st is None:
            raise self._missing(job_id)
        return st

    async def job_ids(self, status: str | None = None, limit: int = 50) -> list[tuple[float, str]]:
        pipe = self._queue_ids(self.batcher.client.pipeline(transaction=False), status, limit)
        return self._read_ids(await pipe.execute(), limit)

    async def jobs(self, status: str | None = None, limit: int = 50) -> list[JobStatus]:
        out = []
        for _, job_id in await self.job_ids(status, check_limit(limit)):
            st = await self.status(job_id)
            if st is not None:
                out.append(st)
        return out


class AsyncJobIterator(AsyncJobControl):
    """What the async ``@batcher.iterator(...)`` returns: ``definition`` is the sync
    :class:`~redis_batcher.jobs.JobIterator` (same class, same settings)."""

    def __init__(self, batcher: AsyncJobsHost, definition: JobIterator) -> None:
        super().__init__(batcher, definition.name)
        self.definition = definition
        self.config: IteratorConfig = definition.config
        self.cls = definition.cls

    async def start(self, job_id: str, params: Any = None, **overrides: Unpack[JobOptions]) -> JobStatus:
        """As :meth:`redis_batcher.jobs.JobIterator.start` (the same per-job settings), awaited."""
        validate_job_id(job_id)
        params_json = encode_params(params)
        config, overrides_json = job_overrides(self.config, overrides)
        await self.batcher.client.hset(
            iterator_registry_key(self.batcher.prefix), self.name, self.config.to_json()
        )
        reply = await self.batcher.executor.execute(
            start_call(self.keys, config, job_id, params_json, overrides_json)
        )
        parse_start(self.name, job_id, reply)
        return await self._must_status(job_id)


async def list_jobs(batcher: AsyncJobsHost, status: str | None = None, limit: int = 50) -> list[JobStatus]:
    """Jobs of every iterator defined on the batcher or registered in Redis, newest first."""
    validate_status(status)
    check_limit(limit)
    registered = await batcher.client.hkeys(iterator_registry_key(batcher.prefix))
    found: list[tuple[float, str, AsyncJobControl]] = []
    for name in iterator_names(batcher.definitions.iterators, registered):
        control = AsyncJobControl(batcher, name)
        found.extend((score, job_id, control) for score, job_id in await control.job_ids(status, limit))
    found.sort(key=lambda row: (row[0], row[1]), reverse=True)
    out = []
    for _, job_id, control in found[:limit]:
        st = await control.status(job_id)
        if st is not None:
            out.append(st)
    return out
