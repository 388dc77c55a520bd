"""What the ``redis-batcher`` command modules share: the console, JSON and time rendering, the
connection options and the batcher or processor those options name."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click
from rich.console import Console

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


def fmt_time(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value else "-"


def connection_options(f: F) -> F:
    """``--redis-url``, ``--prefix`` and ``--cluster``: the batcher a command reads."""
    f = click.option("--cluster", is_flag=True, help="Connect to Redis Cluster.")(f)
    f = click.option("--prefix", default="rb", show_default=True, help="Key prefix of the batcher.")(f)
    return click.option("--redis-url", envvar="REDIS_URL", default=None, help=URL_HELP)(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def processor_options(f: F) -> F:
    """Options of the commands that act on one processor found in the registry."""
    f = json_option(connection_options(f))
    return click.option("--processor", "-p", required=True, help="Processor name.")(f)


def make_batcher(url: str | None, prefix: str, cluster: bool) -> Batcher:
    return Batcher(url or default_url(), prefix=prefix, cluster=cluster)


def remote(url: str | None, prefix: str, cluster: bool, name: str) -> Processor:
    """The registered processor ``name`` (a bad name is a usage error, exit status 2)."""
    try:
        return make_batcher(url, prefix, cluster).remote(name)
    except BatcherError as exc:
        raise click.BadParameter(str(exc), param_hint="--processor") from exc


def registry(batcher: Batcher) -> dict[str, ProcessorConfig]:
    """The registered processors; each unreadable registry entry is reported on stderr (one
    line) and skipped."""
    found = overview.registry(batcher)
    for line in found.skipped():
        click.echo(line, err=True)
    return found.configs
