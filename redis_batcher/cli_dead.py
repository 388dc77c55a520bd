"""``redis-batcher dead ls|show|replay|purge``: the dead letters of registered processors."""

from __future__ import annotations

from collections.abc import Callable

import click
from rich.table import Table

from . import overview
from .cli_common import (
    F,
    connection_options,
    console,
    fmt_time,
    json_option,
    jsonable,
    make_batcher,
    print_json,
    processor_options,
    registry,
    remote,
)
from .errors import BatcherError
from .models import DeadLetter

# what `dead show` prints of a dead letter, before its time and items
DEAD_FIELDS = (
    "id",
    "batch_id",
    "sequence",
    "item_count",
    "reason",
    "error",
    "attempts",
    "deaths",
    "flush_id",
)


@click.group()
def dead() -> None:
    """Dead letters: items that exhausted their attempts, killed workers, or cannot be decoded."""


@dead.command(name="ls")
@click.option("--processor", "-p", default=None, help="Only this processor (default: every registered one).")
@json_option
@connection_options
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
def dead_ls(
    processor: str | None, limit: int, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """List dead letters, newest first (of every registered processor unless -p names one)."""
    found: list[DeadLetter]
    if processor is not None:
        found = remote(redis_url, prefix, cluster, processor).dead_letters(limit=limit)
    else:
        batcher = make_batcher(redis_url, prefix, cluster)
        found = overview.dead_letters(batcher, limit, registry(batcher))
    if as_json:
        print_json([{"processor": d.processor, **jsonable(d)} for d in found])
        return
    title = f"dead letters of {processor}" if processor else f"dead letters under prefix {prefix!r}"
    table = Table(title=title)
    columns = ("id", "batch id", "seq", "items", "reason", "attempts", "deaths", "dead at", "error")
    if processor is None:
        table.add_column("processor")
    for col in columns:
        table.add_column(col)
    for d in found:
        table.add_row(
            *([] if processor else [d.processor]),
            d.id,
            d.batch_id,
            str(d.sequence),
            str(d.item_count),
            d.reason,
            str(d.attempts),
            str(d.deaths),
            fmt_time(d.dead_at),
            d.error,
        )
    console.print(table)


@dead.command(name="show")
@click.argument("dead_id")
@processor_options
def dead_show(
    dead_id: str, processor: str, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """Show one dead letter with its items."""
    proc = remote(redis_url, prefix, cluster, processor)
    try:
        letter = proc.dead_letter(dead_id)
    except BatcherError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        data = jsonable(letter)
        data["items"] = [repr(i) if isinstance(i, bytes) else i for i in letter.items or []]
        print_json(data)
        return
    for field in DEAD_FIELDS:
        console.print(f"[bold]{field}[/]: {getattr(letter, field)}")
    console.print(f"[bold]dead_at[/]: {fmt_time(letter.dead_at)}")
    for i, item in enumerate(letter.items or []):
        console.print(f"  [{i}] {item!r}")


def _dead_selection(verb: str) -> Callable[[F], F]:
    """Arguments shared by `dead replay` and `dead purge`: ids, or --all, of one processor."""

    def decorate(f: F) -> F:
        f = connection_options(f)
        f = click.option("--processor", "-p", required=True, help="Processor name.")(f)
        f = click.option(
            "--all", "select_all", is_flag=True, help=f"{verb} every dead letter of the processor."
        )(f)
        return click.argument("dead_ids", nargs=-1)(f)

    return decorate


def _selected(dead_ids: tuple[str, ...], select_all: bool) -> None:
    if select_all == bool(dead_ids):
        raise click.UsageError("give dead-letter ids or --all (not both)")


@dead.command(name="replay")
@_dead_selection("Replay")
def dead_replay(
    dead_ids: tuple[str, ...],
    select_all: bool,
    processor: str,
    redis_url: str | None,
    prefix: str,
    cluster: bool,
) -> None:
    """Put dead letters back into their batch ids (as new sequences, due now)."""
    _selected(dead_ids, select_all)
    proc = remote(redis_url, prefix, cluster, processor)
    try:
        for dead_id, sequence in overview.replay_dead_letters(proc, None if select_all else dead_ids):
            console.print(f"replayed {dead_id} as sequence {sequence}")
    except BatcherError as exc:
        raise click.ClickException(str(exc)) from exc


@dead.command(name="purge")
@_dead_selection("Delete")
def dead_purge(
    dead_ids: tuple[str, ...],
    select_all: bool,
    processor: str,
    redis_url: str | None,
    prefix: str,
    cluster: bool,
) -> None:
    """Delete dead letters for good."""
    _selected(dead_ids, select_all)
    proc = remote(redis_url, prefix, cluster, processor)
    try:
        n = proc.purge_dead() if select_all else sum(proc.purge_dead(d) for d in dead_ids)
    except BatcherError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"purged {n} dead letter(s)")


COMMANDS: tuple[click.Command, ...] = (dead,)
