"""Faults: workers killed mid-training, Redis going away and coming back, Label Studio failing
during a training, the labeling config changing under a project, and labels that do not fit.

Real processes: workers are real `headstart worker` processes (forked from a pre-loaded parent by
tests/worker_zygote.py, so twenty kills do not cost twenty torch imports) on a redis-server this
test starts and stops itself, with append-only persistence.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Worker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from backend.server.app import create_app
from backend.core.store import ModelStore
from backend.labelstudio.label_mirror import LabelStore
from backend.loop.services import build_services
from backend.common.settings import Settings
from tests.fake_label_studio import FakeLabelStudio
from tests.helpers import CONFIG_2, HYMENOPTERA, REPO, RedisServer, dataset_images
from tests.hostile_servers import ErrorServer
from tests.loop_helpers import annotation_event, local_url, run_burst_worker
from backend.common.queues import RETRY_INTERVALS_S, TRAIN_QUEUE, queue

pytestmark = pytest.mark.faults

MID_JOB_KILLS = 20
MAX_KILLS = 34
RECOVERY_DEADLINE_S = 60


# ---- real worker processes on a Redis of our own ---------------------------------------------------

class WorkerFleet:
    """Real worker processes, forked on demand by tests/worker_zygote.py; each killable on its own."""

    def __init__(self, env: dict, log_path: Path):
        self.env = env
        self.log = open(log_path, "w")
        self.pids: dict[str, int] = {}
        self._count = 0
        self.zygote = subprocess.Popen([sys.executable, "-m", "tests.worker_zygote"], cwd=REPO, env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        ready = self.zygote.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the worker zygote did not start: {ready!r}; see {log_path}")

    def spawn(self) -> str:
        self._count += 1
        name = f"fault-worker-{os.getpid()}-{self._count}"
        self.zygote.stdin.write(f"spawn {name}\n")
        self.zygote.stdin.flush()
        spawned, pid = self.zygote.stdout.readline().split()
        assert spawned == name
        self.pids[name] = int(pid)
        return name

    def kill(self, name: str) -> None:
        """SIGKILL the worker and its process group (its RQ scheduler), as a container kill would."""
        try:
            os.killpg(self.pids.pop(name), signal.SIGKILL)
        except ProcessLookupError:
            pass

    def alive(self, name: str) -> bool:
        try:
            os.kill(self.pids[name], 0)
            return True
        except (KeyError, ProcessLookupError):
            return False

    def stop(self) -> None:
        for name in list(self.pids):
            self.kill(name)
        self.zygote.stdin.close()
        self.zygote.terminate()
        self.zygote.wait(timeout=30)
        self.log.close()


def worker_env(redis_url: str, **extra: str) -> dict:
    return {**os.environ, "REDIS_URL": redis_url, "LOCAL_FILES_DOCUMENT_ROOT": str(HYMENOPTERA),
            "WORKER_HEARTBEAT_S": "1", "TRAIN_MIN_INTERVAL_S": "0", "JOB_RETRIES": "3",
            "REPREDICT_UNLABELED": "false", "ZERO_SHOT": "false", "LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": "",
            "TORCH_THREADS": "1", "LOG_LEVEL": "INFO", **extra}


@pytest.fixture
def own_redis():
    server = RedisServer(appendonly=True).start()
    yield server
    server.cleanup()


def backend_for(settings: Settings, encoders):
    connection = redis_lib.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=5)
    services = build_services(settings, connection, encoders=encoders)
    return connection, services, create_app(settings, services=services).test_client()


def labeled(items, ids, *, project: int, client, config: str = CONFIG_2) -> None:
    # what Label Studio's /setup records first: webhooks of a project never set up are refused
    client.application.extensions["headstart"].projects.remember(str(project), config)
    for path, cls in items:
        response = client.post("/webhook", json=annotation_event(
            project=project, task_id=ids[path], annotation_id=10_000 + ids[path], url=local_url(path),
            choice=cls, config=config))
        assert response.status_code == 200, response.json


def started_job_ids(redis) -> list[str]:
    return StartedJobRegistry(queue=queue(TRAIN_QUEUE, redis)).get_job_ids(cleanup=False)


def running_training(redis, project: int, *, deadline_s: float = 120) -> Job:
    """The job holding the project's training lock, once its worker is known."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        holder = redis.get(f"headstart:train:{project}:running")
        if holder is not None:
            job = Job.fetch(holder.decode(), connection=redis, serializer=JSONSerializer)
            if job.get_status() == JobStatus.STARTED and job.worker_name:
                return job
        time.sleep(0.002)
    raise AssertionError("the training never started")


def training_requested(redis, project: int, *, since: float, deadline_s: float = 120) -> Job:
    """The training that reads the labels submitted at `since` (time.time()), once a worker has taken it: the
    job the request queued, or (when the request was coalesced into a running training) that running one.

    It may be over by the time this looks: an incremental training takes a fraction of a second, and on a
    loaded machine this process can be off the CPU for longer, so the project's markers may already be gone
    (then the newest training of the project queued since the submit is the one) or may briefly say
    "pending" while a finishing training queues the next one.
    """
    def marked() -> bytes | None:
        return redis.get(f"headstart:train:{project}:queued") or redis.get(f"headstart:train:{project}:running")

    deadline = time.monotonic() + deadline_s
    job = None
    while time.monotonic() < deadline:
        marker = marked()
        if marker not in (None, b"pending") and (job is None or marker.decode() != job.id):
            job = Job.fetch(marker.decode(), connection=redis, serializer=JSONSerializer)  # or queued again
        elif job is None and marker is None:
            job = newest_training_since(redis, project, since)
        if job is not None:
            job.refresh()
            if job.get_status() in (JobStatus.STARTED, JobStatus.FINISHED, JobStatus.FAILED) and job.worker_name:
                return job
        time.sleep(0.002)
    workers = {w.name: (w.get_state(), w.get_current_job_id()) for w in Worker.all(connection=redis)}
    raise AssertionError(f"training {job and job.id} ({job and job.get_status()}) was not taken by a worker within "
                         f"{deadline_s}s; train queue {queue(TRAIN_QUEUE, redis).job_ids}, workers {workers}")


def newest_training_since(redis, project: int, since: float) -> Job | None:
    """The newest training of `project` queued at or after `since` that a worker has started or finished."""
    train = queue(TRAIN_QUEUE, redis)
    ids = {job_id for registry in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry)
           for job_id in registry(queue=train).get_job_ids(cleanup=False)}
    jobs = [job for job in Job.fetch_many(sorted(ids), connection=redis, serializer=JSONSerializer)
            if job is not None and job.meta.get("project") == str(project)
            and job.enqueued_at is not None and job.enqueued_at.timestamp() >= since]
    return max(jobs, key=lambda job: job.enqueued_at) if jobs else None


def training_seconds(redis) -> list[float]:
    """How long each finished training job took, oldest first."""
    registry = FinishedJobRegistry(queue=queue(TRAIN_QUEUE, redis))
    jobs = [Job.fetch(i, connection=redis, serializer=JSONSerializer) for i in registry.get_job_ids(cleanup=False)]
    return [(job.ended_at - job.started_at).total_seconds()
            for job in sorted(jobs, key=lambda job: job.started_at) if job.ended_at and job.started_at]


def project_idle(redis, project: int) -> bool:
    keys = [f"headstart:train:{project}:{suffix}" for suffix in ("queued", "running")]
    return not (redis.exists(*keys) or queue(TRAIN_QUEUE, redis).count or started_job_ids(redis))


def newest_outcome(store: ModelStore, project: int) -> dict | None:
    """The newest version a training finished with (promoted or rejected by the guard)."""
    done = [meta for meta in store.versions(str(project), "label") if meta["status"] in ("promoted", "rejected")]
    return max(done, key=lambda meta: meta["version"]) if done else None


def wait_until_trained_on(redis, store: ModelStore, project: int, task_ids: set[int], *, deadline_s: float) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        meta = newest_outcome(store, project)
        if meta and task_ids <= set(map(int, meta.get("trained_on") or {})) and project_idle(redis, project):
            return meta
        time.sleep(0.05)
    raise AssertionError(f"no training included all {len(task_ids)} labels within {deadline_s}s")


def assert_serving(client, store: ModelStore, project: int, val, ids, *, at_least: int) -> int:
    """/predict answers with the current version, which is complete and not older than `at_least`."""
    current = store.current_number(str(project), "label")
    head = store.load(str(project), "label", current)
    assert head.meta["status"] == "promoted" and current >= at_least
    tasks = [{"id": ids[path], "data": {"image": local_url(path)}} for path, _ in val]
    response = client.post("/predict", json={"tasks": tasks, "project": f"{project}.1", "label_config": CONFIG_2})
    assert response.status_code == 200
    assert {r["model_version"] for r in response.json["results"]} == {f"label-v{current}"}
    assert all(r["result"] for r in response.json["results"])
    return current


@pytest.fixture(scope="module")
def images():
    train, val = dataset_images(HYMENOPTERA, "train"), dataset_images(HYMENOPTERA, "val")
    ids = {path: index + 1 for index, (path, _) in enumerate(train + val)}
    ants, bees = [i for i in train if i[1] == "ants"], [i for i in train if i[1] == "bees"]
    interleaved = [pair for two in zip(ants, bees) for pair in two]
    return interleaved, val, ids


# ---- workers killed mid-training ----------------------------------------------------------------------

def test_workers_killed_mid_training_lose_no_label_and_no_version(own_redis, encoders, images, tmp_path):
    project = 31
    interleaved, val, ids = images
    settings = Settings(redis_url=own_redis.url, model_dir=str(tmp_path), local_files_document_root=str(HYMENOPTERA),
                        job_retries=3, train_min_interval_s=0, repredict_unlabeled=False, zero_shot=False)
    redis, services, client = backend_for(settings, encoders)
    store = ModelStore(redis)
    fleet = WorkerFleet(worker_env(own_redis.url), tmp_path / "workers.log")
    rng = random.Random(7)
    kills, recoveries, submitted = [], [], set()
    try:
        workers = [fleet.spawn(), fleet.spawn()]
        warm, extra = interleaved[:60], interleaved[60:]
        for batch in (warm, extra[:2], extra[2:4]):  # the first training embeds 60 images; then 2 more each
            labeled(batch, ids, project=project, client=client)
            submitted |= {ids[path] for path, _ in batch}
            wait_until_trained_on(redis, store, project, submitted, deadline_s=120)
        extra = extra[4:]

        while sum(kill["mid_job"] for kill in kills) < MID_JOB_KILLS and len(kills) < MAX_KILLS:
            before = assert_serving(client, store, project, val[:3], ids, at_least=0)
            window = statistics.median(training_seconds(redis)[1:])  # how long an incremental training takes
            batch, extra = extra[:2], extra[2:]
            submitted_at = time.time()
            labeled(batch, ids, project=project, client=client)
            submitted |= {ids[path] for path, _ in batch}
            job = training_requested(redis, project, since=submitted_at)
            time.sleep(rng.uniform(0, window))
            fleet.kill(job.worker_name)
            killed_at = time.monotonic()
            mid_job = job.get_status(refresh=True) == JobStatus.STARTED
            kills.append({"job": job.id, "mid_job": mid_job})
            assert_serving(client, store, project, val[:3], ids, at_least=before)  # the old version still serves
            workers = [name for name in workers if fleet.alive(name)] + [fleet.spawn()]
            wait_until_trained_on(redis, store, project, submitted, deadline_s=RECOVERY_DEADLINE_S)
            recoveries.append(time.monotonic() - killed_at)

        versions = store.versions(str(project), "label")
        promoted = [meta["version"] for meta in versions if meta["status"] == "promoted"]
        current = store.current_number(str(project), "label")
        incomplete = [meta["version"] for meta in versions
                      if not redis.hexists(f"headstart:head:{project}:label:{meta['version']}", "tensors")]
        orphans = [meta["version"] for meta in versions if meta["status"] == "candidate"]
        final = newest_outcome(store, project)
        lost = submitted - set(map(int, final["trained_on"]))
        mid_job_jobs = [Job.fetch(kill["job"], connection=redis, serializer=JSONSerializer)
                        for kill in kills if kill["mid_job"]]
        rerun = [job for job in mid_job_jobs if job.get_status() == JobStatus.FINISHED and job.retries_left < 3]
        print(f"\nworker kills: {len(kills)} SIGKILLs at random points of a ~{window:.2f}s training "
              f"({len(mid_job_jobs)} mid-job); {len(rerun)} abandoned jobs detected and re-run by RQ's Retry; "
              f"recovery median {statistics.median(recoveries):.1f}s, max {max(recoveries):.1f}s; "
              f"{len(submitted)} labels submitted, {len(lost)} lost; {len(versions)} versions, "
              f"{len(incomplete)} incomplete, {len(orphans)} unpublished candidates of killed runs, "
              f"{sum(m['status'] == 'rejected' for m in versions)} rejected by the guard")
        assert lost == set() and incomplete == []
        assert len(mid_job_jobs) >= MID_JOB_KILLS and len(rerun) == len(mid_job_jobs)
        assert current == max(promoted)  # no version marked promoted without being served
        if final["status"] == "promoted":
            assert current == final["version"]
        assert_serving(client, store, project, val[:3], ids, at_least=1)
    finally:
        fleet.stop()


# ---- Redis going away and coming back ---------------------------------------------------------------

def fake_task(task_id: int, path: Path, choice: str) -> dict:
    annotation = {"id": 10_000 + task_id, "task": task_id, "was_cancelled": False, "ground_truth": False,
                  "updated_at": "2026-11-27T12:00:00Z", "result": [
                      {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]}
    return {"id": task_id, "data": {"image": local_url(path)}, "annotations": [annotation], "predictions": [],
            "total_annotations": 1, "project": 32}


def test_redis_going_away_and_coming_back(own_redis, encoders, images, tmp_path):
    project = 32
    interleaved, val, ids = images
    items, missed, later = interleaved[:12], interleaved[12], interleaved[13]
    label_studio = FakeLabelStudio(label_config=CONFIG_2)
    label_studio.tasks += [fake_task(ids[path], path, cls) for path, cls in items]
    label_studio.start()
    settings = Settings(redis_url=own_redis.url, model_dir=str(tmp_path), local_files_document_root=str(HYMENOPTERA),
                        label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
                        job_retries=3, train_min_interval_s=0, repredict_unlabeled=False, zero_shot=False)
    redis, services, client = backend_for(settings, encoders)
    store = ModelStore(redis)
    fleet = WorkerFleet(worker_env(own_redis.url, LABEL_STUDIO_URL=label_studio.url,
                                   LABEL_STUDIO_API_KEY=label_studio.legacy_token), tmp_path / "workers.log")
    try:
        worker = fleet.spawn()
        labeled(items, ids, project=project, client=client)
        wait_until_trained_on(redis, store, project, {ids[path] for path, _ in items}, deadline_s=120)
        served = assert_serving(client, store, project, val[:4], ids, at_least=1)
        labels_before = len(LabelStore(redis).records(str(project)))
        tasks = [{"id": ids[path], "data": {"image": local_url(path)}} for path, _ in val[:4]]
        predict = {"tasks": tasks, "project": f"{project}.1", "label_config": CONFIG_2}

        own_redis.stop()
        down_at = time.monotonic()
        health = client.get("/health")
        assert health.status_code == 200 and health.json["status"] == "UP" and health.json["health"] == "degraded"
        assert "Redis is unreachable" in health.json["reason"]
        assert client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG_2}).json == {
            "model_version": f"label-v{served}"}
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            response = client.post("/predict", json=predict)
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200
            assert [r["model_version"] for r in response.json["results"]] == [f"label-v{served}"] * 4
            assert all(r["result"] for r in response.json["results"])
        label_studio.tasks.append(fake_task(ids[missed[0]], missed[0], missed[1]))  # annotated while Redis is down
        started = time.monotonic()
        hook = client.post("/webhook", json=annotation_event(
            project=project, task_id=ids[missed[0]], annotation_id=10_000 + ids[missed[0]],
            url=local_url(missed[0]), choice=missed[1]))
        webhook_seconds = time.monotonic() - started
        assert hook.status_code == 503 and "resynchronises" in hook.json["message"] and webhook_seconds < 1
        versions = client.get("/versions")
        assert versions.status_code == 503 and versions.json["error"] == "StoreUnavailable"
        time.sleep(max(0.0, 5 - (time.monotonic() - down_at)))  # the worker lives through a few seconds of it
        own_redis.start()
        outage = time.monotonic() - down_at

        assert client.get("/health").json["health"] == "ok"  # the first request back marks the project stale
        assert LabelStore(redis).needs_sync(str(project))
        assert len(LabelStore(redis).records(str(project))) == labels_before  # append-only: nothing lost
        assert store.current_number(str(project), "label") == served
        label_studio.tasks.append(fake_task(ids[later[0]], later[0], later[1]))
        back = time.monotonic()
        labeled([later], ids, project=project, client=client)
        wanted = {ids[path] for path, _ in items} | {ids[missed[0]], ids[later[0]]}
        meta = wait_until_trained_on(redis, store, project, wanted, deadline_s=RECOVERY_DEADLINE_S)
        resumed = time.monotonic() - back
        assert fleet.alive(worker)  # the same worker process, never restarted
        finished = [Job.fetch(i, connection=redis, serializer=JSONSerializer) for i in FinishedJobRegistry(
            queue=queue(TRAIN_QUEUE, redis)).get_job_ids(cleanup=False)]
        assert max(finished, key=lambda job: job.ended_at).worker_name == worker
        print(f"\nRedis down {outage:.1f}s: /predict kept answering from the held head (max {max(latencies):.2f}s; {[round(x, 2) for x in latencies]}), "
              f"/webhook answered 503 in {webhook_seconds * 1000:.0f} ms, /health said degraded; after the restart "
              f"worker {worker} (same process) trained v{meta['version']} {resumed:.1f}s after the next label, with "
              f"the label missed during the outage recovered by a resync; 0 labels lost")
    finally:
        fleet.stop()
        label_studio.stop()


# ---- Label Studio failing during a training -------------------------------------------------------------

@pytest.fixture
def in_process(settings, redis, encoders):
    """A backend and burst workers in this process, fed by webhooks only (no Label Studio API)."""
    loop = settings.replace(local_files_document_root=str(HYMENOPTERA), job_retries=2, train_min_interval_s=0)
    services = build_services(loop, redis, encoders=encoders)
    return loop, services, create_app(loop, services=services).test_client()


def fast_forward_retry(redis, job_id: str) -> float:
    """Move a job waiting for its retry into the queue now; returns how far ahead it was scheduled."""
    train = queue(TRAIN_QUEUE, redis)
    registry = ScheduledJobRegistry(queue=train)
    job = train.fetch_job(job_id)
    delay = registry.get_scheduled_time(job).timestamp() - time.time()
    registry.remove(job)
    train.enqueue_job(job)
    return delay


@pytest.mark.parametrize("failure", ["unreachable", "500", "401", "html instead of json"])
def test_label_studio_failing_during_training_is_retried_with_backoff_and_recorded(in_process, redis, images,
                                                                                  failure):
    loop, services, client = in_process
    interleaved, val, ids = images
    labeled(interleaved[:6], ids, project=33, client=client)
    run_burst_worker(loop, redis, services)
    served = assert_serving(client, ModelStore(redis), 33, val[:3], ids, at_least=1)

    server = None if failure == "unreachable" else ErrorServer(
        *{"500": (500,), "401": (401, b'{"detail": "Invalid token."}'),
          "html instead of json": (200, b"<html>login</html>", "text/html")}[failure]).start()
    broken = loop.replace(label_studio_url=server.url if server else "http://127.0.0.1:9",
                          label_studio_api_key="0" * 40)
    broken_services = build_services(broken, redis, encoders=services.encoders)
    try:
        response = client.post("/webhook", json={"action": "START_TRAINING",
                                                 "project": {"id": 33, "label_config": CONFIG_2}})
        assert response.status_code == 200
        (job_id,) = queue(TRAIN_QUEUE, redis).job_ids
        delays = []
        for attempt in range(loop.job_retries + 1):
            run_burst_worker(broken, redis, broken_services)
            assert ModelStore(redis).current_number("33", "label") == served  # untouched after every attempt
            if attempt < loop.job_retries:
                delays.append(fast_forward_retry(redis, job_id))
        job = queue(TRAIN_QUEUE, redis).fetch_job(job_id)
        assert job.get_status() == JobStatus.FAILED and job_id in FailedJobRegistry(queue=queue(TRAIN_QUEUE, redis))
        reason = job.latest_result().exc_string.strip().splitlines()[-1]
    finally:
        if server:
            server.stop()
    expected = RETRY_INTERVALS_S[:loop.job_retries]  # backoff between attempts (measured a moment later)
    assert len(delays) == len(expected) and all(i - 3 < d <= i for d, i in zip(delays, expected)), delays
    assert reason.startswith("backend.common.errors.LabelStudioUnavailable: Could not read project 33 from Label Studio")
    assert "Check LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY" in reason
    assert_serving(client, ModelStore(redis), 33, val[:3], ids, at_least=served)
    print(f"\nLabel Studio {failure}: {loop.job_retries + 1} attempts, retries scheduled "
          f"{', '.join(f'+{d:.1f}s' for d in delays)}, current version untouched, recorded as: {reason[:130]}...")


# ---- the labeling config changes under a project -------------------------------------------------------

def config_with(*classes: str, multiple: bool = False) -> str:
    choice = ' choice="multiple"' if multiple else ""
    return ('<View><Image name="image" value="$image"/><Choices name="label" toName="image"' + choice + ">"
            + "".join(f'<Choice value="{name}"/>' for name in classes) + "</Choices></View>")


def predict_versions(client, project: int, config: str, val, ids) -> tuple[int, set[str], int]:
    tasks = [{"id": ids[path], "data": {"image": local_url(path)}} for path, _ in val]
    response = client.post("/predict", json={"tasks": tasks, "project": f"{project}.1", "label_config": config})
    setup = client.post("/setup", json={"project": f"{project}.1", "schema": config})
    assert setup.status_code == 200 and response.status_code == 200
    assert {r["model_version"] for r in response.json["results"]} == {setup.json["model_version"]}
    return response.status_code, {setup.json["model_version"]}, sum(bool(r["result"]) for r in response.json["results"])


def last_training(redis) -> dict:
    """The summary the most recently finished training job returned."""
    train = queue(TRAIN_QUEUE, redis)
    jobs = [train.fetch_job(i) for i in FinishedJobRegistry(queue=train).get_job_ids(cleanup=False)]
    return max(jobs, key=lambda job: job.ended_at).return_value()


def start_training(client, project: int, config: str) -> None:
    response = client.post("/webhook", json={"action": "START_TRAINING",
                                             "project": {"id": project, "label_config": config}})
    assert response.status_code == 200


def test_a_labeling_config_that_changes_mid_project_never_uses_old_heads(in_process, redis, images):
    loop, services, client = in_process
    interleaved, val, ids = images
    store, project = ModelStore(redis), 34
    labeled(interleaved[:8], ids, project=project, client=client)
    run_burst_worker(loop, redis, services)
    assert predict_versions(client, project, CONFIG_2, val[:4], ids) == (200, {"label-v1"}, 4)

    added = config_with("ants", "bees", "wasps")  # a class added: v1 knows nothing of wasps
    assert predict_versions(client, project, added, val[:4], ids) == (200, {"untrained"}, 0)
    start_training(client, project, added)
    run_burst_worker(loop, redis, services)
    assert store.meta(str(project), "label", 2)["classes"] == ["ants", "bees", "wasps"]
    assert predict_versions(client, project, added, val[:4], ids) == (200, {"label-v2"}, 4)

    renamed = config_with("ants", "honeybees")  # a class renamed: the old bees labels no longer count
    start_training(client, project, renamed)
    run_burst_worker(loop, redis, services)
    assert last_training(redis)["controls"]["label"]["status"] == "skipped"
    assert predict_versions(client, project, renamed, val[:4], ids) == (200, {"untrained"}, 0)
    relabeled = [(path, "honeybees" if cls == "bees" else cls) for path, cls in interleaved[:8]]
    labeled(relabeled, ids, project=project, client=client, config=renamed)
    run_burst_worker(loop, redis, services)
    assert predict_versions(client, project, renamed, val[:4], ids) == (200, {"label-v3"}, 4)

    removed = config_with("ants")  # a class removed: one class left, single choice cannot train a head
    assert predict_versions(client, project, removed, val[:4], ids) == (200, {"untrained"}, 0)
    assert predict_versions(client, project, CONFIG_2, val[:4], ids) == (200, {"untrained"}, 0)  # v1 is not current
    start_training(client, project, removed)
    run_burst_worker(loop, redis, services)
    assert FailedJobRegistry(queue=queue(TRAIN_QUEUE, redis)).count == 0
    assert store.current_number(str(project), "label") == 3
    print(f"\nconfig changes: added, renamed and removed classes; {len(store.versions(str(project), 'label'))} "
          "versions, never an old head for a new config, no failed job")


# ---- labels that do not fit ---------------------------------------------------------------------------------

def test_unknown_labels_are_counted_and_skipped(in_process, redis, images):
    loop, services, client = in_process
    interleaved, val, ids = images
    project = 35
    labeled(interleaved[:8], ids, project=project, client=client)
    odd = [(path, "wasps") for path, _ in interleaved[8:11]]  # not a class of the config
    labeled(odd, ids, project=project, client=client)
    run_burst_worker(loop, redis, services)
    meta = ModelStore(redis).meta(str(project), "label", 1)
    assert meta["unknown_labels"] == 3 and meta["label_count"] == 8 and meta["status"] == "promoted"
    assert predict_versions(client, project, CONFIG_2, val[:4], ids) == (200, {"label-v1"}, 4)


@pytest.mark.parametrize("multiple", [False, True])
def test_a_project_with_one_class_only(in_process, redis, images, multiple):
    loop, services, client = in_process
    interleaved, val, ids = images
    project, config = 36, config_with("ants", multiple=multiple)
    ants = [(path, cls) for path, cls in interleaved[:12] if cls == "ants"]
    labeled(ants, ids, project=project, client=client, config=config)
    run_burst_worker(loop, redis, services)
    assert FailedJobRegistry(queue=queue(TRAIN_QUEUE, redis)).count == 0
    outcome = last_training(redis)["controls"]["label"]
    status, versions, predicted = predict_versions(client, project, config, val[:4], ids)
    print(f"\none class ({'multiple' if multiple else 'single'} choice): {outcome['status']}: "
          f"{outcome.get('reason', '')}")
    assert status == 200 and outcome["status"] == "skipped" and versions == {"untrained"} and predicted == 0
    assert ("some tasks without it" if multiple else "two classes") in outcome["reason"]


# ---- an input that kills its workers -----------------------------------------------------------------------

POISON_KILLS = 10


def test_an_input_that_kills_its_workers_is_charged_then_skipped_and_reported(own_redis, encoders, images, tmp_path):
    """A labeled task whose media is on the worker each time it dies (SIGKILL while fetching it, as an
    out-of-memory kill would land): RQ re-runs the abandoned training, each death charges the input in flight,
    the input is processed alone once suspect, and after MEDIA_POISON_KILLS deaths it is skipped: the training
    finishes without it (a media error in the version), it is reported by `headstart status`, it is never
    fetched again, and the workers live on."""
    from backend.admin import views
    from tests.hostile_servers import SlowServer
    from tests.loop_helpers import annotation_event

    project = 41
    interleaved, _, ids = images
    server = SlowServer(dataset_images(HYMENOPTERA, "val")[0][0], 20.0).start()
    poison_url = server.url + "/poison.jpg"
    env = worker_env(own_redis.url, JOB_RETRIES=str(POISON_KILLS + 2), MEDIA_TIMEOUT_S="30",
                     MEDIA_POISON_KILLS=str(POISON_KILLS), MEDIA_ALLOWED_HOSTS=server.url.removeprefix("http://"))
    fleet = WorkerFleet(env, tmp_path / "workers.log")
    try:
        settings = Settings(redis_url=own_redis.url, local_files_document_root=str(HYMENOPTERA),
                            media_poison_kills=POISON_KILLS, job_retries=POISON_KILLS + 2, train_min_interval_s=0,
                            repredict_unlabeled=False, zero_shot=False)
        redis, services, client = backend_for(settings, encoders)
        store = ModelStore(redis)
        labeled(interleaved[:6], ids, project=project, client=client)
        response = client.post("/webhook", json=annotation_event(project=project, task_id=999, annotation_id=19_999,
                                                                 url=poison_url, choice="ants", config=CONFIG_2))
        assert response.status_code == 200
        workers = [fleet.spawn(), fleet.spawn()]
        kills = 0
        deadline = time.monotonic() + 60 * POISON_KILLS
        while kills < POISON_KILLS and time.monotonic() < deadline:
            if server.hits.get("/poison.jpg", 0) > kills:  # a worker is on the input now
                fleet.kill(running_training(redis, project).worker_name)
                kills += 1
                workers = [name for name in workers if fleet.alive(name)] + [fleet.spawn()]
            time.sleep(0.05)
        assert kills == POISON_KILLS, f"only {kills} kills within the deadline"
        trained = {ids[path] for path, _ in interleaved[:6]}
        meta = wait_until_trained_on(redis, store, project, trained, deadline_s=180)
        assert "999" in meta["media_errors"] and "MEDIA_POISON_KILLS" in meta["media_errors"]["999"]
        assert 999 not in set(map(int, meta["trained_on"]))
        assert server.hits["/poison.jpg"] == POISON_KILLS  # never fetched again once poison
        reported = views.status(services)["killer_inputs"]
        poison = [(k["task_id"], k["kills"], k["poison"]) for k in reported if k["url"] == poison_url]
        assert poison == [(999, POISON_KILLS, True)]
        assert all(k["kills"] < POISON_KILLS for k in reported if k["url"] != poison_url)  # co-travellers cleared
        assert all(fleet.alive(name) for name in workers)
        print(f"\npoison input: {kills} SIGKILLs of the worker fetching it; the training then finished without it "
              f"(v{meta['version']}, {meta['status']}, {len(meta['trained_on'])} labels), the input reported as "
              f"poison and never fetched again; {len(workers)} workers alive; "
              f"{sum(k['url'] != poison_url for k in reported)} other inputs charged once while in flight beside it")
    finally:
        fleet.stop()
        server.stop()
