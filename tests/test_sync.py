"""Resync from Label Studio's API, pre-labels pushed back, and personal access tokens.

Label Studio's API is a local stand-in here (tests/fake_label_studio.py) serving the shapes a real
1.23.2 answers; tests/e2e runs the same paths against a real Label Studio.
"""

from __future__ import annotations

import pytest

from backend.server.app import create_app
from backend.core.store import ModelStore
from backend.labelstudio.label_mirror import LabelStore
from backend.loop.services import build_services
from tests.fake_label_studio import FakeLabelStudio
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images
from tests.loop_helpers import run_burst_worker
from backend.common.queues import EMBED_QUEUE, queue

PROJECT = 5


def task(task_id: int, filepath: str, choice: str | None, *, cloud: bool = False) -> dict:
    annotations = [] if choice is None else [{
        "id": 100 + task_id, "task": task_id, "was_cancelled": False, "ground_truth": False,
        "updated_at": "2026-11-27T12:00:00Z",
        "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]}]
    url = f"s3://upload/{PROJECT}/{filepath}" if cloud else f"/data/upload/{PROJECT}/{filepath}"
    return {"id": task_id, "data": {"image": url}, "annotations": annotations,
            "predictions": [], "total_annotations": len(annotations), "project": PROJECT}


@pytest.fixture(params=["personal access token", "legacy token"])
def label_studio(request):
    train = dataset_images(HYMENOPTERA, "train")
    picked = [item for cls in ("ants", "bees") for item in [i for i in train if i[1] == cls][:6]]
    fake = FakeLabelStudio(label_config=CONFIG_2)
    for index, (path, cls) in enumerate(picked, start=1):
        name = f"{index}-{path.name}"
        fake.files[f"upload/{PROJECT}/{name}"] = path.read_bytes()
        # 8 labeled, 4 not; every third task's image lives in cloud storage (presigned through the task)
        fake.tasks.append(task(index, name, cls if index % 6 < 4 else None, cloud=index % 3 == 0))
    fake.start()
    fake.auth_kind = request.param
    yield fake
    fake.stop()


@pytest.fixture
def ls_settings(settings, label_studio):
    key = label_studio.pat if label_studio.auth_kind == "personal access token" else label_studio.legacy_token
    return settings.replace(label_studio_url=label_studio.url, label_studio_api_key=key, repredict_unlabeled=True)


def test_start_training_resyncs_trains_and_writes_pre_labels_back(ls_settings, redis, encoders, label_studio):
    services = build_services(ls_settings, redis, encoders=encoders)
    client = create_app(ls_settings, services=services).test_client()
    LabelStore(redis).put(str(PROJECT), {"id": 999, "task": 999, "result": []}, {"id": 999})  # stale junk
    response = client.post("/webhook", json={"action": "START_TRAINING",
                                             "project": {"id": PROJECT, "label_config": CONFIG_2}})
    assert response.status_code == 200
    run_burst_worker(ls_settings, redis, services)

    store = ModelStore(redis)
    meta = store.meta(str(PROJECT), "label", store.current_number(str(PROJECT), "label"))
    assert meta["label_count"] == 8 and "999" not in meta["trained_on"]
    assert queue(EMBED_QUEUE, redis).count == 0  # the follow-up re-prediction ran on the embedding queue
    pushed = label_studio.imported_predictions
    assert sorted(p["task"] for p in pushed) == [t["id"] for t in label_studio.tasks if not t["annotations"]]
    assert {p["model_version"] for p in pushed} == {f"label-v{meta['version']}"}
    assert all(0.5 <= p["score"] <= 1 and p["result"][0]["value"]["choices"][0] in ("ants", "bees") for p in pushed)
    if label_studio.auth_kind == "personal access token":
        assert label_studio.refreshes >= 1 and set(label_studio.media_auth) == {"Bearer"}
    else:
        assert set(label_studio.media_auth) == {"Token"}
