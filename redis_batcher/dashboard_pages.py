"""The web dashboard's pages (GET): overview, processor, batch id, dead letters, iterator jobs,
workers and the login form. Each reads through :mod:`redis_batcher.dashboard_reads` in a worker
thread and renders a template; its query names what it shows (processor, batch id, SSCAN
cursor), never a path segment, so any name or id passes."""

from __future__ import annotations

from typing import Any

from .dashboard_rates import sparkline
from .dashboard_reads import (
    batch_view,
    dead_letter_items,
    dead_letters,
    ids_page,
    jobs,
    processor_backlog,
    read_overview,
)
from .dashboard_web import Dashboard, page, render, safe_next, state
from .errors import ConfigError
from .job_model import STATUSES

try:
    from starlette.requests import Request
    from starlette.responses import RedirectResponse, Response
except ImportError:  # the optional extra: dashboard_web.require() says so
    pass


def _int(request: Request, name: str) -> int:
    raw = request.query_params.get(name) or "0"
    if not raw.isdigit():
        raise ConfigError(f"{name} must be a whole number, got {raw!r}")
    return int(raw)


def _required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise ConfigError(f"the page needs ?{name}=")
    return value


async def overview_page(request: Request) -> Response:
    def read(dash: Dashboard) -> dict[str, Any]:
        data = read_overview(dash.batcher)
        rates = dash.rates.latest()
        charts = {row.name: sparkline(dash.rates.series(row.name)) for row in data.processors}
        return {
            "title": "overview",
            "data": data,
            "charts": charts,
            "total_chart": sparkline(dash.rates.series()),
            "rates": rates,
        }

    return await page(request, "overview.html", read)


async def processor_page(request: Request) -> Response:
    name = _required(request, "name")
    partition, cursor = _int(request, "part"), _int(request, "cursor")

    def read(dash: Dashboard) -> dict[str, Any]:
        proc = dash.batcher.remote(name)
        backlog = processor_backlog(proc)
        return {
            "title": name,
            "proc": proc,
            "backlog": backlog,
            "ids": ids_page(proc, partition, cursor),
            "chart": sparkline(dash.rates.series(name)),
        }

    return await page(request, "processor.html", read)


async def batch_page(request: Request) -> Response:
    name, batch_id = _required(request, "processor"), _required(request, "id")

    def read(dash: Dashboard) -> dict[str, Any]:
        proc = dash.batcher.remote(name)
        return {"title": f"{name} / {batch_id}", "proc": proc, "view": batch_view(proc, batch_id)}

    return await page(request, "batch.html", read)


async def dead_page(request: Request) -> Response:
    name = request.query_params.get("processor") or None

    def read(dash: Dashboard) -> dict[str, Any]:
        letters = dead_letters(dash.batcher, None if name is None else [name])
        return {"title": "dead letters", "letters": letters, "processor": name}

    return await page(request, "dead.html", read)


async def dead_letter_page(request: Request) -> Response:
    name, dead_id = _required(request, "processor"), _required(request, "id")

    def read(dash: Dashboard) -> dict[str, Any]:
        proc = dash.batcher.remote(name)
        letter = proc.dead_letter(dead_id)
        return {
            "title": f"dead letter {dead_id}",
            "letter": letter,
            "items": dead_letter_items(proc, letter),
        }

    return await page(request, "dead_letter.html", read)


async def jobs_page(request: Request) -> Response:
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUSES:
        raise ConfigError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")

    def read(dash: Dashboard) -> dict[str, Any]:
        return {
            "title": "iterator jobs",
            "jobs": jobs(dash.batcher, status),
            "status": status,
            "statuses": STATUSES,
        }

    return await page(request, "jobs.html", read)


async def workers_page(request: Request) -> Response:
    def read(dash: Dashboard) -> dict[str, Any]:
        return {
            "title": "workers",
            "workers": dash.batcher.workers(),
            "rates": dash.rates.latest(),
            "chart": sparkline(dash.rates.series(), width=320, height=60),
        }

    return await page(request, "workers.html", read)


async def login_page(request: Request) -> Response:
    dash = state(request)
    target = safe_next(request.query_params.get("next"))
    if dash.access.read_only:
        return RedirectResponse(target, status_code=303)
    return render(request, "login.html", {"title": "log in", "next": target, "failed": False, "live": False})
