"""The few Label Studio API calls the `loop` benchmark and the end-to-end flows make, over plain `requests`.

A legacy token goes as `Token`; a personal access token (a JWT refresh token) is exchanged at
/api/token/refresh/ for a short-lived `Bearer` access token, as Label Studio 1.23 requires.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import requests

ACCESS_REFRESH_MARGIN_S = 30.0
TIMEOUT_S = 120.0  # "Retrieve Predictions" waits for the backend's /predict (Label Studio allows 100 s)


class LabelStudioError(AssertionError):
    pass


def _jwt_claims(token: str) -> dict | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        return json.loads(base64.urlsafe_b64decode(payload))
    except ValueError:
        return None


class LabelStudioApi:
    def __init__(self, base_url: str, token: str):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.session = requests.Session()
        self.session.trust_env = False
        self._access = ""
        self._access_expires = 0.0

    @property
    def is_personal_access_token(self) -> bool:
        claims = _jwt_claims(self.token)
        return bool(claims and claims.get("token_type") == "refresh")

    def _authorization(self) -> str:
        if not self.is_personal_access_token:
            return f"Token {self.token}"
        if time.time() > self._access_expires - ACCESS_REFRESH_MARGIN_S:
            response = self.session.post(f"{self.base_url}/api/token/refresh/", json={"refresh": self.token},
                                         timeout=TIMEOUT_S)
            self._check(response, "exchanging the personal access token")
            self._access = response.json()["access"]
            self._access_expires = float(_jwt_claims(self._access)["exp"])
        return f"Bearer {self._access}"

    def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200, 201, 204), **kwargs):
        headers = {"Authorization": self._authorization(), **kwargs.pop("headers", {})}
        response = self.session.request(method, f"{self.base_url}{path}", headers=headers,
                                        timeout=kwargs.pop("timeout", TIMEOUT_S), **kwargs)
        self._check(response, f"{method} {path}", expect)
        return response

    @staticmethod
    def _check(response: requests.Response, what: str, expect: tuple[int, ...] = (200, 201, 204)) -> None:
        if response.status_code not in expect:
            raise LabelStudioError(f"{what}: HTTP {response.status_code} {response.text[:800]}")

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, body=None, **kwargs):
        response = self.request("POST", path, json=body, **kwargs)
        return response.json() if response.content else None

    def patch(self, path: str, body, **kwargs):
        return self.request("PATCH", path, json=body, **kwargs).json()

    def delete(self, path: str, **kwargs) -> None:
        self.request("DELETE", path, **kwargs)

    # projects and tasks

    def create_project(self, title: str, label_config: str) -> dict:
        return self.post("/api/projects", {"title": title, "label_config": label_config})

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project with its annotations and predictions."""
        tasks, page = [], 1
        while True:
            body = self.get(f"/api/tasks?project={project}&fields=all&page_size=500&page={page}",
                            expect=(200, 404))
            batch = body.get("tasks", []) if isinstance(body, dict) else body
            tasks += batch
            if not batch or len(tasks) >= (body.get("total", 0) if isinstance(body, dict) else 0):
                return tasks
            page += 1

    def predictions(self, project: int) -> list[dict]:
        body = self.get(f"/api/predictions?project={project}")
        return body["results"] if isinstance(body, dict) else body

    def import_files(self, project: int, paths: list[Path]) -> list[int]:
        """Upload image files as new tasks (media then lives under /data/upload/)."""
        handles = [open(path, "rb") for path in paths]
        try:
            files = [(f"file{i}", (path.name, handle, "image/jpeg"))
                     for i, (path, handle) in enumerate(zip(paths, handles))]
            body = self.request("POST", f"/api/projects/{project}/import", files=files).json()
        finally:
            for handle in handles:
                handle.close()
        return body["task_ids"] if "task_ids" in body else []

    def add_local_storage(self, project: int, path: Path, *, timeout_s: float = 120, attempts: int = 3) -> dict:
        """A local-files storage over `path` (a subdirectory of LOCAL_FILES_DOCUMENT_ROOT), synced: returns once a
        sync has completed. The sync request can answer before every task exists (a sync already under way makes
        it return at once) or after a sync that failed part way (its status then says `failed`, e.g. on a busy
        SQLite); a failed sync is run again, which adds only the files not yet imported."""
        storage = self.post("/api/storages/localfiles", {
            "project": project, "path": str(path), "use_blob_urls": True,
            "regex_filter": r".*\.(jpe?g|JPE?G)$", "title": "e2e images"})
        for _ in range(attempts):
            self.post(f"/api/storages/localfiles/{storage['id']}/sync")
            storage = self._settled_storage(storage["id"], path, timeout_s)
            if storage.get("status") in (None, "completed"):
                return storage
        raise RuntimeError(f"Label Studio's sync of the local-files storage {path} ended {storage['status']} "
                           f"{attempts} times: {storage.get('traceback') or storage.get('meta')}")

    def _settled_storage(self, storage_id: int, path: Path, timeout_s: float) -> dict:
        """The storage once its sync is no longer queued or in progress."""
        deadline = time.monotonic() + timeout_s
        while True:
            storage = self.get(f"/api/storages/localfiles/{storage_id}")
            if storage.get("status") not in ("queued", "in_progress"):
                return storage
            if time.monotonic() > deadline:
                raise TimeoutError(f"Label Studio's sync of the local-files storage {path} is still "
                                   f"{storage['status']!r} after {timeout_s:g} s")
            time.sleep(0.2)

    # annotations

    def annotate(self, task: int, from_name: str, to_name: str, choice: str) -> dict:
        return self.post(f"/api/tasks/{task}/annotations", {"result": [_choice(from_name, to_name, choice)]})

    def change_annotation(self, annotation: int, from_name: str, to_name: str, choice: str) -> dict:
        return self.patch(f"/api/annotations/{annotation}", {"result": [_choice(from_name, to_name, choice)]})

    def delete_annotation(self, annotation: int) -> None:
        self.delete(f"/api/annotations/{annotation}")

    # machine learning backends

    def connect_backend(self, project: int, url: str, title: str = "headstart") -> dict:
        return self.post("/api/ml", {"url": url, "project": project, "title": title})

    def backend(self, backend_id: int) -> dict:
        """Label Studio's record of the backend (reading it runs /health and /setup on the backend)."""
        return self.get(f"/api/ml/{backend_id}")

    def start_training(self, backend_id: int) -> None:
        self.post(f"/api/ml/{backend_id}/train", {})

    def retrieve_predictions(self, project: int, task_ids: list[int]) -> dict:
        """The Data Manager's "Retrieve Predictions" action on these tasks."""
        return self.post(f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                         {"selectedItems": {"all": False, "included": list(task_ids)}})


def _choice(from_name: str, to_name: str, choice: str) -> dict:
    return {"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [choice]}}
