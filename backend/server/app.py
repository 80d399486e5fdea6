"""The Flask app factory: Label Studio's ML backend contract over headstart's services."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from backend.server.basic_auth import basic_auth_ok
from backend.core.torch_runtime import keep_forward_buffers, set_torch_threads
from backend.common.errors import HeadstartError
from backend.common.redis_conn import connect
from backend.server.admin_routes import admin
from backend.server.contract import contract
from backend.server import current
from backend.loop.services import Services, build_services
from backend.common.settings import Settings
from backend.server.webhook import webhook

log = logging.getLogger(__name__)

OPEN_ROUTES = ("/health",)


def create_app(settings: Settings | None = None, *, redis: Redis | None = None,
               services: Services | None = None) -> Flask:
    """Build the app. Without arguments, reads the environment (the gunicorn entry point)."""
    settings = settings or Settings.from_env()
    if services is None:
        set_torch_threads(settings.torch_threads)
        keep_forward_buffers()
        services = build_services(settings, redis if redis is not None else connect(settings.redis_url))
    warn_about_webhook_auth(settings)
    app = Flask("headstart")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # larger bodies get a 413
    current.install(app, services)
    app.register_blueprint(contract)
    app.register_blueprint(webhook)
    app.register_blueprint(admin)  # /admin has its own ADMIN_TOKEN, so basic auth does not apply there

    @app.before_request
    def require_basic_auth():
        if request.path in OPEN_ROUTES or request.blueprint == "admin":
            return None
        if not basic_auth_ok(request, settings.basic_auth_user, settings.basic_auth_pass):
            if request.path == "/webhook":
                services.metrics.add("headstart_webhook_refused_total", reason="unauthenticated")
            response = jsonify(error="Unauthorized", message="This backend requires HTTP basic auth: "
                               "set the same user and password in Label Studio's model settings.")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="headstart"'
            return response
        return None

    @app.errorhandler(HeadstartError)
    def headstart_error(exc: HeadstartError):
        log.warning("%s %s: %s", request.method, request.path, exc)
        return jsonify(error=type(exc).__name__, message=str(exc)), exc.http_status

    @app.errorhandler(RedisError)
    def redis_error(exc: RedisError):
        log.error("%s %s: Redis unavailable: %s", request.method, request.path, exc)
        return jsonify(error="StoreUnavailable", message=f"Redis is unreachable ({type(exc).__name__}: "
                       f"{exc}); headstart keeps serving what it holds and retries when Redis is back."), 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=exc.name, message=exc.description), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error="InternalError", message="headstart hit an unexpected error; the "
                       "backend log has the details."), 500

    return app


def warn_about_webhook_auth(settings: Settings) -> None:
    """Basic auth without Label Studio's API: headstart cannot give the project's webhook the credentials, so
    Label Studio's annotation webhooks will be refused and submits will not train. Say how to fix it."""
    if (settings.basic_auth_user or settings.basic_auth_pass) and not (
            settings.label_studio_url and settings.label_studio_api_key):
        log.warning("BASIC_AUTH_USER/PASS are set but LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY are not: Label Studio "
                    "creates the project's webhook without credentials, so its annotation webhooks get 401 and "
                    "submits do not train. Set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (headstart then adds the "
                    "header to the webhook itself), or add the header `Authorization: Basic <base64 of "
                    "user:password>` to the project's webhook in Label Studio (Project → Settings → Webhooks).")
