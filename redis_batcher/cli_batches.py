"""``redis-batcher status|history|flush|retry|ls|layout|pause|resume``: batches, processors and
partitions of a prefix, read from the registry without the application's code."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from . import overview
from .cli_common import (
    connection_options,
    console,
    exit_on_error,
    fmt_time,
    json_option,
    make_batcher,
    print_json,
    print_table,
    processor_options,
    registry,
    remote,
)
from .keys import LAYOUT
from .models import FlushResult
from .processor import Processor

STATUS_COLUMNS = ("seq", "status", "items", "attempt", "created", "updated", "due", "last error")
HISTORY_COLUMNS = ("seq", "items", "started", "ms", "ok", "attempt", "error")


def _batch_command(f: Callable[..., None]) -> click.Command:
    """A command on one BATCH_ID of one processor found in the registry."""
    return click.command()(click.argument("batch_id")(processor_options(f)))


@_batch_command
def status(batch_id: str, proc: Processor, as_json: bool) -> None:
    """Show the sequences of BATCH_ID (active ones and the last completed one)."""
    with exit_on_error("BATCH_ID"):
        seqs = proc.sequences(batch_id)
    with exit_on_error():
        paused = proc.paused()
    if as_json:
        active = any(b.status != "completed" for b in seqs)
        fields = {"batch_id": batch_id, "active": active, "paused": paused, "sequences": seqs}
        print_json({**fields, "config": proc.config})
        return
    if not seqs:
        console.print(f"[yellow]no sequences for {batch_id!r} in processor {proc.name!r}[/]")
        return
    rows = [
        (
            str(b.sequence),
            b.status,
            str(b.item_count),
            str(b.attempt),
            fmt_time(b.created_at),
            fmt_time(b.updated_at),
            f"[red]overdue since {fmt_time(b.overdue_since)}[/]" if b.overdue else fmt_time(b.due_at),
            b.last_error or "",
        )
        for b in seqs
    ]
    print_table(f"{proc.name} / {batch_id}", STATUS_COLUMNS, rows)
    if paused:
        console.print(f"[yellow]{_paused_note(proc.name)}[/]")


def _paused_note(name: str) -> str:
    return f"processor {name!r} is paused: no flush is delivered until `redis-batcher resume -p {name}`"


@_batch_command
@click.option(
    "--limit", "-n", type=click.IntRange(min=1), default=None, help="Newest entries shown [default: 20]."
)
@click.option("--all", "show_all", is_flag=True, help="Every entry kept (the processor's history_limit).")
def history(batch_id: str, proc: Processor, limit: int | None, show_all: bool, as_json: bool) -> None:
    """Show the flush history of BATCH_ID, newest first."""
    if show_all and limit is not None:
        raise click.UsageError("--all shows every entry kept: leave out --limit")
    with exit_on_error("BATCH_ID"):
        records = proc.history(batch_id, limit=None if show_all else limit or 20)
    if as_json:
        print_json(records)
        return
    rows = [
        (
            str(r.sequence),
            str(r.item_count),
            fmt_time(r.started_at),
            f"{r.duration_ms:.1f}",
            "yes" if r.success else "[red]no[/]",
            str(r.attempt),
            r.error or "",
        )
        for r in records
    ]
    print_table(f"history of {proc.name} / {batch_id}", HISTORY_COLUMNS, rows)


def _retried_note(base: str, result: FlushResult) -> str:
    names = ", ".join(f"{base}::{seq}" for seq in result.retried)
    return f"retried {names} now (attempt counts kept)"


@_batch_command
def flush(batch_id: str, proc: Processor, as_json: bool) -> None:
    """Seal BATCH_ID's accumulating sequence now (a base id or base::N), and retry now what
    waits for a retry."""
    with exit_on_error():
        result = proc.flush(batch_id)
    if as_json:
        print_json(result)
    elif not result.flushed:
        console.print(f"nothing flushed: {result.reason}")
    elif not result.retried:
        console.print(f"sealed {result.batch_id}::{result.sequence} with {result.item_count} items")
    elif result.sequence in result.retried:  # nothing was sealed
        console.print(f"{_retried_note(result.batch_id, result)}: {result.item_count} items due now")
    else:
        sealed = f"sealed {result.batch_id}::{result.sequence} and {_retried_note(result.batch_id, result)}"
        console.print(f"{sealed}: {result.item_count} items due now")


@_batch_command
def retry(batch_id: str, proc: Processor, as_json: bool) -> None:
    """Deliver now what of BATCH_ID waits for a retry (a base id or base::N): a failed flush
    waiting for its backoff. The accumulating sequence is left alone."""
    with exit_on_error():
        result = proc.retry(batch_id)
    if as_json:
        print_json(result)
    elif result.flushed:
        console.print(f"{_retried_note(result.batch_id, result)}: {result.item_count} items due now")
    else:
        console.print(f"nothing retried: {result.reason}")


def _print_partitions(rows: list[overview.PartitionInfo], prefix: str, as_json: bool) -> None:
    if as_json:
        print_json(rows)
        return
    cells = [(r.processor, r.partition, r.key_prefix, r.slot, r.node, r.queued_sequences) for r in rows]
    columns = ("processor", "partition", "key prefix", "slot", "node", "queued")
    print_table(
        f"partitions under prefix {prefix!r}", columns, [tuple(map(str, c)) for c in cells], markup=False
    )
    for node, count in overview.partitions_per_node(rows).items():
        click.echo(f"{node}: {count} partition(s)")


def _print_processors(rows: list[overview.ProcessorOverview], prefix: str, as_json: bool) -> None:
    if as_json:
        print_json(
            [
                {
                    "processor": row.name,
                    "active_batch_ids": row.active_batch_ids,
                    "queued_sequences": row.queued_sequences,
                    "oldest_overdue_s": row.oldest_overdue,
                    "paused": row.paused,
                    "config": row.config,
                }
                for row in rows
            ]
        )
        return
    cells = [
        (
            r.name,
            r.config.max_batch_size,
            r.config.flush_interval,
            r.config.partitions,
            r.active_batch_ids,
            r.queued_sequences,
            "-" if r.oldest_overdue is None else f"{r.oldest_overdue:.1f}s",
            "yes" if r.paused else "no",
        )
        for r in rows
    ]
    columns = (
        "processor",
        "max size",
        "interval s",
        "partitions",
        "active ids",
        "queued",
        "oldest overdue",
        "paused",
    )
    print_table(f"processors under prefix {prefix!r}", columns, [tuple(map(str, c)) for c in cells])


@click.command(name="ls")
@click.option("--processor", "-p", default=None, help="List the active batch ids of this processor.")
@click.option("--nodes", is_flag=True, help="List every partition with its hash tag, slot and server.")
@json_option
@connection_options
def ls_cmd(
    processor: str | None, nodes: bool, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """List registered processors, or the active batch ids of one processor."""
    batcher = make_batcher(redis_url, prefix, cluster)
    if nodes:
        if processor is not None:
            raise click.UsageError("--nodes lists every processor's partitions: leave out -p")
        _print_partitions(overview.partitions(batcher, registry(batcher)), prefix, as_json)
        return
    if processor is None:
        _print_processors(overview.processors(batcher, registry(batcher)), prefix, as_json)
        return
    batch_ids = sorted(remote(redis_url, prefix, cluster, processor).batch_ids())
    if as_json:
        print_json(batch_ids)
        return
    if not batch_ids:  # on stderr: stdout stays a list of ids for scripts
        click.echo("no active batch ids", err=True)
    for bid in batch_ids:
        click.echo(bid)


@click.command()
@click.option("--upgrade", is_flag=True, help="Stamp this version's layout on data of the previous one.")
@connection_options
def layout(upgrade: bool, redis_url: str | None, prefix: str, cluster: bool) -> None:
    """Show the data layout version stamped in Redis (or upgrade it: README, Upgrading)."""
    batcher = make_batcher(redis_url, prefix, cluster)
    if upgrade:
        with exit_on_error():
            before = batcher.upgrade_layout()
        if before == LAYOUT:
            click.echo(f"prefix {prefix!r} already holds layout {LAYOUT}")
        else:
            click.echo(f"prefix {prefix!r} upgraded from layout 1 to layout {LAYOUT}")
        return
    report = overview.layout_report(batcher)
    if report.found is None:
        what = "layout 1 (written before layouts were stamped)" if report.legacy else "no data yet"
    else:
        what = f"layout {report.found}"
    click.echo(f"prefix {prefix!r}: {what}; this version writes layout {report.current}")
    if not report.matches:
        sys.exit(1)  # a mismatch: scripts and probes can tell


def _pause_command(pause: bool) -> click.Command:
    def command(proc: Processor, as_json: bool) -> None:
        with exit_on_error():
            changed = proc.pause() if pause else proc.resume()
        if as_json:
            print_json({"processor": proc.name, "paused": pause, "changed": changed})
        elif pause:
            click.echo(_paused_note(proc.name) if changed else f"processor {proc.name!r} was paused already")
        else:
            done = "resumed: what is due is delivered now" if changed else "was not paused"
            click.echo(f"processor {proc.name!r} {done}")

    command.__doc__ = (
        "Pause a processor: adds go on, workers claim none of its flushes until `resume`."
        if pause
        else "Resume a paused processor: what became due meanwhile is delivered at once."
    )
    return click.command(name="pause" if pause else "resume")(processor_options(command))


COMMANDS: tuple[click.Command, ...] = (
    status,
    history,
    flush,
    retry,
    ls_cmd,
    layout,
    _pause_command(True),
    _pause_command(False),
)
