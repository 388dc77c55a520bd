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
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console, RenderableType
from rich.table import Table

from . import overview
from .batcher import Batcher, default_url
from .errors import BatcherError, NotSentError, OutcomeUnknownError, UnknownProcessor
from .executor_core import redacted_url
from .keys import validate_name
from .models import ProcessorConfig
from .processor import Processor

F = TypeVar("F", bound=Callable[..., Any])
# Piped output (CI, log files, grep) must not be cut at rich's default of 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
# --redis-url's environment variables, first found wins: the library's own name, then the usual one
URL_ENVVARS = ("REDIS_BATCHER_URL", "REDIS_URL")
URL_HELP = "Redis URL (default: $REDIS_BATCHER_URL, then $REDIS_URL, then redis://127.0.0.1:6379/0)."
# ctx.meta key: the Redis server a command talks to (password hidden), named in its error line
TARGET = "redis_batcher.target"


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
    return click.option("--redis-url", envvar=URL_ENVVARS, default=None, help=URL_HELP)(f)


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
    message and exit status 1 (with ``param_hint``: as a bad value of that parameter, status 2).
    A Redis failure (unreachable, a refused login or command, out of memory) is no bad value:
    it goes on to the ``main`` group, which reports it with the server's address."""
    try:
        yield
    except BatcherError as exc:
        if isinstance(exc, RedisError):
            raise
        if param_hint is None:
            raise click.ClickException(str(exc)) from exc
        raise click.BadParameter(str(exc), param_hint=param_hint) from exc


def error_line(exc: BaseException, target: str | None) -> str | None:
    """The one line the CLI prints for an error an operator can fix: Redis unreachable, a
    refused login or command, out of memory, or any error of the library (``target``: the
    server, named in the line). None for anything else: a bug, shown with its traceback."""
    at = f" at {target}" if target else ""
    # the library's connection errors wrap redis-py's, whose text says what happened
    wrapped = isinstance(exc, (NotSentError, OutcomeUnknownError)) and exc.__cause__ is not None
    cause = exc.__cause__ if wrapped else exc
    if isinstance(exc, AuthenticationError):
        return f"Redis refused the login{at}: {exc}"
    if isinstance(exc, NoPermissionError):
        return f"permission denied by Redis{at}: {exc}"
    if isinstance(exc, OutOfMemoryError):
        return f"Redis is out of memory{at}: {exc}"
    if isinstance(exc, OutcomeUnknownError):
        return f"lost the connection to Redis{at} (the command may have run): {cause}"
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, RedisClusterException)):
        return f"cannot reach Redis{at}: {cause}"
    if isinstance(exc, BatcherError):
        return str(exc)
    if isinstance(exc, RedisError):
        return f"Redis error{at}: {exc}"
    return None


# an operator's command waits this long for an unreachable Redis (a failover's blip) before it
# says so; the library's default (10 s) suits producers, not someone at a prompt
CONNECT_RETRY = 3.0


def make_batcher(
    url: str | None, prefix: str, cluster: bool, connect_retry: float = CONNECT_RETRY
) -> Batcher:
    """The batcher of the connection options (a bad ``--prefix`` or ``--redis-url`` is a usage
    error, exit status 2); the command's error line names its server."""
    with exit_on_error("--prefix"):
        validate_name("prefix", prefix)
    url = url or default_url()
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[TARGET] = redacted_url(url)
    with exit_on_error("--redis-url"):
        return Batcher(url, prefix=prefix, cluster=cluster, connect_retry=connect_retry)


def remote(url: str | None, prefix: str, cluster: bool, name: str) -> Processor:
    """The registered processor ``name`` (a name not registered under the prefix is a usage
    error, exit status 2)."""
    batcher = make_batcher(url, prefix, cluster)
    try:
        return batcher.remote(name)
    except UnknownProcessor as exc:
        raise click.BadParameter(f"{exc} at {batcher.target}", param_hint="--processor") from exc


def registry(batcher: Batcher) -> dict[str, ProcessorConfig]:
    """The registered processors; each unreadable registry entry is reported on stderr (one
    line) and skipped. An empty registry ends the command with exit status 1: producers and
    workers register their processors, so none means the wrong server, db or prefix (or
    nothing has run yet)."""
    found = overview.registry(batcher)
    skipped = found.skipped()
    for line in skipped:
        click.echo(line, err=True)
    if not found.configs and not skipped:
        raise click.ClickException(
            f"no processors registered under prefix {batcher.prefix!r} at {batcher.target}"
        )
    return found.configs
