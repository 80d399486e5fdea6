"""The labeling loop against a real Label Studio 1.23.2, driven only through Label Studio's API.

One project, labeled step by step; each test is one flow of issue 4 and builds on the state the
previous ones left (run them in file order; `-x` stops at the first broken step):
1. connect → annotate 5 per class → a model_version appears by itself → Retrieve Predictions ≥ 85 %
2. annotate 15 more per class → the version changes, accuracy does not drop
3. "Start Training" runs a training and Label Studio's request returns at once
4. a changed and a deleted annotation are both reflected in the next version
5. with auto-training on, annotation submits do not wait for training
6. the worker pushes predictions of the current version, with scores, for unlabeled tasks
"""

from __future__ import annotations

import re
import time

import pytest
import requests

from tests.e2e.dataset import copy_images
from tests.e2e.labeling_session import LabelingSession, image_file_of
from tests.e2e.processes import wait_until
from tests.helpers import CONFIG_2

pytestmark = pytest.mark.e2e

MIN_ACCURACY = 0.85
FAST_REQUEST_S = 3.0  # Label Studio → headstart /webhook → answer; training must not be inside it


@pytest.fixture(scope="module")
def session(ls_api, headstart, documents_root) -> LabelingSession:
    """A project over a local-files storage of the image subset (see tests/e2e/dataset.py)."""
    images = copy_images(documents_root / "hymenoptera")
    project = ls_api.create_project("headstart e2e loop", CONFIG_2)["id"]
    ls_api.add_local_storage(project, documents_root / "hymenoptera")
    tasks = ls_api.tasks(project)
    by_task = {task["id"]: images[image_file_of(task)] for task in tasks}
    assert len(by_task) == len(images), f"storage sync made {len(by_task)} tasks for {len(images)} images"
    assert all(task["data"]["image"].startswith("/data/local-files/?d=hymenoptera/") for task in tasks), \
        tasks[0]["data"]
    backend = ls_api.connect_backend(project, headstart.url)
    return LabelingSession(api=ls_api, pair=headstart, project=project, backend_id=backend["id"], images=by_task)


@pytest.fixture(scope="module")
def history() -> dict:
    """What earlier flows measured, for the later ones to compare with."""
    return {}


def earlier(history: dict, flow: str):
    assert flow in history, f"{flow} did not pass; this flow builds on it"
    return history[flow]


def webhook_count(session: LabelingSession, action: str) -> float:
    text = requests.get(f"{session.pair.url}/metrics", timeout=10).text
    match = re.search(rf'^headstart_webhook_events_total{{action="{action}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_first_labels_train_a_version_and_retrieve_predictions_scores_it(session, history):
    record = session.api.backend(session.backend_id)
    assert record["state"] == "CO", record
    assert record["model_version"] == "untrained"
    hooks = session.api.get(f"/api/webhooks?project={session.project}")
    assert [hook["url"] for hook in hooks] == [f"{session.pair.url}/webhook"]

    started = time.perf_counter()
    submits = session.annotate_next(per_class=5)
    version = session.wait_until_settled(session.expected_training_set())
    assert version["trained_on"] == session.expected_training_set(), "the served version lacks some labels"
    model_version = session.wait_for_label_studio_version(f"label-v{version['version']}")
    trained_after = time.perf_counter() - started

    remaining = session.unlabeled_tasks()
    retrieve_s = session.retrieve_predictions(remaining)
    session.score(model_version, remaining)  # every remaining task got a prediction of this version
    scored = session.score(model_version, session.eval_tasks())
    print(f"\nflow 1: 10 submits (max {max(submits):.2f} s), {model_version} in Label Studio "
          f"{trained_after:.1f} s after the first submit; Retrieve Predictions on {len(remaining)} tasks took "
          f"{retrieve_s:.1f} s; accuracy {scored.accuracy:.3f} on the {scored.scored} val images")
    assert scored.accuracy >= MIN_ACCURACY
    history["flow1"] = scored


def test_more_labels_change_the_version_and_accuracy_does_not_drop(session, history):
    before = earlier(history, "flow1")
    after_number = session.last_version_number()
    session.annotate_next(per_class=15)
    version = session.wait_until_settled(session.expected_training_set())
    assert version["version"] > after_number
    assert version["trained_on"] == session.expected_training_set(), "the served version lacks some labels"
    model_version = session.wait_for_label_studio_version(f"label-v{version['version']}")
    assert model_version != before.model_version

    session.retrieve_predictions(session.unlabeled_tasks())
    scored = session.score(model_version, session.eval_tasks())
    print(f"\nflow 2: {len(session.annotations)} labels → {model_version}: accuracy {scored.accuracy:.3f} "
          f"(was {before.accuracy:.3f} with {before.model_version})")
    assert scored.accuracy >= before.accuracy
    history["flow2"] = scored


def test_start_training_returns_at_once_and_a_training_runs(session):
    """Start Training with nothing new: a training runs (after Label Studio has answered) and, its labels being
    exactly the served version's, saves no version."""
    wait_until(session.training_idle, timeout_s=120, interval_s=0.5, processes=session.pair.processes,
               what="idle training before Start Training")
    last = session.last_version_number()
    requested_at = time.time()
    started = time.perf_counter()
    session.api.start_training(session.backend_id)
    elapsed = time.perf_counter() - started
    returned_at = time.time()

    training = session.wait_for_training(since=requested_at)
    print(f"\nflow 3: POST /api/ml/{{id}}/train answered in {elapsed:.3f} s; a training started "
          f"{training['started_at'] - requested_at:.2f} s after the request: {training['controls']}")
    assert elapsed < FAST_REQUEST_S
    # Had Label Studio waited for the training, the training would have started before its answer.
    assert training["started_at"] > returned_at - 0.5  # (RQ's timestamps and this clock agree to well under that)
    assert training["controls"][session.control]["status"] == "unchanged"
    assert session.last_version_number() == last
    served = session.store.meta(str(session.project), session.control,
                                session.store.current_number(str(session.project), session.control))
    assert served["trained_on"] == session.expected_training_set()


def test_changed_and_deleted_annotations_reach_the_next_version(session):
    last = session.last_version_number()
    changed_task = session.pool_tasks("ants")[0]
    deleted_task = session.pool_tasks("bees")[0]
    changed_annotation, _ = session.annotations[changed_task]
    deleted_annotation, _ = session.annotations.pop(deleted_task)

    session.api.change_annotation(changed_annotation, "label", "image", "bees")
    session.annotations[changed_task] = (changed_annotation, "bees")
    session.api.delete_annotation(deleted_annotation)

    expected = session.expected_training_set()
    version = session.wait_for_version(after=last, trained_on=expected)
    trained_on = version["trained_on"]
    print(f"\nflow 4: version {version['version']} ({version['status']}) trained on {len(trained_on)} labels")
    assert trained_on[str(changed_task)] == ["bees"]
    assert str(deleted_task) not in trained_on
    assert version["label_count"] == len(expected)


def test_auto_training_keeps_annotation_submits_fast(session):
    session.api.patch(f"/api/projects/{session.project}", {"min_annotations_to_start_training": 1})
    assert session.api.get(f"/api/projects/{session.project}")["min_annotations_to_start_training"] == 1
    start_trainings = webhook_count(session, "START_TRAINING")
    last = session.last_version_number()

    submits = session.annotate_next(per_class=1)
    returned_at = time.time()

    version = session.wait_for_version(after=last, trained_on=session.expected_training_set())
    received = webhook_count(session, "START_TRAINING") - start_trainings
    print(f"\nflow 5: submits with auto-training took {', '.join(f'{s:.3f}' for s in submits)} s; "
          f"{received:g} START_TRAINING events; version {version['version']} ({version['status']})")
    assert received >= len(submits), "Label Studio did not send START_TRAINING on submit: auto-training is off"
    assert max(submits) < FAST_REQUEST_S
    assert version["created_at"] > returned_at


def test_worker_pushes_scored_predictions_of_the_current_version(session, history):
    current = session.wait_until_settled(session.expected_training_set())["version"]
    model_version = session.wait_for_label_studio_version(f"label-v{current}")
    retrieved = {earlier(history, "flow1").model_version, earlier(history, "flow2").model_version}
    assert model_version not in retrieved, "no version was promoted after the last Retrieve Predictions"

    unlabeled = session.unlabeled_tasks()

    def pushed():
        tasks = {task["id"]: task for task in session.api.tasks(session.project)}
        found = {}
        for task_id in unlabeled:
            for prediction in tasks[task_id]["predictions"]:
                if prediction["model_version"] == model_version:
                    found[task_id] = prediction
        return found if len(found) == len(unlabeled) else None

    found = wait_until(pushed, timeout_s=240, interval_s=2.0, processes=session.pair.processes,
                       what=f"{model_version} predictions for all {len(unlabeled)} unlabeled tasks")
    scores = [prediction["score"] for prediction in found.values()]
    assert all(isinstance(score, float) and 0.0 < score <= 1.0 for score in scores), scores[:10]
    scored = session.score(model_version, session.eval_tasks())
    print(f"\nflow 6: worker pushed {model_version} predictions for {len(found)} unlabeled tasks, scores "
          f"{min(scores):.2f}..{max(scores):.2f}; accuracy {scored.accuracy:.3f}")
    assert scored.accuracy >= MIN_ACCURACY
