"""What the admin shows: versions with their metrics, jobs with durations and errors, workers.

/metrics, which counts the same trainings and workers, is tested in test_metrics.py."""

from __future__ import annotations

import pytest

from backend.common import queue_state
from backend.admin import views
from backend.admin.errors import NotFound
from tests.admin_support import (admin_settings, annotate, client, labeled_images, served, services,  # noqa: F401
                                 train_rounds)
from tests.loop_helpers import run_burst_worker
from worker.process import build_worker

PROJECT = 7


def test_models_lists_every_version_with_labels_metrics_parameters_and_the_current_one(
        client, admin_settings, redis, services):
    train_rounds(client, admin_settings, redis, services, PROJECT, [1, 5])
    data = views.models(services, f"{PROJECT}.1717")
    assert data["project"] == str(PROJECT) and data["model_version"] == served(client, PROJECT) == "label-v2"
    (control,) = data["controls"]
    first, second = control["versions"]
    assert control["current"] == 2 and (first["current"], second["current"]) == (False, True)
    assert (first["labels"], second["labels"]) == (2, 10)
    assert second["labels_per_class"] == {"ants": 5, "bees": 5}
    decision = services.store.meta(str(PROJECT), "label", 2)["promotion"]
    assert second["status"] == "promoted" and second["reason"] == decision["reason"]
    assert (second["candidate_score"], second["current_score"]) == (decision["candidate_score"],
                                                                    decision["current_score"])
    assert 0.0 <= second["cv_accuracy"] <= 1.0 and second["cv_folds"] == 5
    assert (second["trainable_parameters"], second["non_trainable_parameters"]) == (1280 * 2 + 2, 2_223_872)
    assert second["job_id"] in {job["id"] for job in views.jobs(redis)}
    with pytest.raises(NotFound, match="Project 70 is unknown"):
        views.models(services, 70)


def test_jobs_show_durations_results_and_the_error_of_a_failed_one(client, admin_settings, redis, services):
    train_rounds(client, admin_settings, redis, services, PROJECT, [2])
    annotate(client, 8, labeled_images(1), config=None)
    run_burst_worker(admin_settings, redis, services)
    # a training's own jobs (each one that fits a head also queues an audit of the labels)
    jobs = {job["project"]: job for job in views.jobs(redis) if job["function"] == "worker.jobs.train_project"}
    finished, failed = jobs[str(PROJECT)], jobs["8"]
    assert finished["status"] == "finished" and finished["duration_s"] > 0
    assert finished["result"]["model_version"] == "label-v1" and finished["error"] is None
    assert finished["function"] == "worker.jobs.train_project" and finished["args"] == [str(PROJECT)]
    assert failed["status"] == "failed" and failed["error"].startswith("backend.common.errors.NotEnoughLabels")
    assert "Traceback" in failed["traceback"]
    assert list(jobs.values())[0]["last_activity"] >= list(jobs.values())[1]["last_activity"]  # newest first
    queue_view = {view["name"]: view["counts"] for view in views.queues(redis)}
    assert queue_view["headstart-train"]["finished"] == 1 and queue_view["headstart-train"]["failed"] == 1


def test_workers_show_host_device_backbone_and_counts(admin_settings, redis, services):
    worker = build_worker(admin_settings, redis, services=services, name="viewed-worker")
    try:
        worker.register_birth()  # what work() does first, without blocking on the queues
        worker.set_state("idle")
        (view,) = views.workers(redis)
        assert view["name"] == "viewed-worker" and view["state"] == "idle"
        assert view["device"] == {"type": "cpu", "name": "cpu", "memory_bytes": None}
        assert view["backbone"] == services.encoders.get().key and view["host"]
        assert view["queues"] == ["headstart-train", "headstart-embed"]
        assert view["jobs_done"] == 0 and view["heartbeat_age_s"] < 60
        gauges = queue_state.scrape_gauges(redis)
        assert gauges['headstart_workers{state="idle"}'] == 1 and gauges['headstart_workers{state="busy"}'] == 0
    finally:
        worker.register_death()
    assert views.workers(redis) == []



def test_models_and_the_cli_page_through_versions_without_reading_every_one(services, monkeypatch, capsys, redis_url):
    from backend.cli import main
    from backend.core.heads import build_head
    from backend.core.store import ModelStore

    from tests.helpers import CONFIG_2

    services.projects.remember(str(PROJECT), CONFIG_2)
    meta = {"classes": ["ants", "bees"], "feature_dim": 8, "multi_label": False, "label_count": 2}
    for _ in range(7):
        services.store.save(str(PROJECT), "label", build_head(8, 2), meta, promote=True)
    monkeypatch.setattr(ModelStore, "versions", lambda *args: pytest.fail("every version was read"))
    seen, before = [], None
    while True:
        (control,) = views.models(services, PROJECT, limit=3, before=before)["controls"]
        seen.append([version["version"] for version in control["versions"]])
        before = control["older"]
        if before is None:
            break
    assert seen == [[5, 6, 7], [2, 3, 4], [1]] and control["version_count"] == 7
    assert views.projects(services)[0]["controls"][0]["versions"] == 7
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert main(["models", str(PROJECT), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "label-v7" in out and "label-v5" not in out and f"models {PROJECT} --before 6" in out
