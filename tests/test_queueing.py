"""Coalescing: a burst of submits gives a handful of trainings, and the last one is always served."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from rq import Worker
from rq.registry import FinishedJobRegistry, StartedJobRegistry

from backend.server.app import create_app
from backend.core.store import ModelStore
from tests.helpers import HYMENOPTERA, REPO, dataset_images
from tests.loop_helpers import annotation_event, local_url, set_up
from backend.common.queues import BURST_REQUESTS, TRAIN_QUEUE, TrainingScheduler, queue

PROJECT = 9


def started_training(scheduler: TrainingScheduler, redis):
    """A training job for project 3 that a worker has taken and started."""
    scheduler.request("3", reason="first")
    (job,) = queue(TRAIN_QUEUE, redis).jobs
    queue(TRAIN_QUEUE, redis).remove(job.id)
    job.set_status("started")
    assert scheduler.begin("3", job.id)
    return job


def test_requests_coalesce_while_a_job_is_queued(redis, loop_settings):
    scheduler = TrainingScheduler(redis, loop_settings)
    outcomes = [scheduler.request("3", reason="ANNOTATION_CREATED") for _ in range(20)]
    assert outcomes[0] == "queued" and set(outcomes[1:]) == {"coalesced"}
    assert queue(TRAIN_QUEUE, redis).count == 1


def test_a_request_during_a_run_queues_exactly_one_follow_up(redis, loop_settings):
    scheduler = TrainingScheduler(redis, loop_settings)
    scheduler.request("3", reason="first")
    (job_id,) = queue(TRAIN_QUEUE, redis).job_ids
    queue(TRAIN_QUEUE, redis).remove(job_id)
    assert scheduler.begin("3", job_id)
    assert [scheduler.request("3", reason="during") for _ in range(5)] == ["queued"] + ["coalesced"] * 4
    assert scheduler.finish("3", job_id) is True  # dirty → re-request, coalesced into the queued one
    assert queue(TRAIN_QUEUE, redis).count == 1


def test_requests_during_a_real_run_queue_nothing_until_it_finishes(redis, loop_settings):
    scheduler = TrainingScheduler(redis, loop_settings)
    job = started_training(scheduler, redis)
    assert {scheduler.request("3", reason="during") for _ in range(5)} == {"coalesced"}
    assert queue(TRAIN_QUEUE, redis).count == 0
    assert scheduler.finish("3", job.id) is True
    assert queue(TRAIN_QUEUE, redis).count == 1


def test_a_training_waits_out_the_interval_only_in_a_burst(redis, loop_settings):
    """At an annotator's pace (a few submits within an interval) the next training starts at once; in a burst it
    starts TRAIN_MIN_INTERVAL_S after the last one, so the burst coalesces."""
    scheduler = TrainingScheduler(redis, loop_settings.replace(train_min_interval_s=30))
    job = started_training(scheduler, redis)  # its request counts
    for _ in range(BURST_REQUESTS - 1):
        scheduler.request("3", reason="ANNOTATION_CREATED")
    assert scheduler.finish("3", job.id) is True  # re-queued; a request passed on is not a new one
    assert scheduler.seconds_until_next_start("3") == 0.0
    scheduler.request("3", reason="ANNOTATION_CREATED")
    assert 29 < scheduler.seconds_until_next_start("3") <= 30
    assert scheduler.seconds_until_next_start("4") == 0.0  # another project's counts are its own


def test_a_burst_is_counted_within_one_interval(redis, loop_settings):
    scheduler = TrainingScheduler(redis, loop_settings.replace(train_min_interval_s=0.3))
    job = started_training(scheduler, redis)
    for _ in range(BURST_REQUESTS):
        scheduler.request("3", reason="ANNOTATION_CREATED")
    assert scheduler.finish("3", job.id) is True
    assert 0 < scheduler.seconds_until_next_start("3") <= 0.3
    time.sleep(0.35)  # a quiet interval later the count starts over
    scheduler.request("3", reason="ANNOTATION_CREATED")
    assert scheduler.seconds_until_next_start("3") == 0.0


def test_a_second_job_defers_while_the_first_one_runs(redis, loop_settings):
    scheduler = TrainingScheduler(redis, loop_settings)
    scheduler.request("3", reason="x")
    (first,) = queue(TRAIN_QUEUE, redis).jobs
    first.set_status("started")
    assert scheduler.begin("3", first.id)
    assert scheduler.begin("3", "some-other-job") is False


def wait_until_idle(redis, *, deadline_s: float) -> None:
    train = queue(TRAIN_QUEUE, redis)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        busy = (train.count or StartedJobRegistry(queue=train).count
                or redis.exists(f"headstart:train:{PROJECT}:queued", f"headstart:train:{PROJECT}:running"))
        if not busy:
            return
        time.sleep(0.2)
    raise AssertionError("the worker did not finish the queued trainings in time")


def wait_for_worker(redis, process) -> None:
    deadline = time.monotonic() + 120
    while not Worker.all(connection=redis):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the worker process did not start (exit {process.poll()})")
        time.sleep(0.1)


def test_a_burst_of_100_submits_trains_a_handful_of_times_and_serves_the_last(redis, redis_url, loop_settings,
                                                                             loop_services, tmp_path):
    client = create_app(loop_settings, services=loop_services).test_client()
    set_up(redis, PROJECT)
    train = dataset_images(HYMENOPTERA, "train")
    items = [item for cls in ("ants", "bees") for item in [i for i in train if i[1] == cls][:10]]
    log = open(tmp_path / "worker.log", "w")
    env = {**os.environ, "REDIS_URL": redis_url, "LOCAL_FILES_DOCUMENT_ROOT": str(HYMENOPTERA),
           "JOB_RETRIES": "0", "REPREDICT_UNLABELED": "false", "LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""}
    worker = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--name", f"burst-{os.getpid()}"],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_worker(redis, worker)
        last = None
        for event in range(100):
            path, cls = items[event % len(items)]
            choice = cls if event < 99 else ("bees" if cls == "ants" else "ants")  # the last submit flips a label
            last = (event % len(items) + 1, choice)
            response = client.post("/webhook", json=annotation_event(
                project=PROJECT, task_id=last[0], annotation_id=500 + last[0], url=local_url(path), choice=choice,
                action="ANNOTATION_CREATED" if event < len(items) else "ANNOTATION_UPDATED"))
            assert response.status_code == 200
            time.sleep(0.02)
        wait_until_idle(redis, deadline_s=180)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
    trainings = FinishedJobRegistry(queue=queue(TRAIN_QUEUE, redis)).count
    store = ModelStore(redis)
    meta = store.meta(str(PROJECT), "label", store.current_number(str(PROJECT), "label"))
    print(f"\n100 submits → {trainings} training jobs; served version v{meta['version']}")
    assert 1 <= trainings <= 10, (tmp_path / "worker.log").read_text()[-3000:]
    assert meta["trained_on"][str(last[0])] == [last[1]]


def test_a_training_abandoned_with_no_retry_left_releases_its_lock_and_queues_the_waiting_labels(
        redis, loop_settings, loop_services):
    from rq.exceptions import AbandonedJobError

    from worker.process import abandoned_job_handler

    scheduler = TrainingScheduler(redis, loop_settings)
    job = started_training(scheduler, redis)
    assert scheduler.request("3", reason="while it ran") == "coalesced"  # its worker then dies
    job.retries_left = 0
    abandoned_job_handler(loop_services)(job, AbandonedJobError, AbandonedJobError(), None)
    assert not redis.exists("headstart:train:3:running")
    assert queue(TRAIN_QUEUE, redis).count == 1


def test_a_request_that_died_while_enqueueing_blocks_trainings_only_briefly(redis, loop_settings):
    """The "pending" marker a request sets just before enqueueing expires within seconds, not an hour."""
    from backend.common.queues import PENDING_MARKER_TTL_S

    redis.set("headstart:train:3:queued", "pending", ex=PENDING_MARKER_TTL_S)  # as left by a process killed there
    scheduler = TrainingScheduler(redis, loop_settings)
    assert scheduler.request("3", reason="next submit") == "coalesced"
    assert 0 < redis.ttl("headstart:train:3:queued") <= PENDING_MARKER_TTL_S <= 60
    redis.delete("headstart:train:3:queued")  # what expiry does
    assert scheduler.request("3", reason="the submit after") == "queued"


def test_a_training_popped_by_a_worker_killed_before_it_started_does_not_wedge_the_project(redis, loop_settings):
    """RQ pops a job off the queues (BLPOP) and only then marks it started: a worker killed in between leaves a
    job that says "queued" but is in no queue. The next request must queue a training, not coalesce into it."""
    scheduler = TrainingScheduler(redis, loop_settings)
    assert scheduler.request("3", reason="submit") == "queued"
    assert scheduler.request("3", reason="submit") == "coalesced"  # really queued: joins it
    (lost,) = queue(TRAIN_QUEUE, redis).job_ids
    assert redis.lpop(queue(TRAIN_QUEUE, redis).key).decode() == lost  # what BLPOP did before the SIGKILL
    assert scheduler.request("3", reason="next submit") == "queued"
    assert queue(TRAIN_QUEUE, redis).job_ids != [lost] and queue(TRAIN_QUEUE, redis).count == 1


def test_a_worker_requeues_a_training_lost_by_a_worker_killed_as_it_took_it(redis, loop_settings):
    """Without a further submit, the labels a lost job was queued for still get trained: every worker's
    registry maintenance queues it again once it has been missing longer than a live worker could take."""
    from backend.common.queues import LOST_JOB_GRACE_S
    from backend.labelstudio.projects import ProjectRegistry
    from backend.loop.services import build_services
    from worker.process import HeadstartWorker

    ProjectRegistry(redis).remember("3", "<View/>")
    scheduler = TrainingScheduler(redis, loop_settings)
    assert scheduler.request("3", reason="submit") == "queued"
    (lost,) = queue(TRAIN_QUEUE, redis).job_ids
    redis.lpop(queue(TRAIN_QUEUE, redis).key)  # popped by a worker SIGKILLed before it marked the job started
    worker = HeadstartWorker([queue(TRAIN_QUEUE, redis)], connection=redis)
    worker.services = build_services(loop_settings, redis)
    worker._requeue_lost_trainings()
    assert queue(TRAIN_QUEUE, redis).count == 0  # within the grace a live worker may still be starting it
    job = queue(TRAIN_QUEUE, redis).fetch_job(lost)
    job.enqueued_at = job.enqueued_at - timedelta(seconds=LOST_JOB_GRACE_S + 1)
    job.save()
    worker._requeue_lost_trainings()
    (requeued,) = queue(TRAIN_QUEUE, redis).job_ids
    assert requeued != lost and redis.get("headstart:train:3:queued").decode() == requeued
    worker._requeue_lost_trainings()  # once
    assert queue(TRAIN_QUEUE, redis).count == 1


def test_listing_every_task_of_a_project_is_queued_once_however_often_it_is_asked(redis, loop_settings):
    """Each re-prediction that finds the task index unbuilt asks for the whole-project pass; a 5,000-task project
    was embedded three times over (bench loop) before these requests joined the one already queued or running."""
    from backend.common.queues import EMBED_QUEUE, INDEX_JOB, enqueue_index

    def index_jobs() -> list[str]:
        return [job.id for job in queue(EMBED_QUEUE, redis).jobs if job.func_name == INDEX_JOB]

    first = enqueue_index(redis, loop_settings, "3")
    assert first is not None
    assert [enqueue_index(redis, loop_settings, "3", join_running=join) for join in (False, True, False)] == [None] * 3
    assert index_jobs() == [first.id]
    assert enqueue_index(redis, loop_settings, "4") is not None  # another project's pass is its own
    assert enqueue_index(redis, loop_settings, "3", [7, 8]) is not None  # tasks just created: always listed

    queue(EMBED_QUEUE, redis).remove(first.id)
    first.set_status("started")  # a worker took it
    assert enqueue_index(redis, loop_settings, "3", join_running=True) is None  # a re-prediction waits for it
    after_config_change = enqueue_index(redis, loop_settings, "3")  # the running pass read the old config
    assert after_config_change is not None and after_config_change.id != first.id

    queue(EMBED_QUEUE, redis).remove(after_config_change.id)
    after_config_change.set_status("finished")
    again = enqueue_index(redis, loop_settings, "3", join_running=True)  # a finished pass is joined by nobody
    assert again is not None and index_jobs()[-1] == again.id
