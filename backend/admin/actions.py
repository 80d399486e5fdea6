"""What the admin can change, shared by the CLI and the /admin page's POST routes.

Each action takes its connection or `Services` explicitly, checks that what it is told to act on
exists (NotFound) and may be acted on (Refused), does one thing through RQ or the model store, and
returns a JSON-ready summary of what happened.
"""

from __future__ import annotations

import time

from redis import Redis
from rq import Retry, Worker
from rq.command import send_shutdown_command
from rq.job import JobStatus
from rq.suspension import resume, suspend

from backend.admin.errors import NotFound, Refused
from backend.admin.views import fetch_job, known_project, served_version, worker_names
from backend.common.errors import HeadMismatch
from backend.labelstudio.labeling_config import parse_label_config
from backend.loop.predictor import check_head_matches
from backend.loop.services import Services
from backend.common.queues import (EMBED_JOB, EMBED_QUEUE, FAILED_JOB_TTL_S, QUEUE_NAMES, RESULT_TTL_S, TRAIN_QUEUE,
                             enqueue_repredict, queue)

RETRYABLE = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
CANCELABLE = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)


def retry_job(redis: Redis, job_id: str) -> dict:
    """Put a failed, stopped or canceled job back on its queue, as it was enqueued."""
    job = fetch_job(redis, job_id)
    status = job.get_status(refresh=False)
    if status not in RETRYABLE:
        raise Refused(f"Job {job_id} is {_name(status)}; only failed, stopped or canceled jobs can be retried.")
    registry = job.canceled_job_registry if status == JobStatus.CANCELED else job.failed_job_registry
    registry.requeue(job)
    return {"job": job.id, "queue": job.origin, "status": "queued"}


def retry_failed(redis: Redis) -> dict:
    """Retry every failed job of every headstart queue."""
    requeued = []
    for name in QUEUE_NAMES:
        registry = queue(name, redis).failed_job_registry
        for job_id in registry.get_job_ids():
            registry.requeue(job_id)
            requeued.append(job_id)
    return {"requeued": requeued}


def cancel_job(redis: Redis, job_id: str) -> dict:
    """Cancel a job that has not started. A running job is left to finish (see `workers drain`)."""
    job = fetch_job(redis, job_id)
    status = job.get_status(refresh=False)
    if status == JobStatus.STARTED:
        raise Refused(f"Job {job_id} is running on worker {job.worker_name}; a running job is not interrupted "
                      f"(a half-done training could leave nothing behind). `headstart workers drain "
                      f"{job.worker_name}` stops that worker once the job is done.")
    if status not in CANCELABLE:
        raise Refused(f"Job {job_id} is {_name(status)}; only queued, scheduled or deferred jobs can be canceled.")
    job.cancel()
    return {"job": job.id, "queue": job.origin, "status": "canceled"}


def _name(status) -> str:
    return status.value if isinstance(status, JobStatus) else str(status)


def _control(services: Services, project: str, control: str | None) -> str:
    controls = services.store.controls(project)
    if not controls:
        raise NotFound(f"Project {project} has no trained versions yet.")
    if control is None:
        if len(controls) > 1:
            raise Refused(f"Project {project} has several controls ({', '.join(controls)}): name one "
                          "(--control NAME, or \"control\" in the request).")
        return controls[0]
    if control not in controls:
        raise NotFound(f"Project {project} has no versions for control {control!r} (it has {', '.join(controls)}).")
    return control


def _check_servable(services: Services, project: str, control: str, number: int) -> None:
    """Refuse a version the predictor would skip: trained for other classes than the labeling config has."""
    config = services.projects.label_config(project)
    if config is None:
        return
    specs = {spec.control: spec for spec in parse_label_config(config)}
    if control not in specs:
        raise Refused(f"Control {control!r} is no longer in project {project}'s labeling config, so no "
                      "version of it can be served.")
    try:
        check_head_matches(specs[control], services.store.load(project, control, number))
    except HeadMismatch as exc:
        raise Refused(str(exc)) from None


def promote(services: Services, project: object, version: int, *, control: str | None = None) -> dict:
    """Serve `version` of a control from now on (every gunicorn and RQ worker reads the same pointer)."""
    project = known_project(services, project)
    control = _control(services, project, control)
    meta = services.store.meta(project, control, int(version))
    if meta is None:
        newest, _ = services.store.versions_page(project, control, limit=10)
        numbers = ", ".join(str(m["version"]) for m in newest) or "none"
        raise NotFound(f"Project {project} has no version {version} of {control!r} (its newest: {numbers}; "
                       "`headstart models PROJECT` lists them).")
    before = served_version(services, project)
    if services.store.current_number(project, control) != int(version):
        _check_servable(services, project, control, int(version))
        services.store.promote(project, control, int(version), reason="promoted by an admin")
    return _moved(services, project, control, before)


def rollback(services: Services, project: object, *, control: str | None = None) -> dict:
    """Serve the version that was current before the current one."""
    project = known_project(services, project)
    control = _control(services, project, control)
    before = served_version(services, project)
    try:
        _, target = services.store.rollback_target(project, control)
        _check_servable(services, project, control, target)
        left, _ = services.store.rollback(project, control, reason="rolled back by an admin")
    except LookupError as exc:
        raise Refused(f"Nothing to roll back to: {exc}.") from None
    return {**_moved(services, project, control, before), "rolled_back": left}


def _moved(services: Services, project: str, control: str, before: str) -> dict:
    """Summary of a pointer move; asks for fresh pre-labels when the served model_version changed."""
    after = served_version(services, project)
    settings = services.settings
    repredict = None
    if after != before and settings.repredict_unlabeled and settings.label_studio_url:
        repredict = enqueue_repredict(services.redis, settings, project, after).id
    return {"project": project, "control": control, "current": services.store.current_number(project, control),
            "model_version": after, "previous_model_version": before, "repredict_job": repredict}


def _known_worker(redis: Redis, name: str) -> None:
    names = worker_names(redis)
    if name not in names:
        raise NotFound(f"No worker named {name!r} (running: {', '.join(names) or 'none'}).")


def drain_worker(redis: Redis, name: str) -> dict:
    """Ask a worker to finish the job it is running, take no new one and exit (RQ's warm shutdown)."""
    _known_worker(redis, name)
    send_shutdown_command(redis, name)
    return {"worker": name, "command": "shutdown"}


def wait_until_gone(redis: Redis, name: str, *, timeout_s: float, poll_s: float = 0.2) -> bool:
    """True once worker `name` has deregistered; False if it is still there after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=redis) is None:
            return True
        time.sleep(poll_s)
    return False


def suspend_queues(redis: Redis) -> dict:
    """Workers stop taking jobs until `resume_queues` (RQ's suspension); running jobs finish.

    A worker already waiting on an empty queue notices only after the next job it receives, so
    one more job per idle worker may start.
    """
    suspend(redis)
    return {"suspended": True}


def resume_queues(redis: Redis) -> dict:
    resume(redis)
    return {"suspended": False}


def train(services: Services, project: object) -> dict:
    """Ask for a training of `project` now, through the same coalescing scheduler the webhook uses."""
    project = known_project(services, project)
    outcome = services.scheduler.request(project, reason="asked by an admin")
    train_queue = queue(TRAIN_QUEUE, services.redis)
    queued = [job.id for job in train_queue.get_jobs() if (job.meta or {}).get("project") == project]
    return {"project": project, "outcome": outcome, "job": queued[-1] if queued else None}


def embed(services: Services, project: object) -> dict:
    """Queue the pre-computation of every task's embedding on the workers (tasks read from Label Studio)."""
    project = known_project(services, project)
    settings = services.settings
    job = queue(EMBED_QUEUE, services.redis).enqueue(
        EMBED_JOB, args=(project,), job_timeout=settings.job_timeout_s, failure_ttl=FAILED_JOB_TTL_S,
        result_ttl=RESULT_TTL_S, retry=Retry(max=1, interval=[30]) if settings.job_retries else None,
        description=f"embed every task of project {project}", meta={"project": project},
    )
    return {"project": project, "job": job.id}
