"""A text classification project in a real Label Studio 1.23.2: bbc-news articles imported as tasks.

A backend + worker pair of its own (Redis database 2) runs with TEXT_ENCODER set to the offline
all-MiniLM-L6-v2 folder. Flow: import tasks → connect → label 2 articles per topic → a version
appears by itself → "Retrieve Predictions" scores the evaluation articles → one more submit retrains, its
recipe chosen with the unlabeled articles Retrieve Predictions embedded (`prototype_refined`).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import start_pair
from tests.e2e.dataset import Image
from tests.e2e.labeling_session import LabelingSession
from tests.helpers import BBC_CLASSES, dataset_texts, offline_text_model
from tests.test_text_predict import TEXT_CONFIG

pytestmark = pytest.mark.e2e

POOL_PER_CLASS = 3
LABELED_PER_CLASS = 2
EVAL_TASKS = 60
MIN_ACCURACY = 0.6  # k=2: the reference logistic regression reaches 79.7 ± 6.1 % (chance is 20 %)


@pytest.fixture(scope="module")
def text_pair(label_studio, e2e_redis, documents_root, e2e_root, pytestconfig):
    pair = start_pair(pytestconfig, "text", redis_url=f"redis://127.0.0.1:{e2e_redis.port}/2",
                      label_studio_url=label_studio.url, api_key=label_studio.credentials.legacy_token,
                      documents_root=documents_root, log_dir=e2e_root / "logs",
                      extra_env={"TEXT_ENCODER": offline_text_model(), "HF_HUB_OFFLINE": "1"})
    try:
        yield pair
    finally:
        pair.stop()


def articles() -> list[tuple[str, str, str]]:
    """(text, topic, role): the first POOL_PER_CLASS train articles of each topic, then EVAL_TASKS of val."""
    train = dataset_texts("train")
    pool = [(text, cls, "pool") for cls in BBC_CLASSES
            for text in [t for t, label in train if label == cls][:POOL_PER_CLASS]]
    return pool + [(text, cls, "eval") for text, cls in dataset_texts("val")[:EVAL_TASKS]]


def test_a_text_project_trains_predicts_and_retrains(ls_api, text_pair):
    project = ls_api.create_project("headstart e2e text", TEXT_CONFIG)["id"]
    chosen = articles()
    ls_api.post(f"/api/projects/{project}/import", [{"text": text} for text, _, _ in chosen])
    tasks = ls_api.tasks(project)
    assert len(tasks) == len(chosen)
    by_text = {text: (cls, role) for text, cls, role in chosen}
    images = {task["id"]: Image(file_name=f"task-{task['id']}", label=by_text[task["data"]["text"]][0],
                                role=by_text[task["data"]["text"]][1]) for task in tasks}
    backend = ls_api.connect_backend(project, text_pair.url)
    session = LabelingSession(api=ls_api, pair=text_pair, project=project, backend_id=backend["id"],
                              images=images, control="topic", object_name="text")
    record = ls_api.backend(session.backend_id)
    assert record["state"] == "CO" and record["model_version"] == "untrained", record

    session.annotate_next(per_class=LABELED_PER_CLASS)
    version = session.wait_until_settled(session.expected_training_set())
    assert version["status"] == "promoted" and version["media_errors"] == {}, version
    assert version["modality"] == "text" and version["backbone_key"].startswith("st:model@file-")
    assert version["parameters"]["non_trainable"] > 22_000_000  # the frozen MiniLM
    model_version = session.wait_for_label_studio_version(f"topic-v{version['version']}")

    evaluation = session.eval_tasks()
    retrieve_s = session.retrieve_predictions(evaluation)
    scored = session.score(model_version, evaluation)
    assert all(0.0 < p["score"] <= 1.0 for p in session.predictions_of(model_version).values())
    print(f"\ntext project: {model_version} on {len(session.annotations)} labels; Retrieve Predictions on "
          f"{len(evaluation)} articles took {retrieve_s:.1f} s; accuracy {scored.accuracy:.3f}")
    assert scored.accuracy >= MIN_ACCURACY

    last = session.last_version_number()
    session.annotate_next(per_class=1)  # one more article per topic: each submit asks for a retrain
    retrained = session.wait_until_settled(session.expected_training_set())
    assert retrained["version"] > last and retrained["label_count"] == len(session.annotations)
    # the trainings after Retrieve Predictions chose their recipe with the unlabeled articles it embedded
    selection = retrained["selection"]
    print(f"retrained: {selection['recipe']} (weights {selection['weights']}), {retrained['pool_size']} unlabeled "
          f"articles read")
    assert "prototype_refined" in selection["evidence"], selection
    if "prototype_refined" in selection["components"]:
        assert retrained["pool_size"] == EVAL_TASKS
