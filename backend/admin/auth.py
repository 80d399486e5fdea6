"""Who may use /admin: ADMIN_TOKEN as a Bearer header, or a session cookie from the login form.

The session cookie is stateless (issue time + HMAC under ADMIN_TOKEN), so every gunicorn worker
accepts it and changing ADMIN_TOKEN ends every session. Cookie-authenticated POSTs also need the
CSRF token (an HMAC of the session, put in the page) in an X-CSRF-Token header, and an Origin (or
Referer) naming this host. Bearer-authenticated calls need no CSRF token: a browser never adds
that header to a cross-site request.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit

from flask import Request
from redis import Redis

from backend.common import redis_keys

COOKIE = "headstart_admin"
COOKIE_PATH = "/admin"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600
MAX_FAILURES = 10  # wrong ADMIN_TOKENs (sign-in form or Bearer) per client and window, then 429 until it ends
FAILURE_WINDOW_S = 60


def _sign(token: str, message: str) -> str:
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def new_session(token: str, *, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    return f"{issued}.{_sign(token, f'session:{issued}')}"


def session_ok(token: str, value: str | None, *, now: float | None = None) -> bool:
    """True for a cookie this ADMIN_TOKEN issued less than SESSION_TTL_S ago."""
    issued, _, signature = (value or "").partition(".")
    if not issued.isdigit() or not signature:
        return False
    age = (time.time() if now is None else now) - int(issued)
    return 0 <= age < SESSION_TTL_S and hmac.compare_digest(signature, _sign(token, f"session:{issued}"))


def csrf_token(token: str, session: str) -> str:
    return _sign(token, f"csrf:{session}")


def token_ok(token: str, offered: str | None) -> bool:
    return bool(token) and hmac.compare_digest((offered or "").encode(), token.encode())


def bearer(request: Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def same_origin(request: Request, *, required: bool) -> bool:
    """Whether the request's Origin (else Referer) names this host. Absent: `not required`.

    Only the host is compared, not the scheme, so a TLS-terminating proxy in front still works;
    a page on any other site has another host.
    """
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source or source == "null":
        return not required and source is None
    return urlsplit(source).netloc.lower() == request.host.lower()


class FailedSignIns:
    """Wrong ADMIN_TOKENs per client address, counted in Redis so every gunicorn worker shares the count: after
    MAX_FAILURES in FAILURE_WINDOW_S, that client is refused (429) until the window ends, right token or not."""

    def __init__(self, redis: Redis):
        self.redis = redis

    def blocked(self, client: str) -> int:
        """Seconds until `client` may try again; 0 when it may now."""
        key = redis_keys.admin_failures(client)
        count = self.redis.get(key)
        if count is None or int(count) < MAX_FAILURES:
            return 0
        return max(1, int(self.redis.ttl(key)))

    def failed(self, client: str) -> None:
        key = redis_keys.admin_failures(client)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, FAILURE_WINDOW_S, nx=True)
        pipe.execute()
