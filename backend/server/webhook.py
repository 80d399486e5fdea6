"""POST /webhook: Label Studio's project events become label-mirror updates and queued trainings.

Answers in milliseconds: nothing here trains or talks to Label Studio. Label Studio does not retry
webhooks, so whenever the mirror may have missed something it is marked stale and the next
training resynchronises it from Label Studio's API.
"""

from __future__ import annotations

import logging
import threading

from flask import Blueprint, Flask, current_app, jsonify
from redis.exceptions import RedisError

from backend.common.errors import BadRequest
from backend.labelstudio.label_mirror import LabelStore
from backend.loop.predictor import project_id
from backend.server.contract import json_body
from backend.server.current import services


webhook = Blueprint("webhook", __name__)
log = logging.getLogger(__name__)

TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING")
OTHER_EVENTS = ("ANNOTATIONS_CREATED", "TASKS_CREATED", "TASKS_DELETED", "PROJECT_CREATED", "PROJECT_UPDATED",
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
    if action not in TRAINING_EVENTS:
        return jsonify(status="ignored", action=action)
    project = _project_of(body)
    try:
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
    """Mirror the event into the label store and ask for a training; returns the scheduler's outcome."""
    labels = hub.labels
    config = body["project"].get("label_config") if isinstance(body.get("project"), dict) else None
    if isinstance(config, str) and config and hub.projects.remember(project, config):
        labels.mark_stale(project)
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        annotation, task = body.get("annotation"), body.get("task")
        if not isinstance(annotation, dict):
            raise BadRequest(f"{action} needs an 'annotation' object.")
        labels.put(project, annotation, task if isinstance(task, dict) else {})
    elif action == "ANNOTATIONS_DELETED":
        labels.delete(project, _annotation_ids(body))
    else:  # START_TRAINING: Label Studio is asking for a fresh look at everything
        labels.mark_stale(project)
    return hub.scheduler.request(project, reason=action)


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


def _annotation_ids(body: dict) -> list[int]:
    annotations = body.get("annotations")
    if not isinstance(annotations, list):
        raise BadRequest("ANNOTATIONS_DELETED needs an 'annotations' list of {id}.")
    ids = [item.get("id") if isinstance(item, dict) else item for item in annotations]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BadRequest("ANNOTATIONS_DELETED 'annotations' must hold integer ids.")
    return ids
