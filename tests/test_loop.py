"""The training loop end to end inside one process: webhook → RQ job (burst worker) → promoted head → /predict.

Label Studio's API is not configured here (the mirror is fed by webhooks only); tests/e2e drives the
same loop against a real Label Studio, including resynchronisation.
"""

from __future__ import annotations

import pytest
import torch
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from torchvision import models

from backend.server.app import create_app
from backend.core.store import ModelStore
from backend.loop.services import build_services
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images
from tests.loop_helpers import annotation_event, deleted_event, local_url, run_burst_worker, set_up
from backend.common.queues import TRAIN_QUEUE, queue

PROJECT = 7


@pytest.fixture
def services(loop_services):
    return loop_services


@pytest.fixture
def client(loop_settings, services, redis):
    set_up(redis, PROJECT)  # Label Studio's /setup: webhooks of a project never set up are refused
    return create_app(loop_settings, services=services).test_client()


@pytest.fixture(scope="module")
def images():
    train, val = dataset_images(HYMENOPTERA, "train"), dataset_images(HYMENOPTERA, "val")
    ids = {path: index + 1 for index, (path, _) in enumerate(train + val)}
    return train, val, ids


def first_per_class(train, count):
    return [item for cls in ("ants", "bees") for item in [i for i in train if i[1] == cls][:count]]


def annotate(client, items, ids, *, start_annotation: int = 1000):
    for offset, (path, cls) in enumerate(items):
        response = client.post("/webhook", json=annotation_event(
            project=PROJECT, task_id=ids[path], annotation_id=start_annotation + ids[path] + offset * 0,
            url=local_url(path), choice=cls))
        assert response.status_code == 200, response.json


def val_accuracy(client, val, ids) -> tuple[float, str]:
    tasks = [{"id": ids[path], "data": {"image": local_url(path)}} for path, _ in val]
    results = client.post("/predict", json={"tasks": tasks, "project": f"{PROJECT}.1", "label_config": CONFIG_2}).json["results"]
    correct = sum(bool(r["result"]) and r["result"][0]["value"]["choices"] == [cls] for r, (_, cls) in zip(results, val))
    return correct / len(val), results[0]["model_version"]


def current_meta(redis) -> dict:
    store = ModelStore(redis)
    return store.meta(str(PROJECT), "label", store.current_number(str(PROJECT), "label"))


def test_annotations_turn_into_a_better_served_version(client, loop_settings, redis, services, images):
    train, val, ids = images
    assert client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2}).json["model_version"] == "untrained"

    annotate(client, first_per_class(train, 1), ids)
    run_burst_worker(loop_settings, redis, services)
    first_accuracy, first_version = val_accuracy(client, val, ids)
    assert first_version == "label-v1"

    annotate(client, first_per_class(train, 10), ids)
    run_burst_worker(loop_settings, redis, services)
    second_accuracy, second_version = val_accuracy(client, val, ids)
    assert second_version == "label-v2"
    assert client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2}).json["model_version"] == "label-v2"
    print(f"\nval accuracy: 1 label/class {first_accuracy:.3f} → 10 labels/class {second_accuracy:.3f}")
    assert second_accuracy > first_accuracy
    assert current_meta(redis)["label_count"] == 20


def test_a_deleted_annotation_is_not_in_the_next_version(client, loop_settings, redis, services, images):
    train, _, ids = images
    items = first_per_class(train, 3)
    annotate(client, items, ids)
    run_burst_worker(loop_settings, redis, services)
    gone_path = items[0][0]
    assert str(ids[gone_path]) in current_meta(redis)["trained_on"]

    response = client.post("/webhook", json=deleted_event(project=PROJECT, annotation_ids=[1000 + ids[gone_path]]))
    assert response.status_code == 200
    run_burst_worker(loop_settings, redis, services)
    meta = current_meta(redis)
    assert meta["version"] == 2 and str(ids[gone_path]) not in meta["trained_on"]
    assert meta["label_count"] == len(items) - 1


def test_an_updated_annotation_replaces_its_label(client, loop_settings, redis, services, images):
    train, _, ids = images
    items = first_per_class(train, 3)
    annotate(client, items, ids)
    path = items[0][0]
    client.post("/webhook", json=annotation_event(project=PROJECT, task_id=ids[path], annotation_id=1000 + ids[path],
                                                  url=local_url(path), choice="bees", action="ANNOTATION_UPDATED"))
    run_burst_worker(loop_settings, redis, services)
    assert current_meta(redis)["trained_on"][str(ids[path])] == ["bees"]


def test_a_worse_backbone_is_not_promoted(client, loop_settings, redis, services, images, encoders, tmp_path):
    train, _, ids = images
    annotate(client, first_per_class(train, 20), ids)
    run_burst_worker(loop_settings, redis, services)
    assert ModelStore(redis).current_number(str(PROJECT), "label") == 1

    # An untrained network is the extreme case of a backbone that transfers badly to this data.
    random_weights = tmp_path / "random-mobilenet.pth"
    torch.manual_seed(1)
    torch.save(models.mobilenet_v2(weights=None).state_dict(), random_weights)
    worse = loop_settings.replace(backbone_weights_file=str(random_weights))
    worse_services = build_services(worse, redis, encoders=type(encoders)(
        default_name="mobilenet_v2", weights_file=str(random_weights)))
    worse_client = create_app(worse, services=worse_services).test_client()
    assert worse_client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT, "label_config": CONFIG_2}}).status_code == 200
    run_burst_worker(worse, redis, worse_services)

    store = ModelStore(redis)
    assert store.current_number(str(PROJECT), "label") == 1
    rejected = store.meta(str(PROJECT), "label", 2)
    print(f"\nworse backbone: {rejected['status_reason']}")
    assert rejected["status"] == "rejected"
    assert rejected["promotion"]["candidate_score"] < rejected["promotion"]["current_score"]


def test_a_failing_job_lands_in_the_failed_registry_and_the_old_version_keeps_serving(
        client, loop_settings, redis, services, images):
    train, val, ids = images
    annotate(client, first_per_class(train, 3), ids)
    run_burst_worker(loop_settings, redis, services)
    before, version = val_accuracy(client, val[:10], ids)

    # Label Studio is configured but unreachable: the resync that START_TRAINING asks for must fail loudly.
    unreachable = loop_settings.replace(label_studio_url="http://127.0.0.1:9", label_studio_api_key="0" * 40)
    broken_services = build_services(unreachable, redis, encoders=services.encoders)
    broken_client = create_app(unreachable, services=broken_services).test_client()
    broken_client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT, "label_config": CONFIG_2}})
    run_burst_worker(unreachable, redis, broken_services)

    failed = FailedJobRegistry(queue=queue(TRAIN_QUEUE, redis))
    (job_id,) = failed.get_job_ids()
    job = queue(TRAIN_QUEUE, redis).fetch_job(job_id)
    assert "LabelStudioUnavailable" in job.latest_result().exc_string
    assert "Check LABEL_STUDIO_URL" in job.latest_result().exc_string
    after, version_after = val_accuracy(client, val[:10], ids)
    assert (after, version_after) == (before, version)


def test_events_while_nothing_can_train_are_kept_for_later(client, loop_settings, redis, services, images):
    train, _, ids = images
    annotate(client, first_per_class(train, 1)[:1], ids)  # one class only: no head possible
    run_burst_worker(loop_settings, redis, services)
    finished = FinishedJobRegistry(queue=queue(TRAIN_QUEUE, redis))
    (job_id,) = finished.get_job_ids()
    summary = queue(TRAIN_QUEUE, redis).fetch_job(job_id).return_value()
    assert summary["controls"]["label"]["status"] == "skipped"
    assert "two classes" in summary["controls"]["label"]["reason"]
    annotate(client, first_per_class(train, 1), ids)
    run_burst_worker(loop_settings, redis, services)
    assert ModelStore(redis).current_number(str(PROJECT), "label") == 1


def test_one_more_label_is_served_before_its_validation_and_validated_in_the_same_job(
        client, loop_settings, redis, services, images):
    train, _, ids = images
    items = first_per_class(train, 11)
    annotate(client, items[:10] + items[11:21], ids)
    run_burst_worker(loop_settings, redis, services)
    first = current_meta(redis)
    assert first["version"] == 1 and first["validated"] is True

    annotate(client, [items[10]], ids)  # one ant more: only labels changed
    run_burst_worker(loop_settings, redis, services)
    second = current_meta(redis)
    assert second["version"] == 2 and second["label_count"] == 21
    assert second["selection"]["recipe"] == first["selection"]["recipe"]  # refitted, not chosen again
    assert second["validated"] is True and second["promotion"]["promote"] is True
    assert not second["promotion"]["reason"].startswith("promoted before validation")
    assert second["out_of_fold_correct"] is not None and 0.8 <= second["metrics"]["cv_accuracy"] <= 1.0


def test_a_training_with_no_changed_label_keeps_the_served_version(client, loop_settings, redis, services, images):
    """START_TRAINING with nothing new (or a relabel undone) saves no version: it would be the same head, and
    every unlabeled task would be re-predicted for it."""
    train, _, ids = images
    items = first_per_class(train, 3)
    annotate(client, items, ids)
    run_burst_worker(loop_settings, redis, services)
    assert current_meta(redis)["version"] == 1

    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT}}).status_code == 200
    run_burst_worker(loop_settings, redis, services)
    store = ModelStore(redis)
    assert [meta["version"] for meta in store.versions(str(PROJECT), "label")] == [1]
    assert store.current_number(str(PROJECT), "label") == 1

    path = items[0][0]  # a real change still trains
    client.post("/webhook", json=annotation_event(project=PROJECT, task_id=ids[path], annotation_id=1000 + ids[path],
                                                  url=local_url(path), choice="bees", action="ANNOTATION_UPDATED"))
    run_burst_worker(loop_settings, redis, services)
    assert current_meta(redis)["version"] == 2 and current_meta(redis)["trained_on"][str(ids[path])] == ["bees"]


def test_a_stale_rerun_never_promotes_a_head_of_older_labels_over_a_newer_one(client, services, images, monkeypatch):
    """A training re-run after lost heartbeats while the first run still embeds: the newer run reads more labels and
    promotes; the older one, finishing last and judged against that newer head, must not replace it."""
    from backend.loop.retrain import retrain_project

    train, _, ids = images
    annotate(client, first_per_class(train, 3), ids)
    later = [item for item in first_per_class(train, 5) if item not in first_per_class(train, 3)]
    embed = services.features.features
    raced = []

    def embed_while_a_newer_training_promotes(project, items, encoder):
        vectors = embed(project, items, encoder)
        if not raced:  # the stale run has read its labels; meanwhile more arrive and a newer run promotes
            raced.append(True)
            annotate(client, later, ids, start_annotation=2000)
            assert retrain_project(services, str(PROJECT), job_id="newer")["promoted"] == ["label"]
        return vectors

    monkeypatch.setattr(services.features, "features", embed_while_a_newer_training_promotes)
    stale = retrain_project(services, str(PROJECT), job_id="stale")

    store = services.store
    served = store.meta(str(PROJECT), "label", store.current_number(str(PROJECT), "label"))
    assert served["job_id"] == "newer" and len(served["trained_on"]) == 10
    assert stale["controls"]["label"]["status"] == "superseded" and stale["promoted"] == []
    assert "newer labels" in stale["controls"]["label"]["reason"]


def test_with_no_old_detail_kept_every_training_is_still_judged_on_the_served_versions_labels(
        loop_settings, redis, encoders, images):
    """VERSION_DETAIL_KEEP=0, the strictest: older versions lose their per-label lists at once, yet the served one
    keeps what the guard reads (its `trained_on`, `out_of_fold_correct`), so each new version is compared on them."""
    from backend.loop.retrain import retrain_project

    services = build_services(loop_settings.replace(version_detail_keep=0), redis, encoders=encoders)
    client = create_app(loop_settings, services=services).test_client()
    set_up(redis, PROJECT)
    train, _, ids = images
    store, items = services.store, first_per_class(train, 6)
    for count in range(3, 7):
        annotate(client, [item for item in items if item in first_per_class(train, count)], ids)
        retrain_project(services, str(PROJECT), job_id=f"labels-{count}")
        current = store.current_number(str(PROJECT), "label")
        served = store.meta(str(PROJECT), "label", current)
        assert len(served["trained_on"]) == 2 * count and served["out_of_fold_correct"] is not None
        detailed = [meta["version"] for meta in store.versions(str(PROJECT), "label") if "trained_on" in meta]
        assert set(detailed) <= {current, store.rollback_target(str(PROJECT), "label")[1] if current > 1 else 0}
    reasons = [meta["promotion"]["reason"] for meta in store.versions(str(PROJECT), "label")[1:]]
    assert all("on the same" in reason for reason in reasons), reasons  # judged on the served version's labels
