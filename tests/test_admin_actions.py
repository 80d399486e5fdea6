"""Admin actions: promote / rollback move the served version; retry, cancel, suspend, train and embed go through RQ."""

from __future__ import annotations

import pytest
from rq.job import JobStatus
from rq.suspension import is_suspended

from backend.common import queue_state
from backend.admin import actions, views
from backend.admin.errors import NotFound, Refused
from backend.core.heads import build_head
from backend.core.store import ModelStore
from backend.loop.services import build_services
from tests.admin_support import (admin_settings, annotate, client, fake_label_studio, labeled_images,  # noqa: F401
                                 served, services)
from tests.helpers import CONFIG_2
from tests.loop_helpers import run_burst_worker
from backend.common.queues import EMBED_QUEUE, TRAIN_QUEUE, queue

PROJECT = 7


def save_version(store: ModelStore, *, classes=("ants", "bees"), labels: int = 4, accuracy: float = 0.75) -> int:
    """A stored head version with the metadata a trained one has (no training: these tests move pointers)."""
    meta = {"classes": list(classes), "feature_dim": 1280, "multi_label": False, "label_count": labels,
            "metrics": {"cv_accuracy": accuracy}, "backbone": "mobilenet_v2", "backbone_key": "mobilenet_v2:test"}
    return store.save(str(PROJECT), "label", build_head(1280, len(classes)), meta)


@pytest.fixture
def three_promotions(services, client):
    """Versions 1, 2, 3 of project 7, each promoted in turn (3 is served)."""
    client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2})
    for labels in (2, 4, 8):
        services.store.promote(str(PROJECT), "label", save_version(services.store, labels=labels))
    assert served(client, PROJECT) == "label-v3"


def test_rollback_walks_back_through_promotions_and_setup_follows(services, client, three_promotions):
    result = actions.rollback(services, PROJECT)
    assert (result["rolled_back"], result["current"], result["model_version"]) == (3, 2, "label-v2")
    assert result["previous_model_version"] == "label-v3"
    assert served(client, PROJECT) == "label-v2"
    assert services.store.meta(str(PROJECT), "label", 3)["status"] == "rolled_back"

    assert actions.rollback(services, PROJECT)["current"] == 1
    with pytest.raises(Refused, match="first promoted version"):
        actions.rollback(services, PROJECT)
    assert served(client, PROJECT) == "label-v1"

    # Promoting by hand, then rolling back, returns to the version served before that promotion.
    assert actions.promote(services, PROJECT, 3)["model_version"] == "label-v3"
    assert actions.rollback(services, PROJECT)["model_version"] == "label-v1"


def test_promote_refuses_what_cannot_be_served_and_names_what_is_missing(services, client, three_promotions):
    other = save_version(services.store, classes=("cats", "dogs"))
    with pytest.raises(Refused, match="classes"):
        actions.promote(services, PROJECT, other)
    with pytest.raises(NotFound, match="no version 99"):
        actions.promote(services, PROJECT, 99)
    with pytest.raises(NotFound, match="control 'colour'"):
        actions.promote(services, PROJECT, 1, control="colour")
    with pytest.raises(NotFound, match="Project 8 is unknown"):
        actions.promote(services, 8, 1)
    assert served(client, PROJECT) == "label-v3"


def test_a_rollback_to_a_version_of_other_classes_is_refused_and_changes_nothing(services, client):
    client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2})
    services.store.promote(str(PROJECT), "label", save_version(services.store, classes=("cats", "dogs")))
    services.store.promote(str(PROJECT), "label", save_version(services.store))
    with pytest.raises(Refused, match="classes"):
        actions.rollback(services, PROJECT)
    assert served(client, PROJECT) == "label-v2"
    assert services.store.meta(str(PROJECT), "label", 2)["status"] == "promoted"


def test_a_project_with_several_controls_needs_one_named(services, three_promotions):
    services.store.save(str(PROJECT), "colour", build_head(1280, 2), {"classes": ["red", "blue"], "feature_dim": 1280,
                                                                     "multi_label": False})
    with pytest.raises(Refused, match="several controls"):
        actions.rollback(services, PROJECT)
    assert actions.rollback(services, PROJECT, control="label")["current"] == 2


def test_a_failed_training_is_retried_once_its_cause_is_fixed(services, client, admin_settings, redis):
    annotate(client, PROJECT, labeled_images(2), config=None)  # no labeling config known yet: the job fails
    run_burst_worker(admin_settings, redis, services)
    (failed,) = [job for job in views.jobs(redis) if job["status"] == "failed"]
    assert "no known labeling config" in failed["error"] and "Traceback" in failed["traceback"]
    assert served(client, PROJECT) == "untrained"  # /setup records the config: the cause is gone
    assert actions.retry_job(redis, failed["id"]) == {"job": failed["id"], "queue": TRAIN_QUEUE, "status": "queued"}
    run_burst_worker(admin_settings, redis, services)
    assert views.job(redis, failed["id"])["status"] == "finished"
    assert served(client, PROJECT) == "label-v1"


def test_retry_failed_requeues_every_failed_job(services, client, admin_settings, redis):
    for project in (7, 8):
        annotate(client, project, labeled_images(1), config=None)
    run_burst_worker(admin_settings, redis, services)
    failed = {job["id"] for job in views.jobs(redis) if job["status"] == "failed"}
    assert len(failed) == 2
    assert set(actions.retry_failed(redis)["requeued"]) == failed
    assert queue(TRAIN_QUEUE, redis).failed_job_registry.count == 0 and queue(TRAIN_QUEUE, redis).count == 2


def test_cancel_only_touches_jobs_that_have_not_started(services, client, redis):
    with pytest.raises(NotFound, match="unknown"):  # until /setup or a webhook names its labeling config
        actions.train(services, PROJECT)
    client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2})
    first = actions.train(services, PROJECT)
    assert first["outcome"] == "queued" and first["job"] in queue(TRAIN_QUEUE, redis).job_ids
    assert actions.train(services, PROJECT) == {**first, "outcome": "coalesced"}
    with pytest.raises(Refused, match="is queued; only failed"):
        actions.retry_job(redis, first["job"])

    assert actions.cancel_job(redis, first["job"])["status"] == "canceled"
    assert queue(TRAIN_QUEUE, redis).count == 0
    with pytest.raises(Refused, match="canceled"):
        actions.cancel_job(redis, first["job"])
    assert actions.train(services, PROJECT)["outcome"] == "queued"  # a canceled job does not swallow requests

    running = queue(TRAIN_QUEUE, redis).jobs[0]
    running.set_status(JobStatus.STARTED)
    with pytest.raises(Refused, match="running"):
        actions.cancel_job(redis, running.id)
    with pytest.raises(NotFound, match="No job 'nope'"):
        actions.cancel_job(redis, "nope")


def test_suspend_and_resume_hold_every_worker(redis):
    assert actions.suspend_queues(redis) == {"suspended": True} and is_suspended(redis)
    assert queue_state.scrape_gauges(redis)["headstart_queues_suspended"] == 1.0
    assert actions.resume_queues(redis) == {"suspended": False} and not is_suspended(redis)


def test_draining_an_unknown_worker_names_the_running_ones(redis):
    with pytest.raises(NotFound, match="No worker named 'ghost'"):
        actions.drain_worker(redis, "ghost")


def test_embed_caches_every_task_of_a_project_with_progress_in_the_job(admin_settings, redis, encoders, client):
    items = labeled_images(3)
    fake = fake_label_studio(PROJECT, items)
    try:
        ls_settings = admin_settings.replace(label_studio_url=fake.url, label_studio_api_key=fake.legacy_token)
        services = build_services(ls_settings, redis, encoders=encoders)
        client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2})
        job_id = actions.embed(services, PROJECT)["job"]
        assert queue(EMBED_QUEUE, redis).job_ids == [job_id]
        run_burst_worker(ls_settings, redis, services)
    finally:
        fake.stop()
    job = views.job(redis, job_id)
    assert job["status"] == "finished", job["traceback"]
    assert job["progress"] == {"done": len(items), "total": len(items), "failed": 0}
    assert job["result"]["media"] == len(items)
    assert "headstart_embedding_cache_misses_total " + str(len(items)) in services.metrics.render()
