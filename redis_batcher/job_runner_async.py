"""The asyncio runner of iterator jobs inside an asyncio worker: performs the effects of
:class:`~redis_batcher.job_runner_core.JobRunnerCore` (which decides everything) on the asyncio
client, one task per running job. ``async def`` methods of an iterator class are awaited on the
event loop; plain ones run in a thread so they cannot block it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable
from typing import Any

from . import job_runner_core as core
from .job_model import JobStats
from .job_runner_core import JobRunnerCore, Session
from .jobs import JobIterator
from .jobs_async import AsyncJobsHost


async def _call_user(fn: Any, *args: Any) -> Any:
    """Await an ``async def`` method; run a plain one in a thread (it may block)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class AsyncJobRunner(JobRunnerCore):
    """The asyncio job runner (one task per running job); see
    :class:`redis_batcher.job_runner.JobRunner`."""

    def __init__(
        self,
        batcher: AsyncJobsHost,
        iterators: Iterable[JobIterator] | None = None,
        *,
        concurrency: int = 4,
        poll_interval: float = 1.0,
        grace_period: float = 30.0,
    ) -> None:
        chosen = iterators if iterators is not None else batcher.definitions.iterators.values()
        super().__init__(batcher.prefix, chosen, concurrency, poll_interval, grace_period)
        self.batcher = batcher
        # made by run(): an asyncio.Event belongs to the event loop it is first used in
        self._wake: asyncio.Event | None = None  # a session ended, or stop()
        self._stop: asyncio.Event | None = None

    def stop(self) -> None:
        """Stop claiming; running steps finish (up to ``grace_period``), leases are released."""
        super().stop()
        for event in (self._stop, self._wake):
            if event is not None:
                event.set()

    async def run(self, burst: bool = False) -> JobStats:
        """Serve until :meth:`stop`; ``burst=True``: return once nothing is running or runnable."""
        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        if self.stopping:
            self._stop.set()
        try:
            await self._run_steps(self.serve(burst))
        finally:
            await self._run_steps(self.shutdown())
        return self.stats

    # -- performing effects -----------------------------------------------------------------------

    async def _run_steps(self, steps: core.Steps[None]) -> None:
        with core.Driver(steps) as driver:
            for effect in driver:
                try:
                    driver.answer(await self._perform(effect))
                except asyncio.CancelledError:
                    raise  # the steps are closed: a cancelled session saves nothing more
                except BaseException as exc:  # the steps that asked decide what it means
                    driver.fail(exc)

    async def _session(self, s: Session) -> None:
        try:
            await self._run_steps(self.session(s))
        except asyncio.CancelledError:
            if not s.abandoned:  # cancelled from outside the runner (the loop closing): give it back
                await asyncio.shield(self._run_steps(self.release(s, "task cancelled")))
            raise
        finally:
            if self._wake is not None:
                self._wake.set()

    async def _perform(self, effect: core.Effect) -> Any:
        assert self._wake is not None and self._stop is not None
        match effect:
            case core.Send(call):
                return await call.script.call_async(self.batcher.client, call.keys, call.args)
            case core.Execute(call, wait):
                return await self.batcher.executor.execute(call, wait=wait)
            case core.Command(name, args, kwargs):
                return await getattr(self.batcher.client, name)(*args, **kwargs)
            case core.Invoke(fn, args):
                return await _call_user(fn, *args)
            case core.Sleep(seconds):
                await asyncio.sleep(seconds)
            case core.Pause(seconds):
                await _wait(self._stop, seconds)
            case core.Idle(seconds):
                await _wait(self._wake, seconds)
                self._wake.clear()
            case core.Spawn(s):
                s.task = asyncio.ensure_future(self._session(s))
            case core.Cancel(sessions):
                tasks = [s.task for s in sessions if s.task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return None
