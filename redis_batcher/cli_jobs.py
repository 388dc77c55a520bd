"""``redis-batcher jobs ls|status|pause|resume|cancel|delete``: iterator jobs, found through the
iterator registry without the application's code."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from .cli_common import (
    F,
    connection_options,
    console,
    exit_on_error,
    fmt_time,
    json_option,
    jsonable,
    make_batcher,
    print_json,
    print_table,
)
from .job_model import STATUSES
from .jobs import find_job

LS_COLUMNS = (
    "iterator",
    "job id",
    "status",
    "processed",
    "items/s",
    "retries",
    "created",
    "last run",
    "error",
)


def _job_command(f: F) -> F:
    """Options of the `jobs` commands: connection, --json and an optional --iterator."""
    f = json_option(connection_options(f))
    return click.option(
        "--iterator", "-i", default=None, help="Iterator name (found from the job id when omitted)."
    )(f)


def _find_job(url: str | None, prefix: str, cluster: bool, job_id: str, iterator: str | None) -> Any:
    with exit_on_error():
        return find_job(make_batcher(url, prefix, cluster), job_id, iterator)


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
        rows.append((name.replace("_", " "), fmt_time(getattr(st, name))))
    rows.append(("params", json.dumps(st.params, ensure_ascii=False)))
    if st.config is not None:
        rows.append(("config", json.dumps(jsonable(st.config))))
    for field, value in rows:
        table.add_row(field, Text(value))  # Text: an error or cursor is not rich markup
    console.print(table)


@click.group()
def jobs() -> None:
    """Iterator jobs: list them, show one, pause, resume, cancel or delete."""


@jobs.command(name="ls")
@click.option("--status", "-s", "status_filter", default=None, help="Only jobs in this status.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@connection_options
def jobs_ls(
    status_filter: str | None, limit: int, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
) -> None:
    """List jobs of every registered iterator, newest first."""
    if status_filter is not None and status_filter not in STATUSES:
        raise click.BadParameter(f"one of {', '.join(STATUSES)}", param_hint="--status")
    found = make_batcher(redis_url, prefix, cluster).jobs(status=status_filter, limit=limit)
    if as_json:
        print_json(found)
        return
    title = f"jobs under prefix {prefix!r}" + (f" ({status_filter})" if status_filter else "")
    rows = [
        # Text: ids and error texts are not rich markup
        (
            st.iterator,
            Text(st.job_id),
            st.status,
            str(st.processed),
            f"{st.items_per_second:g}",
            str(st.retry_count),
            fmt_time(st.created_at),
            fmt_time(st.last_run_at),
            Text(st.error or ""),
        )
        for st in found
    ]
    print_table(title, LS_COLUMNS, rows)


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
        print_json(st)
    else:
        _print_job(st)


def _job_action(action: str, help_text: str) -> None:
    def command(
        job_id: str, iterator: str | None, as_json: bool, redis_url: str | None, prefix: str, cluster: bool
    ) -> None:
        control = _find_job(redis_url, prefix, cluster, job_id, iterator)
        with exit_on_error():
            result = getattr(control, action)(job_id)
        if action == "delete":
            if not result:
                raise click.ClickException(f"no job {job_id!r} for iterator {control.name!r}")
            if as_json:
                print_json({"job_id": job_id, "iterator": control.name, "deleted": result})
            else:
                console.print(f"deleted job {job_id} of {control.name}", markup=False)
            return
        if as_json:
            print_json(result)
        else:
            console.print(f"job {job_id} of {control.name}: {result.status}", markup=False)

    command.__doc__ = help_text
    jobs.command(name=action)(click.argument("job_id")(_job_command(command)))


_job_action("pause", "Pause JOB_ID (the step in progress is saved, then its worker stops).")
_job_action("resume", "Resume a paused or failed JOB_ID (its retry count is reset).")
_job_action("cancel", "Cancel JOB_ID for good (status cancelled).")
_job_action("delete", "Delete JOB_ID; refused while it is running or paused.")

COMMANDS: tuple[click.Command, ...] = (jobs,)
