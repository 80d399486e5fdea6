"""/admin and /admin/api: ADMIN_TOKEN, sign-in cookie, CSRF and Origin checks, basic auth, the page itself."""

from __future__ import annotations

import re

import pytest

from backend.admin.auth import COOKIE, new_session, session_ok
from backend.server.app import create_app
from backend.loop.services import build_services
from tests.admin_support import (TOKEN, admin_settings, annotate, client, labeled_images, services,  # noqa: F401
                                 train_rounds)
from tests.helpers import CONFIG_2
from tests.loop_helpers import run_burst_worker

pytestmark = pytest.mark.security

ORIGIN = {"Origin": "http://localhost"}  # the Flask test client's host
EVIL = {"Origin": "http://evil.example"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def signed_in(client) -> str:
    """Sign in through the form; returns the page's CSRF token."""
    response = client.post("/admin/login", data={"token": TOKEN}, headers=ORIGIN)
    assert response.status_code == 303 and response.headers["Location"] == "/admin"
    page = client.get("/admin").get_data(as_text=True)
    return re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page).group(1)


def test_without_admin_token_every_admin_route_is_refused_with_the_fix(settings, redis, services):
    client = create_app(settings, services=build_services(settings, redis, encoders=services.encoders)).test_client()
    for path in ("/admin", "/admin/login", "/admin/api/overview"):
        response = client.get(path, headers=BEARER)
        assert response.status_code == 403
        assert "Set ADMIN_TOKEN to a long random string" in response.get_data(as_text=True)
    assert client.post("/admin/api/queues/suspend", headers=BEARER).status_code == 403
    assert client.post("/admin/login", data={"token": ""}, headers=ORIGIN).status_code == 403


def test_bearer_token_reads_the_api_and_a_wrong_one_is_refused(client):
    assert client.get("/admin/api/overview").status_code == 401
    assert client.get("/admin/api/overview", headers={"Authorization": "Bearer nope"}).status_code == 401
    response = client.get("/admin/api/overview", headers=BEARER)
    assert response.status_code == 200 and response.json["workers"] == [] and len(response.json["queues"]) == 2
    assert client.get("/admin").status_code == 303  # the page sends browsers to the sign-in form


def test_sign_in_sets_a_strict_http_only_cookie_and_refuses_a_wrong_token(client):
    assert client.post("/admin/login", data={"token": "guess"}, headers=ORIGIN).status_code == 401
    assert client.post("/admin/login", data={"token": TOKEN}, headers=EVIL).status_code == 403
    assert client.post("/admin/login", data={"token": TOKEN}).status_code == 403  # no Origin, no Referer
    response = client.post("/admin/login", data={"token": TOKEN}, headers=ORIGIN)
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/admin" in cookie and TOKEN not in cookie
    page = client.get("/admin")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"


def test_wrong_tokens_are_rate_limited_per_client(client, redis):
    from backend.admin.auth import FAILURE_WINDOW_S, MAX_FAILURES
    for _ in range(MAX_FAILURES):
        assert client.post("/admin/login", data={"token": "guess"}, headers=ORIGIN).status_code == 401
    refused = client.post("/admin/login", data={"token": TOKEN}, headers=ORIGIN)  # even the right one, for now
    assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= FAILURE_WINDOW_S
    api = client.get("/admin/api/overview", headers=BEARER)  # Bearer guesses count against the same client
    assert api.status_code == 429 and api.json["error"] == "TooManyRequests"
    other = client.get("/admin/api/overview", headers=BEARER, environ_base={"REMOTE_ADDR": "10.0.0.7"})
    assert other.status_code == 200  # another client is not locked out
    for _ in range(MAX_FAILURES):
        client.get("/admin/api/overview", headers={"Authorization": "Bearer nope"},
                   environ_base={"REMOTE_ADDR": "10.0.0.8"})
    assert client.get("/admin/api/overview", headers=BEARER, environ_base={"REMOTE_ADDR": "10.0.0.8"}).status_code == 429
    redis.delete(*redis.keys("headstart:admin-failures:*"))  # the window ends
    assert client.post("/admin/login", data={"token": TOKEN}, headers=ORIGIN).status_code == 303


def test_a_session_expires_and_dies_with_the_token():
    value = new_session(TOKEN, now=1000)
    assert session_ok(TOKEN, value, now=1000 + 60)
    assert not session_ok(TOKEN, value, now=1000 + 13 * 3600)
    assert not session_ok("another-token", value, now=1060)
    assert not session_ok(TOKEN, value.replace(".", ".0"), now=1060)


def test_cookie_posts_need_the_csrf_token_and_this_origin(client, redis):
    csrf = signed_in(client)
    url = "/admin/api/queues/suspend"
    assert client.post(url, headers=ORIGIN).status_code == 403  # no CSRF token
    assert client.post(url, headers={**ORIGIN, "X-CSRF-Token": "0" * 64}).status_code == 403
    assert client.post(url, headers={**EVIL, "X-CSRF-Token": csrf}).status_code == 403
    assert client.post(url, headers={"X-CSRF-Token": csrf}).status_code == 403  # neither Origin nor Referer
    assert not redis.exists("rq:suspended")
    assert client.post(url, headers={**ORIGIN, "X-CSRF-Token": csrf}).json == {"suspended": True}
    assert client.post("/admin/api/queues/resume", headers={"Referer": "http://localhost/admin",
                                                            "X-CSRF-Token": csrf}).json == {"suspended": False}


def test_bearer_posts_need_no_csrf_but_a_foreign_origin_is_refused(client):
    assert client.post("/admin/api/queues/suspend", headers=BEARER).json == {"suspended": True}
    assert client.post("/admin/api/queues/resume", headers={**BEARER, **EVIL}).status_code == 403


def test_admin_has_its_own_token_when_basic_auth_guards_label_studio_routes(admin_settings, redis, services):
    guarded = admin_settings.replace(basic_auth_user="ls", basic_auth_pass="secret")
    client = create_app(guarded, services=build_services(guarded, redis, encoders=services.encoders)).test_client()
    assert client.post("/setup", json={"project": "1", "schema": CONFIG_2}).status_code == 401
    assert client.get("/admin/api/overview", headers=BEARER).status_code == 200
    assert client.get("/admin/api/overview", auth=("ls", "secret")).status_code == 401  # basic auth is not the admin


def test_the_page_says_whether_label_studio_routes_are_open_and_whether_webhooks_carry_the_credentials(
        admin_settings, redis, services):
    from backend.labelstudio.webhooks import WebhookAuth

    open_page = create_app(admin_settings, services=services).test_client()
    overview = open_page.get("/admin/api/overview", headers=BEARER).json["access"]
    assert overview["basic_auth"] is False and "BASIC_AUTH_USER" in overview["message"]
    guarded = admin_settings.replace(basic_auth_user="ls", basic_auth_pass="secret")
    guarded_services = build_services(guarded, redis, encoders=services.encoders)
    guarded_services.projects.remember("4", CONFIG_2)
    guarded_services.projects.remember("5", CONFIG_2)
    WebhookAuth(redis).record("4", "tag", {"state": "failed", "message": "Label Studio refused: 403, give the key "
                                                                         "project admin rights"})
    client = create_app(guarded, services=guarded_services).test_client()
    access = client.get("/admin/api/overview", headers=BEARER).json["access"]
    states = {hook["project"]: (hook["state"], hook["message"]) for hook in access["webhooks"]}
    assert access["basic_auth"] is True
    assert states["4"] == ("failed", "Label Studio refused: 403, give the key project admin rights")
    assert states["5"][0] == "not tried yet"
    page = client.get("/admin", headers=BEARER).get_data(as_text=True)
    assert 'data-webhook-project="4"' in page and "give the key project admin rights" in page


def test_api_errors_name_what_is_missing(client):
    assert client.get("/admin/api/projects/4/models", headers=BEARER).json["error"] == "NotFound"
    assert client.post("/admin/api/jobs/abc/retry", headers=BEARER).status_code == 404
    response = client.post("/admin/api/projects/4/promote", headers=BEARER, json={"version": "3"})
    assert response.status_code == 400 and "version" in response.json["message"]


def test_the_page_shows_versions_with_a_learning_curve_and_escapes_job_errors(client, admin_settings, redis, services):
    train_rounds(client, admin_settings, redis, services, 7, [2, 6])
    from backend.common.queues import TrainingScheduler
    # trainings of projects without a labeling config fail (their webhooks are refused, so asked for directly)
    for project in ("8", "9"):
        TrainingScheduler(redis, admin_settings).request(project, reason="START_TRAINING")
    TrainingScheduler(redis, admin_settings).request("<script>alert(1)</script>", reason="hostile")
    run_burst_worker(admin_settings, redis, services)
    signed_in(client)
    page = client.get("/admin").get_data(as_text=True)

    project = page[page.index('data-project="7"'):]
    assert re.search(r'<svg class="curve"[^>]*>.*</svg>', project, re.S)
    assert project.count('class="point"') == 2 and 'data-version="2"' in project
    assert "label-v2" in project and "current" in project
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('data-status="failed"') == 3 and "retry</button>" in page
