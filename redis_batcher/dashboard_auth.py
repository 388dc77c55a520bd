"""Who may act on the web dashboard: without an access token it is read-only; with one, the
pages need a session (a signed cookie set by the login form) or the token as an
``Authorization: Bearer`` header, and every action is a POST carrying the session's CSRF token
(a bearer header is no ambient credential a foreign page could make the browser send, so it
needs none). Sessions are signed with a key drawn when the dashboard starts: a restart logs
everyone out."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets

from .errors import ConfigError

SESSION_COOKIE = "rb_dashboard"
TOKEN_ENVVAR = "REDIS_BATCHER_DASHBOARD_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class Access:
    """The dashboard's access rule for ``token`` (None: read-only for everyone)."""

    def __init__(self, token: str | None) -> None:
        if token is not None and not token.strip():
            raise ConfigError("the dashboard's access token is empty")
        self.token = token
        secret = secrets.token_bytes(32) + (token or "").encode()
        self.key = hashlib.sha256(secret).digest()

    @property
    def read_only(self) -> bool:
        return self.token is None

    def _sign(self, what: str) -> str:
        return hmac.new(self.key, what.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str | None) -> bool:
        """Whether ``given`` is the access token (compared in constant time)."""
        if self.token is None or given is None:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def bearer(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token."""
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(given.strip())

    def new_session(self) -> str:
        """A session cookie's value, after a login with the right token."""
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._sign('session:' + nonce)}"

    def session(self, cookie: str | None) -> str | None:
        """The session id of a valid session cookie, else None."""
        if self.token is None or not cookie:
            return None
        nonce, _, signature = cookie.partition(".")
        if nonce and hmac.compare_digest(signature, self._sign("session:" + nonce)):
            return nonce
        return None

    def csrf(self, session: str) -> str:
        """The CSRF token of a session: what its forms carry."""
        return self._sign("csrf:" + session)

    def csrf_matches(self, session: str, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given, self.csrf(session))
