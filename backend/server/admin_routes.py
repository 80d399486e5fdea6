"""/admin: the page, its login, and the JSON API (/admin/api/...) the page's buttons call.

A thin adapter: reads go through `backend.admin.views`, changes through `backend.admin.actions` (the
CLI calls the same functions). Access rules are in `backend.admin.auth` and backend/admin/README.md.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from flask import (Blueprint, Response, g, jsonify, redirect, render_template, request)

import backend.admin
from backend.admin import actions, views
from backend.admin.auth import (COOKIE, COOKIE_PATH, CSRF_HEADER, SESSION_TTL_S, FailedSignIns, bearer, csrf_token,
                                new_session, same_origin, session_ok, token_ok)
from backend.admin.chart import learning_curve
from backend.loop.audit_report import coverage_line
from backend.common.errors import BadRequest
from backend.server.current import services

ASSETS = Path(backend.admin.__file__).parent  # the page's templates and static files live with the admin package
admin = Blueprint("admin", __name__, url_prefix="/admin", template_folder=str(ASSETS / "templates"),
                  static_folder=str(ASSETS / "static"))

OPEN_ENDPOINTS = ("admin.login_form", "admin.login", "admin.static")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DISABLED_MESSAGE = ("The admin is off because no ADMIN_TOKEN is set. Set ADMIN_TOKEN to a long random string "
                    "(python -c 'import secrets; print(secrets.token_urlsafe(32))') in the backend's "
                    "environment and restart it; then sign in at /admin with that token.")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _is_api() -> bool:
    return request.path.startswith("/admin/api/")


def _refuse(status: int, error: str, message: str):
    if _is_api():
        return jsonify(error=error, message=message), status
    return Response(render_template("message.html", message=message), status=status, mimetype="text/html")


@admin.before_request
def guard():
    """Who may call this route, and for changes: from this site only."""
    token = services().settings.admin_token
    if not token:
        return _refuse(403, "AdminDisabled", DISABLED_MESSAGE)
    if request.endpoint in OPEN_ENDPOINTS:  # the sign-in checks its own Origin; static files are public code
        return None
    offered = bearer(request)
    session = request.cookies.get(COOKIE)
    if offered is not None:
        if (wait := _throttled()) is not None:
            return wait
        if not token_ok(token, offered):
            FailedSignIns(services().redis).failed(_client())
            return _refuse(401, "Unauthorized", "The Bearer token is not this backend's ADMIN_TOKEN.")
        g.admin_via = "bearer"
    elif session_ok(token, session):
        g.admin_via = "cookie"
        g.csrf = csrf_token(token, session)
    elif _is_api():
        return _refuse(401, "Unauthorized",
                       "Send ADMIN_TOKEN as 'Authorization: Bearer <token>', or sign in at /admin/login.")
    else:
        return redirect("/admin/login", code=303)
    if request.method in SAFE_METHODS:
        return None
    if not same_origin(request, required=g.admin_via == "cookie"):
        return _refuse(403, "Forbidden", "Cross-site request refused: its Origin is not this backend.")
    if g.admin_via == "cookie":
        offered_csrf = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token") or ""
        if not hmac.compare_digest(offered_csrf, g.csrf):
            return _refuse(403, "Forbidden", f"Missing or wrong CSRF token: send the page's token in {CSRF_HEADER}.")
    return None


@admin.after_request
def harden(response: Response) -> Response:
    for header, value in SECURITY_HEADERS.items():
        response.headers.setdefault(header, value)
    return response


@admin.get("/login")
def login_form():
    return render_template("login.html", error=None)


@admin.post("/login")
def login():
    if not same_origin(request, required=True):
        return _refuse(403, "Forbidden", "Cross-site sign-in refused: its Origin is not this backend.")
    token = services().settings.admin_token
    if (wait := _throttled()) is not None:
        return wait
    if not token_ok(token, request.form.get("token")):
        FailedSignIns(services().redis).failed(_client())
        return render_template("login.html", error="That is not this backend's ADMIN_TOKEN."), 401
    response = redirect("/admin", code=303)
    response.set_cookie(COOKIE, new_session(token), max_age=SESSION_TTL_S, path=COOKIE_PATH, httponly=True,
                        samesite="Strict", secure=request.is_secure)
    return response


def _client() -> str:
    return request.remote_addr or "unknown"


def _throttled():
    """A 429 while this client has had too many wrong tokens; None when it may try."""
    seconds = FailedSignIns(services().redis).blocked(_client())
    if not seconds:
        return None
    message = f"Too many wrong ADMIN_TOKENs from this address: try again in {seconds} s."
    if _is_api():
        response = jsonify(error="TooManyRequests", message=message)
        response.status_code = 429
    else:
        response = Response(render_template("message.html", message=message), status=429, mimetype="text/html")
    response.headers["Retry-After"] = str(seconds)
    return response


@admin.post("/logout")
def logout():
    response = redirect("/admin/login", code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=request.is_secure)
    return response


@admin.get("")
@admin.get("/")
def page():
    data = views.overview(services())
    curves = {(project["project"], control["control"]): learning_curve(
        control["versions"], title=f"project {project['project']} {control['control']}: accuracy vs labels")
        for project in data["projects"] for control in project["controls"]}
    return render_template("admin.html", data=data, curves=curves, csrf=g.get("csrf", ""),
                           coverage_line=coverage_line)


# --- JSON API: the same views and actions as the CLI ---------------------------------------------

@admin.get("/api/overview")
def api_overview():
    return jsonify(views.overview(services()))


@admin.get("/api/status")
def api_status():
    return jsonify(views.status(services()))


@admin.get("/api/workers")
def api_workers():
    return jsonify(workers=views.workers(services().redis))


@admin.get("/api/queues")
def api_queues():
    redis = services().redis
    return jsonify(queues=views.queues(redis), suspended=views.suspended(redis))


@admin.get("/api/jobs")
def api_jobs():
    return jsonify(jobs=views.jobs(services().redis))


@admin.get("/api/jobs/<job_id>")
def api_job(job_id: str):
    return jsonify(views.job(services().redis, job_id))


@admin.get("/api/projects")
def api_projects():
    return jsonify(projects=views.projects(services()))


@admin.get("/api/projects/<project>/models")
def api_models(project: str):
    """`?limit=` versions per control (default views.VERSIONS_SHOWN) numbered below `?before=` (a control's `older`)."""
    return jsonify(views.models(services(), project, limit=_count_arg("limit", views.VERSIONS_SHOWN),
                                before=_count_arg("before", None)))


def _count_arg(name: str, default: int | None) -> int | None:
    raw = request.args.get(name) or ""
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit() and 0 < int(raw) and len(raw) <= 12):
        raise BadRequest(f"'{name}' must be a positive integer, got {raw[:20]!r}.")
    return int(raw)


def _body() -> dict:
    body = request.get_json(silent=True)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    return body


def _control(body: dict) -> str | None:
    control = body.get("control")
    if control is not None and not isinstance(control, str):
        raise BadRequest("'control' must be a string (the name of a Choices control).")
    return control or None


@admin.post("/api/jobs/<job_id>/retry")
def api_retry(job_id: str):
    return jsonify(actions.retry_job(services().redis, job_id))


@admin.post("/api/jobs/retry-failed")
def api_retry_failed():
    return jsonify(actions.retry_failed(services().redis))


@admin.post("/api/jobs/<job_id>/cancel")
def api_cancel(job_id: str):
    return jsonify(actions.cancel_job(services().redis, job_id))


@admin.post("/api/projects/<project>/promote")
def api_promote(project: str):
    body = _body()
    version = body.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BadRequest('Send the version to promote as {"version": 3} (and "control" if the project has several).')
    return jsonify(actions.promote(services(), project, version, control=_control(body)))


@admin.post("/api/projects/<project>/rollback")
def api_rollback(project: str):
    return jsonify(actions.rollback(services(), project, control=_control(_body())))


@admin.post("/api/projects/<project>/train")
def api_train(project: str):
    return jsonify(actions.train(services(), project))


@admin.post("/api/projects/<project>/embed")
def api_embed(project: str):
    return jsonify(actions.embed(services(), project))


@admin.post("/api/workers/<name>/drain")
def api_drain(name: str):
    return jsonify(actions.drain_worker(services().redis, name))


@admin.post("/api/queues/suspend")
def api_suspend():
    return jsonify(actions.suspend_queues(services().redis))


@admin.post("/api/queues/resume")
def api_resume():
    return jsonify(actions.resume_queues(services().redis))
