"""`headstart status|workers|queues|jobs|models|train|embed`: same data as the API, exit codes scripts can use."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from backend.admin import views
from backend.cli import main
from backend.loop.services import build_services
from tests.admin_support import (TOKEN, admin_settings, annotate, client, fake_label_studio,  # noqa: F401
                                 labeled_images, served, services, train_rounds)
from tests.helpers import CONFIG_2
from tests.loop_helpers import run_burst_worker
from worker.process import build_worker
from backend.common.queues import EMBED_CHUNK_JOB, EMBED_JOB, EMBED_QUEUE, TRAIN_QUEUE, queue

PROJECT = 7


@pytest.fixture(autouse=True)
def cli_env(monkeypatch, redis_url):
    """The CLI reads REDIS_URL like every headstart command."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("LOG_LEVEL", "WARNING")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def api(client, path: str):
    response = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.json
    return response.json


def test_an_unreachable_redis_exits_2_and_says_what_to_fix(capsys, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    code, _, err = run(capsys, "status")
    assert code == 2 and "unreachable" in err and "REDIS_URL" in err
    assert "hunter2" not in err


def test_unknown_names_exit_1_and_bad_arguments_exit_2(capsys, redis):
    for argv, message in [(("models", "70"), "Project 70 is unknown"),
                          (("workers", "drain", "ghost"), "No worker named 'ghost'"),
                          (("jobs", "retry", "nope"), "No job 'nope'"),
                          (("train", "70"), "Project 70 is unknown")]:
        code, _, err = run(capsys, *argv)
        assert (code, message in err) == (1, True), (argv, err)
    for argv in [("jobs", "retry"), ("models", "promote", "7"), ("workers", "stop"), ("models", "x")]:
        assert run(capsys, *argv)[0] == 2, argv
    with pytest.raises(SystemExit) as exc:
        main(["workers", "explode"])
    assert exc.value.code == 2


def test_models_status_and_jobs_show_what_the_api_shows(capsys, client, admin_settings, redis, services):
    train_rounds(client, admin_settings, redis, services, PROJECT, [1, 4])
    assert run_json(capsys, "models", str(PROJECT)) == api(client, f"/admin/api/projects/{PROJECT}/models")
    assert run_json(capsys, "jobs") == api(client, "/admin/api/jobs")["jobs"]
    status = run_json(capsys, "status")
    assert status["projects"] == api(client, "/admin/api/projects")["projects"]
    assert status["projects"][0]["model_version"] == served(client, PROJECT) == "label-v2"

    code, table, _ = run(capsys, "models", str(PROJECT))
    assert code == 0 and f"project {PROJECT} serves label-v2" in table
    rows = [line for line in table.splitlines() if "label-v" in line and "│" in line]
    assert len(rows) == 2 and "current" in rows[1] and "current" not in rows[0]
    assert "2562" in rows[1] and "2223872" in rows[1]  # trainable head, frozen backbone
    code, table, _ = run(capsys, "status")
    assert code == 0 and "label: v2 of 2" in table and "headstart-train" in table


def test_rollback_and_promote_from_the_cli_change_what_setup_answers(capsys, client, admin_settings, redis, services):
    train_rounds(client, admin_settings, redis, services, PROJECT, [1, 4])
    code, out, _ = run(capsys, "models", "rollback", str(PROJECT))
    assert code == 0 and "now serves label-v1" in out
    assert served(client, PROJECT) == "label-v1"
    code, _, err = run(capsys, "models", "rollback", str(PROJECT))
    assert code == 1 and "Nothing to roll back to" in err
    assert run_json(capsys, "models", "promote", str(PROJECT), "2")["model_version"] == "label-v2"
    assert served(client, PROJECT) == "label-v2"


def test_jobs_retry_failed_show_and_cancel(capsys, client, admin_settings, redis, services):
    annotate(client, 8, labeled_images(1), config=None)
    run_burst_worker(admin_settings, redis, services)
    (failed,) = run_json(capsys, "jobs", "--status", "failed")
    code, out, _ = run(capsys, "jobs", "show", failed["id"])
    assert code == 0 and "NotEnoughLabels" in out and "Traceback" in out
    assert run_json(capsys, "jobs", "retry", "--failed") == {"requeued": [failed["id"]]}
    assert run_json(capsys, "jobs", "cancel", failed["id"])["status"] == "canceled"
    code, _, err = run(capsys, "jobs", "cancel", failed["id"])
    assert code == 1 and "only queued" in err
    assert run_json(capsys, "queues", "suspend") == {"suspended": True}
    assert run_json(capsys, "queues")["suspended"] is True
    assert run_json(capsys, "queues", "resume") == {"suspended": False}


def test_workers_show_the_gpu_a_worker_published(capsys, client, admin_settings, redis, services):
    worker = build_worker(admin_settings, redis, services=services, name="gpu-worker")
    worker.register_birth()
    try:
        gpu = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85_031_714_816}
        redis.hset(worker.key, "headstart", json.dumps({**worker.headstart_info, "device": gpu}))
        code, table, _ = run(capsys, "workers")
        assert code == 0 and "NVIDIA H100 80GB HBM3 79.2 GiB" in table and "gpu-worker" in table
        client.post("/admin/login", data={"token": TOKEN}, headers={"Origin": "http://localhost"})
        page = client.get("/admin").get_data(as_text=True)
        assert re.search(r"NVIDIA H100 80GB HBM3 <small>79.2 GiB</small>", page)
        assert run_json(capsys, "workers")[0]["device"] == gpu
    finally:
        worker.register_death()


def run_while_a_worker_works(capsys, argv, settings, redis, services, queue_name) -> tuple[int, str, str]:
    """Run a CLI command that waits for a job in a thread while a burst worker runs that job here."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("code", main(argv)))
    thread.start()
    deadline = time.monotonic() + 30
    while not queue(queue_name, redis).count:
        assert thread.is_alive() and time.monotonic() < deadline, "the command queued no job"
        time.sleep(0.05)
    run_burst_worker(settings, redis, services)
    thread.join(timeout=60)
    captured = capsys.readouterr()
    return outcome["code"], captured.out, captured.err


def test_train_wait_prints_the_new_model_version(capsys, client, admin_settings, redis, services):
    annotate(client, PROJECT, labeled_images(2))
    queue(TRAIN_QUEUE, redis).empty()  # the webhook's own request; the CLI asks for its own
    redis.delete(f"headstart:train:{PROJECT}:queued")
    code, out, err = run_while_a_worker_works(capsys, ["train", str(PROJECT), "--wait"], admin_settings, redis,
                                              services, TRAIN_QUEUE)
    assert code == 0, err
    assert '"model_version": "label-v1"' in out


def test_embed_follows_the_job_with_a_progress_bar(capsys, client, admin_settings, redis, encoders):
    items = labeled_images(2)
    fake = fake_label_studio(PROJECT, items)
    try:
        ls_settings = admin_settings.replace(label_studio_url=fake.url, label_studio_api_key=fake.legacy_token)
        services = build_services(ls_settings, redis, encoders=encoders)
        client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2})
        code, out, err = run_while_a_worker_works(capsys, ["embed", str(PROJECT)], ls_settings, redis, services,
                                                  EMBED_QUEUE)
    finally:
        fake.stop()
    assert code == 0, err
    assert f"embedding project {PROJECT}" in out and f"{len(items)}/{len(items)}" in out
    jobs = views.jobs(redis)
    (job,) = [job for job in jobs if job["function"] == EMBED_JOB]  # the rest are its chunks, run by any worker
    assert job["progress"] == {"done": len(items), "total": len(items), "failed": 0}
    assert {job["function"] for job in jobs} == {EMBED_JOB, EMBED_CHUNK_JOB}
