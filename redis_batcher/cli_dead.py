"""``redis-batcher dead ls|show|replay|purge``: the dead letters of registered processors."""

from __future__ import annotations

from collections.abc import Callable

import click

from . import overview
from .cli_common import (
    connection_options,
    console,
    exit_on_error,
    fmt_time,
    json_option,
    jsonable,
    make_batcher,
    print_json,
    print_table,
    processor_options,
    registry,
    remote,
)
from .models import DeadLetter
from .processor import Processor

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
    columns: tuple[str, ...] = (
        "id",
        "batch id",
        "seq",
        "items",
        "reason",
        "attempts",
        "deaths",
        "dead at",
        "error",
    )
    rows: list[tuple[str, ...]] = [
        (
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
        for d in found
    ]
    if processor is None:  # several processors: which one each is of
        columns = ("processor", *columns)
        rows = [(d.processor, *row) for d, row in zip(found, rows, strict=True)]
    print_table(title, columns, rows)


@dead.command(name="show")
@click.argument("dead_id")
@processor_options
def dead_show(dead_id: str, proc: Processor, as_json: bool) -> None:
    """Show one dead letter with its items."""
    with exit_on_error():
        letter = proc.dead_letter(dead_id)
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


Action = Callable[[Processor, tuple[str, ...] | None], None]


def _dead_selection(name: str, verb: str) -> Callable[[Action], click.Command]:
    """`dead replay` and `dead purge`: the action gets the processor and the dead-letter ids
    given (None: --all, every dead letter of the processor)."""

    def decorate(action: Action) -> click.Command:
        def command(
            dead_ids: tuple[str, ...],
            select_all: bool,
            processor: str,
            redis_url: str | None,
            prefix: str,
            cluster: bool,
        ) -> None:
            if select_all == bool(dead_ids):
                raise click.UsageError("give dead-letter ids or --all (not both)")
            proc = remote(redis_url, prefix, cluster, processor)
            with exit_on_error():
                action(proc, None if select_all else dead_ids)

        command.__doc__ = action.__doc__
        f = connection_options(command)
        f = click.option("--processor", "-p", required=True, help="Processor name.")(f)
        f = click.option(
            "--all", "select_all", is_flag=True, help=f"{verb} every dead letter of the processor."
        )(f)
        return dead.command(name=name)(click.argument("dead_ids", nargs=-1)(f))

    return decorate


@_dead_selection("replay", "Replay")
def dead_replay(proc: Processor, dead_ids: tuple[str, ...] | None) -> None:
    """Put dead letters back into their batch ids (as new sequences, due now)."""
    for dead_id, sequence in overview.replay_dead_letters(proc, dead_ids):
        console.print(f"replayed {dead_id} as sequence {sequence}")


@_dead_selection("purge", "Delete")
def dead_purge(proc: Processor, dead_ids: tuple[str, ...] | None) -> None:
    """Delete dead letters for good."""
    n = proc.purge_dead() if dead_ids is None else sum(proc.purge_dead(d) for d in dead_ids)
    console.print(f"purged {n} dead letter(s)")


COMMANDS: tuple[click.Command, ...] = (dead,)
