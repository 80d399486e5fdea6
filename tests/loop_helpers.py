"""Building Label Studio-shaped webhook payloads and running burst workers for the training-loop tests."""

from __future__ import annotations

import copy
import json

from backend.common.settings import Settings
from backend.labelstudio.projects import ProjectRegistry
from tests.fake_label_studio import FakeLabelStudio
from tests.helpers import CONFIG_2, HYMENOPTERA, LS_REQUESTS, dataset_images
from worker.process import build_worker

_TEMPLATE = json.loads((LS_REQUESTS / "webhook-ANNOTATION_CREATED.json").read_text())["body"]


def local_url(path) -> str:
    return f"/data/local-files/?d={path.relative_to(HYMENOPTERA).as_posix()}"


def annotation_event(*, project: int, task_id: int, annotation_id: int, url: str, choice: str,
                     action: str = "ANNOTATION_CREATED", config: str = CONFIG_2, updated_at: str = "") -> dict:
    """An ANNOTATION_CREATED/UPDATED body shaped exactly like the recorded one."""
    body = copy.deepcopy(_TEMPLATE)
    body["action"] = action
    body["project"]["id"] = project
    body["project"]["label_config"] = config
    body["annotation"].update(id=annotation_id, task=task_id, project=project,
                              updated_at=updated_at or f"2026-11-27T12:{annotation_id // 60 % 60:02d}:{annotation_id % 60:02d}Z")
    body["annotation"]["result"][0]["value"]["choices"] = [choice]
    body["task"].update(id=task_id, project=project, data={"image": url})
    return body


def deleted_event(*, project: int, annotation_ids: list[int]) -> dict:
    body = json.loads((LS_REQUESTS / "webhook-ANNOTATIONS_DELETED.json").read_text())["body"]
    body["project"]["id"] = project
    body["project"]["label_config"] = CONFIG_2
    body["annotations"] = [{"id": i} for i in annotation_ids]
    return body


def set_up(redis, project, config: str = CONFIG_2) -> None:
    """What Label Studio's /setup records when the backend is connected: a webhook of a project never set up is
    refused (backend/server/webhook.py)."""
    ProjectRegistry(redis).remember(str(project), config)


def run_burst_worker(settings: Settings, redis, services) -> None:
    """Run every queued job in-process with the production worker class."""
    build_worker(settings, redis, services=services).work(burst=True, with_scheduler=False)


def uploaded_hymenoptera_project(project: int, split: str, per_class: int) -> FakeLabelStudio:
    """A stand-in Label Studio (not started) whose tasks are `per_class` uploaded ant photos, then as many bee
    photos, of hymenoptera's `split`: ids follow the classes, as in a folder imported class by class. Each task
    also carries its true `class` (for the tests; Label Studio ignores it)."""
    images = dataset_images(HYMENOPTERA, split)
    picked = [item for cls in ("ants", "bees") for item in [i for i in images if i[1] == cls][:per_class]]
    fake = FakeLabelStudio(label_config=CONFIG_2)
    for index, (path, cls) in enumerate(picked, start=1):
        name = f"{index}-{path.name}"
        fake.files[f"upload/{project}/{name}"] = path.read_bytes()
        fake.tasks.append({**uploaded_task(project, index, name), "class": cls})
    return fake


def uploaded_task(project: int, task_id: int, name: str) -> dict:
    """A Label Studio task whose image is the upload `name` of `project`."""
    return {"id": task_id, "data": {"image": f"/data/upload/{project}/{name}"}, "annotations": [],
            "predictions": [], "total_annotations": 0, "project": project}
