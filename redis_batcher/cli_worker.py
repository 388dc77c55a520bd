"""``redis-batcher worker``: the worker daemon for the processors and iterator jobs of an app."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler

from . import asyncio as aio
from .batcher import Batcher
from .cli_common import TARGET, F, exit_on_error
from .cli_workers import Lifecycle, lifecycle_options
from .errors import BatcherError
from .logs import JsonFormatter
from .metrics import require as require_metrics
from .metrics import serve as serve_metrics
from .processor import Processor
from .worker import Worker

LOG_LEVEL = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
LOG_FORMAT = click.Choice(["text", "json"])
LOG_FORMAT_HELP = "text: for people (rich on a terminal); json: one JSON object per line, for log shippers."
ITERATOR_HELP = "Only run jobs of these iterators (repeatable). With -p or -i, only what is named is served."
IDLE_HELP = "Longest sleep between delay-queue checks when no wake-up arrives."
GRACE_HELP = "On SIGTERM, how long in-flight handlers may finish before their leases are released."
URL_HELP = (
    "Serve this Redis instead of the one the app's batcher connects to "
    "(default: $REDIS_BATCHER_URL; $REDIS_URL does not override the app)."
)
METRICS_HELP = "Serve Prometheus metrics on this port at /metrics (needs redis-batcher[metrics])."
METRICS_HOST_HELP = "Address the metrics server listens on (0.0.0.0: every interface)."
PREFETCH_HELP = (
    "Claim up to concurrency x this many flushes (above 1: ahead of free handler slots; "
    "if the worker dies, each claimed flush is charged a death)."
)


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


def _bounded(
    name: str, kind: click.FloatRange | click.IntRange, default: float, help_text: str
) -> Callable[[F], F]:
    """An option taking a bounded number, with its default shown."""
    return click.option(name, type=kind, default=default, show_default=True, help=help_text)


def _log_to_stderr(level: str, log_format: str = "text") -> None:
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # one greppable line per record in log files
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


@click.command()
@click.argument("app")
@click.option("--redis-url", envvar="REDIS_BATCHER_URL", default=None, help=URL_HELP)
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--burst", is_flag=True, help="Deliver what is due now, then exit.")
@click.option("--processor", "-p", "names", multiple=True, help="Only serve these processors (repeatable).")
@click.option("--iterator", "-i", "iterator_names", multiple=True, help=ITERATOR_HELP)
@_bounded("--max-idle-wait", click.FloatRange(min=0.01), 5.0, IDLE_HELP)
@_bounded("--grace-period", click.FloatRange(min=0), 30.0, GRACE_HELP)
@_bounded("--prefetch-multiplier", click.IntRange(min=1), 1, PREFETCH_HELP)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help=METRICS_HELP)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help=METRICS_HOST_HELP)
@lifecycle_options
@click.option("--log-level", default="INFO", show_default=True, type=LOG_LEVEL)
@click.option("--log-format", type=LOG_FORMAT, default="text", show_default=True, help=LOG_FORMAT_HELP)
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
    metrics_port: int | None,
    metrics_host: str,
    log_level: str,
    log_format: str,
    lifecycle: Lifecycle,
) -> None:
    """Run a worker for the processors and iterator jobs of APP (``module:batcher`` or
    ``module:processor``). With --processor or --iterator it serves only what they name.

    SIGTERM/SIGINT: stop claiming, finish in-flight flushes, exit 0. A second signal exits at once.
    """
    _log_to_stderr(log_level, log_format)
    if metrics_port is not None:
        require_metrics()  # before anything starts: the extra may be missing
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
        with exit_on_error("--redis-url"):
            batcher.connect(redis_url, cluster=batcher.is_cluster)
    click.get_current_context().meta[TARGET] = batcher.target
    options: dict[str, Any] = {
        "concurrency": concurrency,
        "processors": selected,
        "iterators": iterators,
        "max_idle_wait": max_idle_wait,
        "grace_period": grace_period,
        "prefetch_multiplier": prefetch_multiplier,
    }
    options.update(lifecycle.worker_options())
    if lifecycle.check:
        lifecycle.run_check(batcher, selected or sorted(batcher.processors))
    if metrics_port is not None:
        options["observer"] = serve_metrics(batcher, metrics_port, metrics_host)
    try:
        w: Any = (
            aio.Worker(batcher, **options) if isinstance(batcher, aio.Batcher) else Worker(batcher, **options)
        )
    except BatcherError as exc:
        raise click.UsageError(str(exc)) from exc
    # an evicting policy, a layout mismatch or (--burst) an unreachable Redis ends run(): the
    # main group prints it as one line, exit status 1
    if isinstance(w, aio.Worker):
        asyncio.run(w.run(burst=burst))
        if w.forced:
            sys.exit(1)
    else:
        w.run(burst=burst)


COMMANDS: tuple[click.Command, ...] = (worker,)
