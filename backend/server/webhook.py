"""POST /webhook: Label Studio's project events become hints for the label mirror and queued trainings.

Answers in milliseconds: nothing here trains or talks to Label Studio. A webhook is a *hint* of what
changed (its body could be forged, and Label Studio does not retry one that fails): it records
which tasks and annotations to confirm, and the training confirms them against Label Studio's API
(`backend.labelstudio.sync`). Only where this process has no LABEL_STUDIO_URL/API_KEY is the body
itself written as the label. Whenever the mirror may have missed something it is marked stale, and
the next training reads every annotated task again.

`TASKS_DELETED` and `PROJECT_DELETED` are hints too: a background job asks Label Studio before anything is dropped
(`worker.jobs.forget_deleted_tasks`, `forget_deleted_project`); without the API nothing is dropped.

What a forged webhook can cost, at most: for a project never set up (no /setup from Label Studio), nothing
(it is refused, counted, and no job is queued); for a known one, hints under `MAX_HINTS` and a training
that confirms them. A labeling config in the body is never stored: a different one is a hint, and the
training reads the project's config from Label Studio.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Blueprint, Flask, current_app, jsonify
from redis.exceptions import RedisError

from backend.common.errors import BadRequest
from backend.common.queues import enqueue_forget_project, enqueue_forget_tasks, enqueue_index
from backend.labelstudio.label_mirror import Expected, LabelStore, annotation_record
from backend.loop import project_data
from backend.loop.predictor import project_id
from backend.server.contract import json_body
from backend.server.current import services


webhook = Blueprint("webhook", __name__)
log = logging.getLogger(__name__)

TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
                   "START_TRAINING")
TASK_EVENTS = ("TASKS_CREATED", "TASKS_DELETED")
OTHER_EVENTS = (*TASK_EVENTS, "PROJECT_CREATED", "PROJECT_UPDATED",
                "PROJECT_DELETED", "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED")


@webhook.post("/webhook")
def receive():
    body = json_body()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("A webhook body needs an 'action' string, e.g. ANNOTATION_CREATED.")
    hub = services()
    # only known names become metric labels: arbitrary ones would grow the metrics hash without bound
    hub.metrics.add("headstart_webhook_events_total",
                    action=action if action in TRAINING_EVENTS + OTHER_EVENTS else "other")
    if action not in TRAINING_EVENTS + TASK_EVENTS + ("PROJECT_DELETED",):
        return jsonify(status="ignored", action=action)
    project = _project_of(body)
    try:
        if hub.projects.label_config(project) is None:
            # never set up: Label Studio calls /setup before it creates the webhook, so this is not Label Studio
            hub.metrics.add("headstart_webhook_refused_total", reason="unknown_project")
            return jsonify(status="ignored: unknown project", action=action, project=project, message=(
                f"Project {project} was never set up: connect the backend in Label Studio (Settings → Model), "
                "which calls /setup, before its webhooks count."))
        if action == "PROJECT_DELETED":
            outcome = _record_project_deleted(hub, project)
        elif action in TASK_EVENTS:
            outcome = _record_tasks(hub, body, action, project)
        else:
            outcome = _record(hub, body, action, project)
    except RedisError as exc:
        missed_events(current_app).note(project)
        log.error("project %s: %s not recorded, Redis is unreachable: %s", project, action, exc)
        return jsonify(error="StoreUnavailable", message=(
            f"Redis is unreachable ({type(exc).__name__}), so this {action} was not recorded. Label Studio "
            f"does not resend webhooks: once Redis is back, project {project}'s next training resynchronises "
            "every label from Label Studio's API.")), 503
    return jsonify(status=outcome, action=action, project=project)


def _record(hub, body: dict, action: str, project: str) -> str:
    """Leave hints (and, without the API, the labels) in the mirror and ask for a training; returns the
    scheduler's outcome, or `unchanged` for a repeated delivery of an event already confirmed."""
    labels = hub.labels
    config = body["project"].get("label_config") if isinstance(body.get("project"), dict) else None
    writes = not hub.can_reach_label_studio  # without the API, the webhook's word is all there is
    config_changed = isinstance(config, str) and bool(config) and config != hub.projects.label_config(project)
    if config_changed and writes:
        hub.projects.remember(project, config)  # the next training reads everything (and trains heads for it)
    elif config_changed:  # never stored from a body: the training asks Label Studio for the project's config
        labels.add_hints(project, config=True)
    # whether the mirror can tell a repeated delivery: it holds what was confirmed (or, without the API, written)
    repeated = not config_changed and (writes or not labels.needs_sync(project))
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        annotation, task = body.get("annotation"), body.get("task")
        if not isinstance(annotation, dict):
            raise BadRequest(f"{action} needs an 'annotation' object.")
        record = annotation_record(annotation, task if isinstance(task, dict) else {})
        if repeated and labels.is_confirmed(project, annotation["id"], record):
            return "unchanged"
        labels.add_hints(project, tasks=[record["task"]], expected=_expected([(annotation, record)]))
        if writes:
            labels.put(project, annotation, task if isinstance(task, dict) else {})
    elif action == "ANNOTATIONS_CREATED":  # in bulk (e.g. the Data Manager's "predictions to annotations")
        pairs = _created_in_bulk(body)
        records = [(a, annotation_record(a, t)) for a, t in pairs]
        labels.add_hints(project, tasks=[record["task"] for _, record in records], expected=_expected(records))
        if writes:
            for annotation, task in pairs:
                labels.put(project, annotation, task)
    elif action == "ANNOTATIONS_DELETED":
        ids = _annotation_ids(body)
        if repeated and not labels.knows_any(project, ids) and not labels.hints_pending(project):
            return "unchanged"
        labels.add_hints(project, annotations=ids)
        if writes:
            labels.delete(project, ids)
    else:  # START_TRAINING: look for changes no webhook announced
        labels.add_hints(project, check=True)
    return hub.scheduler.request(project, reason=action)


def _record_tasks(hub, body: dict, action: str, project: str) -> str:
    """Tasks created: read back by id from Label Studio, indexed and embedded in the background (never taken
    from the body). Tasks deleted: their labels confirmed at the next training, and a background job drops from the
    task index those Label Studio no longer lists (never on the body's word: without the API, the index stays)."""
    ids = _task_ids(body)
    if action == "TASKS_DELETED":
        hub.labels.add_hints(project, tasks=ids)
        indexed = sorted(hub.tasks.data(project, ids)) if hub.can_reach_label_studio else []
        if indexed:  # ids the index does not hold cost nothing more
            enqueue_forget_tasks(hub.redis, hub.settings, project, indexed)
            return "queued"
        return "recorded"
    if not hub.can_reach_label_studio or not ids:
        return "ignored: needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
    enqueue_index(hub.redis, hub.settings, project, ids)
    return "queued"


def _record_project_deleted(hub, project: str) -> str:
    """A hint: with the API, a background job drops the project's data once Label Studio answers 404 for it;
    without, nothing is dropped on a webhook's word (`headstart forget PROJECT` does it by hand)."""
    if hub.can_reach_label_studio:
        if project_data.check_pending(hub.redis, project, within_s=hub.settings.job_timeout_s):
            return "coalesced"  # repeated deliveries share one check
        project_data.record_hint(hub.redis, project, state="queued", message="confirming with Label Studio")
        enqueue_forget_project(hub.redis, hub.settings, project)
        return "queued"
    message = (f"nothing dropped: without LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY headstart cannot confirm it; "
               f"if project {project} is really gone, `headstart forget {project}` drops its data")
    project_data.record_hint(hub.redis, project, state="unconfirmed", message=message)
    log.warning("project %s: PROJECT_DELETED received; %s", project, message)
    return "recorded: " + message


def _expected(records: list[tuple[dict, dict]]) -> list[Expected]:
    """The announced annotations the next training should find in Label Studio (cancelled ones never count)."""
    now = time.time()
    return [Expected(annotation["id"], record["task"], 0, record["updated_at"], now) for annotation, record in records
            if isinstance(annotation.get("id"), int) and isinstance(record.get("task"), int) and not record["cancelled"]]


def _task_ids(body: dict) -> list[int]:
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequest(f"{body.get('action')} needs a 'tasks' list of {{id}}.")
    ids = [item.get("id") if isinstance(item, dict) else item for item in tasks]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


class MissedEvents:
    """Projects whose webhook events this process could not record because Redis was unreachable.

    Label Studio does not retry webhooks. On the first request after Redis answers again, each such
    project's label mirror is marked stale, so its next training resynchronises from Label Studio.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._projects: set[str] = set()

    def note(self, project: str) -> None:
        with self._lock:
            self._projects.add(project)

    def pending(self) -> set[str]:
        with self._lock:
            return set(self._projects)

    def flush(self, labels: LabelStore) -> None:
        for project in self.pending():
            try:
                labels.mark_stale(project)
            except RedisError:
                return  # still away; try again on the next request
            with self._lock:
                self._projects.discard(project)
            log.warning("project %s: webhook events were missed while Redis was away; its next training "
                        "resynchronises from Label Studio", project)


def missed_events(app: Flask) -> MissedEvents:
    return app.extensions.setdefault("headstart_missed_events", MissedEvents())


@webhook.before_app_request
def mark_missed_projects_stale():
    missed = current_app.extensions.get("headstart_missed_events")
    if missed is not None and missed.pending():
        missed.flush(services().labels)


def _project_of(body: dict) -> str:
    project = body.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    if project is None and isinstance(body.get("annotation"), dict):
        project = body["annotation"].get("project")
    if project is None:
        raise BadRequest("The webhook body names no project (expected project.id).")
    return project_id(project)


def _created_in_bulk(body: dict) -> list[tuple[dict, dict]]:
    """(annotation, its task) pairs of an ANNOTATIONS_CREATED body: lists under `annotation` and `task`."""
    annotations = body.get("annotation", body.get("annotations"))
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise BadRequest("ANNOTATIONS_CREATED needs an 'annotation' list of annotation objects.")
    tasks = body.get("task") if isinstance(body.get("task"), list) else []
    by_id = {task.get("id"): task for task in tasks if isinstance(task, dict)}
    return [(annotation, by_id.get(annotation["task"], {}) if isinstance(annotation.get("task"), int) else {})
            for annotation in annotations]


def _annotation_ids(body: dict) -> list[int]:
    annotations = body.get("annotations")
    if not isinstance(annotations, list):
        raise BadRequest("ANNOTATIONS_DELETED needs an 'annotations' list of {id}.")
    ids = [item.get("id") if isinstance(item, dict) else item for item in annotations]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BadRequest("ANNOTATIONS_DELETED 'annotations' must hold integer ids.")
    return ids
