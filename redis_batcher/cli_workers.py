"""``redis-batcher workers`` and ``health``: the live workers of a prefix, and the probes a
supervisor runs (Kubernetes liveness and readiness, see docs/deploying.md); also the worker
daemon's own probe and lifecycle options (``--check``, ``--pidfile``, ``--max-flushes``,
``--max-idle``, ``--beat-interval``)."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from redis.exceptions import RedisError

from . import asyncio as aio
from .batcher import Batcher
from .cli_common import connection_options, console, json_option, make_batcher, print_json, print_table
from .errors import BatcherError
from .worker_registry import BEAT_INTERVAL, Health, WorkerInfo, assess

PIDFILE_HELP = "Write the worker's pid to PATH at start, remove it at stop (with --check: probe that worker)."
CHECK_HELP = "Probe instead of serving: exit 0 if a live worker serves APP (or the --pidfile one), else 1."


def _age(when: datetime) -> str:
    seconds = (datetime.now(timezone.utc) - when).total_seconds()
    return f"{max(seconds, 0.0):.1f}s ago"


def pidfile_probe(list_workers: Callable[[], list[WorkerInfo]], prefix: str, path: str) -> Health:
    """Liveness of the worker whose pid ``path`` holds (on this host)."""
    try:
        pid = int(Path(path).read_text().split()[0])
    except FileNotFoundError:
        return Health(False, f"no pid file at {path} (the worker has not started, or has stopped)")
    except (OSError, ValueError, IndexError) as exc:
        return Health(False, f"no pid in {path}: {exc}")
    return probe(list_workers, prefix, pid=pid)


@contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """Write this process' pid to ``path`` for the duration (None: nothing), then remove it
    unless another process has written its own there meanwhile."""
    if path is None:
        yield
        return
    pid = str(os.getpid())
    Path(path).write_text(pid + "\n")
    try:
        yield
    finally:
        try:
            if Path(path).read_text().split() == [pid]:
                Path(path).unlink()
        except OSError:
            pass


def probe(list_workers: Callable[[], list[WorkerInfo]], prefix: str, **criteria: Any) -> Health:
    """:func:`~redis_batcher.worker_registry.assess` on the workers listed, Redis errors included."""
    try:
        found = list_workers()
    except (RedisError, BatcherError, ValueError) as exc:  # ValueError: a malformed URL
        return Health(False, f"cannot read the workers under prefix {prefix!r}: {exc}")
    return assess(found, prefix, **criteria)


def report(health: Health) -> None:
    """Print a probe's line (stderr when it failed) and exit with its status."""
    click.echo(health.message, err=not health.ok)
    sys.exit(0 if health.ok else 1)


@dataclass(frozen=True)
class Lifecycle:
    """The worker daemon's lifecycle options (see :func:`lifecycle_options`)."""

    check: bool
    pidfile: str | None
    max_flushes: int | None
    max_idle: float | None
    beat_interval: float

    def worker_options(self) -> dict[str, Any]:
        """The Worker arguments they set."""
        return {
            "max_flushes": self.max_flushes,
            "max_idle": self.max_idle,
            "beat_interval": self.beat_interval,
        }

    def run_check(self, batcher: Batcher | aio.Batcher, processors: Sequence[str]) -> None:
        """``worker --check``: exit 0 when the worker of ``--pidfile`` is alive, or (without
        it) when each of ``processors`` is served by a live worker of the batcher's prefix."""

        def list_workers() -> list[WorkerInfo]:
            if isinstance(batcher, aio.Batcher):
                return asyncio.run(batcher.workers())
            return batcher.workers()

        if self.pidfile is not None:
            report(pidfile_probe(list_workers, batcher.prefix, self.pidfile))
        report(probe(list_workers, batcher.prefix, processors=processors))


def lifecycle_options(f: Callable[..., None]) -> Callable[..., None]:
    """Add ``--check``, ``--pidfile``, ``--max-flushes``, ``--max-idle`` and
    ``--beat-interval`` to the worker command, which gets them as one ``lifecycle`` argument;
    the pid file is written around the whole command (not with ``--check``)."""

    @functools.wraps(f)
    def command(
        check: bool,
        pidfile: str | None,
        max_flushes: int | None,
        max_idle: float | None,
        beat_interval: float,
        **params: Any,
    ) -> None:
        lifecycle = Lifecycle(check, pidfile, max_flushes, max_idle, beat_interval)
        with pid_file(None if check else pidfile):
            f(lifecycle=lifecycle, **params)

    options = [
        click.option("--check", is_flag=True, help=CHECK_HELP),
        click.option("--pidfile", type=click.Path(dir_okay=False), default=None, help=PIDFILE_HELP),
        click.option(
            "--max-flushes",
            type=click.IntRange(min=1),
            default=None,
            help="Exit 0 after handling this many flushes (a supervisor starts a fresh worker).",
        ),
        click.option(
            "--max-idle",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Exit 0 after this many seconds without a flush to run.",
        ),
        click.option(
            "--beat-interval",
            type=click.FloatRange(min=0, min_open=True),
            default=BEAT_INTERVAL,
            show_default=True,
            help="Seconds between heartbeats of the worker's registry record (it expires after 3 missed).",
        ),
    ]
    wrapped: Callable[..., None] = command
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped


@click.command()
@json_option
@connection_options
def workers(as_json: bool, redis_url: str | None, prefix: str, cluster: bool) -> None:
    """List the live workers of a prefix (sync and asyncio), from their heartbeat records."""
    found = make_batcher(redis_url, prefix, cluster).workers()
    if as_json:
        print_json(found)
        return
    if not found:
        console.print(f"no live workers under prefix {prefix!r}", markup=False)
        return
    print_table(
        f"live workers ({prefix})",
        [
            "id",
            "kind",
            "processors",
            "iterators",
            "in flight",
            "delivered",
            "failed",
            "last beat",
            "started",
            "version",
        ],
        [
            [
                w.id,
                w.kind,
                ", ".join(w.processors) or "-",
                ", ".join(w.iterators) or "-",
                str(w.inflight),
                str(w.delivered),
                str(w.failed),
                _age(w.last_beat),
                w.started.isoformat(timespec="seconds"),
                w.version,
            ]
            for w in found
        ],
        markup=False,
    )


@click.command()
@connection_options
@click.option("--worker-id", default=None, help="Liveness of this worker (an id `workers` lists).")
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False),
    default=None,
    help="Liveness of the worker of this pid file.",
)
@click.option(
    "--processor", "-p", "names", multiple=True, help="Readiness: a live worker serves it (repeatable)."
)
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=3.0, show_default=True, help="Seconds to reach Redis."
)
def health(
    redis_url: str | None,
    prefix: str,
    cluster: bool,
    worker_id: str | None,
    pidfile: str | None,
    names: tuple[str, ...],
    timeout: float,
) -> None:
    """Probe for a supervisor: exit 0 when healthy, 1 otherwise, with one line saying why.

    Readiness (no --worker-id/--pidfile): Redis answers and a live worker serves each
    --processor (at least one live worker without -p). Liveness (--worker-id or --pidfile): that
    worker's heartbeat is fresh (it beats every --beat-interval; missing 3 beats, it is dead).
    """

    def list_workers() -> list[WorkerInfo]:
        return make_batcher(redis_url, prefix, cluster, timeout).workers()

    if worker_id is not None:
        report(probe(list_workers, prefix, worker_id=worker_id))
    if pidfile is not None:
        report(pidfile_probe(list_workers, prefix, pidfile))
    report(probe(list_workers, prefix, processors=names))


COMMANDS: tuple[click.Command, ...] = (workers, health)
