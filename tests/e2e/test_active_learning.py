"""Active learning inside Label Studio's own queue, against a real Label Studio 1.23.2.

With ACTIVE_LEARNING on (the session's backend), the labeling stream (`GET /api/projects/{id}/next`)
serves headstart's first pick, and a second annotator at once another of its picks, before any head exists
and after; annotators still see the served version's prediction, and deleting a prediction set in Label
Studio (which clears the project's model version) does not stop it. With it off (a second backend),
the project's sampling, model version and order are left as Label Studio had them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from redis import Redis

from backend.common import redis_keys
from backend.common.settings import Settings
from tests.e2e.conftest import start_pair
from tests.e2e.labeling_session import CONTROL, OBJECT, image_file_of
from tests.e2e.ls_api import LabelStudioApi
from tests.e2e.processes import wait_until
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images

pytestmark = pytest.mark.e2e

QUEUE_TIMEOUT_S = 240  # index, embed every image on two shared cores, rank, write


def copy_train_images(target: Path, per_class: int) -> dict[str, str]:
    """The first `per_class` train images of each class, flat in `target`; file name → label."""
    target.mkdir(parents=True, exist_ok=True)
    labels = {}
    for cls in ("ants", "bees"):
        for path, label in [item for item in dataset_images(HYMENOPTERA, "train") if item[1] == cls][:per_class]:
            shutil.copyfile(path, target / f"{label}-{path.name}")
            labels[f"{label}-{path.name}"] = label
    return labels


def project_with_images(api: LabelStudioApi, documents_root: Path, name: str, per_class: int) -> tuple[int, dict]:
    labels = copy_train_images(documents_root / name, per_class)
    project = api.create_project(f"headstart e2e {name}", CONFIG_2)["id"]
    api.add_local_storage(project, documents_root / name)
    truth = {task["id"]: labels[image_file_of(task)] for task in api.tasks(project)}
    assert len(truth) == len(labels)
    return project, truth


def queue_state(redis_url: str, project: int) -> dict:
    redis = Redis.from_url(redis_url)
    try:
        return {k.decode(): v.decode() for k, v in redis.hgetall(redis_keys.active(str(project))).items()}
    finally:
        redis.close()


def next_task(api: LabelStudioApi, project: int) -> dict:
    return api.get(f"/api/projects/{project}/next")


@pytest.fixture(scope="module")
def active(ls_api, label_studio, headstart, documents_root):
    project, truth = project_with_images(ls_api, documents_root, "active-on", per_class=20)
    before = ls_api.get(f"/api/projects/{project}")
    backend = ls_api.connect_backend(project, headstart.url)
    connected = ls_api.get(f"/api/projects/{project}")
    return {"project": project, "truth": truth, "backend": backend["id"], "before": before, "connected": connected}


def wait_for_front(ls_api, headstart, project: int, *, after_round: int = 0) -> dict:
    """The queue state once headstart published a front newer than `after_round` and Label Studio points at it."""
    def published():
        state = queue_state(headstart.redis_url, project)
        if int(state.get("round", 0)) <= after_round or "tag" not in state:
            return None
        return state if ls_api.get(f"/api/projects/{project}")["model_version"] == state["tag"] else None
    return wait_until(published, timeout_s=QUEUE_TIMEOUT_S, what="headstart's front in Label Studio",
                      processes=headstart.processes)


def test_connecting_points_the_project_at_the_backend_title_and_headstart_switches_sampling(ls_api, headstart, active):
    # what Label Studio does by itself: the project's model_version is the backend's title, not a version
    assert active["before"]["sampling"] == "Sequential sampling"
    assert active["connected"]["model_version"] == "headstart"
    state = wait_for_front(ls_api, headstart, active["project"])
    project = ls_api.get(f"/api/projects/{active['project']}")
    assert project["sampling"] == "Uncertainty sampling"
    assert state["sampling"] == "Uncertainty sampling" and state["note"] == ""
    assert ls_api.backend(active["backend"])["title"] == state["tag"] == project["model_version"]
    active["state"] = state


def test_before_any_head_the_next_task_is_one_headstart_ranked_first(ls_api, label_studio, headstart, active):
    state = active.get("state") or pytest.fail("the front was never published")
    front = json.loads(state["front"])
    # this backend runs without ZERO_SHOT: no scores, so the front is the first pick then larger task ids
    assert state["strategy"] == "typicality" and state["guide"] == "none" and state["scored"] == "0"
    assert front[1:] == [task for task in front[1:] if task > front[0]]
    assert len(front) == min(8, 1 + sum(task > front[0] for task in active["truth"]))
    first = next_task(ls_api, active["project"])
    # Label Studio serves headstart's first pick first: among tasks without a score it goes by id
    assert first["id"] == front[0], (first["id"], front)
    # a second annotator asking at the same time gets another of headstart's picks, not the locked one
    other = LabelStudioApi(label_studio.url, label_studio.add_user("annotator2@headstart.test"))
    second = next_task(other, active["project"])
    assert second["id"] in front and second["id"] != first["id"], (first["id"], second["id"], front)
    active["other"] = other
    active["held"] = {second["id"]}  # locked for annotator2, who never labels it: Label Studio skips it for others


def test_after_labels_the_queue_follows_the_new_head_and_shows_its_prediction(ls_api, label_studio, headstart, active):
    project, truth = active["project"], active["truth"]
    # a fresh second annotator: Label Studio hands a user the task it still holds locked for them first, and
    # the one of the test above may have left the front since
    other = LabelStudioApi(label_studio.url, label_studio.add_user("annotator3@headstart.test"))
    labeled = []
    round_before = int(queue_state(headstart.redis_url, project)["round"])
    for _ in range(6):  # the stream's own tasks, labeled with the truth (both classes appear among the picks)
        task = next_task(ls_api, project)
        ls_api.annotate(task["id"], CONTROL, OBJECT, truth[task["id"]])
        labeled.append(task["id"])
    assert {truth[t] for t in labeled} == {"ants", "bees"}, "typicality picked a single class"
    state = wait_for_front(ls_api, headstart, project, after_round=round_before)

    def headed():
        current = queue_state(headstart.redis_url, project)
        version = ls_api.backend(active["backend"])["model_version"]
        front = set(json.loads(current.get("front", "[]")))
        return current if version.startswith("label-v") and front and not front & set(labeled) and \
            ls_api.get(f"/api/projects/{project}")["model_version"] == current["tag"] and \
            current.get("scored") == "1" else None
    for _ in range(5):  # a training still coming (a follow-up, a coalesced one) may publish a newer front meanwhile
        state = wait_until(headed, timeout_s=QUEUE_TIMEOUT_S, what="a front ranked with a head",
                           processes=headstart.processes)
        task = next_task(ls_api, project)
        second = next_task(other, project)
        version = ls_api.backend(active["backend"])["model_version"]
        if queue_state(headstart.redis_url, project)["round"] == state["round"]:
            break  # both asked while this front was the current one
    front = json.loads(state["front"])
    assert not set(front) & set(labeled)
    # the lowest score of the front is headstart's first pick (unless another annotator holds it locked)
    expected = next(t for t in front if t not in active.get("held", set()))
    assert task["id"] == expected, (task["id"], front, active.get("held"))
    assert task["id"] not in labeled

    def shown() -> list[dict] | None:  # the served version's pre-label (its re-prediction may still be writing)
        current = ls_api.backend(active["backend"])["model_version"]
        listed = ls_api.get(f"/api/tasks/{task['id']}")["predictions"]
        return [p for p in listed if p["result"] and p["model_version"] == current] or None
    assert wait_until(shown, timeout_s=QUEUE_TIMEOUT_S, what="the served version's prediction on the next task",
                      processes=headstart.processes)
    assert version.startswith("label-v")
    assert second["id"] in front and second["id"] != task["id"]


def test_deleting_a_prediction_set_in_label_studio_does_not_stop_the_queue(ls_api, label_studio, headstart, active):
    project, truth = active["project"], active["truth"]
    state = queue_state(headstart.redis_url, project)
    fronts = [version for version in ls_api.get(f"/api/projects/{project}/model-versions/")
              if version.startswith("headstart-next-") and version != state["tag"]]
    assert fronts, "no earlier front to delete"
    oldest = min(fronts, key=lambda version: int(version.rsplit("-", 1)[1]))
    # what an admin cleaning up does in Settings → Predictions; Label Studio 1.23.2 then clears the project's
    # model_version (it named the ML backend), and renaming the backend no longer carries it along
    ls_api.delete(f"/api/projects/{project}/model-versions/", json={"model_version": oldest})
    assert not ls_api.get(f"/api/projects/{project}")["model_version"]
    assert oldest not in ls_api.get(f"/api/projects/{project}/model-versions/")
    # the next training's refresh looks the project up again once its last look is LABEL_CHECK_S old
    state = queue_state(headstart.redis_url, project)
    time.sleep(max(0.0, float(state.get("target_looked_at", 0)) + Settings.from_env().label_check_s - time.time()))
    pick = next(task for task in json.loads(state["front"]) if task not in active.get("held", set()))
    ls_api.annotate(pick, CONTROL, OBJECT, truth[pick])
    state = wait_for_front(ls_api, headstart, project, after_round=int(state["round"]))
    assert ls_api.backend(active["backend"])["title"] == state["tag"]
    # a fresh annotator (the others hold tasks locked): Label Studio serves from headstart's front again
    fresh = LabelStudioApi(label_studio.url, label_studio.add_user("annotator4@headstart.test"))
    served = next_task(fresh, project)
    assert served["id"] in json.loads(state["front"]), (served["id"], state["front"])


def test_with_active_learning_off_the_project_is_left_alone(ls_api, e2e_redis, documents_root, e2e_root, pytestconfig):
    project, truth = project_with_images(ls_api, documents_root, "active-off", per_class=5)
    pair = start_pair(pytestconfig, "active-off", redis_url=f"redis://127.0.0.1:{e2e_redis.port}/5",
                      label_studio_url=ls_api.base_url, api_key=ls_api.token, documents_root=documents_root,
                      log_dir=e2e_root / "logs", extra_env={"ACTIVE_LEARNING": "false"})
    try:
        backend = ls_api.connect_backend(project, pair.url)
        wait_until(lambda: queue_state(pair.redis_url, project).get("sampling"), timeout_s=QUEUE_TIMEOUT_S,
                   what="the first contact", processes=pair.processes)
        redis = Redis.from_url(pair.redis_url)
        wait_until(lambda: int(redis.hget(redis_keys.embedding_progress(str(project)), "done") or 0) >= len(truth),
                   timeout_s=QUEUE_TIMEOUT_S, what="every image embedded", processes=pair.processes)
        redis.close()
        after = ls_api.get(f"/api/projects/{project}")
        assert after["sampling"] == "Sequential sampling"
        assert after["model_version"] == "headstart" == ls_api.backend(backend["id"])["title"]
        assert "round" not in queue_state(pair.redis_url, project)
        assert next_task(ls_api, project)["id"] == min(truth)  # sequential: the first task
    finally:
        pair.stop()
