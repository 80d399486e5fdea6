"""Fixtures and helpers for the admin tests: an app with ADMIN_TOKEN, projects trained through the real
webhook → RQ job path. Test modules import the fixtures they use by name."""

from __future__ import annotations

import pytest

from backend.server.app import create_app
from backend.loop.services import build_services
from tests.fake_label_studio import FakeLabelStudio
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images
from tests.loop_helpers import annotation_event, local_url, run_burst_worker

TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
def admin_settings(settings):
    """Settings with local media, an admin token and no pause between trainings."""
    return settings.replace(local_files_document_root=str(HYMENOPTERA), train_min_interval_s=0, admin_token=TOKEN)


@pytest.fixture
def services(admin_settings, redis, encoders):
    return build_services(admin_settings, redis, encoders=encoders)


@pytest.fixture
def client(admin_settings, services):
    return create_app(admin_settings, services=services).test_client()


def labeled_images(per_class: int) -> list[tuple]:
    """(path, class) for the first `per_class` ants and bees of hymenoptera's train split."""
    train = dataset_images(HYMENOPTERA, "train")
    return [item for cls in ("ants", "bees") for item in [i for i in train if i[1] == cls][:per_class]]


def annotate(client, project: int, items: list[tuple], *, config: str | None = CONFIG_2) -> None:
    """Post one ANNOTATION_CREATED per item, as Label Studio would (task id = annotation id = position), after
    recording `config` as its /setup does. With `config` None the project is unknown and its webhooks would be
    refused: the labels are put in the mirror and a training asked for directly (it fails: no labeling config)."""
    services = client.application.extensions["headstart"]
    if config is not None:
        services.projects.remember(str(project), config)
    for task_id, (path, cls) in enumerate(items, start=1):
        body = annotation_event(project=project, task_id=task_id, annotation_id=project * 1000 + task_id,
                                url=local_url(path), choice=cls)
        if config is None:
            services.labels.put(str(project), body["annotation"], body["task"])
            continue
        response = client.post("/webhook", json=body)
        assert response.status_code == 200, response.get_json()
    if config is None:
        services.scheduler.request(str(project), reason="START_TRAINING")


def train_rounds(client, settings, redis, services, project: int, rounds: list[int]) -> None:
    """One version per round: label `rounds[i]` images per class, then run the queued jobs."""
    assert client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG_2}).status_code == 200
    for per_class in rounds:
        annotate(client, project, labeled_images(per_class))
        run_burst_worker(settings, redis, services)


def fake_label_studio(project: int, items: list[tuple]) -> FakeLabelStudio:
    """A started stand-in for Label Studio's API with one unlabeled uploaded-image task per item."""
    fake = FakeLabelStudio(label_config=CONFIG_2)
    for task_id, (path, _) in enumerate(items, start=1):
        name = f"{task_id}-{path.name}"
        fake.files[f"upload/{project}/{name}"] = path.read_bytes()
        fake.tasks.append({"id": task_id, "data": {"image": f"/data/upload/{project}/{name}"}, "annotations": [],
                           "predictions": [], "project": project})
    return fake.start()


def served(client, project: int) -> str:
    """The model_version /setup answers, as Label Studio reads it."""
    return client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG_2}).get_json()["model_version"]
