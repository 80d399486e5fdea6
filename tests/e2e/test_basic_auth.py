"""Basic auth and training on submit together, against a real Label Studio 1.23.2.

A third backend + worker pair (on its own Redis database) runs with BASIC_AUTH_USER/PASS, and the model is
connected in Label Studio with the same user and password, as the README says. Label Studio creates the
project's webhook without headers (ml/models.py create_ml_webhook); headstart's /setup queues a job that gives
it the basic-auth header through Label Studio's API (backend/labelstudio/webhooks.py). Then:
- submits in Label Studio reach the webhook, and a version trained on them appears by itself;
- no webhook delivery of Label Studio is refused;
- a forged webhook without credentials is refused, and one with credentials but a made-up annotation changes
  no label.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest
import requests
from redis import Redis

from backend.labelstudio.label_mirror import LabelStore
from backend.labelstudio.labeling_config import parse_label_config
from tests.e2e.conftest import start_pair
from tests.e2e.dataset import CLASSES, Image
from tests.e2e.labeling_session import LabelingSession, image_file_of
from tests.e2e.processes import wait_until
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images

pytestmark = pytest.mark.e2e

USER, PASSWORD = "label-studio", "e2e-basic-auth-pass"
POOL_PER_CLASS = 3


@pytest.fixture(scope="module")
def auth_pair(label_studio, e2e_redis, documents_root, e2e_root, pytestconfig):
    pair = start_pair(pytestconfig, "basic-auth", redis_url=f"redis://127.0.0.1:{e2e_redis.port}/2",
                      label_studio_url=label_studio.url, api_key=label_studio.credentials.legacy_token,
                      documents_root=documents_root, log_dir=e2e_root / "logs",
                      extra_env={"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD})
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def session(ls_api, auth_pair, documents_root) -> LabelingSession:
    """A project over a local-files storage of POOL_PER_CLASS images per class, connected with basic auth."""
    folder = documents_root / "basic-auth"
    folder.mkdir()
    images = {}
    for label in CLASSES:
        for path, _ in [item for item in dataset_images(HYMENOPTERA, "train") if item[1] == label][:POOL_PER_CLASS]:
            name = f"pool-{label}-{path.name}"
            shutil.copyfile(path, folder / name)
            images[name] = Image(file_name=name, label=label, role="pool")
    project = ls_api.create_project("headstart e2e basic auth", CONFIG_2)["id"]
    ls_api.add_local_storage(project, folder)
    by_task = {task["id"]: images[image_file_of(task)] for task in ls_api.tasks(project)}
    backend = ls_api.post("/api/ml", {"url": auth_pair.url, "project": project, "title": "headstart",
                                      "auth_method": "BASIC_AUTH", "basic_auth_user": USER,
                                      "basic_auth_pass": PASSWORD})
    return LabelingSession(api=ls_api, pair=auth_pair, project=project, backend_id=backend["id"], images=by_task)


def metric(session: LabelingSession, series: str) -> float:
    text = requests.get(f"{session.pair.url}/metrics", auth=(USER, PASSWORD), timeout=10).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def mirror_labels(session: LabelingSession) -> dict[int, list[str]]:
    labels = LabelStore(Redis.from_url(session.pair.redis_url))
    spec = parse_label_config(CONFIG_2)[0]
    return {example.task_id: example.choices for example in labels.examples(str(session.project), spec)[0]}


REFUSED = 'headstart_webhook_refused_total{reason="unauthenticated"}'


def test_submits_train_with_basic_auth_on(session):
    assert session.api.backend(session.backend_id)["state"] == "CO"
    hooks = wait_until(lambda: [hook for hook in session.api.get(f"/api/webhooks?project={session.project}")
                                if hook["headers"].get("Authorization")],
                       timeout_s=60, interval_s=0.5, processes=session.pair.processes,
                       what="the basic-auth header on the project's webhook in Label Studio")
    assert [hook["url"] for hook in hooks] == [f"{session.pair.url}/webhook"]
    assert requests.get(f"{session.pair.url}/versions", timeout=10).status_code == 401  # auth is really on

    refused_before = metric(session, REFUSED)
    session.annotate_next(per_class=2)
    version = session.wait_until_settled(session.expected_training_set())
    assert version["trained_on"] == session.expected_training_set()
    events = metric(session, 'headstart_webhook_events_total{action="ANNOTATION_CREATED"}')
    print(f"\nbasic auth on: the webhook got its header through Label Studio's API; 4 submits → "
          f"{events:.0f} ANNOTATION_CREATED webhooks accepted, {metric(session, REFUSED) - refused_before:.0f} "
          f"refused; version {version['version']} trained on {len(version['trained_on'])} labels")
    assert events >= 4 and metric(session, REFUSED) == refused_before


def test_forged_webhooks_change_no_label(session):
    truth = mirror_labels(session)
    assert truth == {int(task): labels for task, labels in session.expected_training_set().items()}
    task, (annotation, label) = next(iter(session.annotations.items()))
    flipped = "bees" if label == "ants" else "ants"
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [flipped]}}]
    unlabeled = session.unlabeled_tasks()[0]
    forged = [
        {"action": "ANNOTATION_UPDATED", "project": {"id": session.project},
         "annotation": {"id": annotation, "task": task, "result": result, "ground_truth": True,
                        "updated_at": "2099-01-01T00:00:00Z"}, "task": {"id": task, "data": {}}},
        {"action": "ANNOTATION_CREATED", "project": {"id": session.project},
         "annotation": {"id": 987_654, "task": unlabeled, "result": result, "ground_truth": True,
                        "updated_at": "2099-01-01T00:00:00Z"}, "task": {"id": unlabeled, "data": {}}},
        {"action": "ANNOTATIONS_DELETED", "project": {"id": session.project},
         "annotations": [{"id": a} for a, _ in session.annotations.values()]},
    ]
    refused_before = metric(session, REFUSED)
    for body in forged:
        assert requests.post(f"{session.pair.url}/webhook", json=body, timeout=10).status_code == 401
    assert metric(session, REFUSED) == refused_before + len(forged)
    last = session.last_version_number()
    sent_at = time.time()
    for body in forged:  # with the password: hints only, confirmed against Label Studio
        response = requests.post(f"{session.pair.url}/webhook", json=body, auth=(USER, PASSWORD), timeout=10)
        assert response.status_code == 200, response.text
    training = session.wait_for_training(since=sent_at)
    wait_until(session.training_idle, timeout_s=120, interval_s=0.5, processes=session.pair.processes,
               what="idle training after the forged webhooks")
    after = mirror_labels(session)
    changed = sum(after.get(t) != labels for t, labels in truth.items()) + len(set(after) - set(truth))
    print(f"\nforged webhooks: {len(forged)} without credentials refused (401, counted); {len(forged)} with "
          f"credentials (flipped ground truth, a made-up annotation, deletion of every annotation): labels "
          f"changed {changed}; the training they asked for: {training['controls']}")
    assert changed == 0 and after == truth
    # the labels read back from Label Studio are the served version's own: no new version
    assert training["controls"][session.control]["status"] == "unchanged" and session.last_version_number() == last
