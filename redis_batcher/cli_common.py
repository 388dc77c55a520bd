"""What the ``redis-batcher`` command modules share: the console, JSON and time rendering, the
connection options and the batcher or processor those options name."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import click
from rich.console import Console, RenderableType
from rich.table import Table

from . import overview
from .batcher import Batcher, default_url
from .errors import BatcherError
from .models import ProcessorConfig
from .processor import Processor

F = TypeVar("F", bound=Callable[..., Any])
# Piped output (CI, log files, grep) must not be cut at rich's default of 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
URL_HELP = "Redis URL (default: $REDIS_URL, then redis://127.0.0.1:6379/0)."


def jsonable(value: Any) -> Any:
    """``value`` with dataclasses as dicts and datetimes as ISO text, for ``json.dumps``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def print_json(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2, ensure_ascii=False))


def print_table(
    title: str, columns: Iterable[str], rows: Iterable[Sequence[RenderableType]], markup: bool = True
) -> None:
    """A table of ``rows`` under ``columns`` (cells that are str are rich markup unless
    ``markup`` is false)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table, markup=markup)


def fmt_time(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value else "-"


def connection_options(f: F) -> F:
    """``--redis-url``, ``--prefix`` and ``--cluster``: the batcher a command reads."""
    f = click.option("--cluster", is_flag=True, help="Connect to Redis Cluster.")(f)
    f = click.option("--prefix", default="rb", show_default=True, help="Key prefix of the batcher.")(f)
    return click.option("--redis-url", envvar="REDIS_URL", default=None, help=URL_HELP)(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def processor_options(f: Callable[..., None]) -> Callable[..., None]:
    """Options of the commands that act on one processor found in the registry: ``--processor``,
    ``--json`` and the connection. The command gets that processor as ``proc`` (an unknown
    name is a usage error, exit status 2), and ``as_json``."""

    @functools.wraps(f)
    def command(processor: str, redis_url: str | None, prefix: str, cluster: bool, **params: Any) -> None:
        f(proc=remote(redis_url, prefix, cluster, processor), **params)

    options = json_option(connection_options(command))
    return click.option("--processor", "-p", required=True, help="Processor name.")(options)


@contextmanager
def exit_on_error(param_hint: str | None = None) -> Iterator[None]:
    """Around a library call: a :class:`BatcherError` it raises ends the command with its
    message and exit status 1 (with ``param_hint``: as a bad value of that parameter, status 2)."""
    try:
        yield
    except BatcherError as exc:
        if param_hint is None:
            raise click.ClickException(str(exc)) from exc
        raise click.BadParameter(str(exc), param_hint=param_hint) from exc


def make_batcher(url: str | None, prefix: str, cluster: bool) -> Batcher:
    return Batcher(url or default_url(), prefix=prefix, cluster=cluster)


def remote(url: str | None, prefix: str, cluster: bool, name: str) -> Processor:
    """The registered processor ``name`` (a bad name is a usage error, exit status 2)."""
    with exit_on_error("--processor"):
        return make_batcher(url, prefix, cluster).remote(name)


def registry(batcher: Batcher) -> dict[str, ProcessorConfig]:
    """The registered processors; each unreadable registry entry is reported on stderr (one
    line) and skipped."""
    found = overview.registry(batcher)
    for line in found.skipped():
        click.echo(line, err=True)
    return found.configs
