"""The web dashboard as an ASGI app (Starlette, pages rendered by Jinja2, served by uvicorn):
``redis-batcher dashboard`` runs :func:`serve`; an application can mount :func:`create_app`
in its own ASGI server. Needs ``pip install 'redis-batcher[dashboard]'``. See docs/dashboard.md.

While it runs, the app samples the worker registry every ``sample_interval`` seconds (two
commands) for the flushes/s and failures/s charts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from redis.exceptions import RedisError

from .batcher import Batcher
from .dashboard_actions import action, login, logout
from .dashboard_auth import Access
from .dashboard_pages import (
    batch_page,
    dead_letter_page,
    dead_page,
    jobs_page,
    login_page,
    overview_page,
    processor_page,
    workers_page,
)
from .dashboard_rates import RateHistory
from .dashboard_web import ASSETS, Dashboard, log, on_error, require, templates
from .errors import BatcherError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError:  # the optional extra: dashboard_web.require() says so
    pass

SAMPLE_INTERVAL = 5.0
REFRESH = 5.0


async def sample(dash: Dashboard, interval: float) -> None:
    """Record the workers' rates every ``interval`` seconds until cancelled; a failed read
    is logged and tried again at the next one."""
    while True:
        try:
            found = await run_in_threadpool(dash.batcher.workers)
            dash.rates.record(found, time.time())
        except (RedisError, BatcherError) as exc:
            log.warning("sampling the worker registry failed: %s", exc)
        await asyncio.sleep(interval)


def create_app(
    batcher: Batcher,
    token: str | None = None,
    *,
    sample_interval: float | None = SAMPLE_INTERVAL,
    refresh: float = REFRESH,
) -> Starlette:
    """The dashboard of ``batcher``'s prefix: read-only without ``token``; with it, the pages
    need a login (or ``Authorization: Bearer <token>``) and the actions are on.
    ``sample_interval``: seconds between samples of the worker registry for the rate charts
    (None: no sampling); ``refresh``: seconds between refreshes of a page's live part."""
    require()
    dash = Dashboard(batcher, Access(token), RateHistory(), templates(), refresh)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = None if sample_interval is None else asyncio.create_task(sample(dash, sample_interval))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    routes = [
        Route("/", overview_page),
        Route("/processor", processor_page),
        Route("/batch", batch_page),
        Route("/dead", dead_page),
        Route("/dead/show", dead_letter_page),
        Route("/jobs", jobs_page),
        Route("/workers", workers_page),
        Route("/login", login_page),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/action/{op}", action, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(ASSETS / "static")), name="static"),
    ]
    handlers = {RedisError: on_error, BatcherError: on_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.dashboard = dash
    return app


def serve(app: Starlette, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="info")
