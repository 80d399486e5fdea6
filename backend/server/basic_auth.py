"""HTTP basic auth for the Label Studio routes (BASIC_AUTH_USER / BASIC_AUTH_PASS)."""

from __future__ import annotations

import hmac

from flask import Request


def basic_auth_ok(request: Request, user: str, password: str) -> bool:
    """True when no credentials are configured, or the request carries the right ones."""
    if not user and not password:
        return True
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest((auth.username or "").encode(), user.encode())
    pass_ok = hmac.compare_digest((auth.password or "").encode(), password.encode())
    return user_ok and pass_ok
