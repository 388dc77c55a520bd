"""What the web dashboard's pages and actions share (Starlette, Jinja2): the dashboard's state
on the app, the access check of a request, rendering a page or only its live part (the small
script's refresh asks for that part with the ``X-Dashboard-Partial`` header), and the error page
of a Redis or library error (the one line the CLI would print)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from redis.exceptions import RedisError

from .batcher import Batcher
from .cli_common import error_line
from .dashboard_auth import SESSION_COOKIE, Access
from .dashboard_rates import RateHistory
from .errors import BatcherError, ConfigError, UnknownIterator, UnknownProcessor

try:
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import RedirectResponse, Response
    from starlette.templating import Jinja2Templates

    INSTALLED = True
except ImportError:  # the optional extra is not installed: see require()
    INSTALLED = False

MISSING = "the dashboard needs starlette, uvicorn and jinja2: pip install 'redis-batcher[dashboard]'"
ASSETS = Path(__file__).resolve().parent / "dashboard_assets"
PARTIAL_HEADER = "x-dashboard-partial"

log = logging.getLogger("redis_batcher.dashboard")


def require() -> None:
    """Raise :class:`ConfigError` naming the extra when Starlette, uvicorn or Jinja2 is missing."""
    if not INSTALLED:
        raise ConfigError(MISSING)


@dataclass
class Dashboard:
    """A dashboard's state: the batcher it reads, its access rule, the sampled rates, its
    templates and how often the pages refresh their live parts (seconds)."""

    batcher: Batcher
    access: Access
    rates: RateHistory
    templates: Jinja2Templates
    refresh: float


def fmt_time(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def since(value: datetime | None) -> str:
    """How long ago ``value`` was, as :func:`fmt_age`."""
    if value is None:
        return "-"
    return fmt_age(max((datetime.now(timezone.utc) - value).total_seconds(), 0.0))


def url(path: str, **params: Any) -> str:
    """``path`` (which may hold a query) with ``params`` (those that are not None) added to its
    query."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    if not query:
        return path
    return f"{path}{'&' if '?' in path else '?'}{query}"


def templates() -> Jinja2Templates:
    found = Jinja2Templates(directory=str(ASSETS / "templates"))
    found.env.filters.update(time=fmt_time, age=fmt_age, since=since)
    found.env.globals.update(url=url)
    return found


def state(request: Request) -> Dashboard:
    found: Dashboard = request.app.state.dashboard
    return found


def session_of(request: Request) -> str | None:
    return state(request).access.session(request.cookies.get(SESSION_COOKIE))


def signed_in(request: Request) -> bool:
    """Whether the request may act: a token is set and it has a session or the bearer token."""
    access = state(request).access
    if access.read_only:
        return False
    return session_of(request) is not None or access.bearer(request.headers.get("authorization"))


def safe_next(value: str | None) -> str:
    """Where to go back to after an action or a login: a path of this site, never another's."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    return value


def here(request: Request) -> str:
    """This page's path and query without the message of a previous action."""
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "msg"]
    return request.url.path + (f"?{urlencode(params)}" if params else "")


def login_redirect(request: Request) -> Response | None:
    """With a token, the pages need a session: a redirect to the login form, else None."""
    if state(request).access.read_only or signed_in(request):
        return None
    return RedirectResponse(url("/login", next=here(request)), status_code=303)


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """``template`` with ``context`` and what every page shows; only the page's live part when
    the refresh script asks for it."""
    dash = state(request)
    session = session_of(request)
    common = {
        "partial": request.headers.get(PARTIAL_HEADER) == "1",
        "can_act": signed_in(request),
        "read_only": dash.access.read_only,
        "session": session is not None,
        "csrf": dash.access.csrf(session) if session else "",
        "here": here(request),
        "msg": request.query_params.get("msg"),
        "refresh_ms": int(dash.refresh * 1000),
        "prefix": dash.batcher.prefix,
        "target": dash.batcher.target,
    }
    return dash.templates.TemplateResponse(request, template, {**common, **context}, status_code=status_code)


async def page(request: Request, template: str, read: Callable[[Dashboard], dict[str, Any]]) -> Response:
    """A page: the login check, then ``read`` (the Redis reads, in a worker thread) rendered."""
    redirect = login_redirect(request)
    if redirect is not None:
        return redirect
    dash = state(request)
    context = await run_in_threadpool(read, dash)
    return render(request, template, context)


def error_status(exc: BaseException) -> int:
    if isinstance(exc, (UnknownProcessor, UnknownIterator, LookupError)):
        return 404
    if isinstance(exc, RedisError) or not isinstance(exc, BatcherError):
        return 503
    return 400


async def on_error(request: Request, exc: Exception) -> Response:
    """A Redis or library error on a page: its one line, in the page frame."""
    line = error_line(exc, state(request).batcher.target) or str(exc)
    log.warning("%s %s: %s", request.method, here(request), line)
    return render(request, "error.html", {"title": "error", "error": line}, error_status(exc))
