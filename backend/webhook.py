"""POST /webhook: Label Studio's project events become label-mirror updates and queued trainings.

Answers in milliseconds: nothing here trains or talks to Label Studio. Label Studio does not retry
webhooks, so whenever the mirror may have missed something it is marked stale and the next
training resynchronises it from Label Studio's API.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from backend.errors import BadRequest
from backend.label_store import LabelStore
from backend.predictor import project_id
from backend.routes import json_body
from worker.queueing import TrainingScheduler

webhook = Blueprint("webhook", __name__)

TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING")


@webhook.post("/webhook")
def receive():
    body = json_body()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("A webhook body needs an 'action' string, e.g. ANNOTATION_CREATED.")
    hub = current_app.extensions["headstart"]
    hub.metrics.add("headstart_webhook_events_total", action=action)
    if action not in TRAINING_EVENTS:
        return jsonify(status="ignored", action=action)
    project = _project_of(body)
    labels = LabelStore(hub.redis)
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
    outcome = TrainingScheduler(hub.redis, hub.settings).request(project, reason=action)
    return jsonify(status=outcome, action=action, project=project)


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
