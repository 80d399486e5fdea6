"""The RQ jobs. Plain functions taking ids and plain data; exceptions propagate so RQ records them."""

from __future__ import annotations

import logging
import time
import uuid

import torch
from rq import get_current_job

from backend.core.promotion import decide
from backend.core.store import HeadVersion
from backend.core.trainer import train_version
from backend.common.errors import HeadMismatch, HeadstartError, NotEnoughLabels
from backend.loop.features import MediaItem
from backend.labelstudio.label_mirror import Example, LabelStore
from backend.labelstudio.client import make_client
from backend.labelstudio.labeling_config import HeadSpec, parse_label_config
from backend.loop.predictor import check_head_matches
from backend.services import Services
from worker import context
from backend.common.queues import TrainingScheduler, enqueue_repredict
from backend.labelstudio.sync import project_tasks, sync_project, unlabeled_tasks

log = logging.getLogger(__name__)

REPREDICT_BATCH = 64
EMBED_BATCH = 32


def train_project(project: str) -> dict:
    """Sync labels → embed what is not cached → fit → validate → promote if not worse → re-predict."""
    hub = context.current()
    job = get_current_job()
    job_id = job.id if job is not None else f"direct-{uuid.uuid4().hex}"
    scheduler = TrainingScheduler(hub.redis, hub.settings)
    time.sleep(scheduler.seconds_until_next_start(project))
    if not scheduler.begin(project, job_id):
        return {"project": project, "status": "deferred: another training of this project is running"}
    started = time.perf_counter()
    try:
        summary = _train(hub, project, job_id)
    except Exception:
        hub.metrics.add("headstart_trainings_total", outcome="failed")
        raise
    finally:
        scheduler.finish(project, job_id)
    hub.metrics.observe("headstart_training_seconds", time.perf_counter() - started)
    return summary


def _train(hub: Services, project: str, job_id: str) -> dict:
    labels = LabelStore(hub.redis)
    if labels.needs_sync(project):
        if hub.settings.label_studio_url and hub.settings.label_studio_api_key:
            sync_project(make_client(hub.settings), labels, hub.projects, project)
        else:
            log.warning("project %s: LABEL_STUDIO_URL/API_KEY not set; training on webhook data only", project)
    config = hub.projects.label_config(project)
    if config is None:
        raise NotEnoughLabels(f"Project {project} has no known labeling config yet: connect the backend "
                              "in Label Studio (Settings → Model) so /setup records it.")
    outcomes = {spec.control: _train_control(hub, labels, project, spec, job_id) for spec in parse_label_config(config)}
    promoted = [control for control, outcome in outcomes.items() if outcome["status"] == "promoted"]
    model_version = hub.predictor.served(project, config).model_version
    if promoted and hub.settings.repredict_unlabeled and hub.settings.label_studio_url:
        enqueue_repredict(hub.redis, hub.settings, project, model_version)
    return {"project": project, "model_version": model_version, "controls": outcomes}


def _train_control(hub: Services, labels: LabelStore, project: str, spec: HeadSpec, job_id: str) -> dict:
    examples, unknown = labels.examples(project, spec)
    shortage = _label_shortage(examples, spec, hub.settings.min_labels_per_class)
    if shortage:
        log.info("project %s: no training yet: %s", project, shortage)
        return {"status": "skipped", "reason": shortage, "labels": len(examples)}
    embedder = hub.embedders.get()
    items = [MediaItem(task_id=example.task_id, url=example.url) for example in examples]
    vectors = hub.features.features(project, items, embedder)
    usable = [i for i, vector in enumerate(vectors) if not isinstance(vector, HeadstartError)]
    media_errors = {str(example.task_id): str(vector) for example, vector in zip(examples, vectors)
                    if isinstance(vector, HeadstartError)}
    examples = [examples[i] for i in usable]
    shortage = _label_shortage(examples, spec, hub.settings.min_labels_per_class)
    if shortage:
        log.info("project %s: no training yet: %s (media failed for %d tasks)", project, shortage, len(media_errors))
        return {"status": "skipped", "reason": f"{shortage} (media failed for {len(media_errors)} tasks)",
                "media_errors": media_errors}
    features = torch.stack([vectors[i] for i in usable])
    task_ids = [example.task_id for example in examples]
    names = [example.choices for example in examples]
    candidate = train_version(
        hub.store, project=project, control=spec.control, classes=spec.classes, multi_label=spec.multi_label,
        features=features, labels=names, task_ids=task_ids, embedder=embedder,
        extra_meta={"job_id": job_id, "unknown_labels": unknown, "media_errors": media_errors},
    )
    current = _current_head(hub, project, spec)
    current_features = features if current is None or current.backbone_key == embedder.key else \
        _features_for(hub, project, current, examples)
    decision = decide(candidate.meta, current, task_ids=task_ids, labels=names, current_features=current_features)
    hub.store.update_meta(project, spec.control, candidate.number, promotion=decision.as_dict())
    if decision.promote:
        hub.store.promote(project, spec.control, candidate.number, reason=decision.reason)
        hub.metrics.add("headstart_trainings_total", outcome="promoted")
        status = "promoted"
    else:
        hub.store.update_meta(project, spec.control, candidate.number, status="rejected", status_reason=decision.reason)
        hub.metrics.add("headstart_trainings_total", outcome="rejected")
        status = "rejected"
    log.info("project %s %s-v%d: %s (%s)", project, spec.control, candidate.number, status, decision.reason)
    return {"status": status, "version": candidate.number, "reason": decision.reason, "labels": len(examples),
            "cv_accuracy": candidate.validation.accuracy, "train_seconds": candidate.meta["train_seconds"]}


def _label_shortage(examples: list[Example], spec: HeadSpec, minimum: int) -> str | None:
    """Why these labels cannot train a head yet, or None when they can."""
    counts = {name: sum(name in example.choices for example in examples) for name in spec.classes}
    enough = [name for name, count in counts.items() if count >= minimum]
    needed = 1 if spec.multi_label else 2
    if len(enough) < needed or (spec.multi_label and all(count == len(examples) for count in counts.values())):
        return (f"control {spec.control!r} needs at least {minimum} labeled task(s) for "
                f"{'a class (and some tasks without it)' if spec.multi_label else 'two classes'}; has {counts}")
    return None


def _current_head(hub: Services, project: str, spec: HeadSpec) -> HeadVersion | None:
    number = hub.store.current_number(project, spec.control)
    if number is None:
        return None
    head = hub.store.load(project, spec.control, number)
    try:
        check_head_matches(spec, head)
    except HeadMismatch as exc:
        log.info("project %s: the current head is not comparable: %s", project, exc)
        return None
    return head


def _features_for(hub: Services, project: str, head: HeadVersion, examples: list[Example]):
    """Features of `examples` under the current head's backbone, or None if that backbone is unavailable."""
    try:
        embedder = hub.embedders.for_key(head.meta["backbone"], head.backbone_key)
    except HeadstartError as exc:
        log.warning("cannot score the current version on its backbone: %s", exc)
        return None
    vectors = hub.features.features(project, [MediaItem(e.task_id, e.url) for e in examples], embedder)
    if any(isinstance(vector, HeadstartError) for vector in vectors):
        return None
    return torch.stack(vectors)


def predict_unlabeled(project: str, model_version: str) -> dict:
    """Write fresh pre-labels (with confidence scores) for every unlabeled task into Label Studio."""
    hub = context.current()
    config = hub.projects.label_config(project)
    if config is None or hub.predictor.served(project, config).model_version != model_version:
        return {"project": project, "status": f"skipped: {model_version} is no longer current"}
    client = make_client(hub.settings)
    tasks = unlabeled_tasks(client, project)
    written = 0
    for start in range(0, len(tasks), REPREDICT_BATCH):
        batch = tasks[start:start + REPREDICT_BATCH]
        predictions = hub.predictor.predict(batch, project=project, label_config=config)
        payload = [{"task": task["id"], "result": prediction["result"], "score": prediction["score"],
                    "model_version": prediction["model_version"]}
                   for task, prediction in zip(batch, predictions) if prediction["result"]]
        if payload:
            client.projects.import_predictions(id=int(project), request=payload)
            written += len(payload)
    return {"project": project, "model_version": model_version, "tasks": len(tasks), "predictions": written}


def embed_tasks(project: str) -> dict:
    """Embed the media of every task of a project into the shared cache, ahead of predictions and trainings.

    Tasks are read from Label Studio's API. Progress (done, total, failed) goes to the job's meta
    after every batch, where `headstart embed` and /admin read it.
    """
    hub = context.current()
    config = hub.projects.label_config(project)
    if config is None:
        raise NotEnoughLabels(f"Project {project} has no known labeling config yet: connect the backend in Label "
                              "Studio (Settings → Model) so /setup records it.")
    tasks = project_tasks(make_client(hub.settings), project)
    keys = list(dict.fromkeys(spec.data_key for spec in parse_label_config(config)))
    items = [MediaItem(task_id=task["id"], url=task["data"][key]) for task in tasks for key in keys
             if isinstance((task.get("data") or {}).get(key), str)]
    embedder = hub.embedders.get()
    job = get_current_job()
    failed = 0
    _report_progress(job, done=0, total=len(items), failed=0)
    for start in range(0, len(items), EMBED_BATCH):
        batch = items[start:start + EMBED_BATCH]
        failed += sum(isinstance(vector, HeadstartError) for vector in hub.features.features(project, batch, embedder))
        _report_progress(job, done=start + len(batch), total=len(items), failed=failed)
    return {"project": project, "tasks": len(tasks), "media": len(items), "failed": failed, "backbone": embedder.key}


def _report_progress(job, *, done: int, total: int, failed: int) -> None:
    if job is not None:
        job.meta["progress"] = {"done": done, "total": total, "failed": failed}
        job.save_meta()
