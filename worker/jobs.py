"""The RQ jobs: thin adapters from a queued job to the pipelines in `backend.loop`.

Each job function takes the worker process's `Services` first (`headstart worker` passes them, see
`worker.process.ServicesJob`) and then the plain, JSON-serialized arguments it was enqueued with by
name (`backend.common.queues`). Exceptions propagate so RQ records them.
"""

from __future__ import annotations

import logging
import time
import uuid

from rq import get_current_job

from backend.common import redis_keys
from backend.common.errors import HeadstartError, NotEnoughLabels, TrainingRunning
from backend.common.queues import (claim_prediction_pass, enqueue_audit, enqueue_embed_chunk, enqueue_index,
                                    enqueue_queue_refresh, enqueue_repredict, schedule_prediction_pass,
                                    training_waiting)
from backend.core.encoders import Encoder
from backend.labelstudio import webhooks
from backend.labelstudio.labeling_config import HeadSpec, parse_label_config
from backend.labelstudio.task_index import read_tasks
from backend.labelstudio.projects import project_exists
from backend.loop import project_data
from backend.loop.active_queue import ensure_sampling, ranking_enabled, refresh_queue
from backend.loop.audit import audit_project
from backend.loop.features import MediaItem
from backend.loop.repredict import repredict, served_version
from backend.loop.retrain import retrain_project
from backend.loop.services import Services

log = logging.getLogger(__name__)

EMBED_CHUNK = 32  # tasks per embedding job: about a second of CPU
EMBED_YIELD_TASKS = 8  # a chunk looks for a waiting training this often and leaves it the rest: a training waits ~0.2 s
WEBHOOK_LOOKS = 3  # times the webhook is looked for: Label Studio calls /setup once before it creates it
WEBHOOK_LOOK_INTERVAL_S = 2.0


def train_project(services: Services, project: str) -> dict:
    """Take the project's training lock, run the retrain pipeline, release the lock (re-queueing if
    labels changed meanwhile), and queue the background work a new head calls for: re-prediction of the
    unlabeled tasks after a promotion, the label audit and the re-ranking of the labeling queue."""
    job = get_current_job()
    job_id = job.id if job is not None else f"direct-{uuid.uuid4().hex}"
    scheduler = services.scheduler
    time.sleep(scheduler.seconds_until_next_start(project))
    if not scheduler.begin(project, job_id):
        return {"project": project, "status": "deferred: another training of this project is running"}
    started = time.perf_counter()
    try:
        summary = retrain_project(services, project, job_id=job_id)
    except Exception:
        services.metrics.add("headstart_trainings_total", outcome="failed")
        raise
    finally:
        scheduler.finish(project, job_id)
    services.metrics.observe("headstart_training_seconds", time.perf_counter() - started)
    if summary["promoted"] and services.settings.repredict_unlabeled and services.can_reach_label_studio:
        schedule_prediction_pass(services.redis, services.settings, project)  # at most one per interval
    if ranking_enabled(services):  # before the audit: the annotator's next task waits for it, not for the audit
        enqueue_queue_refresh(services.redis, services.settings, project)  # with the head just served
    if any(outcome["status"] not in ("skipped", "unchanged") for outcome in summary["controls"].values()):
        enqueue_audit(services.redis, services.settings, project)  # suspects and coverage of the labels just read
    return summary


def refresh_labeling_queue(services: Services, project: str) -> dict:
    """Re-rank the project's labeling queue in Label Studio (active learning) with the served head."""
    services.redis.delete(redis_keys.active_refresh_queued(project))  # a training finishing from now on queues another
    return _refresh_queue(services, project)


def _refresh_queue(services: Services, project: str) -> dict:
    """Re-rank Label Studio's queue after a training or an embedding pass; a failure here never fails the job."""
    try:
        return refresh_queue(services, project)
    except Exception as exc:  # the queue is a convenience: the head and its predictions are what matter
        log.warning("project %s: the labeling queue was not re-ranked: %s", project, exc)
        return {"status": f"failed: {exc}"}


def predict_unlabeled(services: Services, project: str, model_version: str | None = None,
                      task_ids: list[int] | None = None) -> dict:
    """Write `model_version`'s pre-labels (with scores) for the unlabeled tasks into Label Studio, from cached
    features; yields to a waiting training between write batches by queueing the rest as a new job.

    A scheduled pass (`model_version` None, `backend.common.queues.schedule_prediction_pass`) writes the version
    served when it starts; if another pass started less than REPREDICT_MIN_INTERVAL_S ago, it is scheduled again."""
    if model_version is None:
        services.redis.delete(redis_keys.prediction_pass_pending(project))  # promotions from now on schedule another
        if not claim_prediction_pass(services.redis, services.settings, project):
            schedule_prediction_pass(services.redis, services.settings, project)
            return {"project": project, "status": "rescheduled: a pass started less than REPREDICT_MIN_INTERVAL_S ago"}
        model_version = served_version(services, project)
        if model_version is None:
            return {"project": project, "status": "skipped: nothing is served"}
    if not services.tasks.is_built(project):
        enqueue_index(services.redis, services.settings, project, join_running=True)  # it predicts what it embeds
        return {"project": project, "status": "queued: the task index is built first"}
    summary = repredict(services, project, model_version, task_ids,
                        should_yield=lambda: training_waiting(services.redis))
    if summary.get("remaining"):
        enqueue_repredict(services.redis, services.settings, project, model_version, summary["remaining"])
    return {**summary, "remaining": len(summary.get("remaining") or [])}


def index_tasks(services: Services, project: str, task_ids: list[int] | None = None) -> dict:
    """List the project's tasks (every one, or the created `task_ids`, read back from Label Studio by id) into
    the task index, queue embedding chunks for inputs never embedded, and predict what is already cached."""
    config = _config(services, project)
    tasks = read_tasks(services.label_studio(), project, ids=task_ids)
    if task_ids is None:
        services.tasks.replace_all(project, tasks)
    else:
        services.tasks.put_many(project, tasks)
    items_by_input = [(encoder, [item for task in tasks if (item := _item(task, spec)).url])
                      for spec, encoder in _inputs(services, parse_label_config(config))]
    pending, total, done = set(), 0, 0
    for encoder, items in items_by_input:
        cached = services.features.cached(project, items, encoder)
        pending.update(item.task_id for item, vector in zip(items, cached) if vector is None)
        total += len(items)
        done += sum(vector is not None for vector in cached)
    pending = sorted(pending)
    progress = redis_keys.embedding_progress(project)
    if task_ids is None:
        services.redis.hset(progress, mapping={"total": total, "done": done, "failed": 0})
    else:
        services.redis.hincrby(progress, "total", total)
        services.redis.hincrby(progress, "done", done)
    for start in range(0, len(pending), EMBED_CHUNK):
        enqueue_embed_chunk(services.redis, services.settings, project, pending[start:start + EMBED_CHUNK])
    version = served_version(services, project)
    predicted = repredict(services, project, version, [task["id"] for task in tasks]) if version else {}
    if task_ids is None:
        ensure_sampling(services, project)
    if not pending:
        _refresh_queue(services, project)
    return {"project": project, "tasks": len(tasks), "media": total, "to_embed": len(pending),
            "chunks": -(-len(pending) // EMBED_CHUNK), "predictions": predicted.get("predictions", 0),
            "backbone": "+".join(dict.fromkeys(encoder.key for encoder, _ in items_by_input))}


def forget_deleted_tasks(services: Services, project: str, task_ids: list[int]) -> dict:
    """TASKS_DELETED is a hint: of the indexed tasks it named, drop only those Label Studio no longer lists (a forged
    or stale webhook removes nothing that still exists)."""
    indexed = sorted(services.tasks.data(project, task_ids))
    present = {task["id"] for task in read_tasks(services.label_studio(), project, ids=indexed)} if indexed else set()
    gone = [task for task in indexed if task not in present]
    services.tasks.remove(project, gone)
    if present:
        log.warning("project %s: TASKS_DELETED named %d task(s) Label Studio still has: kept", project, len(present))
    return {"project": project, "named": len(task_ids), "removed": len(gone), "kept": len(present)}


def forget_deleted_project(services: Services, project: str) -> dict:
    """PROJECT_DELETED is a hint: drop the project's data from Redis only when Label Studio answers 404 for it. A
    project Label Studio still has keeps everything (the hint is recorded as wrong); a running training of it
    makes this job fail and retry later."""
    if project_exists(services.label_studio(), project):
        project_data.record_hint(services.redis, project, state="refuted",
                                 message="Label Studio still has this project: nothing was dropped")
        log.warning("project %s: PROJECT_DELETED, but Label Studio still has the project: nothing dropped", project)
        return {"project": project, "status": "kept: Label Studio still has the project"}
    job = get_current_job()
    job_id = job.id if job is not None else f"direct-{uuid.uuid4().hex}"
    if not services.scheduler.begin(project, job_id):  # its lock keeps trainings from writing while keys go
        raise TrainingRunning(f"A training of project {project} is running; its data is dropped after it (retried).")
    return {**project_data.forget_project(services.redis, project), "status": "dropped"}


def embed_chunk(services: Services, project: str, task_ids: list[int]) -> dict:
    """Embed the inputs of a few tasks (a unit of bounded duration); at most every REPREDICT_MIN_INTERVAL_S (the
    spacing of all passes writing the project's predictions), and when the project's embedding ends, write the served
    version's predictions of every task embedded since the last write.

    Every EMBED_YIELD_TASKS tasks it looks for a training waiting in the queue; if one waits, the rest of the chunk
    is queued as a new chunk and this one ends, so no training waits behind embedding for more than a few images."""
    config = _config(services, project)
    inputs = _inputs(services, parse_label_config(config))
    vectors, deferred = [], []
    for start in range(0, len(task_ids), EMBED_YIELD_TASKS):
        if start and training_waiting(services.redis):  # the rest waits its turn behind the training
            deferred = task_ids[start:]
            enqueue_embed_chunk(services.redis, services.settings, project, deferred)
            break
        vectors += _embed(services, project, inputs, task_ids[start:start + EMBED_YIELD_TASKS])
    failed = sum(isinstance(vector, HeadstartError) for vector in vectors)
    pipe = services.redis.pipeline(transaction=False)
    pipe.hincrby(redis_keys.embedding_progress(project), "done", len(vectors) - failed)
    pipe.hincrby(redis_keys.embedding_progress(project), "failed", failed)
    pipe.execute()
    version = served_version(services, project)
    done = _embedding_done(services, project)
    predicted = {}
    if version and not deferred and (claim_prediction_pass(services.redis, services.settings, project) or done):
        predicted = repredict(services, project, version)  # what this and the chunks since the last pass embedded
    if done:
        _refresh_queue(services, project)
    return {"project": project, "tasks": len(task_ids) - len(deferred), "media": len(vectors), "failed": failed,
            "deferred": len(deferred), "predictions": predicted.get("predictions", 0)}


def _embed(services: Services, project: str, inputs: list[tuple[HeadSpec, Encoder]],
           task_ids: list[int]) -> list:
    """The feature vectors (or errors) of the inputs of `task_ids` the task index holds, cached on the way."""
    data = services.tasks.data(project, task_ids)
    vectors = []
    for spec, encoder in inputs:
        items = [item for task in task_ids if task in data
                 if (item := _item({"id": task, "data": data[task]}, spec)).url]
        vectors += services.features.features(project, list(dict.fromkeys(items)), encoder)
    return vectors


def embed_tasks(services: Services, project: str) -> dict:
    """`headstart embed`: index every task of the project and embed their inputs in chunks that every worker
    shares. Progress (done, total, failed, in inputs) is the project's embedding progress, read by the CLI and
    /admin through this job's meta."""
    job = get_current_job()
    if job is not None:
        job.meta["progress_key"] = redis_keys.embedding_progress(project)
        job.save_meta()
    return index_tasks(services, project)


def secure_webhook(services: Services, project: str, backend_url: str) -> dict:
    """Give the project's webhooks that point at `backend_url` (the URL Label Studio calls this backend by) the
    basic-auth header, so Label Studio's annotation webhooks are accepted; a failure is recorded and logged with
    its fix (shown on /admin), and tried again at a later /setup."""
    settings = services.settings
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    if not user and not password:
        return {"project": project, "state": "off: BASIC_AUTH_USER/PASS are not set on this worker"}
    auth, tag = webhooks.WebhookAuth(services.redis), webhooks.credentials_tag(user, password)
    header = webhooks.authorization(user, password)
    try:
        for look in range(WEBHOOK_LOOKS):
            outcome = webhooks.secure_project_webhooks(services.label_studio(), project, backend_url, header)
            if outcome["state"] == "ok":
                break
            time.sleep(WEBHOOK_LOOK_INTERVAL_S if look < WEBHOOK_LOOKS - 1 else 0)
    except HeadstartError as exc:  # refused or unreachable: retrying at once would not help
        auth.record(project, tag, {"state": "failed", "message": str(exc)},
                    retry_after_s=webhooks.RETRY_FAILED_AFTER_S)
        log.warning("project %s: %s", project, exc)
        return {"project": project, "state": "failed", "message": str(exc)}
    auth.record(project, tag, outcome)
    if outcome["state"] == "missing":
        log.warning("project %s: Label Studio has no webhook pointing at %swebhook yet; looking again at a later "
                    "/setup", project, backend_url)
    elif outcome["patched"]:
        log.info("project %s: webhook(s) %s now carry the basic-auth header", project, outcome["webhooks"])
        # webhooks refused before now were lost: the next training looks for what changed meanwhile
        services.labels.add_hints(project, check=True)
        services.scheduler.request(project, reason="webhook credentials added")
    return {"project": project, **outcome}


def _embedding_done(services: Services, project: str) -> bool:
    progress = services.redis.hmget(redis_keys.embedding_progress(project), ["total", "done", "failed"])
    total, done, failed = (int(value or 0) for value in progress)
    return total > 0 and done + failed >= total


def audit_labels(services: Services, project: str) -> dict:
    """Judge the project's labels under its served heads (suspects, near-duplicate conflicts, auto-accept coverage),
    store the audit with the version and bring Label Studio's suspect markers in line."""
    services.redis.delete(redis_keys.audit_queued(project))  # a training finishing from now on queues another
    return audit_project(services, project)


def _config(services: Services, project: str) -> str:
    config = services.projects.label_config(project)
    if config is None:
        raise NotEnoughLabels(f"Project {project} has no known labeling config yet: connect the backend in Label "
                              "Studio (Settings → Model) so /setup records it.")
    return config


def _inputs(services: Services, specs: list[HeadSpec]) -> list[tuple[HeadSpec, Encoder]]:
    """One (spec, encoder) per distinct input of the config: controls on the same object share it."""
    distinct = {(spec.data_key, spec.modality, spec.markup, spec.inline): spec for spec in reversed(specs)}
    return [(spec, services.encoders.for_input(spec.modality, spec.markup)) for spec in reversed(distinct.values())]


def _item(task: dict, spec: HeadSpec) -> MediaItem:
    value = (task.get("data") or {}).get(spec.data_key)
    return MediaItem(task_id=task["id"], url=value if isinstance(value, str) else "", inline=spec.inline)
