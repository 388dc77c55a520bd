"""``redis-batcher dashboard``: the web dashboard of a prefix (:mod:`redis_batcher.dashboard_app`)."""

from __future__ import annotations

import logging
import sys

import click

from . import asyncio as aio
from .batcher import Batcher
from .cli_common import TARGET, connection_options, exit_on_error, make_batcher
from .cli_worker import load_target
from .dashboard_app import REFRESH, SAMPLE_INTERVAL, create_app, serve
from .dashboard_auth import TOKEN_ENVVAR, is_loopback
from .dashboard_web import require

TOKEN_HELP = (
    f"Access token (default: ${TOKEN_ENVVAR}): with it the pages need a login and the actions "
    "(flush, pause, replay, purge, job control) are on; without it the dashboard is read-only."
)


class Refused(click.ClickException):
    """A setting the dashboard refuses: one line, exit status 2 (bad usage)."""

    exit_code = 2


def _batcher(app: str | None, redis_url: str | None, prefix: str, cluster: bool) -> Batcher:
    """The sync batcher the dashboard reads: the app's (its processors' codecs decode the item
    previews), rebound to --redis-url when given; else the connection options'."""
    if app is None:
        return make_batcher(redis_url, prefix, cluster)
    found, _ = load_target(app)
    batcher: Batcher = found.definitions if isinstance(found, aio.Batcher) else found
    url = redis_url or (found.url if isinstance(found, aio.Batcher) else None)
    if isinstance(found, aio.Batcher) and url is None:
        raise Refused(f"{app} is an asyncio batcher made from a client: give --redis-url")
    if url is not None:
        with exit_on_error("--redis-url"):
            batcher.connect(url, cluster=cluster or found.is_cluster)
    click.get_current_context().meta[TARGET] = batcher.target
    return batcher


@click.command()
@click.argument("app", required=False)
@connection_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--token", envvar=TOKEN_ENVVAR, default=None, help=TOKEN_HELP)
@click.option(
    "--sample-interval",
    type=click.FloatRange(min=0.1),
    default=SAMPLE_INTERVAL,
    show_default=True,
    help="Seconds between samples of the worker registry for the flushes/s chart.",
)
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.5),
    default=REFRESH,
    show_default=True,
    help="Seconds between refreshes of a page's live part.",
)
def dashboard(
    app: str | None,
    redis_url: str | None,
    prefix: str,
    cluster: bool,
    host: str,
    port: int,
    token: str | None,
    sample_interval: float,
    refresh: float,
) -> None:
    """Serve the web dashboard of a prefix on http://HOST:PORT (APP: ``module:batcher``, whose
    codecs decode the item previews; without it, --redis-url and --prefix).

    Read-only unless --token is given. Binding an address other than loopback needs a token.
    Needs ``pip install 'redis-batcher[dashboard]'``.
    """
    if token is not None and not token.strip():
        raise Refused("--token is empty")
    if token is None and not is_loopback(host):
        raise Refused(
            f"refusing to serve {host} without an access token: give --token (or ${TOKEN_ENVVAR}), "
            "or bind 127.0.0.1"
        )
    with exit_on_error():
        require()
    batcher = _batcher(app, redis_url, prefix, cluster)
    with exit_on_error():
        web = create_app(batcher, token, sample_interval=sample_interval, refresh=refresh)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    mode = "actions need the token" if token else "read-only"
    click.echo(
        f"redis-batcher dashboard of prefix {batcher.prefix!r} at {batcher.target} "
        f"on http://{host}:{port} ({mode})",
        err=True,
    )
    sys.stderr.flush()
    serve(web, host, port)


COMMANDS: tuple[click.Command, ...] = (dashboard,)
