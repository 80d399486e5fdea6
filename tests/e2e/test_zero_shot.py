"""Zero-shot pre-labels in a real Label Studio 1.23.2: an ants/bees project connected before any label.

A backend + worker pair of its own (Redis database 3) with ZERO_SHOT on (the other flows run it off). Flow:
a local-files storage of hymenoptera's val photos → connect → Label Studio's backend record shows `label-v0`
→ the workers index and embed the tasks and write a `label-v0` prediction for every one, with no label and
no training; most of them are right.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import start_pair
from tests.e2e.dataset import copy_images
from tests.e2e.labeling_session import LabelingSession, image_file_of
from tests.e2e.processes import wait_until
from tests.helpers import CONFIG_2

pytestmark = pytest.mark.e2e

MIN_ACCURACY = 0.93  # the bench's k=0 figure on this split is 96.7 %
WRITTEN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def zero_shot_pair(label_studio, e2e_redis, documents_root, e2e_root, pytestconfig):
    pair = start_pair(pytestconfig, "zero-shot", redis_url=f"redis://127.0.0.1:{e2e_redis.port}/3",
                      label_studio_url=label_studio.url, api_key=label_studio.credentials.legacy_token,
                      documents_root=documents_root, log_dir=e2e_root / "logs", extra_env={"ZERO_SHOT": "true"})
    try:
        yield pair
    finally:
        pair.stop()


def test_a_project_of_imagenet_classes_is_pre_labeled_before_any_label(ls_api, zero_shot_pair, documents_root):
    images = copy_images(documents_root / "zero-shot", pool_per_class=0)  # all of val, nothing to annotate
    project = ls_api.create_project("headstart e2e zero-shot", CONFIG_2)["id"]
    ls_api.add_local_storage(project, documents_root / "zero-shot")
    by_task = {task["id"]: images[image_file_of(task)] for task in ls_api.tasks(project)}
    assert len(by_task) == len(images)
    backend = ls_api.connect_backend(project, zero_shot_pair.url)
    session = LabelingSession(api=ls_api, pair=zero_shot_pair, project=project, backend_id=backend["id"],
                              images=by_task)
    record = ls_api.backend(session.backend_id)
    assert record["state"] == "CO" and record["model_version"] == "label-v0", record

    wait_until(lambda: len(session.predictions_of("label-v0")) == len(by_task), timeout_s=WRITTEN_TIMEOUT_S,
               interval_s=2.0, processes=zero_shot_pair.processes,
               what=f"a label-v0 prediction for each of the {len(by_task)} tasks in Label Studio")
    scored = session.score("label-v0", sorted(by_task))
    predictions = session.predictions_of("label-v0").values()
    assert all(0.5 <= prediction["score"] <= 1.0 for prediction in predictions)
    written = [p["task"] for p in ls_api.predictions(project) if p["model_version"] == "label-v0"]
    assert sorted(written) == sorted(by_task)  # one per task: none written twice (the active front has its own)
    print(f"\nzero-shot: {len(by_task)} tasks pre-labeled label-v0 without a label, accuracy {scored.accuracy:.3f}")
    assert scored.accuracy >= MIN_ACCURACY
