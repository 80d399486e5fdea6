"""Predictions go to Label Studio one by one when that is cheaper than a bulk import, which recounts every task
of the project (backend/labelstudio/prediction_writes.py), against the local stand-in of Label Studio's API."""

from __future__ import annotations

import pytest

from backend.common.settings import Settings
from backend.labelstudio.client import make_client
from backend.labelstudio.prediction_writes import single_writes_cheaper, write_predictions
from tests.fake_label_studio import FakeLabelStudio
from tests.helpers import CONFIG_2

RESULT = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["ants"]}}]


@pytest.fixture
def label_studio():
    fake = FakeLabelStudio(label_config=CONFIG_2)
    yield fake.start()
    fake.stop()


def predictions(count: int, version: str = "headstart-next-1") -> list[dict]:
    return [{"task": task, "result": RESULT, "score": None if task == 1 else 0.5, "model_version": version}
            for task in range(1, count + 1)]


def test_a_few_predictions_in_a_large_project_go_one_by_one(label_studio):
    client = make_client(Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token))
    label_studio.api_requests.clear()
    assert write_predictions(client, 1, predictions(8), project_tasks=5000) == 8
    assert label_studio.api_requests == ["POST /api/predictions/"] * 8 and not label_studio.imported_predictions
    stored = sorted(label_studio.predictions.values(), key=lambda p: p["task"])
    assert [p["task"] for p in stored] == list(range(1, 9)) and "score" not in stored[0] and stored[1]["score"] == 0.5


def test_a_pass_or_a_small_project_goes_in_one_bulk_import(label_studio):
    client = make_client(Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token))
    label_studio.api_requests.clear()
    assert write_predictions(client, 1, predictions(8), project_tasks=500) == 1
    assert write_predictions(client, 1, predictions(400, "label-v2"), project_tasks=5000) == 1
    assert write_predictions(client, 1, [], project_tasks=5000) == 0
    assert label_studio.api_requests == ["POST /api/projects/1/import/predictions"] * 2
    assert len(label_studio.imported_predictions) == 408 and not label_studio.predictions


def test_the_crossover_grows_with_the_project_and_is_capped():
    assert not single_writes_cheaper(1, 100)  # a small project's bulk import is cheap
    assert single_writes_cheaper(20, 5000) and not single_writes_cheaper(21, 5000)
    assert single_writes_cheaper(50, 500_000) and not single_writes_cheaper(51, 500_000)
