"""Version numbers after Redis lost its data (backend/labelstudio/model_versions.py, ModelStore.continue_numbering):
a new head never takes a `model_version` name Label Studio already stores predictions of."""

from __future__ import annotations

import pytest

from backend.core.store import ModelStore
from backend.labelstudio.model_versions import highest_numbers
from tests.test_sync import PROJECT, created, fake_project, train
from tests.loop_helpers import set_up
from backend.loop.services import build_services
from backend.server.app import create_app


def test_highest_numbers_reads_every_control_of_joined_versions():
    assert highest_numbers(["label-v3", "label-v12+kind-v2", "untrained", "kind-v1", "my-control-v4", "x-vy"]) == {
        "label": 12, "kind": 2, "my-control": 4}


@pytest.fixture
def label_studio():
    fake = fake_project()
    yield fake
    fake.stop()


@pytest.fixture
def pipeline(settings, redis, encoders, label_studio):
    loop = settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.pat,
                            train_min_interval_s=0)
    services = build_services(loop, redis, encoders=encoders)
    set_up(redis, PROJECT)
    return loop, services, create_app(loop, services=services).test_client()


def test_numbering_continues_after_the_versions_label_studio_holds(pipeline, label_studio, redis):
    fake, store = label_studio, ModelStore(redis)
    # Redis lost everything, Label Studio still holds predictions of label-v1 … label-v7 of the old heads
    fake.stored_predictions = [{"task": 5, "model_version": f"label-v{n}"} for n in range(1, 8)]
    requests_before = len(fake.api_requests)
    _, summary = train(pipeline, created(fake, fake.task(1)["annotations"][0]))
    assert summary["controls"]["label"]["version"] == 8 and summary["model_version"] == "label-v8"
    assert fake.api_requests[requests_before:].count(f"GET /api/projects/{PROJECT}/model-versions/") == 1

    fresh = fake.annotate(4, 401, fake.classes[4])  # the next training: the counter exists, nothing read
    requests_before = len(fake.api_requests)
    _, summary = train(pipeline, created(fake, fresh))
    assert summary["controls"]["label"]["version"] == 9
    assert f"GET /api/projects/{PROJECT}/model-versions/" not in fake.api_requests[requests_before:]


def test_continue_numbering_never_lowers_the_counter(redis):
    store = ModelStore(redis)
    assert not store.numbering_started("3", "label")
    store.continue_numbering("3", "label", 5)
    store.continue_numbering("3", "label", 2)
    assert store.numbering_started("3", "label") and int(redis.get("headstart:head:3:label:next")) == 5
