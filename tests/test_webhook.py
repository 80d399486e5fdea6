"""/webhook as an attacker and as Label Studio use it (backend/server/webhook.py, backend/labelstudio/webhooks.py).

- Forged webhooks change no label: a webhook is a hint, and the training confirms it by id against Label
  Studio's API (here the stand-in of tests/fake_label_studio.py, answering as a real 1.23.2 does).
- A forged webhook costs only a bounded record: projects never set up store nothing and queue nothing,
  labeling configs in bodies are never stored, pending hints per project are capped.
- With basic auth on, unauthenticated calls are refused and counted, and /setup gives the project's webhook in
  Label Studio the basic-auth header, so Label Studio's own webhooks pass (tests/e2e/test_basic_auth.py proves
  it against a real Label Studio).
"""

from __future__ import annotations

import base64
import json
import logging
import re

import pytest

from backend.common import redis_keys
from backend.common.queues import QUEUE_NAMES, TRAIN_QUEUE, queue
from backend.labelstudio.label_mirror import CHECK, MAX_HINTS, LabelStore
from backend.labelstudio.webhooks import WebhookAuth, authorization, points_at
from backend.loop.services import build_services
from backend.server.app import create_app
from backend.server.webhook import TASK_EVENTS, TRAINING_EVENTS
from tests.helpers import CONFIG_2
from tests.loop_helpers import annotation_event, deleted_event, run_burst_worker, set_up
from tests.test_sync import PROJECT, SPEC, created, fake_project

pytestmark = pytest.mark.security

USER, PASSWORD = "label-studio", "s3cret-webhook-pass"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
BACKEND_URL = "http://localhost:9090"  # the URL Label Studio calls the backend by (the Host of its /setup)
HUGE_CONFIG = CONFIG_2.replace("</View>", "<!--" + "x" * 1_000_000 + "--></View>")


@pytest.fixture
def label_studio():
    fake = fake_project()
    yield fake
    fake.stop()


@pytest.fixture
def loop(settings, redis, encoders, label_studio):
    """The production app and burst workers against the fake Label Studio, the project set up."""
    loop = settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
                            train_min_interval_s=0)
    services = build_services(loop, redis, encoders=encoders)
    set_up(redis, PROJECT)
    return loop, services, create_app(loop, services=services).test_client()


def mirror(redis) -> list[str]:
    return sorted(map(json.dumps, LabelStore(redis).records(str(PROJECT))))


def served_labels(redis) -> dict[int, list[str]]:
    return {example.task_id: example.choices for example in LabelStore(redis).examples(str(PROJECT), SPEC)[0]}


def forged_bodies(fake, round_: int) -> list[dict]:
    """Every kind of forged annotation webhook, with ids that differ per round."""
    labeled = [task for task in fake.tasks if task["annotations"]]
    unlabeled = [task for task in fake.tasks if not task["annotations"]]
    real = labeled[round_ % len(labeled)]["annotations"][0]
    flipped = "bees" if fake.classes[real["task"]] == "ants" else "ants"
    bodies = []

    made_up_annotation = created(fake, real)  # a new annotation id on a real labeled task, as ground truth
    made_up_annotation["annotation"].update(id=90_000 + round_, ground_truth=True)
    made_up_annotation["annotation"]["result"][0]["value"]["choices"] = [flipped]
    bodies.append(made_up_annotation)

    updated = created(fake, real) | {"action": "ANNOTATION_UPDATED"}  # the real annotation, flipped, newer
    updated["annotation"].update(ground_truth=True, updated_at=f"2099-01-01T00:00:{round_ % 60:02d}.000000Z")
    updated["annotation"]["result"][0]["value"]["choices"] = [flipped]
    bodies.append(updated)

    ghost = created(fake, real)  # a task Label Studio does not have
    ghost["annotation"].update(id=91_000 + round_, task=800_000 + round_, ground_truth=True)
    ghost["task"]["id"] = 800_000 + round_
    bodies.append(ghost)

    on_unlabeled = created(fake, real)  # a label on a real task nobody labeled
    target = unlabeled[round_ % len(unlabeled)]
    on_unlabeled["annotation"].update(id=92_000 + round_, task=target["id"], ground_truth=True)
    on_unlabeled["task"].update(id=target["id"], data=target["data"])
    bodies.append(on_unlabeled)

    bulk = {"action": "ANNOTATIONS_CREATED", "project": {"id": PROJECT},
            "annotation": [made_up_annotation["annotation"], ghost["annotation"]],
            "task": [made_up_annotation["task"], ghost["task"]]}
    bodies.append(bulk)

    every_real_id = [a["id"] for task in labeled for a in task["annotations"]]  # guessed right: LS still has them
    bodies.append(deleted_event(project=PROJECT, annotation_ids=every_real_id + [93_000 + round_]))
    return bodies


def test_forged_webhooks_change_no_label(loop, label_studio, redis):
    settings, services, client = loop
    fake = label_studio
    assert client.post("/webhook", json=created(fake, fake.task(1)["annotations"][0])).status_code == 200
    run_burst_worker(settings, redis, services)  # first contact: every label read from Label Studio
    truth, truth_labels = mirror(redis), served_labels(redis)
    assert len(truth_labels) == 8

    attempts, requests_before, rounds = 0, len(fake.api_requests), 5
    for round_ in range(rounds):
        for body in forged_bodies(fake, round_):
            response = client.post("/webhook", json=body)
            assert response.status_code == 200, response.json
            attempts += 1
        run_burst_worker(settings, redis, services)
        assert mirror(redis) == truth, f"round {round_}: a forged webhook changed the mirror"
    changed = sum(served_labels(redis).get(task) != choices for task, choices in truth_labels.items())
    changed += len(set(served_labels(redis)) - set(truth_labels))
    requests = len(fake.api_requests) - requests_before
    print(f"\nforged webhooks: {attempts} attempts ({rounds} rounds of made-up annotation, newer flipped update, "
          f"made-up task, label on an unlabeled task, bulk, deletion of every real annotation), all as ground "
          f"truth; labels changed: {changed}; Label Studio requests to confirm them: {requests}")
    assert changed == 0 and served_labels(redis) == truth_labels


def every_action_body(project: int, action: str) -> dict:
    """A body of `action` for `project`, with every field an action reads, and a 1 MB labeling config."""
    body = annotation_event(project=project, task_id=1, annotation_id=1, url="/data/upload/1/a.jpg", choice="ants",
                            action=action, config=HUGE_CONFIG)
    body.update(annotations=[{"id": 1}], tasks=[{"id": 1}])
    if action == "ANNOTATIONS_CREATED":
        body["annotation"], body["task"] = [body["annotation"]], [body["task"]]
    return body


def test_webhooks_of_projects_never_set_up_store_nothing_and_queue_nothing(loop, redis):
    _, services, client = loop
    before = {key for key in redis.keys() if key != redis_keys.METRICS.encode()}
    actions = TRAINING_EVENTS + TASK_EVENTS
    for action in actions:
        response = client.post("/webhook", json=every_action_body(424_242, action))
        assert response.status_code == 200 and response.json["status"] == "ignored: unknown project", response.json
    after = {key for key in redis.keys() if key != redis_keys.METRICS.encode()}
    assert after == before, f"keys written for an unknown project: {after - before}"
    assert all(queue(name, redis).count == 0 for name in QUEUE_NAMES)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'headstart_webhook_refused_total{{reason="unknown_project"}} {len(actions)}' in metrics


def test_a_labeling_config_in_a_webhook_body_is_never_stored(loop, label_studio, redis):
    settings, services, client = loop
    response = client.post("/webhook", json={"action": "START_TRAINING",
                                             "project": {"id": PROJECT, "label_config": HUGE_CONFIG}})
    assert response.status_code == 200
    assert services.projects.label_config(str(PROJECT)) == CONFIG_2
    biggest = max(redis.memory_usage(key) or 0 for key in redis.keys())
    assert biggest < 100_000, f"a {biggest}-byte key: the body's 1 MB config was stored"
    run_burst_worker(settings, redis, services)  # the training asks Label Studio for the project's config instead
    assert services.projects.label_config(str(PROJECT)) == label_studio.label_config == CONFIG_2
    assert "GET /api/projects/5/" in label_studio.api_requests


def test_pending_hints_per_project_are_capped(loop, redis):
    _, _, client = loop
    sent = 0
    for batch in range(3):  # 3 × 8,000 guessed annotation ids
        ids = list(range(batch * 8_000 + 1, (batch + 1) * 8_000 + 1))
        assert client.post("/webhook", json=deleted_event(project=PROJECT, annotation_ids=ids)).status_code == 200
        sent += len(ids)
    held = redis.smembers(redis_keys.label_hints(str(PROJECT)))
    print(f"\npending hints: {sent} guessed ids sent, {len(held)} held (cap {MAX_HINTS}, then `check`)")
    assert len(held) <= MAX_HINTS + 2 and CHECK.encode() in held


# ---- basic auth ----------------------------------------------------------------------------------------------

@pytest.fixture
def auth_loop(settings, redis, encoders, label_studio):
    loop = settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
                            basic_auth_user=USER, basic_auth_pass=PASSWORD, train_min_interval_s=0)
    services = build_services(loop, redis, encoders=encoders)
    return loop, services, create_app(loop, services=services).test_client()


def setup_call(client, **headers):
    return client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2}, base_url=BACKEND_URL,
                       headers=headers)


def test_unauthenticated_webhooks_are_refused_counted_and_store_nothing(auth_loop, label_studio, redis):
    _, _, client = auth_loop
    set_up(redis, PROJECT)
    body = created(label_studio, label_studio.task(1)["annotations"][0])
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{USER}:guess".encode()).decode()}
    assert client.post("/webhook", json=body).status_code == 401
    assert client.post("/webhook", json=body, headers=wrong).status_code == 401
    assert not LabelStore(redis).hints_pending(str(PROJECT)) and queue(TRAIN_QUEUE, redis).count == 0
    assert client.post("/webhook", json=body, headers=AUTH).status_code == 200
    metrics = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'headstart_webhook_refused_total{reason="unauthenticated"} 2' in metrics


def test_setup_gives_the_projects_webhook_the_basic_auth_header(auth_loop, label_studio, redis, monkeypatch):
    settings, services, client = auth_loop
    monkeypatch.setattr("worker.jobs.WEBHOOK_LOOK_INTERVAL_S", 0)
    fake = label_studio
    ours = fake.add_ml_webhook(PROJECT, BACKEND_URL)
    other_backend = fake.add_ml_webhook(PROJECT, "http://other-backend:9090")
    other_project = fake.add_ml_webhook(PROJECT + 1, BACKEND_URL)

    assert setup_call(client).status_code == 401  # /setup itself needs basic auth: no job from a stranger
    assert setup_call(client, **AUTH).status_code == 200
    assert setup_call(client, **AUTH).status_code == 200  # Label Studio calls it often: one attempt at a time
    assert queue(TRAIN_QUEUE, redis).count == 1
    run_burst_worker(settings, redis, services)

    assert ours["headers"] == {"Authorization": authorization(USER, PASSWORD)} == AUTH
    assert other_backend["headers"] == {} and other_project["headers"] == {}  # never sent elsewhere
    state = WebhookAuth(redis).state(str(PROJECT))
    assert state["state"] == "ok" and state["webhooks"] == [ours["id"]] and PASSWORD not in json.dumps(state)
    assert setup_call(client, **AUTH).status_code == 200 and queue(TRAIN_QUEUE, redis).count == 0  # done

    # Label Studio now sends its webhooks with the webhook's headers: they pass
    body = created(fake, fake.task(1)["annotations"][0])
    assert client.post("/webhook", json=body, headers=ours["headers"]).status_code == 200


def test_a_webhook_created_after_the_first_setup_is_found_at_a_later_one(auth_loop, label_studio, redis,
                                                                        monkeypatch):
    settings, services, client = auth_loop
    monkeypatch.setattr("worker.jobs.WEBHOOK_LOOK_INTERVAL_S", 0)
    assert setup_call(client, **AUTH).status_code == 200  # Label Studio validates before it saves the webhook
    run_burst_worker(settings, redis, services)
    assert WebhookAuth(redis).state(str(PROJECT))["state"] == "missing"
    ours = label_studio.add_ml_webhook(PROJECT, BACKEND_URL)
    redis.delete(redis_keys.webhook_auth(str(PROJECT), "claim"))  # RETRY_AFTER_S later
    assert setup_call(client, **AUTH).status_code == 200
    run_burst_worker(settings, redis, services)
    assert ours["headers"] == AUTH and WebhookAuth(redis).state(str(PROJECT))["state"] == "ok"


def test_a_refused_webhook_change_is_recorded_and_logged_with_its_fix(auth_loop, label_studio, redis, caplog):
    settings, services, client = auth_loop
    label_studio.add_ml_webhook(PROJECT, BACKEND_URL)
    label_studio.webhook_changes_refused = True
    assert setup_call(client, **AUTH).status_code == 200
    with caplog.at_level(logging.WARNING):
        run_burst_worker(settings, redis, services)
    state = WebhookAuth(redis).state(str(PROJECT))
    assert state["state"] == "failed" and "Settings → Webhooks" in state["message"]
    assert any("Could not change the webhooks of project 5" in record.getMessage() for record in caplog.records)
    assert setup_call(client, **AUTH).status_code == 200 and queue(TRAIN_QUEUE, redis).count == 0  # not at once


def test_basic_auth_without_label_studios_api_warns_at_start(settings, services, caplog):
    with caplog.at_level(logging.WARNING):
        create_app(settings.replace(basic_auth_user=USER, basic_auth_pass=PASSWORD), services=services)
    assert any("LABEL_STUDIO_API_KEY" in record.getMessage() and "Webhooks" in record.getMessage()
               for record in caplog.records)


@pytest.mark.parametrize(("hook", "backend", "ours"), [
    ("http://localhost:9090/webhook", "http://localhost:9090/", True),
    ("http://LOCALHOST:9090/webhook/", "http://localhost:9090", True),
    ("https://ml.example.com/headstart/webhook", "http://ml.example.com/headstart/", True),
    ("http://localhost:9091/webhook", "http://localhost:9090/", False),
    ("http://evil.example/webhook?localhost:9090", "http://localhost:9090/", False),
    ("http://localhost:9090/other/webhook", "http://localhost:9090/", False),
])
def test_only_webhooks_pointing_at_this_backend_get_the_header(hook, backend, ours):
    assert points_at(hook, backend) is ours
    assert re.fullmatch(r"Basic [A-Za-z0-9+/=]+", authorization(USER, PASSWORD))
