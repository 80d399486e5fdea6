"""Queues, and coalescing of training requests: at most one training queued and one running per project.

Every request marks the project dirty. A job is enqueued only if none is queued for the project.
A starting job takes the project's run lock and clears the dirty mark before it reads any label;
when it finishes it re-queues once if new requests arrived meanwhile. So a burst of submits gives a
handful of trainings, and the last submit is always read by a training that starts after it.

Trainings of a project start at most once per TRAIN_MIN_INTERVAL_S while requests come in a burst (more than
`BURST_REQUESTS` within one interval: an import, a bulk relabel, a script); at an annotator's pace the next
training starts at once, so a label is not kept waiting for the interval.
"""

from __future__ import annotations

import time
from datetime import timedelta

from redis import Redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.common import redis_keys
from backend.common.settings import Settings

TRAIN_QUEUE = "headstart-train"
EMBED_QUEUE = "headstart-embed"
QUEUE_NAMES = (TRAIN_QUEUE, EMBED_QUEUE)
RETRY_INTERVALS_S = [5, 30, 120]
PASS_PENDING_GRACE_S = 300  # a prediction pass queued this long past its start time and not started: lost
BURST_REQUESTS = 3  # more requests than this within one TRAIN_MIN_INTERVAL_S: a burst, whose trainings are spaced
PENDING_MARKER_TTL_S = 30  # how long a request's "enqueueing now" marker may stand before the job id replaces it
LOST_JOB_GRACE_S = 5.0  # a live worker marks a job it popped as started within milliseconds; after this, it is lost
FAILED_JOB_TTL_S = 7 * 24 * 3600
RESULT_TTL_S = 24 * 3600

TRAIN_JOB = "worker.jobs.train_project"
REPREDICT_JOB = "worker.jobs.predict_unlabeled"
EMBED_JOB = "worker.jobs.embed_tasks"
INDEX_JOB = "worker.jobs.index_tasks"
EMBED_CHUNK_JOB = "worker.jobs.embed_chunk"
WEBHOOK_AUTH_JOB = "worker.jobs.secure_webhook"
AUDIT_JOB = "worker.jobs.audit_labels"
QUEUE_REFRESH_JOB = "worker.jobs.refresh_labeling_queue"
FORGET_TASKS_JOB = "worker.jobs.forget_deleted_tasks"
FORGET_PROJECT_JOB = "worker.jobs.forget_deleted_project"


def queue(name: str, redis: Redis) -> Queue:
    return Queue(name, connection=redis, serializer=JSONSerializer)


def _key(project: str, suffix: str) -> str:
    return redis_keys.training(project, suffix)


class TrainingScheduler:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis = redis
        self.settings = settings

    def request(self, project: str, *, reason: str, new: bool = True) -> str:
        """Ask for a training of `project`. Returns "queued" or "coalesced". `new`: a request from outside (counted
        toward a burst, `seconds_until_next_start`); False for one passed on (re-queued after a run, or lost).

        While a training of the project runs, nothing is queued: the dirty mark makes the running
        job re-queue once when it finishes (it reads the mark after releasing its lock, and this
        sets the mark before looking at the lock, so no request falls between the two).
        """
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_key(project, "dirty"), reason)
            if new and self.settings.train_min_interval_s > 0:  # counted per window of one interval
                window_ms = max(1, int(self.settings.train_min_interval_s * 1000))
                pipe.set(_key(project, "recent"), 0, nx=True, px=window_ms)
                pipe.incr(_key(project, "recent"))
            pipe.execute()
        if self._running_job(project) is not None:
            return "coalesced"
        # "pending" lives only as long as enqueueing can take: a process dying between this SET and the
        # enqueue below must not block the project's trainings for long
        if not self.redis.set(_key(project, "queued"), "pending", nx=True, ex=PENDING_MARKER_TTL_S):
            if self._queued_job_alive(project):
                return "coalesced"
            self.redis.set(_key(project, "queued"), "pending", ex=PENDING_MARKER_TTL_S)
        job = queue(TRAIN_QUEUE, self.redis).enqueue(
            TRAIN_JOB, args=(project,), job_timeout=self.settings.job_timeout_s,
            retry=self._retry(), failure_ttl=FAILED_JOB_TTL_S, result_ttl=RESULT_TTL_S,
            description=f"train project {project} ({reason})", meta={"project": project, "reason": reason},
        )
        self.redis.set(_key(project, "queued"), job.id, ex=self.settings.job_timeout_s * 2)
        return "queued"

    def requeue_if_lost(self, project: str) -> bool:
        """Queue the project's training again if its queued job was lost; True if it was.

        RQ workers listening on several queues pop a job (BLPOP) and only then mark it started, so a
        worker killed in between, or killed while Redis was handing it the job, takes the job with it:
        it is in no queue and no registry, and nothing would ever run the labels it was queued for.
        Every worker calls this in its registry maintenance (each WORKER_HEARTBEAT_S).
        """
        marker = self.redis.get(_key(project, "queued"))
        if marker is None or marker == b"pending":
            return False
        job = _fetch(marker.decode(), self.redis)
        if job is None or job.get_status(refresh=False) != JobStatus.QUEUED or self._in_queue(job.id):
            return False
        if job.enqueued_at is not None and time.time() - job.enqueued_at.timestamp() < LOST_JOB_GRACE_S:
            return False
        self.redis.delete(_key(project, "queued"))
        self.request(project, reason=f"job {job.id} was lost by a worker killed as it took it", new=False)
        return True

    def _in_queue(self, job_id: str) -> bool:
        train = queue(TRAIN_QUEUE, self.redis)
        return any(self.redis.lpos(key, job_id) is not None for key in (train.key, train.intermediate_queue_key))

    def _queued_job_alive(self, project: str) -> bool:
        """False when the queued marker names a job that is gone or already over (e.g. lost with Redis data)."""
        marker = self.redis.get(_key(project, "queued"))
        if marker is None or marker == b"pending":
            return marker is not None
        job = _fetch(marker.decode(), self.redis)
        if job is None:
            return False
        status = job.get_status(refresh=False)
        if status == JobStatus.QUEUED:
            # A worker pops a job off the queue and only then marks it started: killed in between, it leaves a
            # job that says "queued" but is in no queue, and would wedge the project's trainings until the marker
            # expires. Queued means in the queue (or in RQ's intermediate list of a single-queue worker).
            return self._in_queue(job.id)
        return status in (JobStatus.SCHEDULED, JobStatus.DEFERRED)

    def seconds_until_next_start(self, project: str) -> float:
        """How long a starting job waits so that, in a burst of requests (more than `BURST_REQUESTS` within the
        current interval), the project's trainings start at most once per interval; 0 otherwise.

        It waits before taking the run lock, while still counted as queued, so requests arriving
        meanwhile coalesce into it.
        """
        last, requests = self.redis.mget(_key(project, "last_start"), _key(project, "recent"))
        if last is None or int(requests or 0) <= BURST_REQUESTS:
            return 0.0
        return max(0.0, min(self.settings.train_min_interval_s,
                            float(last) + self.settings.train_min_interval_s - time.time()))

    def _running_job(self, project: str) -> str | None:
        """The id of the job holding the project's run lock, if that job is really running."""
        holder = self.redis.get(_key(project, "running"))
        if holder is None:
            return None
        status = self.redis.hget(Job.key_for(holder.decode()), "status")  # one field, not the whole job
        return holder.decode() if status is not None and status.decode() == JobStatus.STARTED.value else None

    def begin(self, project: str, job_id: str) -> bool:
        """Called by a starting training job: take the run lock. False if another job holds it."""
        self.redis.delete(_key(project, "queued"))
        lock = _key(project, "running")
        if not self.redis.set(lock, job_id, nx=True, ex=self.settings.job_timeout_s + 60):
            if self._running_job(project) not in (None, job_id):
                return False
            self.redis.set(lock, job_id, ex=self.settings.job_timeout_s + 60)  # the holder died
        self.redis.delete(_key(project, "dirty"))
        self.redis.set(_key(project, "last_start"), time.time(), ex=3600)
        return True

    def finish(self, project: str, job_id: str) -> bool:
        """Release the run lock; re-queue once if requests arrived meanwhile. True if re-queued."""
        lock = _key(project, "running")
        holder = self.redis.get(lock)
        if holder is not None and holder.decode() == job_id:
            self.redis.delete(lock)
        reason = self.redis.get(_key(project, "dirty"))
        if reason is None:
            return False
        self.request(project, reason=f"changed during training: {reason.decode()}", new=False)
        return True

    def _retry(self) -> Retry | None:
        retries = self.settings.job_retries
        return Retry(max=retries, interval=RETRY_INTERVALS_S[:retries]) if retries > 0 else None


def _fetch(job_id: str, redis: Redis) -> Job | None:
    try:
        return Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except Exception:  # NoSuchJobError, or a job hash from another serializer
        return None


def cancel_project_jobs(redis: Redis, project: str) -> int:
    """Cancel the project's jobs still waiting in headstart's queues (a deleted project's: they would write its keys
    again); returns how many."""
    cancelled = 0
    for name in QUEUE_NAMES:
        waiting = queue(name, redis)
        for job in Job.fetch_many(waiting.get_job_ids(), connection=redis, serializer=waiting.serializer):
            if job is not None and (job.meta or {}).get("project") == project:
                job.cancel()
                cancelled += 1
    return cancelled


def training_waiting(redis: Redis) -> bool:
    """True while a training job waits in the queue: background work yields to it between chunks."""
    return queue(TRAIN_QUEUE, redis).count > 0


def _enqueue_background(redis: Redis, settings: Settings, job: str, args: tuple, description: str,
                        project: str) -> Job:
    """Embedding and re-prediction: small units on the embed queue, which every worker serves after trainings."""
    return queue(EMBED_QUEUE, redis).enqueue(
        job, args=args, job_timeout=settings.job_timeout_s,
        retry=Retry(max=2, interval=[10, 60]), failure_ttl=FAILED_JOB_TTL_S, result_ttl=RESULT_TTL_S,
        description=description, meta={"project": project},
    )


def enqueue_repredict(redis: Redis, settings: Settings, project: str, model_version: str,
                      task_ids: list[int] | None = None) -> Job:
    """Pre-label the project's unlabeled tasks (or `task_ids`, the rest of an interrupted pass) with `model_version`."""
    what = "unlabeled tasks" if task_ids is None else f"{len(task_ids)} more unlabeled tasks"
    return _enqueue_background(redis, settings, REPREDICT_JOB, (project, model_version, task_ids),
                               f"pre-label {what} of project {project} with {model_version}", project)


def schedule_prediction_pass(redis: Redis, settings: Settings, project: str) -> Job | None:
    """Pre-label the project's unlabeled tasks with the version served when the pass starts, at most one pass per
    REPREDICT_MIN_INTERVAL_S: queued now, or scheduled for when the interval since the last pass started is over.
    None when a pass is already waiting (it will write the newest version).

    While annotators label, a version is promoted every few seconds, and each pass is one Label Studio import of
    every unlabeled task (at 5,000 tasks, seconds during which Label Studio's database is locked and submits wait):
    a pass per promotion kept Label Studio busy writing predictions that the next promotion replaced at once.
    """
    delay = max(0.0, redis.pttl(redis_keys.prediction_pass_started(project)) / 1000)
    # if the job is lost, the flag lapses soon after the pass should have started (a second pass is harmless:
    # the ledger gives each task's prediction to one pass)
    if not redis.set(redis_keys.prediction_pass_pending(project), "1", nx=True,
                     ex=int(delay) + PASS_PENDING_GRACE_S):
        return None
    description = f"pre-label the unlabeled tasks of project {project} with the version then served"
    if delay <= 0:
        return _enqueue_background(redis, settings, REPREDICT_JOB, (project, None, None), description, project)
    return queue(EMBED_QUEUE, redis).enqueue_in(
        timedelta(seconds=delay), REPREDICT_JOB, args=(project, None, None), job_timeout=settings.job_timeout_s,
        retry=Retry(max=2, interval=[10, 60]), failure_ttl=FAILED_JOB_TTL_S, result_ttl=RESULT_TTL_S,
        description=description, meta={"project": project})


def claim_prediction_pass(redis: Redis, settings: Settings, project: str) -> bool:
    """True if no pass writing the project's predictions started within REPREDICT_MIN_INTERVAL_S: the caller's pass
    starts now (and counts as the last one)."""
    interval_ms = int(settings.repredict_min_interval_s * 1000)
    return interval_ms <= 0 or bool(
        redis.set(redis_keys.prediction_pass_started(project), time.time(), nx=True, px=interval_ms))


def enqueue_index(redis: Redis, settings: Settings, project: str, task_ids: list[int] | None = None, *,
                  join_running: bool = False) -> Job | None:
    """List the project's tasks (all, or those created: `task_ids`) into the task index, then embed them in chunks.

    Listing every task is single-flight: None when such a job is already queued (or, with `join_running`, running),
    since it reads the project as it is when it runs. Without this, each re-prediction that found the index unbuilt
    queued another whole pass, and a 5,000-task project was embedded three times over while annotators labeled.
    A request after a labeling config change does not join a running pass, which read the old config.
    """
    if task_ids is not None:
        return _enqueue_background(redis, settings, INDEX_JOB, (project, task_ids),
                                   f"index and embed {len(task_ids)} new task(s) of project {project}", project)
    marker = redis_keys.task_index_job(project)
    if not redis.set(marker, "pending", nx=True, ex=PENDING_MARKER_TTL_S):
        holder = redis.get(marker)
        if holder == b"pending" or (holder is not None and _unfinished(holder.decode(), redis, join_running)):
            return None
        redis.set(marker, "pending", ex=PENDING_MARKER_TTL_S)
    job = _enqueue_background(redis, settings, INDEX_JOB, (project, None),
                              f"index and embed every task of project {project}", project)
    redis.set(marker, job.id, ex=settings.job_timeout_s * 2)
    return job


def _unfinished(job_id: str, redis: Redis, include_running: bool) -> bool:
    """Whether job `job_id` is still to run (queued, scheduled for a retry, deferred) or, if asked, running."""
    job = _fetch(job_id, redis)
    if job is None:
        return False
    status = job.get_status(refresh=False)
    return status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED) or (
        include_running and status == JobStatus.STARTED)


def enqueue_forget_tasks(redis: Redis, settings: Settings, project: str, task_ids: list[int]) -> Job:
    """TASKS_DELETED named these tasks: drop from the task index those Label Studio no longer has."""
    return _enqueue_background(redis, settings, FORGET_TASKS_JOB, (project, task_ids),
                               f"confirm {len(task_ids)} deleted task(s) of project {project}", project)


def enqueue_forget_project(redis: Redis, settings: Settings, project: str) -> Job:
    """PROJECT_DELETED named the project: drop its data once Label Studio confirms it is gone (404)."""
    return _enqueue_background(redis, settings, FORGET_PROJECT_JOB, (project,),
                               f"confirm project {project} was deleted, then drop its data", project)


def enqueue_embed_chunk(redis: Redis, settings: Settings, project: str, task_ids: list[int]) -> Job:
    return _enqueue_background(redis, settings, EMBED_CHUNK_JOB, (project, task_ids),
                               f"embed {len(task_ids)} task(s) of project {project}", project)


def enqueue_webhook_auth(redis: Redis, settings: Settings, project: str, backend_url: str) -> Job:
    """Give the project's webhook in Label Studio the basic-auth header (on the training queue: small, and
    without it no submit trains)."""
    return queue(TRAIN_QUEUE, redis).enqueue(
        WEBHOOK_AUTH_JOB, args=(project, backend_url), job_timeout=settings.job_timeout_s,
        failure_ttl=FAILED_JOB_TTL_S, result_ttl=RESULT_TTL_S,
        description=f"add basic auth to project {project}'s webhook", meta={"project": project},
    )


def enqueue_audit(redis: Redis, settings: Settings, project: str) -> Job | None:
    """Audit the project's labels (suspects, conflicts, auto-accept coverage) after a training; None when an audit
    is already queued (it will read the newest labels when it starts)."""
    if not redis.set(redis_keys.audit_queued(project), "1", nx=True, ex=settings.job_timeout_s):
        return None
    return _enqueue_background(redis, settings, AUDIT_JOB, (project,), f"audit the labels of project {project}",
                               project)


def enqueue_queue_refresh(redis: Redis, settings: Settings, project: str) -> Job | None:
    """Re-rank the project's labeling queue (active learning) in the background, after a training; None when a
    re-ranking is already queued (it will rank with the newest head when it starts). It is not part of the
    training: at 5,000 embedded tasks it takes seconds, which the next submit's training would wait for."""
    if not redis.set(redis_keys.active_refresh_queued(project), "1", nx=True, ex=settings.job_timeout_s):
        return None
    return _enqueue_background(redis, settings, QUEUE_REFRESH_JOB, (project,),
                               f"re-rank the labeling queue of project {project}", project)
