"""headstart's next picks as Label Studio will serve them (backend/loop/active_queue.py): which tasks make the
front, their honest scores, and whose probabilities guide them before any head is trained.

Label Studio's API is the local stand-in (tests/fake_label_studio.py); tests/e2e/test_active_learning.py drives
the real one.
"""

from __future__ import annotations

import pytest

from backend.loop.active_queue import next_front, served_in_order
from backend.loop.services import build_services
from backend.server.app import create_app
from tests.helpers import CONFIG_2
from tests.loop_helpers import run_burst_worker, uploaded_hymenoptera_project

PROJECT = 9
PER_CLASS = 8


def test_the_front_keeps_only_tasks_label_studio_serves_after_headstarts_first_pick():
    scores = {1: 0.7, 2: 0.6, 3: 0.8, 4: 0.7, 5: 0.95, 6: 0.9, 7: 0.99, 8: 0.65}
    # 2 and 8 score below 3 and would be served first; 4 ties with 3 but has a larger id: served after it
    assert served_in_order([3, 2, 4, 8, 5, 6, 7, 1], scores, 8) == [3, 5, 6, 7]
    assert served_in_order([3, 2, 4, 8, 5, 6, 7, 1], {**scores, 4: 0.8}, 8) == [3, 4, 5, 6, 7]
    assert served_in_order([1, 2, 3, 4, 5, 6, 7], scores, 3) == [1, 3, 4]
    assert served_in_order([6, 2, 1, 3, 5, 7], scores, 3) == [6, 5, 7]  # full from further down the order
    assert served_in_order([7, 1, 3], scores, 8) == [7]  # the first pick always leads, however confident
    assert served_in_order([4, 2, 6, 1, 5], None, 3) == [4, 6, 5]  # no scores: by id, after the first pick
    assert served_in_order([], scores, 8) == []


@pytest.fixture
def label_studio():
    """Ants first, then bees: task ids follow the classes, as in a folder imported class by class."""
    fake = uploaded_hymenoptera_project(PROJECT, "train", PER_CLASS)
    yield fake.start()
    fake.stop()


def _embedded(settings, redis, encoders, label_studio, *, zero_shot: bool):
    """Services for the stand-in's project after /setup: every task indexed and embedded by a burst worker."""
    configured = settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
                                  active_learning=True, zero_shot=zero_shot, train_min_interval_s=0)
    services = build_services(configured, redis, encoders=encoders)
    client = create_app(configured, services=services).test_client()
    assert client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2}).status_code == 200
    run_burst_worker(configured, redis, services)
    assert services.tasks.count(str(PROJECT)) == len(label_studio.tasks)
    return services


def test_before_any_head_the_zero_shot_classifier_ranks_and_scores_the_front(settings, redis, encoders,
                                                                              label_studio):
    services = _embedded(settings, redis, encoders, label_studio, zero_shot=True)
    front = next_front(services, str(PROJECT))
    assert front.guide == "zero-shot" and front.strategy == "typicality"
    # honest: each score is the confidence of the zero-shot pre-label annotators see on that task (`label-v0`)
    tasks = [{"id": task["id"], "data": task["data"]} for task in label_studio.tasks]
    shown, _ = services.predictor.predict_cached(tasks, project=str(PROJECT), label_config=CONFIG_2)
    assert {p["model_version"] for p in shown} == {"label-v0"}
    confidence = {task["id"]: p["score"] for task, p in zip(tasks, shown)}
    assert front.scores == pytest.approx({task: confidence[task] for task in front.tasks}, abs=1e-5)
    # Label Studio serves the first pick first (lowest score, then lowest id); the front holds as many of the
    # tasks served after it as ACTIVE_FRONT allows
    first = (front.scores[front.tasks[0]], front.tasks[0])
    assert all((front.scores[task], task) > first for task in front.tasks[1:])
    after = [task for task in confidence if (round(confidence[task], 6), task) > first]
    assert len(front.tasks) == min(services.settings.active_front, 1 + len(after))
    assert front.tasks[0] == next_front(services, str(PROJECT)).tasks[0]  # deterministic for the project


def test_without_any_model_the_front_is_the_first_pick_then_larger_ids(settings, redis, encoders, label_studio):
    services = _embedded(settings, redis, encoders, label_studio, zero_shot=False)
    front = next_front(services, str(PROJECT))
    assert front.guide == "none" and front.scores == {}
    assert all(task > front.tasks[0] for task in front.tasks[1:])
    assert len(front.tasks) == min(services.settings.active_front, 1 + len(label_studio.tasks) - front.tasks[0])


def test_labeling_what_label_studio_serves_covers_both_classes_at_once(settings, redis, encoders, label_studio):
    """The bug this guards against: tasks imported class by class, a front of unscored picks, and Label Studio
    serving them by id gave six ants before the first bee, so no head could train until the seventh label."""
    services = _embedded(settings, redis, encoders, label_studio, zero_shot=True)
    class_of = {task["id"]: task["class"] for task in label_studio.tasks}
    served = []
    for annotation_id in range(1, 5):
        front = next_front(services, str(PROJECT))
        task = min(front.tasks, key=lambda t: (front.scores.get(t, 0.0), t))  # Label Studio: lowest score, then id
        served.append(task)
        services.labels.put(str(PROJECT), {
            "id": annotation_id, "task": task, "was_cancelled": False, "updated_at": "2026-12-02T00:00:00Z",
            "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                        "value": {"choices": [class_of[task]]}}]},
            {"id": task, "data": next(t["data"] for t in label_studio.tasks if t["id"] == task)})
    assert len(set(served)) == 4
    assert {class_of[task] for task in served[:3]} == {"ants", "bees"}, [class_of[t] for t in served]
