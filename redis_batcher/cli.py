"""The ``redis-batcher`` command: worker daemon, inspection, manual flush and the demo."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from . import asyncio as aio
from .batcher import Batcher, default_url
from .errors import BatcherError, EvictionPolicyError, LayoutMismatch
from .job_model import STATUSES
from .jobs import find_job
from .keys import LAYOUT, key_slot, registry_key
from .models import DeadLetter, ProcessorConfig
from .processor import Processor
from .worker import Worker

F = TypeVar("F", bound=Callable[..., Any])
# Piped output (CI, log files, grep) must not be cut at rich's default of 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
URL_HELP = "Redis URL (default: $REDIS_URL, then redis://127.0.0.1:6379/0)."


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _print_json(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))


def _fmt_time(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value else "-"


def load_target(spec: str) -> tuple[Any, list[str] | None]:
    """Import ``module:attr`` naming a Batcher or a Processor (then only that processor), sync
    or asyncio."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"expected MODULE:ATTR, got {spec!r}", param_hint="APP")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="APP") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise click.BadParameter(f"{module_name!r} has no attribute {attr!r}", param_hint="APP") from None
    if isinstance(obj, (Batcher, aio.Batcher)):
        return obj, None
    if isinstance(obj, (Processor, aio.AsyncProcessor)):
        return obj.batcher, [obj.name]
    raise click.BadParameter(
        f"{spec} is a {type(obj).__name__}, not a Batcher or Processor", param_hint="APP"
    )


def _batcher(url: str | None, prefix: str, cluster: bool) -> Batcher:
    return Batcher(url or default_url(), prefix=prefix, cluster=cluster)


def _remote(url: str | None, prefix: str, cluster: bool, name: str) -> Processor:
    try:
        return _batcher(url, prefix, cluster).remote(name)
    except BatcherError as exc:
        raise click.BadParameter(str(exc), param_hint="--processor") from exc


def _registry(batcher: Batcher) -> dict[str, ProcessorConfig]:
    """The registered processors; each unreadable registry entry is reported on stderr (one
    line) and skipped."""
    configs, bad = batcher.registry_entries()
    for name, reason in sorted(bad.items()):
        click.echo(f"skipped registry entry {name} of {registry_key(batcher.prefix)}: {reason}", err=True)
    return configs


def _common(f: Any) -> Any:
    f = click.option("--cluster", is_flag=True, help="Connect to Redis Cluster.")(f)
    f = click.option("--prefix", default="rb", show_default=True, help="Key prefix of the batcher.")(f)
    f = click.option("--redis-url", envvar="REDIS_URL", default=None, help=URL_HELP)(f)
    return f


def _processor_command(f: F) -> F:
    """Options of the commands that act on one processor found in the registry."""
    f = _common(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)
    return click.option("--processor", "-p", required=True, help="Processor name.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="redis-batcher")
def main() -> None:
    """Batch items in Redis and deliver them to handlers."""


@main.command()
@click.argument("app")
@click.option("--redis-url", envvar="REDIS_URL", default=None, help="Override the app batcher's Redis URL.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--burst", is_flag=True, help="Deliver what is due now, then exit.")
@click.option("--processor", "-p", "names", multiple=True, help="Only serve these processors (repeatable).")
@click.option(
    "--iterator",
    "-i",
    "iterator_names",
    multiple=True,
    help="Only run jobs of these iterators (repeatable). With -p or -i, only what is named is served.",
)
@click.option(
    "--max-idle-wait",
    type=click.FloatRange(min=0.01),
    default=5.0,
    show_default=True,
    help="Longest sleep between delay-queue checks when no wake-up arrives.",
)
@click.option(
    "--grace-period",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="On SIGTERM, how long in-flight handlers may finish before their leases are released.",
)
@click.option(
    "--prefetch-multiplier",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Claim up to concurrency x this many flushes (above 1: ahead of free handler slots; "
    "if the worker dies, each claimed flush is charged a death).",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def worker(
    app: str,
    redis_url: str | None,
    concurrency: int,
    burst: bool,
    names: tuple[str, ...],
    iterator_names: tuple[str, ...],
    max_idle_wait: float,
    grace_period: float,
    prefetch_multiplier: int,
    log_level: str,
) -> None:
    """Run a worker for the processors and iterator jobs of APP (``module:batcher`` or
    ``module:processor``). With --processor or --iterator it serves only what they name.

    SIGTERM/SIGINT: stop claiming, finish in-flight flushes, exit 0. A second signal exits at once.
    """
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # one greppable line per record in log files
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    batcher, only = load_target(app)
    selected = list(names) or only
    if selected:
        unknown = [n for n in selected if n not in batcher.processors]
        if unknown:
            raise click.BadParameter(
                f"unknown processor(s) {unknown}; {app} defines {sorted(batcher.processors)}",
                param_hint="--processor",
            )
    defined = batcher.iterators if isinstance(batcher, Batcher) else batcher.definitions.iterators
    unknown = [n for n in iterator_names if n not in defined]
    if unknown:
        raise click.BadParameter(
            f"unknown iterator(s) {unknown}; {app} defines {sorted(defined)}", param_hint="--iterator"
        )
    # naming processors or iterators serves only those: -p alone runs no jobs, -i alone no processors
    iterators: list[str] | None = None
    if selected or iterator_names:
        selected, iterators = selected or [], list(iterator_names)
    if redis_url:
        batcher.connect(redis_url, cluster=batcher.is_cluster)
    options: dict[str, Any] = {
        "concurrency": concurrency,
        "processors": selected,
        "iterators": iterators,
        "max_idle_wait": max_idle_wait,
        "grace_period": grace_period,
        "prefetch_multiplier": prefetch_multiplier,
    }
    try:
        w: Any = (
            aio.Worker(batcher, **options) if isinstance(batcher, aio.Batcher) else Worker(batcher, **options)
        )
    except BatcherError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        if isinstance(w, aio.Worker):
            import asyncio

            asyncio.run(w.run(burst=burst))
            if w.forced:
                sys.exit(1)
        else:
            w.run(burst=burst)
    except (EvictionPolicyError, LayoutMismatch) as exc:  # a setting to fix, not a crash
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("batch_id")
@_processor_command
def status(
    batch_id: str, processor: str, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """Show the sequences of BATCH_ID (active ones and the last completed one)."""
    proc = _remote(redis_url, prefix, cluster, processor)
    try:
        seqs = proc.sequences(batch_id)
    except BatcherError as exc:
        raise click.BadParameter(str(exc), param_hint="BATCH_ID") from exc
    if as_json:
        st = proc.status(batch_id)
        _print_json(
            {"batch_id": batch_id, "active": st is not None, "sequences": seqs, "config": proc.config}
        )
        return
    if not seqs:
        console.print(f"[yellow]no sequences for {batch_id!r} in processor {processor!r}[/]")
        return
    table = Table(title=f"{processor} / {batch_id}")
    for col in ("seq", "status", "items", "attempt", "created", "updated", "last error"):
        table.add_column(col)
    for b in seqs:
        table.add_row(
            str(b.sequence),
            b.status,
            str(b.item_count),
            str(b.attempt),
            _fmt_time(b.created_at),
            _fmt_time(b.updated_at),
            b.last_error or "",
        )
    console.print(table)


@main.command()
@click.argument("batch_id")
@_processor_command
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
def history(
    batch_id: str,
    processor: str,
    limit: int,
    as_json: bool,
    redis_url: str | None,
    prefix: str,
    cluster: bool,
) -> None:
    """Show the flush history of BATCH_ID, newest first."""
    proc = _remote(redis_url, prefix, cluster, processor)
    try:
        records = proc.history(batch_id, limit=limit)
    except BatcherError as exc:
        raise click.BadParameter(str(exc), param_hint="BATCH_ID") from exc
    if as_json:
        _print_json(records)
        return
    table = Table(title=f"history of {processor} / {batch_id}")
    for col in ("seq", "items", "started", "ms", "ok", "attempt", "error"):
        table.add_column(col)
    for r in records:
        table.add_row(
            str(r.sequence),
            str(r.item_count),
            _fmt_time(r.started_at),
            f"{r.duration_ms:.1f}",
            "yes" if r.success else "[red]no[/]",
            str(r.attempt),
            r.error or "",
        )
    console.print(table)


@main.command()
@click.argument("batch_id")
@_processor_command
def flush(
    batch_id: str, processor: str, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """Seal BATCH_ID's accumulating sequence now (a base id or base::N)."""
    proc = _remote(redis_url, prefix, cluster, processor)
    try:
        result = proc.flush(batch_id)
    except BatcherError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _print_json(result)
    elif result.flushed:
        console.print(f"sealed {batch_id}::{result.sequence} with {result.item_count} items")
    else:
        console.print(f"nothing flushed: {result.reason}")


def _node_of(batcher: Batcher, key: str) -> str:
    """host:port of the server holding ``key`` (a cluster: the primary owning its slot)."""
    if batcher.is_cluster:
        return str(batcher.client.get_node_from_key(key).name)
    kwargs = batcher.client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _ls_nodes(batcher: Batcher, as_json: bool) -> None:
    """Every partition of every registered processor: its hash tag, slot and server."""
    rows = []
    for name in sorted(_registry(batcher)):
        proc = batcher.remote(name)
        for k, part in enumerate(proc.keys.parts):
            rows.append(
                {
                    "processor": name,
                    "partition": k,
                    "key_prefix": part.pfx,
                    "slot": key_slot(part.due),
                    "node": _node_of(batcher, part.due),
                    "queued_sequences": batcher.client.zcard(part.due),
                }
            )
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"partitions under prefix {batcher.prefix!r}")
    for col in ("processor", "partition", "key prefix", "slot", "node", "queued"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("processor", "partition", "key_prefix", "slot", "node")),
                      str(row["queued_sequences"]))
    console.print(table, markup=False)
    per_node: dict[str, int] = {}
    for row in rows:
        per_node[str(row["node"])] = per_node.get(str(row["node"]), 0) + 1
    for node, count in sorted(per_node.items()):
        click.echo(f"{node}: {count} partition(s)")


@main.command(name="ls")
@click.option("--processor", "-p", default=None, help="List the active batch ids of this processor.")
@click.option("--nodes", is_flag=True, help="List every partition with its hash tag, slot and server.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_common
def ls_cmd(
    processor: str | None, nodes: bool, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """List registered processors, or the active batch ids of one processor."""
    batcher = _batcher(redis_url, prefix, cluster)
    if nodes:
        if processor is not None:
            raise click.UsageError("--nodes lists every processor's partitions: leave out -p")
        _ls_nodes(batcher, as_json)
        return
    if processor is None:
        rows = []
        for name, cfg in sorted(_registry(batcher).items()):
            proc = batcher.remote(name)
            ids = sum(batcher.client.scard(p.ids) for p in proc.keys.parts)
            due = sum(batcher.client.zcard(p.due) for p in proc.keys.parts)
            rows.append({"processor": name, "active_batch_ids": ids, "queued_sequences": due, "config": cfg})
        if as_json:
            _print_json(rows)
            return
        table = Table(title=f"processors under prefix {prefix!r}")
        for col in ("processor", "max size", "interval s", "partitions", "active ids", "queued"):
            table.add_column(col)
        for row in rows:
            cfg = row["config"]
            table.add_row(
                row["processor"],
                str(cfg.max_batch_size),
                str(cfg.flush_interval),
                str(cfg.partitions),
                str(row["active_batch_ids"]),
                str(row["queued_sequences"]),
            )
        console.print(table)
        return
    proc = _remote(redis_url, prefix, cluster, processor)
    batch_ids = sorted(proc.batch_ids())
    if as_json:
        _print_json(batch_ids)
        return
    for bid in batch_ids:
        click.echo(bid)


@main.command()
@click.option("--upgrade", is_flag=True, help="Stamp this version's layout on data of the previous one.")
@_common
def layout(upgrade: bool, redis_url: str | None, prefix: str, cluster: bool) -> None:
    """Show the data layout version stamped in Redis (or upgrade it: README, Upgrading)."""
    batcher = _batcher(redis_url, prefix, cluster)
    if upgrade:
        try:
            before = batcher.upgrade_layout()
        except BatcherError as exc:
            raise click.ClickException(str(exc)) from exc
        if before == LAYOUT:
            click.echo(f"prefix {prefix!r} already holds layout {LAYOUT}")
        else:
            click.echo(f"prefix {prefix!r} upgraded from layout 1 to layout {LAYOUT}")
        return
    found = batcher.layout()
    legacy = found is None and bool(batcher.registry_entries()[0])
    if found is None:
        what = "layout 1 (written before layouts were stamped)" if legacy else "no data yet"
    else:
        what = f"layout {found}"
    click.echo(f"prefix {prefix!r}: {what}; this version writes layout {LAYOUT}")
    if legacy or found not in (None, LAYOUT):
        sys.exit(1)  # a mismatch: scripts and probes can tell


@main.group()
def dead() -> None:
    """Dead letters: items that exhausted their attempts, killed workers, or cannot be decoded."""


@dead.command(name="ls")
@click.option("--processor", "-p", default=None, help="Only this processor (default: every registered one).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_common
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
def dead_ls(
    processor: str | None, limit: int, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """List dead letters, newest first (of every registered processor unless -p names one)."""
    found: list[tuple[str, DeadLetter]]
    if processor is not None:
        proc = _remote(redis_url, prefix, cluster, processor)
        found = [(processor, d) for d in proc.dead_letters(limit=limit)]
    else:
        batcher = _batcher(redis_url, prefix, cluster)
        found = []
        for name in sorted(_registry(batcher)):
            found.extend((name, d) for d in batcher.remote(name).dead_letters(limit=limit))
        found.sort(key=lambda row: row[1].dead_at or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
        found = found[:limit]
    if as_json:
        _print_json([{"processor": name, **_jsonable(d)} for name, d in found])
        return
    title = f"dead letters of {processor}" if processor else f"dead letters under prefix {prefix!r}"
    table = Table(title=title)
    columns = ("id", "batch id", "seq", "items", "reason", "attempts", "deaths", "dead at", "error")
    if processor is None:
        table.add_column("processor")
    for col in columns:
        table.add_column(col)
    for name, d in found:
        table.add_row(
            *([] if processor else [name]),
            d.id,
            d.batch_id,
            str(d.sequence),
            str(d.item_count),
            d.reason,
            str(d.attempts),
            str(d.deaths),
            _fmt_time(d.dead_at),
            d.error,
        )
    console.print(table)


@dead.command(name="show")
@click.argument("dead_id")
@_processor_command
def dead_show(
    dead_id: str, processor: str, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """Show one dead letter with its items."""
    proc = _remote(redis_url, prefix, cluster, processor)
    try:
        letter = proc.dead_letter(dead_id)
    except BatcherError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        data = _jsonable(letter)
        data["items"] = [repr(i) if isinstance(i, bytes) else i for i in letter.items or []]
        _print_json(data)
        return
    for field in (
        "id",
        "batch_id",
        "sequence",
        "item_count",
        "reason",
        "error",
        "attempts",
        "deaths",
        "flush_id",
    ):
        console.print(f"[bold]{field}[/]: {getattr(letter, field)}")
    console.print(f"[bold]dead_at[/]: {_fmt_time(letter.dead_at)}")
    for i, item in enumerate(letter.items or []):
        console.print(f"  [{i}] {item!r}")


def _dead_selection(verb: str) -> Callable[[F], F]:
    """Arguments shared by `dead replay` and `dead purge`: ids, or --all, of one processor."""

    def decorate(f: F) -> F:
        f = _common(f)
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
    proc = _remote(redis_url, prefix, cluster, processor)
    ids = [d.id for d in proc.dead_letters(limit=1_000_000)] if select_all else list(dead_ids)
    try:
        for dead_id in ids:
            console.print(f"replayed {dead_id} as sequence {proc.replay_dead(dead_id)}")
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
    proc = _remote(redis_url, prefix, cluster, processor)
    try:
        n = proc.purge_dead() if select_all else sum(proc.purge_dead(d) for d in dead_ids)
    except BatcherError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"purged {n} dead letter(s)")


@main.command()
@click.option("--redis-url", default=None, help="Use this Redis instead of a throwaway redis-server.")
@click.option("--items", type=click.IntRange(min=1), default=20_000, show_default=True, help="Items to add.")
@click.option("--producers", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--batch-ids", "batch_ids", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--flush-interval", type=click.FloatRange(min=0), default=0.5, show_default=True)
def demo(
    redis_url: str | None,
    items: int,
    producers: int,
    batch_ids: int,
    max_batch_size: int,
    flush_interval: float,
) -> None:
    """Run producers and a worker against a throwaway redis-server and report throughput."""
    from .demo import run_demo  # not at the top: it makes its batcher when imported

    code = run_demo(
        redis_url=redis_url,
        items=items,
        producers=producers,
        batch_ids=batch_ids,
        max_batch_size=max_batch_size,
        flush_interval=flush_interval,
        console=console,
    )
    sys.exit(code)


# -- iterator jobs ---------------------------------------------------------------------------------


def _job_command(f: F) -> F:
    """Options of the `jobs` commands: connection, --json and an optional --iterator."""
    f = _common(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)
    return click.option(
        "--iterator", "-i", default=None, help="Iterator name (found from the job id when omitted)."
    )(f)


def _find_job(url: str | None, prefix: str, cluster: bool, job_id: str, iterator: str | None) -> Any:
    try:
        return find_job(_batcher(url, prefix, cluster), job_id, iterator)
    except BatcherError as exc:
        raise click.ClickException(str(exc)) from exc


def _print_job(st: Any) -> None:
    table = Table(title=Text(f"{st.iterator} / {st.job_id}"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str]] = [
        ("status", st.status),
        ("processed", str(st.processed)),
        ("items/s (last minute)", f"{st.items_per_second:g}"),
        ("cursor", "-" if st.cursor is None else st.cursor),
        ("retry count", str(st.retry_count)),
        ("error", st.error or "-"),
        ("worker", st.worker or "-"),
    ]
    for name in ("created_at", "started_at", "last_run_at", "next_run_at", "finished_at"):
        rows.append((name.replace("_", " "), _fmt_time(getattr(st, name))))
    rows.append(("params", json.dumps(st.params, ensure_ascii=False)))
    if st.config is not None:
        rows.append(("config", json.dumps(_jsonable(st.config))))
    for field, value in rows:
        table.add_row(field, Text(value))  # Text: an error or cursor is not rich markup
    console.print(table)


@main.group()
def jobs() -> None:
    """Iterator jobs: list them, show one, pause, resume, cancel or delete."""


@jobs.command(name="ls")
@click.option("--status", "-s", "status_filter", default=None, help="Only jobs in this status.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_common
def jobs_ls(
    status_filter: str | None, limit: int, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """List jobs of every registered iterator, newest first."""
    if status_filter is not None and status_filter not in STATUSES:
        raise click.BadParameter(f"one of {', '.join(STATUSES)}", param_hint="--status")
    found = _batcher(redis_url, prefix, cluster).jobs(status=status_filter, limit=limit)
    if as_json:
        _print_json(found)
        return
    table = Table(title=f"jobs under prefix {prefix!r}" + (f" ({status_filter})" if status_filter else ""))
    for col in (
        "iterator",
        "job id",
        "status",
        "processed",
        "items/s",
        "retries",
        "created",
        "last run",
        "error",
    ):
        table.add_column(col)
    for st in found:
        table.add_row(
            st.iterator,
            Text(st.job_id),  # Text: ids and error texts are not rich markup
            st.status,
            str(st.processed),
            f"{st.items_per_second:g}",
            str(st.retry_count),
            _fmt_time(st.created_at),
            _fmt_time(st.last_run_at),
            Text(st.error or ""),
        )
    console.print(table)


@jobs.command(name="status")
@click.argument("job_id")
@_job_command
def jobs_status(
    job_id: str, iterator: str | None, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """Show one job: status, progress, cursor, retries, error, times, params and config."""
    control = _find_job(redis_url, prefix, cluster, job_id, iterator)
    st = control.status(job_id)
    if st is None:
        raise click.ClickException(f"no job {job_id!r} for iterator {control.name!r}")
    if as_json:
        _print_json(st)
    else:
        _print_job(st)


def _job_action(action: str, help_text: str) -> None:
    def command(
        job_id: str, iterator: str | None, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
    ) -> None:
        control = _find_job(redis_url, prefix, cluster, job_id, iterator)
        try:
            result = getattr(control, action)(job_id)
        except BatcherError as exc:
            raise click.ClickException(str(exc)) from exc
        if action == "delete":
            if not result:
                raise click.ClickException(f"no job {job_id!r} for iterator {control.name!r}")
            if as_json:
                _print_json({"job_id": job_id, "iterator": control.name, "deleted": result})
            else:
                console.print(f"deleted job {job_id} of {control.name}", markup=False)
            return
        if as_json:
            _print_json(result)
        else:
            console.print(f"job {job_id} of {control.name}: {result.status}", markup=False)

    command.__doc__ = help_text
    jobs.command(name=action)(click.argument("job_id")(_job_command(command)))


_job_action("pause", "Pause JOB_ID (the step in progress is saved, then its worker stops).")
_job_action("resume", "Resume a paused or failed JOB_ID (its retry count is reset).")
_job_action("cancel", "Cancel JOB_ID for good (status cancelled).")
_job_action("delete", "Delete JOB_ID; refused while it is running or paused.")
