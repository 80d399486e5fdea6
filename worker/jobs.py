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

from backend.common.errors import HeadstartError, NotEnoughLabels
from backend.common.queues import enqueue_repredict
from backend.labelstudio.labeling_config import parse_label_config
from backend.labelstudio.sync import project_tasks, unlabeled_tasks
from backend.loop.features import MediaItem
from backend.loop.retrain import retrain_project
from backend.loop.services import Services

log = logging.getLogger(__name__)

REPREDICT_BATCH = 64
EMBED_BATCH = 32


def train_project(services: Services, project: str) -> dict:
    """Take the project's training lock, run the retrain pipeline, release the lock (re-queueing if
    labels changed meanwhile), and queue re-prediction of unlabeled tasks after a promotion."""
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
        enqueue_repredict(services.redis, services.settings, project, summary["model_version"])
    return summary


def predict_unlabeled(services: Services, project: str, model_version: str) -> dict:
    """Write fresh pre-labels (with confidence scores) for every unlabeled task into Label Studio."""
    config = services.projects.label_config(project)
    if config is None or services.predictor.served(project, config).model_version != model_version:
        return {"project": project, "status": f"skipped: {model_version} is no longer current"}
    client = services.label_studio()
    tasks = unlabeled_tasks(client, project)
    written = 0
    for start in range(0, len(tasks), REPREDICT_BATCH):
        batch = tasks[start:start + REPREDICT_BATCH]
        predictions = services.predictor.predict(batch, project=project, label_config=config)
        payload = [{"task": task["id"], "result": prediction["result"], "score": prediction["score"],
                    "model_version": prediction["model_version"]}
                   for task, prediction in zip(batch, predictions) if prediction["result"]]
        if payload:
            client.projects.import_predictions(id=int(project), request=payload)
            written += len(payload)
    return {"project": project, "model_version": model_version, "tasks": len(tasks), "predictions": written}


def embed_tasks(services: Services, project: str) -> dict:
    """Embed the media of every task of a project into the shared cache, ahead of predictions and trainings.

    Tasks are read from Label Studio's API. Progress (done, total, failed) goes to the job's meta
    after every batch, where `headstart embed` and /admin read it.
    """
    config = services.projects.label_config(project)
    if config is None:
        raise NotEnoughLabels(f"Project {project} has no known labeling config yet: connect the backend in Label "
                              "Studio (Settings → Model) so /setup records it.")
    tasks = project_tasks(services.label_studio(), project)
    keys = list(dict.fromkeys(spec.data_key for spec in parse_label_config(config)))
    items = [MediaItem(task_id=task["id"], url=task["data"][key]) for task in tasks for key in keys
             if isinstance((task.get("data") or {}).get(key), str)]
    encoder = services.encoders.get()
    job = get_current_job()
    failed = 0
    _report_progress(job, done=0, total=len(items), failed=0)
    for start in range(0, len(items), EMBED_BATCH):
        batch = items[start:start + EMBED_BATCH]
        failed += sum(isinstance(vector, HeadstartError) for vector in services.features.features(project, batch, encoder))
        _report_progress(job, done=start + len(batch), total=len(items), failed=failed)
    return {"project": project, "tasks": len(tasks), "media": len(items), "failed": failed, "backbone": encoder.key}


def _report_progress(job, *, done: int, total: int, failed: int) -> None:
    if job is not None:
        job.meta["progress"] = {"done": done, "total": total, "failed": failed}
        job.save_meta()
