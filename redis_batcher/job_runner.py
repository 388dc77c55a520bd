"""The threaded runner of iterator jobs inside a sync worker: performs the effects of
:class:`~redis_batcher.job_runner_core.JobRunnerCore` (which decides everything) on the batcher's
client, one thread for its main loop and one per running job."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from . import job_runner_core as core
from .job_model import JobStats
from .job_runner_core import JobRunnerCore, Session
from .jobs import JobIterator, JobsHost


class JobRunner(JobRunnerCore):
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
        super().__init__(batcher.prefix, chosen, concurrency, poll_interval, grace_period)
        self.batcher = batcher
        self._wake = threading.Event()  # a session ended, or stop()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control ----------------------------------------------------------------------------------

    def start(self, burst: bool = False) -> threading.Thread:
        """Run in a thread of its own (:meth:`wait` joins it)."""
        self.stopping = False
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(burst,), name="rb-jobs", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop claiming; running steps finish (up to ``grace_period``), leases are released."""
        super().stop()
        self._stop.set()
        self._wake.set()

    def wait(self) -> None:
        """Block until the runner thread has ended (signals are still handled meanwhile)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.2)

    def run(self, burst: bool = False) -> JobStats:
        """Serve until :meth:`stop`; ``burst=True``: return once no job is running and none is
        runnable now."""
        try:
            self._run_steps(self.serve(burst))
        finally:
            self._run_steps(self.shutdown())
        return self.stats

    # -- performing effects -----------------------------------------------------------------------

    def _run_steps(self, steps: core.Steps[None]) -> None:
        with core.Driver(steps) as driver:
            for effect in driver:
                try:
                    driver.answer(self._perform(effect))
                except BaseException as exc:  # the steps that asked decide what it means
                    driver.fail(exc)

    def _session(self, s: Session) -> None:
        try:
            self._run_steps(self.session(s))
        finally:
            self._wake.set()

    def _perform(self, effect: core.Effect) -> Any:
        match effect:
            case core.Send(call):
                return call.run(self.batcher.client)
            case core.Execute(call, wait):
                return self.batcher.executor.execute(call, wait=wait)
            case core.Command(name, args, kwargs):
                return getattr(self.batcher.client, name)(*args, **kwargs)
            case core.Invoke(fn, args):
                return fn(*args)
            case core.Sleep(seconds):
                time.sleep(seconds)
            case core.Pause(seconds):
                self._stop.wait(seconds)
            case core.Idle(seconds):
                self._wake.wait(seconds)
                self._wake.clear()
            case core.Spawn(s):
                s.task = threading.Thread(target=self._session, args=(s,), name="rb-job", daemon=True)
                s.task.start()
            case core.Cancel():
                pass  # a thread cannot be stopped: an abandoned session saves nothing after its step
        return None
