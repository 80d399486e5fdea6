"""The admin against a running system: two `headstart worker` processes, `headstart serve` (gunicorn, two
workers), trainings of two projects driven by webhooks, one failing job. The CLI, the JSON API and the
page in a real headless Chromium must show the same workers, jobs and versions; a retry from the page
takes effect; a rollback from the CLI changes the model_version /setup answers; a drain stops a worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from rq import Worker

from backend.cli import main
from tests.admin_browser import INSTALL_HINT, Browser, find_chromium
from tests.admin_support import TOKEN, labeled_images
from tests.helpers import CONFIG_2, HYMENOPTERA, REPO, free_port
from tests.loop_helpers import annotation_event, local_url
from backend.common.queues import TRAIN_JOB, TRAIN_QUEUE, TrainingScheduler, queue
from backend.common.settings import Settings
from backend.labelstudio.label_mirror import LabelStore

WORKERS = ("admin-w1", "admin-w2")
STARTUP_S = 120


class Process:
    """A headstart command in its own process group, logged to a file, stopped with its children."""

    def __init__(self, name: str, argv: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "backend.cli", *argv], cwd=REPO, env=env,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)

    def tail(self) -> str:
        return f"--- {self.name}\n" + self.log_path.read_text(errors="replace")[-2500:]


def wait_until(condition, *, timeout_s: float, what: str, processes=()):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        dead = [p for p in processes if p.popen.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(p.tail() for p in processes)
            raise AssertionError(f"{what}: {'exited: ' + dead[0].name if dead else 'timed out'}\n{logs}")
        time.sleep(0.2)


@pytest.fixture
def system(redis, redis_url, tmp_path):
    """A backend on a free port and two workers, all started by the `headstart` CLI, against our Redis DB."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "LOCAL_FILES_DOCUMENT_ROOT": str(HYMENOPTERA),
           "ADMIN_TOKEN": TOKEN, "JOB_RETRIES": "0", "REPREDICT_UNLABELED": "false", "ZERO_SHOT": "false", "TRAIN_MIN_INTERVAL_S": "0",
           "LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": "", "WORKERS": "2", "THREADS": "2",
           "TORCH_THREADS": "1", "LOG_LEVEL": "WARNING"}
    processes = [Process("backend", ["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path)]
    processes += [Process(name, ["worker", "--name", name], env, tmp_path) for name in WORKERS]
    url = f"http://127.0.0.1:{port}"

    def backend_up():
        try:
            return requests.get(f"{url}/health", timeout=5).status_code == 200
        except requests.RequestException:  # not listening yet, or gunicorn's workers still importing
            return False
    try:
        wait_until(backend_up, timeout_s=STARTUP_S, what="backend start", processes=processes[:1])
        wait_until(lambda: {w.name for w in Worker.all(connection=redis)} == set(WORKERS), timeout_s=STARTUP_S,
                   what="worker start", processes=processes)
        yield {"url": url, "processes": {p.name: p for p in processes}, "env": env, "tmp": tmp_path}
    finally:
        for process in processes:
            process.stop()


def post(system, path: str, body: dict) -> dict:
    response = requests.post(system["url"] + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def setup_version(system, project: int) -> str:
    return post(system, "/setup", {"project": f"{project}.1", "schema": CONFIG_2})["model_version"]


def api(system, path: str):
    response = requests.get(system["url"] + "/admin/api" + path, headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def cli_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def label_round(system, redis, rounds: dict[int, int], *, no_config: tuple[int, ...] = ()) -> None:
    """Post the labels of a round as Label Studio would, then wait until the workers ran every training.

    The workers run while labels arrive, so a round may give a project one version or a few (the
    scheduler coalesces); every check below reads the counts from the system instead of assuming them.
    """
    for project, per_class in rounds.items():
        for task_id, (path, cls) in enumerate(labeled_images(per_class), start=1):
            body = annotation_event(project=project, task_id=task_id, annotation_id=project * 1000 + task_id,
                                    url=local_url(path), choice=cls)
            if project in no_config:
                # a webhook of a project never set up is refused (backend/server/webhook.py): its labels are in
                # the mirror, as a lost /setup would leave them, and a training is asked for without the config
                LabelStore(redis).put(str(project), body["annotation"], body["task"])
                continue
            # a label already sent in an earlier round is the same delivery again: recognised, nothing queued
            assert post(system, "/webhook", body)["status"] in ("queued", "coalesced", "unchanged")
    for project in no_config:
        TrainingScheduler(redis, Settings(job_retries=0)).request(str(project), reason="START_TRAINING")
    wait_idle(system, redis)


def wait_idle(system, redis) -> None:
    """Until nothing is queued or running and every worker is idle, seen three times in a row.

    Repeated because a job is briefly in neither the queue nor the started registry while a worker
    moves it from one to the other.
    """
    train = queue(TRAIN_QUEUE, redis)

    def idle() -> bool:
        return not (train.count or train.started_job_registry.count or redis.keys("headstart:train:*:running")) \
            and all(worker.get_state() == "idle" for worker in Worker.all(connection=redis))
    streak = []
    wait_until(lambda: streak.append(idle()) or streak[-3:] == [True] * 3, timeout_s=120, what="trainings",
               processes=list(system["processes"].values()))


PAGE_STATE = """(() => ({
  workers: [...document.querySelectorAll('tr[data-worker]')].map(row => row.dataset.worker).sort(),
  jobs: Object.fromEntries([...document.querySelectorAll('tr[data-job]')].map(
    row => [row.dataset.job, row.dataset.status])),
  projects: Object.fromEntries([...document.querySelectorAll('article[data-project]')].map(article => [
    article.dataset.project, {
      model_version: article.querySelector('.model-version').textContent,
      versions: [...article.querySelectorAll('tr[data-version]')].map(row => [
        Number(row.dataset.version), row.querySelector('td:nth-child(2) .badge').textContent,
        row.classList.contains('current')]).sort((a, b) => a[0] - b[0]),
      curve_points: article.querySelectorAll('svg.curve g.point').length}])),
}))()"""


def expected_page(workers, jobs, projects) -> dict:
    """What the page must show, built from the CLI's JSON."""
    return {"workers": sorted(w["name"] for w in workers),
            "jobs": {job["id"]: job["status"] for job in jobs},
            "projects": {p["project"]: {"model_version": p["model_version"],
                                        "versions": [[v["version"], v["status"], v["current"]]
                                                     for c in p["controls"] for v in c["versions"]],
                                        "curve_points": sum(v["cv_accuracy"] is not None
                                                            for c in p["controls"] for v in c["versions"])}
                         for p in projects}}


def test_cli_api_and_page_agree_and_admin_actions_take_effect(system, capsys, redis, monkeypatch):
    monkeypatch.setenv("REDIS_URL", system["env"]["REDIS_URL"])
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    chromium = find_chromium()
    if chromium is None:
        pytest.fail(INSTALL_HINT)
    assert (setup_version(system, 21), setup_version(system, 22)) == ("untrained", "untrained")

    # Project 21 gets three versions (1, 3, 6 labels per class), 22 one; 23 has no labeling config: its job fails.
    label_round(system, redis, {21: 1, 22: 3, 23: 1}, no_config=(23,))
    label_round(system, redis, {21: 3})
    label_round(system, redis, {21: 6})

    workers = cli_json(capsys, "workers")
    jobs = cli_json(capsys, "jobs")
    models = {project: cli_json(capsys, "models", str(project)) for project in (21, 22)}
    assert [w["name"] for w in workers] == sorted(WORKERS) and {w["state"] for w in workers} == {"idle"}
    assert all(w["backbone"].startswith("mobilenet_v2") and w["device"]["name"] == "cpu" for w in workers)
    finished = [job for job in jobs if job["status"] == "finished"]
    (failed,) = [job for job in jobs if job["status"] == "failed"]
    assert failed["project"] == "23" and "no known labeling config" in failed["error"]
    assert sum(w["jobs_done"] for w in workers) == len(finished) and sum(w["jobs_failed"] for w in workers) == 1
    assert {job["worker"] for job in jobs} <= set(WORKERS)
    promoted = [v for v in models[21]["controls"][0]["versions"] if v["status"] == "promoted"]
    assert len(promoted) >= 2 and models[22]["controls"][0]["versions"]  # the first two versions always promote
    for project in (21, 22):
        assert models[project]["model_version"] == setup_version(system, project)

    # The JSON behind the page says the same as the CLI.
    overview = api(system, "/overview")
    assert [w["name"] for w in overview["workers"]] == [w["name"] for w in workers]
    assert {j["id"]: j["status"] for j in overview["jobs"]} == {j["id"]: j["status"] for j in jobs}
    assert {p["project"]: p for p in overview["projects"]} == {"21": models[21], "22": models[22]}

    # So does the page, in a real browser, after signing in through its form.
    browser = Browser(chromium, system["tmp"] / "chromium-profile", log_path=system["tmp"] / "chromium.log")
    try:
        browser.navigate(system["url"] + "/admin")
        assert browser.evaluate("location.pathname") == "/admin/login"
        browser.action_then_load(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                                 "document.querySelector('form.login').submit()")
        assert browser.evaluate("location.pathname") == "/admin"
        assert browser.evaluate("document.cookie") == ""  # the session cookie is HttpOnly
        page = browser.evaluate(PAGE_STATE)
        assert page == expected_page(workers, jobs, [models[21], models[22]])

        # Fix the failed job's cause (the project's labeling config arrives with /setup), then retry it from the page.
        assert setup_version(system, 23) == "untrained"
        try:
            browser.action_then_load(f"document.querySelector('tr[data-job=\"{failed['id']}\"] "
                                     "button[data-post$=\"/retry\"]').click()")
        except TimeoutError:
            raise AssertionError("the page did not reload after retry: "
                                 + browser.evaluate("document.getElementById('flash').textContent")) from None
        wait_until(lambda: api(system, f"/jobs/{failed['id']}")["status"] == "finished", timeout_s=60,
                   what="the retried job", processes=list(system["processes"].values()))
        wait_idle(system, redis)
        assert setup_version(system, 23) == "label-v1"
        browser.navigate(system["url"] + "/admin")
        page = browser.evaluate(PAGE_STATE)
        assert page["jobs"][failed["id"]] == "finished"
        assert page["projects"]["23"]["model_version"] == "label-v1"
        shot = browser.screenshot(system["tmp"] / "admin.png")
        with capsys.disabled():
            print(f"\nscreenshot of /admin: {shot}")
        assert shot.stat().st_size > 20_000
    finally:
        browser.close()

    # A rollback through the real CLI process changes what /setup answers (so Label Studio re-predicts).
    control = models[21]["controls"][0]
    promoted = sorted((v for v in control["versions"] if v["status"] == "promoted"), key=lambda v: v["promoted_at"])
    assert len(promoted) >= 2 and promoted[-1]["current"]
    before = setup_version(system, 21)
    rollback = subprocess.run([sys.executable, "-m", "backend.cli", "models", "rollback", "21"], cwd=REPO,
                              env=system["env"], capture_output=True, text=True, timeout=120)
    assert rollback.returncode == 0, rollback.stderr
    after = setup_version(system, 21)
    assert before == f"label-v{promoted[-1]['version']}" and after == f"label-v{promoted[-2]['version']}"
    assert f"now serves {after}" in rollback.stdout

    # Metrics from either gunicorn worker add up the same counters; gauges are measured at scrape time.
    trained = [job for job in cli_json(capsys, "jobs")  # a job deferred to a running one trained nothing
               if job["function"] == TRAIN_JOB and job["status"] == "finished"
               and not job["result"].get("status", "").startswith("deferred")]
    for _ in range(4):
        text = requests.get(system["url"] + "/metrics", timeout=10).text
        assert re.search(r'^headstart_workers\{state="idle"\} 2$', text, re.M)
        assert re.search(r'^headstart_trainings_total\{outcome="failed"\} 1$', text, re.M)
        assert re.search(rf'^headstart_training_seconds_count {len(trained)}$', text, re.M)

    # Draining a worker (RQ's shutdown command) ends that process; the other keeps serving.
    assert cli_json(capsys, "workers", "drain", "admin-w2") == {"worker": "admin-w2", "command": "shutdown"}
    assert system["processes"]["admin-w2"].popen.wait(timeout=30) == 0
    assert [w["name"] for w in cli_json(capsys, "workers")] == ["admin-w1"]
    assert [w["name"] for w in api(system, "/workers")["workers"]] == ["admin-w1"]
