"""Label Studio's ML backend routes: /health, /setup, /predict, /versions, /metrics."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, jsonify, request
from redis.exceptions import RedisError

from backend.common.queue_state import scrape_gauges
from backend.common.queues import enqueue_index, enqueue_webhook_auth
from backend.common.errors import BadRequest
from backend.labelstudio.webhooks import WebhookAuth, credentials_tag
from backend.loop.features import FetchPlan
from backend.loop.predictor import project_id
from backend.loop.repredict import PredictionLedger
from backend.server.current import services

contract = Blueprint("contract", __name__)
log = logging.getLogger(__name__)

MODEL_CLASS = "headstart"
VERSIONS_PAGE = 100  # /versions names per page by default
VERSIONS_MAX_PAGE = 1000


def json_body() -> dict:
    """The request's JSON object, or a 400 that says what was wrong."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise BadRequest("The JSON body nests too deeply; Label Studio never sends such bodies.") from None
    if body is None:
        raise BadRequest("The body must be JSON (Content-Type: application/json), as Label Studio sends.")
    if not isinstance(body, dict):
        raise BadRequest(f"The body must be a JSON object, got {type(body).__name__}.")
    return body


@contract.get("/")
@contract.get("/health")
def health():
    """Label Studio gives this 1 s. `status` stays UP while predictions can still be served."""
    try:
        services().redis.ping()
        redis_state = "ok"
    except RedisError:
        redis_state = "unreachable"
    if redis_state == "ok":
        return jsonify(status="UP", model_class=MODEL_CLASS, redis=redis_state, health="ok")
    return jsonify(status="UP", model_class=MODEL_CLASS, redis=redis_state, health="degraded",
                   reason="Redis is unreachable: predictions come from the heads this process holds; "
                          "webhooks answer 503 and trainings wait until Redis is back.")


@contract.post("/setup")
def setup():
    body = json_body()
    project = project_id(body.get("project"))
    schema = body.get("schema")
    if not isinstance(schema, str):
        raise BadRequest("'schema' (the labeling config XML) is missing from /setup.")
    hub = services()
    hub.predictor.check_zero_shot(schema)  # a predicted_values naming no ImageNet class: 400 with the fix
    served = hub.predictor.served(project, schema)
    try:
        if hub.projects.remember(project, schema) and hub.can_reach_label_studio:
            # first contact or a new config: list and embed the project's tasks in the background now,
            # so re-predicting after the first promotion is a pass over cached features
            enqueue_index(hub.redis, hub.settings, project)
        _secure_webhook(hub, project)
    except RedisError as exc:  # Label Studio calls /setup before every predict: keep answering
        log.warning("project %s: labeling config not recorded, Redis is unreachable: %s", project, exc)
    return jsonify(model_version=served.model_version)


def _secure_webhook(hub, project: str) -> None:
    """With basic auth on, Label Studio's webhooks must carry it too (it creates them without): queue giving the
    project's webhook the header, at most one attempt at a time. This /setup passed basic auth, so its Host is
    the URL Label Studio calls this backend by, and the webhook to change is the one pointing there."""
    settings = hub.settings
    if not (settings.basic_auth_user or settings.basic_auth_pass) or not hub.can_reach_label_studio:
        return
    if WebhookAuth(hub.redis).needs_attempt(project, credentials_tag(settings.basic_auth_user, settings.basic_auth_pass)):
        enqueue_webhook_auth(hub.redis, settings, project, request.host_url)


@contract.post("/predict")
def predict():
    started = time.perf_counter()
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise BadRequest("'tasks' must be a list of task objects.")
    hub = services()
    project = project_id(body.get("project") if body.get("project") is not None else _first_project(tasks))
    label_config = body.get("label_config") or hub.projects.label_config(project)
    if not isinstance(label_config, str):
        raise BadRequest("'label_config' is missing and this project has not been set up yet.")
    after_answer: list = []  # the new embeddings' cache writes and the counters: once the answer is on its way
    results = hub.predictor.predict(tasks, project=project, label_config=label_config,
                                    plan=FetchPlan.for_request(hub.settings, after_answer=after_answer))
    results = _answer_or_leave(hub, project, tasks, results)
    response = jsonify(results=results)
    elapsed = time.perf_counter() - started
    after_answer.append(lambda: hub.metrics.record(
        {"headstart_predict_requests_total": 1, "headstart_predictions_total": len(tasks)},
        {"headstart_predict_seconds": elapsed}))
    response.call_on_close(lambda: _run_after_answer(project, after_answer))
    return response


def _run_after_answer(project: str, work: list) -> None:
    """What /predict left for after its answer (each part fails alone, logged: the answer is already sent)."""
    for part in work:
        try:
            part()
        except Exception:
            log.exception("project %s: bookkeeping after /predict's answer failed", project)


def _answer_or_leave(hub, project: str, tasks: list[dict], results: list[dict]) -> list:
    """Record the answered tasks in the prediction ledger (Label Studio saves each answer as a prediction of its
    model_version: the worker must not write another), except tasks a re-prediction pass is writing right now or
    has just written: those are answered with no prediction (an empty list: Label Studio saves nothing for them),
    or Label Studio would hold two. While Redis is unreachable the answers go out unrecorded (at worst a task gets
    the version twice)."""
    answered: dict[str, list[int]] = {}
    for task, result in zip(tasks, results):
        identifier = _task_id(task)
        if result["result"] and identifier is not None:
            answered.setdefault(result["model_version"], []).append(identifier)
    try:
        held = {version: PredictionLedger(hub.redis).answer(project, version, ids) for version, ids in answered.items()}
    except RedisError as exc:
        log.warning("project %s: answered predictions not recorded, Redis is unreachable: %s", project, exc)
        return results
    return [[] if result["result"] and _task_id(task) in held.get(result["model_version"], ()) else result
            for task, result in zip(tasks, results)]


def _task_id(task: dict) -> int | None:
    """The task's id when it is one Label Studio could have sent (an integer), else None: a list or an object there
    is bad input, answered like a task without an id."""
    identifier = task.get("id")
    return identifier if isinstance(identifier, int) and not isinstance(identifier, bool) else None


def _first_project(tasks: list[dict]):
    return tasks[0].get("project") if tasks else None


@contract.get("/versions")
def versions():
    """Promoted versions' names, newest first, a page at a time: `?limit=` (default `VERSIONS_PAGE`, at most
    `VERSIONS_MAX_PAGE`) and `?before=N` (the `next` of the previous page; None on the last). Label Studio reads
    only `versions`. A page never splits the versions of one number across controls, so it can hold a few more."""
    hub = services()
    requested = request.args.get("project")
    limit = _count_arg("limit", VERSIONS_PAGE, maximum=VERSIONS_MAX_PAGE)
    before = _count_arg("before", None)
    projects = [project_id(requested)] if requested else hub.projects.all()
    entries, more = [], False
    for project in projects:
        for control in hub.store.controls(project):
            page, cursor = hub.store.versions_page(project, control, limit=limit, before=before, statuses=("promoted",))
            entries += [(meta["version"], f"{control}-v{meta['version']}") for meta in page]
            more = more or cursor is not None
    entries.sort(key=lambda entry: -entry[0])
    if len(entries) > limit:
        boundary = entries[limit - 1][0]
        more = more or any(number < boundary for number, _ in entries)
        entries = [entry for entry in entries if entry[0] >= boundary]
    cursor = entries[-1][0] if more and entries else None
    return jsonify(versions=[name for _, name in entries], next=cursor)


def _count_arg(name: str, default: int | None, *, maximum: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1 or len(raw) > 12:
        raise BadRequest(f"'{name}' must be a positive integer, got {raw[:20]!r}.")
    return min(int(raw), maximum) if maximum is not None else int(raw)


@contract.get("/metrics")
def metrics():
    """Counters from Redis (shared by every gunicorn and RQ worker) plus queue and worker gauges measured now."""
    hub = services()
    return Response(hub.metrics.render(scrape_gauges(hub.redis)), mimetype="text/plain; version=0.0.4")
