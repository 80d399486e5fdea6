"""A small local stand-in for Label Studio's REST API, serving the shapes a real 1.23.2 answers.

Used only where running the real Label Studio would make a unit test take a minute; tests/e2e
drives the same code paths against a real Label Studio. Loopback only.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import jwt
from flask import Flask, abort, jsonify, redirect, request
from werkzeug.serving import make_server

from tests.helpers import BackgroundServer

SECRET = "fake-label-studio-signing-key-for-tests"
DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # label_studio/data_manager/managers.py: Datetime filter values


def now() -> str:
    """A timestamp as Label Studio's serializers write one."""
    return datetime.now(timezone.utc).strftime(DATETIME_FORMAT)


def personal_access_token(user_id: int = 1) -> str:
    """A JWT refresh token shaped like Label Studio's personal access tokens."""
    now = int(time.time())
    return jwt.encode({"token_type": "refresh", "exp": now + 3600, "iat": now, "jti": "pat", "user_id": user_id},
                      SECRET, algorithm="HS256")


@dataclass
class FakeLabelStudio:
    label_config: str
    tasks: list[dict] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    legacy_token: str = "0123456789abcdef0123456789abcdef01234567"
    pat: str = field(default_factory=personal_access_token)
    imported_predictions: list[dict] = field(default_factory=list)
    predictions: dict[int, dict] = field(default_factory=dict)  # id → one made by POST /api/predictions/
    refreshes: int = 0
    media_auth: list[str] = field(default_factory=list)
    api_requests: list[str] = field(default_factory=list)  # "GET /api/tasks/" per API call (not media, not tokens)
    fail_api_with: int | None = None  # answer every API call with this status (Label Studio down)
    # changes made right after the next N task reads: a save Label Studio commits after its webhook went out
    commit_after_reads: list[tuple[int, Callable[[], object]]] = field(default_factory=list)
    stored_predictions: list[dict] = field(default_factory=list)  # predictions Label Studio held before (Redis loss)
    webhooks: list[dict] = field(default_factory=list)  # webhooks/models.py Webhook, as its serializer lists it
    webhook_changes_refused: bool = False  # PATCH /api/webhooks/{id}/ answers 403 (a user without the permission)
    deleted_projects: set[int] = field(default_factory=set)  # GET /api/projects/{id}/ answers 404

    def add_ml_webhook(self, project: int, backend_url: str) -> dict:
        """The webhook Label Studio creates when an ML backend is connected (ml/models.py create_ml_webhook)."""
        hook = {"id": len(self.webhooks) + 1, "organization": 1, "project": project,
                "url": backend_url.rstrip("/") + "/webhook", "send_payload": True, "send_for_all_actions": True,
                "headers": {}, "is_active": True, "actions": [], "created_at": now(), "updated_at": now()}
        self.webhooks.append(hook)
        return hook

    # changing labels the way Label Studio does: each write moves the task's updated_at

    def task(self, task_id: int) -> dict:
        return next(task for task in self.tasks if task["id"] == task_id)

    def annotate(self, task_id: int, annotation_id: int, choice: str, *, cancelled: bool = False) -> dict:
        stamp = now()
        annotation = {"id": annotation_id, "task": task_id, "was_cancelled": cancelled, "ground_truth": False,
                      "created_at": stamp, "updated_at": stamp,
                      "result": [] if cancelled else [{"from_name": "label", "to_name": "image", "type": "choices",
                                                       "value": {"choices": [choice]}}]}
        task = self.task(task_id)
        task["annotations"].append(annotation)
        task["updated_at"] = now()
        return annotation

    def change(self, annotation_id: int, choice: str) -> dict:
        for task in self.tasks:
            for annotation in task["annotations"]:
                if annotation["id"] == annotation_id:
                    annotation["result"][0]["value"]["choices"] = [choice]
                    annotation["updated_at"] = now()
                    task["updated_at"] = now()
                    return annotation
        raise KeyError(annotation_id)

    def delete_annotation(self, annotation_id: int) -> None:
        for task in self.tasks:
            if any(annotation["id"] == annotation_id for annotation in task["annotations"]):
                task["annotations"] = [a for a in task["annotations"] if a["id"] != annotation_id]
                task["updated_at"] = now()

    def delete_task(self, task_id: int) -> None:
        self.tasks = [task for task in self.tasks if task["id"] != task_id]

    def start(self) -> "FakeLabelStudio":
        self._background = BackgroundServer(make_server("127.0.0.1", 0, self._app(), threaded=True))
        self.url = self._background.url
        return self

    def stop(self) -> None:
        self._background.stop()

    def _authorized(self) -> bool:
        header = request.headers.get("Authorization", "")
        if header == f"Token {self.legacy_token}":
            return True
        if header.startswith("Bearer "):
            try:
                claims = jwt.decode(header[7:], SECRET, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                return False
            return claims.get("token_type") == "access"
        return False

    def _app(self) -> Flask:
        app = Flask("fake-label-studio")

        @app.before_request
        def check_auth():
            if request.path != "/api/token/refresh/" and not self._authorized():
                abort(401)
            if request.path.startswith("/api/") and request.path != "/api/token/refresh/":
                self.api_requests.append(f"{request.method} {request.path}")
                if self.fail_api_with is not None:
                    abort(self.fail_api_with)

        @app.post("/api/token/refresh/")
        def refresh():
            if request.json.get("refresh") != self.pat:
                abort(401)
            self.refreshes += 1
            access = jwt.encode({"token_type": "access", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
            return jsonify(access=access)

        @app.get("/api/projects/<int:project>/")
        def project(project):
            if project in self.deleted_projects:
                abort(404)  # projects/api.py ProjectAPI: get_object_or_404
            return jsonify(id=project, title="fake", label_config=self.label_config)

        @app.get("/api/tasks/")
        def tasks():
            # Label Studio 1.23.2's Data Manager task list (data_manager/api.py TaskListAPI): `only_annotated`
            # is ignored; `query` carries Data Manager filters, ordering and selectedItems.
            page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
            project = int(request.args["project"])
            query = json.loads(request.args.get("query") or "{}")
            selected = [self._stamped(t) for t in self.tasks if t.get("project", project) == project]
            selected = _select(_filter(selected, query.get("filters")), query.get("selectedItems"))
            selected = _order(selected, query.get("ordering") or [])
            if (page - 1) * size >= len(selected) and page > 1:
                abort(404)  # like Label Studio: past the last page
            chunk = [self._as_listed(t, all_fields=request.args.get("fields") == "all")
                     for t in selected[(page - 1) * size: page * size]]
            answer = jsonify(tasks=chunk, total=len(selected),
                             total_annotations=sum(_live(t) for t in selected), total_predictions=0)
            self._count_down_commits()
            return answer

        @app.get("/api/projects/<int:project>/model-versions/")
        def model_versions(project):
            # projects/models.py get_model_versions(with_counters=True): model_version → predictions of it
            counts: dict[str, int] = {}
            for prediction in self.imported_predictions + self.stored_predictions:
                counts[prediction["model_version"]] = counts.get(prediction["model_version"], 0) + 1
            return jsonify(counts)

        @app.get("/api/webhooks/")
        def webhooks():
            project = request.args.get("project")
            return jsonify([hook for hook in self.webhooks if project is None or str(hook["project"]) == project])

        @app.patch("/api/webhooks/<int:hook_id>/")
        def change_webhook(hook_id):
            if self.webhook_changes_refused:
                abort(403)
            hook = next((hook for hook in self.webhooks if hook["id"] == hook_id), None)
            if hook is None:
                abort(404)
            headers = request.json.get("headers", hook["headers"])
            # webhooks/models.py HEADERS_SCHEMA: at most 10 string headers with plain names
            if not isinstance(headers, dict) or len(headers) > 10 or not all(
                    isinstance(value, str) and re.fullmatch(r"[a-zA-Z0-9-_]+", name) for name, value in headers.items()):
                abort(400)
            hook.update(headers=headers, updated_at=now())
            return jsonify(hook)

        @app.post("/api/projects/<int:project>/import/predictions")
        def import_predictions(project):
            self.imported_predictions += request.json
            return jsonify(created=len(request.json)), 201

        @app.post("/api/predictions/")
        def create_prediction():
            prediction = {**request.json, "id": len(self.predictions) + 1 + max(self.predictions, default=0)}
            self.predictions[prediction["id"]] = prediction
            return jsonify(prediction), 201

        @app.delete("/api/predictions/<int:prediction>/")
        def delete_prediction(prediction):
            if self.predictions.pop(prediction, None) is None:
                return jsonify(detail="Not found."), 404
            return "", 204

        @app.get("/tasks/<int:task>/presign/")
        def presign(task):
            # Label Studio answers with a redirect to a short-lived signed URL of the cloud object.
            uri = base64.urlsafe_b64decode(request.args["fileuri"]).decode()
            return redirect(f"/storage-data/uploaded/?filepath={uri.split('://', 1)[1]}", code=303)

        @app.get("/storage-data/uploaded/")
        def uploaded():
            self.media_auth.append(request.headers.get("Authorization", "").split(" ")[0])
            data = self.files.get(request.args.get("filepath", ""))
            if data is None:
                abort(404)
            return data, 200, {"Content-Type": "image/jpeg"}

        return app

    def _count_down_commits(self) -> None:
        waiting = []
        for reads, commit in self.commit_after_reads:
            if reads <= 1:
                commit()
            else:
                waiting.append((reads - 1, commit))
        self.commit_after_reads = waiting

    @staticmethod
    def _stamped(task: dict) -> dict:
        """A task appended without `updated_at` counts as created now (Label Studio stamps every save)."""
        task.setdefault("updated_at", now())
        return task

    @staticmethod
    def _as_listed(task: dict, *, all_fields: bool) -> dict:
        listed = {**task, "total_annotations": _live(task),
                  "cancelled_annotations": sum(bool(a["was_cancelled"]) for a in task["annotations"])}
        if not all_fields:  # data_manager/serializers.py: annotations and predictions only with fields=all
            listed.pop("annotations", None)
            listed.pop("predictions", None)
        return listed


def _live(task: dict) -> int:
    """Task.total_annotations: annotations that are not cancelled."""
    return sum(not a["was_cancelled"] for a in task["annotations"])


FIELDS = {"id": lambda t: t["id"], "total_annotations": _live,
          "cancelled_annotations": lambda t: sum(bool(a["was_cancelled"]) for a in t["annotations"]),
          "updated_at": lambda t: t["updated_at"]}
OPERATORS = {"equal": lambda a, b: a == b, "not_equal": lambda a, b: a != b, "greater": lambda a, b: a > b,
             "less": lambda a, b: a < b, "greater_or_equal": lambda a, b: a >= b,
             "less_or_equal": lambda a, b: a <= b}


def _filter(tasks: list[dict], filters: dict | None) -> list[dict]:
    """The subset of data_manager/managers.py `apply_filters` headstart uses; anything else is refused."""
    if not filters:
        return tasks
    tests = []
    for item in filters["items"]:
        field_name = item["filter"].removeprefix("filter:tasks:")
        if field_name not in FIELDS or item["operator"] not in OPERATORS or item["type"] not in ("Number", "Datetime"):
            abort(400, f"the fake Label Studio does not implement the filter {item}")
        value = item["value"]
        if item["type"] == "Datetime":
            value = datetime.strptime(value, DATETIME_FORMAT).replace(tzinfo=timezone.utc)
        tests.append((field_name, OPERATORS[item["operator"]], value, item["type"]))

    def matches(task: dict, test) -> bool:
        field_name, operator, value, kind = test
        actual = FIELDS[field_name](task)
        if kind == "Datetime":
            actual = datetime.fromisoformat(actual)
        return operator(actual, value)

    combine = any if filters.get("conjunction") == "or" else all
    return [task for task in tasks if combine(matches(task, test) for test in tests)]


def _select(tasks: list[dict], selected: dict | None) -> list[dict]:
    """data_manager/managers.py `TaskQuerySet.prepared`: an empty `included` selects every task, as there."""
    if not selected:
        return tasks
    if selected.get("all") is False and selected.get("included"):
        return [task for task in tasks if task["id"] in set(selected["included"])]
    if selected.get("all") is True and selected.get("excluded"):
        return [task for task in tasks if task["id"] not in set(selected["excluded"])]
    return tasks


def _order(tasks: list[dict], ordering: list[str]) -> list[dict]:
    if not ordering:
        return sorted(tasks, key=lambda task: task["id"])
    name = ordering[0].lstrip("-").removeprefix("filter:").removeprefix("tasks:")
    if name not in FIELDS:
        abort(400, f"the fake Label Studio does not implement ordering by {ordering[0]}")
    key = (lambda task: datetime.fromisoformat(task["updated_at"])) if name == "updated_at" else FIELDS[name]
    return sorted(tasks, key=key, reverse=ordering[0].startswith("-"))
