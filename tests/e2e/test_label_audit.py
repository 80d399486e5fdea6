"""The label audit against a real Label Studio 1.23.2: a deliberately wrong label shows up in the Data Manager
filter and in `headstart suspects` after the next training, and disappears once it is fixed.

The project: the first 20 ants and 20 bees of hymenoptera `train`, all labeled, one ant labeled "bees" on purpose
(WRONG, an unmistakable ant: out of fold it scores 0.01 as a bee), plus 10 unlabeled `val` images for the
auto-accept coverage. The marker is a prediction of model version `headstart-suspect`; the Data Manager filter
"Prediction model versions contains headstart-suspect" is applied by Label Studio in SQL
(`data_manager/managers.py` `apply_filters`), and read here through the same task list the UI uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from backend.loop.audit import SUSPECT_MODEL_VERSION
from tests.e2e.labeling_session import image_file_of
from tests.e2e.processes import wait_until
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images

pytestmark = pytest.mark.e2e

PER_CLASS = 20
UNLABELED = 5  # per class, from val
WRONG = "132478121_2a430adea2.jpg"  # an ant, labeled "bees"
AUDIT_TIMEOUT_S = 300
CLI_TIMEOUT_S = 300  # importing torch and building the services, on two shared cores
SUSPECT_FILTER = {"filters": {"conjunction": "and", "items": [
    {"filter": "filter:tasks:predictions_model_versions", "operator": "contains", "type": "List",
     "value": [SUSPECT_MODEL_VERSION]}]}}


@pytest.fixture(scope="module")
def project(ls_api, headstart, documents_root) -> dict:
    folder = documents_root / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, count in (("train", PER_CLASS), ("val", UNLABELED)):
        for label in ("ants", "bees"):
            for path, _ in [item for item in dataset_images(HYMENOPTERA, split) if item[1] == label][:count]:
                shutil.copyfile(path, folder / path.name)
                truth[path.name] = (label, split)
    project = ls_api.create_project("headstart e2e label audit", CONFIG_2)["id"]
    ls_api.add_local_storage(project, folder)
    tasks = {image_file_of(task): task["id"] for task in ls_api.tasks(project)}
    assert set(tasks) == set(truth)
    ls_api.connect_backend(project, headstart.url)
    annotations, labels = {}, {}
    for name, (label, split) in sorted(truth.items()):
        if split == "train":
            labels[tasks[name]] = "bees" if name == WRONG else label
            annotations[name] = ls_api.annotate(tasks[name], "label", "image", labels[tasks[name]])["id"]
    return {"id": project, "tasks": tasks, "annotations": annotations, "labels": labels, "wrong": tasks[WRONG],
            "label_studio_url": ls_api.base_url}


def headstart_cli(pair, *args: str, label_studio_url: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "REDIS_URL": pair.redis_url, "LABEL_STUDIO_URL": label_studio_url}
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def audit_of(pair, project: int) -> dict:
    done = headstart_cli(pair, "suspects", str(project), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["controls"][0]


def wait_for_audit(pair, project: int, labels: dict[int, str]) -> dict:
    """`headstart suspects --json` once the audit stored under the served version was made after the labels in
    `labels` (task → label) were trained on (polled in Redis: the CLI takes a while to start on a busy host)."""
    from redis import Redis

    from backend.common import redis_keys
    from backend.core.store import ModelStore

    redis = Redis.from_url(pair.redis_url)
    store = ModelStore(redis)

    def audited():
        number = store.current_number(str(project), "label")
        if number is None or store.meta(str(project), "label", number)["trained_on"] != {
                str(task): [label] for task, label in labels.items()}:
            return None
        raw = redis.get(redis_keys.audit(str(project), "label"))
        return raw is not None and json.loads(raw)["model_version"] == f"label-v{number}"
    wait_until(audited, timeout_s=AUDIT_TIMEOUT_S, interval_s=2.0, processes=pair.processes,
               what=f"an audit of project {project} under a version trained on {len(labels)} labels")
    return audit_of(pair, project)


def filtered(ls_api, project: int) -> dict[int, dict]:
    """Task id → the task, for the tasks the Data Manager filter on the suspect marker returns."""
    body = ls_api.get("/api/tasks", params={"project": project, "fields": "all", "page_size": 100,
                                            "query": json.dumps(SUSPECT_FILTER)})
    return {task["id"]: task for task in body["tasks"]}


def test_a_wrong_label_is_a_suspect_in_the_data_manager_and_the_cli(ls_api, headstart, project):
    audit = wait_for_audit(headstart, project["id"], project["labels"])
    assert audit["judged"], audit["reason"]
    suspects = {s["task"]: s for s in audit["suspects"]}
    assert project["wrong"] in suspects, audit
    wrong = suspects[project["wrong"]]
    assert wrong["given"] == ["bees"] and wrong["suggested"] == ["ants"] and wrong["suggested_probability"] > 0.5
    table = headstart_cli(headstart, "suspects", str(project["id"]), label_studio_url=project["label_studio_url"])
    link = f"{project['label_studio_url']}/projects/{project['id']}/data?task={project['wrong']}"
    assert table.returncode == 0 and link in table.stdout, table.stdout + table.stderr
    assert len(suspects) <= 3, "a few suspects among 40 labels, not a list of noise"

    marked = wait_until(lambda: (tasks := filtered(ls_api, project["id"])) and set(tasks) == set(suspects) and tasks,
                        timeout_s=60, interval_s=1.0, processes=headstart.processes,
                        what="the Data Manager filter on headstart-suspect returning exactly the suspects")
    assert len(marked) < len(project["tasks"])  # the filter filters
    prediction = next(p for p in marked[project["wrong"]]["predictions"] if p["model_version"] == SUSPECT_MODEL_VERSION)
    assert prediction["result"][0]["value"]["choices"] == ["ants"]
    assert prediction["score"] == pytest.approx(wrong["suggested_probability"], abs=1e-3)
    assert prediction["mislabeling"] == pytest.approx(1 - wrong["given_probability"], abs=1e-3)

    status = headstart_cli(headstart, "status")
    assert "precision the model would label" in status.stdout and f"of {2 * UNLABELED} remaining tasks" in status.stdout, \
        status.stdout


def test_a_fixed_label_is_no_longer_a_suspect(ls_api, headstart, project):
    ls_api.change_annotation(project["annotations"][WRONG], "label", "image", "ants")
    audit = wait_for_audit(headstart, project["id"], {**project["labels"], project["wrong"]: "ants"})
    assert project["wrong"] not in {s["task"] for s in audit["suspects"]}, audit
    remaining = {s["task"] for s in audit["suspects"]}
    wait_until(lambda: set(filtered(ls_api, project["id"])) == remaining or None, timeout_s=60, interval_s=1.0,
               processes=headstart.processes, what="the fixed task's marker gone from the Data Manager filter")
    task = ls_api.get(f"/api/tasks/{project['wrong']}")
    assert task["annotations"][0]["result"][0]["value"]["choices"] == ["ants"]  # the label is the person's, unchanged
