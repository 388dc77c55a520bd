"""The web dashboard's actions (POST): log in and out, flush a batch id now, pause and resume a
processor, replay and purge dead letters, pause, resume and cancel iterator jobs. Refused (403)
on a read-only dashboard, without a session or the bearer token, and without the session's
CSRF token; each one done or refused writes an audit line to the ``redis_batcher.dashboard``
log, then the browser goes back to the page it came from with the outcome."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl

from .batcher import Batcher
from .cli_common import error_line
from .dashboard_auth import SESSION_COOKIE
from .dashboard_reads import job_action
from .dashboard_web import log, render, safe_next, session_of, state, url
from .errors import BatcherError, ConfigError
from .overview import replay_dead_letters

try:
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, RedirectResponse, Response
except ImportError:  # the optional extra: dashboard_web.require() says so
    pass

# a form is a few short fields: a larger body is no form of these pages
MAX_FORM_BYTES = 16 * 1024

Form = dict[str, str]


async def _form(request: Request) -> Form:
    """The url-encoded form of ``request`` (the pages post nothing else)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ConfigError("form too large")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _field(form: Form, name: str) -> str:
    value = form.get(name, "")
    if not value:
        raise ConfigError(f"the action needs the field {name!r}")
    return value


def _flush(batcher: Batcher, form: Form) -> str:
    proc = batcher.remote(_field(form, "processor"))
    result = proc.flush(_field(form, "batch_id"))
    if not result.flushed:
        return f"nothing flushed: {result.reason}"
    return f"flushed {result.batch_id}::{result.sequence} ({result.item_count} items)"


def _pause(batcher: Batcher, form: Form) -> str:
    proc = batcher.remote(_field(form, "processor"))
    return f"paused {proc.name}" if proc.pause() else f"{proc.name} was paused already"


def _resume(batcher: Batcher, form: Form) -> str:
    proc = batcher.remote(_field(form, "processor"))
    return f"resumed {proc.name}" if proc.resume() else f"{proc.name} was not paused"


def _replay(batcher: Batcher, form: Form) -> str:
    proc = batcher.remote(_field(form, "processor"))
    done = [
        f"{dead_id} as sequence {seq}" for dead_id, seq in replay_dead_letters(proc, [_field(form, "id")])
    ]
    return "replayed " + ", ".join(done)


def _purge(batcher: Batcher, form: Form) -> str:
    proc = batcher.remote(_field(form, "processor"))
    dead_id = form.get("id") or None
    if dead_id is None and form.get("all") != "1":
        raise ConfigError("purge needs a dead letter id or all=1")
    return f"purged {proc.purge_dead(dead_id)} dead letter(s) of {proc.name}"


def _job(batcher: Batcher, form: Form) -> str:
    st = job_action(batcher, _field(form, "iterator"), _field(form, "job_id"), _field(form, "op"))
    return f"job {st.job_id} of {st.iterator}: {st.status}"


ACTIONS: dict[str, Callable[[Batcher, Form], str]] = {
    "flush": _flush,
    "pause": _pause,
    "resume": _resume,
    "replay": _replay,
    "purge": _purge,
    "job": _job,
}


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _refused(request: Request, op: str, why: str) -> Response:
    log.warning("refused action %s from %s: %s", op, _client(request), why)
    return PlainTextResponse(f"refused: {why}\n", status_code=403)


def _allowed(request: Request, form: Form) -> str | None:
    """Why ``request`` may not act (None: it may)."""
    access = state(request).access
    if access.read_only:
        return "the dashboard is read-only (start it with --token to allow actions)"
    if access.bearer(request.headers.get("authorization")):
        return None
    session = session_of(request)
    if session is None:
        return "not logged in"
    if not access.csrf_matches(session, form.get("csrf")):
        return "missing or wrong CSRF token"
    return None


async def action(request: Request) -> Response:
    """POST /action/{op}: one action, audited, then back to the form's ``next`` page."""
    op = request.path_params["op"]
    form = await _form(request)
    why = _allowed(request, form)
    if why is not None:
        return _refused(request, op, why)
    if op not in ACTIONS:
        return PlainTextResponse(f"unknown action {op!r}\n", status_code=404)
    fields = {k: v for k, v in sorted(form.items()) if k not in ("csrf", "next")}
    dash = state(request)
    try:
        outcome = await run_in_threadpool(ACTIONS[op], dash.batcher, form)
        log.info("action %s %s from %s: %s", op, fields, _client(request), outcome)
    except BatcherError as exc:
        outcome = "failed: " + (error_line(exc, dash.batcher.target) or str(exc))
        log.warning("action %s %s from %s %s", op, fields, _client(request), outcome)
    return RedirectResponse(url(safe_next(form.get("next")), msg=outcome), status_code=303)


async def login(request: Request) -> Response:
    """POST /login: the token gives a session cookie."""
    dash = state(request)
    form = await _form(request)
    target = safe_next(form.get("next"))
    if dash.access.read_only:
        return RedirectResponse(target, status_code=303)
    if not dash.access.token_matches(form.get("token")):
        log.warning("failed login from %s", _client(request))
        return render(
            request, "login.html", {"title": "log in", "next": target, "failed": True, "live": False}, 403
        )
    log.info("login from %s", _client(request))
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        dash.access.new_session(),
        httponly=True,
        samesite="strict",
        secure=request.url.is_secure,
    )
    return response


async def logout(request: Request) -> Response:
    """POST /logout (with the session's CSRF token)."""
    form = await _form(request)
    why = _allowed(request, form)
    if why is not None:
        return _refused(request, "logout", why)
    log.info("logout from %s", _client(request))
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
