"""``redis-batcher top``: a live view of the processors and workers of a prefix, refreshed every
``--interval`` seconds (the data is :func:`redis_batcher.top.snapshot`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import click
from redis.exceptions import RedisError
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import top as top_data
from .batcher import Batcher
from .cli_common import (
    connection_options,
    console,
    error_line,
    json_option,
    make_batcher,
    print_json,
    registry,
)
from .errors import BatcherError

# a refresh waits at most this long for an unreachable Redis before the frame says so
CONNECT_RETRY = 2.0


def _rate(value: float | None, shared: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}*" if shared else f"{value:.1f}"


def _row(*cells: object) -> list[RenderableType]:
    return [Text(str(cell)) for cell in cells]


def frame(snap: top_data.TopSnapshot, target: str) -> RenderableType:
    """One frame of ``top``: the processors, then the live workers."""
    procs = Table(
        title=Text(f"processors under prefix {snap.prefix!r} at {target}, {snap.taken:%H:%M:%S} UTC")
    )
    for column in ("processor", "backlog", "oldest overdue", "flushes/s", "failures/s", "dead letters"):
        procs.add_column(column, justify="left" if column == "processor" else "right")
    for column in ("paused", "workers", "queued"):
        procs.add_column(column, justify="right")
    for p in snap.processors:
        procs.add_row(
            *_row(
                p.name,
                p.backlog,
                "-" if p.oldest_overdue is None else f"{p.oldest_overdue:.1f}s",
                _rate(p.flushes_per_s, p.shared),
                _rate(p.failures_per_s, p.shared),
                p.dead_letters,
                "PAUSED" if p.paused else "no",
                p.workers,
                p.queued,
            )
        )
    if not snap.workers:
        return Group(procs, Text(f"no live workers under prefix {snap.prefix!r}"))
    caption = (
        f"{len(snap.workers)} live worker(s): {snap.flushes_per_s:.1f} flushes/s, "
        f"{snap.failures_per_s:.1f} failures/s"
    )
    if any(p.shared for p in snap.processors):
        caption += "; * counts the flushes of workers serving several processors"
    workers = Table(title="live workers", caption=Text(caption))
    for column in ("id", "kind", "processors", "in flight", "flushes/s", "failures/s", "last beat"):
        workers.add_column(column)
    for w in snap.workers:
        info = w.info
        age = max((snap.taken - info.last_beat).total_seconds(), 0.0)
        workers.add_row(
            *_row(
                info.id,
                info.kind,
                ", ".join(info.processors) or "-",
                info.inflight,
                _rate(w.flushes_per_s),
                _rate(w.failures_per_s),
                f"{age:.1f}s ago",
            )
        )
    return Group(procs, workers)


def _watch(
    batcher: Batcher, names: Sequence[str] | None, interval: float, snap: top_data.TopSnapshot
) -> None:
    """Refresh the frame every ``interval`` seconds until interrupted; a refresh that fails
    keeps the last frame, with the error under it, and is tried again."""
    with Live(frame(snap, batcher.target), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            try:
                snap = top_data.snapshot(batcher, snap, names)
                live.update(frame(snap, batcher.target), refresh=True)
            except (RedisError, BatcherError) as exc:
                line = error_line(exc, batcher.target) or str(exc)
                live.update(Group(frame(snap, batcher.target), Text(line, style="bold red")), refresh=True)


@click.command()
@click.option(
    "--processor", "-p", "names", multiple=True, help="Only these processors (repeatable; default: all)."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between two refreshes.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@json_option
@connection_options
def top(
    names: tuple[str, ...],
    interval: float,
    once: bool,
    as_json: bool,
    redis_url: str | None,
    prefix: str,
    cluster: bool,
) -> None:
    """A live view of the processors of a prefix: backlog (due now), oldest overdue,
    flushes and failures per second, dead letters, paused, workers. Ctrl-C ends it.

    Each refresh costs a fixed number of Redis commands per partition, however many batch ids
    are active. Rates come from the workers' heartbeats (every 5 s by default): the first frame
    shows each worker's average since it started.
    """
    if as_json and not once:
        raise click.UsageError("--json prints one frame: use it with --once")
    batcher = make_batcher(redis_url, prefix, cluster, CONNECT_RETRY)
    registered = registry(batcher)
    unknown = sorted(set(names) - set(registered))
    if unknown:
        raise click.BadParameter(
            f"not registered under prefix {prefix!r} at {batcher.target}: {', '.join(unknown)}",
            param_hint="--processor",
        )
    chosen = list(names) or None
    snap = top_data.snapshot(batcher, None, chosen)
    if once:
        if as_json:
            print_json(snap)
        else:
            console.print(frame(snap, batcher.target))
        return
    try:
        _watch(batcher, chosen, interval, snap)
    except KeyboardInterrupt:  # Ctrl-C is how top ends: exit 0, no traceback
        pass


COMMANDS: tuple[click.Command, ...] = (top,)
