"""Flushes and failures per second over the last minutes, for the web dashboard: a ring buffer
of samples of the worker registry taken by the dashboard process (the rates between the
workers' heartbeats, as ``redis-batcher top`` computes them: :func:`redis_batcher.top.worker_rates`),
and the small SVG chart drawn from it. Nothing here talks to Redis: the caller passes the
workers it read."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .top import WorkerRates, worker_rates
from .worker_registry import WorkerInfo

# 72 samples 5 s apart: the last six minutes
SAMPLES = 72


@dataclass(frozen=True)
class Sample:
    """The live workers at ``at`` (epoch s) with their rates."""

    at: float
    workers: tuple[WorkerRates, ...]


@dataclass(frozen=True)
class Point:
    """Flushes and failures per second at ``at`` (None: no rate known then)."""

    at: float
    flushes: float | None
    failures: float | None


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


class RateHistory:
    """The last ``size`` samples; :meth:`record` is called by one sampler, the readers may run
    in other threads."""

    def __init__(self, size: int = SAMPLES) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)
        self.lock = threading.Lock()

    def record(self, workers: Sequence[WorkerInfo], at: float) -> Sample:
        """Add a sample of ``workers`` (their rates since the previous sample's beats)."""
        with self.lock:
            before = {w.info.id: w for w in self.samples[-1].workers} if self.samples else {}
            sample = Sample(at, tuple(worker_rates(info, before.get(info.id)) for info in workers))
            self.samples.append(sample)
        return sample

    def latest(self) -> dict[str, WorkerRates]:
        """The rates of the workers of the newest sample, by worker id."""
        with self.lock:
            return {w.info.id: w for w in self.samples[-1].workers} if self.samples else {}

    def series(self, processor: str | None = None) -> list[Point]:
        """The rates of the workers serving ``processor`` (None: all workers), oldest first.
        A worker serving several processors counts its flushes for each."""
        with self.lock:
            samples = list(self.samples)
        out = []
        for s in samples:
            chosen = [w for w in s.workers if processor is None or processor in w.info.processors]
            out.append(
                Point(s.at, _sum([w.flushes_per_s for w in chosen]), _sum([w.failures_per_s for w in chosen]))
            )
        return out


def _polyline(values: list[float | None], width: int, height: int, top: float, css: str) -> str:
    if not values:
        return ""
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (v or 0.0) / top * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return f'<polyline class="{css}" points="{points}"/>'


def sparkline(points: Sequence[Point], width: int = 160, height: int = 36) -> str:
    """An inline SVG of ``points``: flushes/s (class ``fl``) and failures/s (class ``fa``) on
    one scale, oldest at the left; its title names the newest values. Only numbers go into
    the markup."""
    flushes = [p.flushes for p in points]
    failures = [p.failures for p in points]
    top = max([v for v in flushes + failures if v is not None] + [1.0])
    last = points[-1] if points else None
    title = (
        "no samples yet"
        if last is None
        else f"{last.flushes or 0.0:.2f} flushes/s, {last.failures or 0.0:.2f} failures/s "
        f"(max {top:.2f}/s over {len(points)} samples)"
    )
    return (
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{title}"><title>{title}</title>'
        f'<line class="axis" x1="0" y1="{height - 1}" x2="{width}" y2="{height - 1}"/>'
        f"{_polyline(flushes, width, height, top, 'fl')}{_polyline(failures, width, height, top, 'fa')}</svg>"
    )
