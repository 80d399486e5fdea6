"""What the admin shows, computed once for the CLI, the /admin page, its JSON API and /metrics.

Every view is a function of an explicit Redis connection (projects also need the `Services`) that
returns plain JSON-ready data: the CLI prints it as tables or JSON, the page renders it, the API
returns it as is. Nothing here writes to Redis except RQ's own registry maintenance on read.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

from redis import Redis
from rq import Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.admin.errors import NotFound
from backend.loop.active_queue import queue_status
from backend.labelstudio.webhooks import WebhookAuth
from backend.loop import audit_report, project_data
from backend.loop.predictor import model_version_of, project_id
from backend.common.redis_conn import LOCAL_REDIS_URL
from backend.loop.services import Services
from backend.common.queue_state import queues, registries, suspended  # noqa: F401 (admin views too)
from backend.common.queues import QUEUE_NAMES, queue

RECENT_JOBS_PER_STATE = 50


VERSIONS_SHOWN = 50  # versions per control /admin, `headstart models` and the learning curve show by default

def iso(moment: datetime | float | None) -> str | None:
    """UTC ISO 8601 text for a datetime or an epoch time; None stays None."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(float(moment), timezone.utc)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def redacted(url: str) -> str:
    """`url` without its password, fit to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def redis_info(redis: Redis, url: str) -> dict:
    """Where Redis is (REDIS_URL, password hidden; empty means the local default), its version and size."""
    url = url or LOCAL_REDIS_URL
    info = redis.info("server")
    memory = redis.info("memory")
    return {"url": redacted(url), "version": info.get("redis_version"),
            "used_memory": memory.get("used_memory_human"), "db_keys": redis.dbsize()}


def workers(redis: Redis) -> list[dict]:
    """Every registered RQ worker, with what `headstart worker` publishes about its host and device."""
    views = []
    for worker in Worker.all(connection=redis, serializer=JSONSerializer):
        raw = redis.hget(worker.key, "headstart")
        info = json.loads(raw) if raw else {}
        heartbeat = worker.last_heartbeat
        views.append({
            "name": worker.name,
            "state": worker.get_state(),
            "host": info.get("host") or worker.hostname,
            "pid": worker.pid,
            "device": info.get("device") or {},
            "backbone": info.get("backbone"),
            "torch_threads": info.get("torch_threads"),
            "queues": worker.queue_names(),
            "current_job": worker.get_current_job_id(),
            "last_heartbeat": iso(heartbeat),
            "heartbeat_age_s": _age(heartbeat),
            "born": iso(worker.birth_date),
            "jobs_done": worker.successful_job_count,
            "jobs_failed": worker.failed_job_count,
            "working_seconds": round(worker.total_working_time or 0.0, 3),
        })
    return sorted(views, key=lambda view: view["name"])


def worker_names(redis: Redis) -> list[str]:
    return sorted(worker.name for worker in Worker.all(connection=redis, serializer=JSONSerializer))


def _age(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return round((datetime.now(timezone.utc) - moment).total_seconds(), 1)


def jobs(redis: Redis, *, per_state: int = RECENT_JOBS_PER_STATE) -> list[dict]:
    """Queued, running, failed, finished, ... jobs of every headstart queue, most recent first."""
    ids: list[str] = []
    for name in QUEUE_NAMES:
        q = queue(name, redis)
        ids += q.get_job_ids(0, per_state - 1)
        for registry in registries(q).values():
            ids += registry.get_job_ids(0, per_state - 1, desc=True, cleanup=False)
    unique = list(dict.fromkeys(ids))
    found = [job for job in Job.fetch_many(unique, connection=redis, serializer=JSONSerializer) if job is not None]
    views = [job_view(job) for job in found]
    return sorted(views, key=lambda view: view["last_activity"] or "", reverse=True)


def job(redis: Redis, job_id: str) -> dict:
    return job_view(fetch_job(redis, job_id))


def fetch_job(redis: Redis, job_id: str) -> Job:
    found = Job.fetch_many([job_id], connection=redis, serializer=JSONSerializer)[0] if job_id else None
    if found is None:
        raise NotFound(f"No job {job_id!r}: it never existed or its record expired (finished jobs are kept "
                       "a day, failed ones a week). `headstart jobs` lists the known ones.")
    return found


def job_view(job: Job) -> dict:
    status = job.get_status(refresh=False)
    status = status.value if isinstance(status, JobStatus) else str(status)
    result = job.latest_result() if status in ("finished", "failed", "stopped") else None
    traceback = result.exc_string if result is not None and result.exc_string else None
    end = job.ended_at if status not in ("started", "queued") else None
    duration = None
    if job.started_at is not None:
        until = end or (datetime.now(timezone.utc) if status == "started" else None)
        if until is not None:
            duration = round((_aware(until) - _aware(job.started_at)).total_seconds(), 3)
    try:
        args = list(job.args)
    except Exception:  # a job enqueued by something that is not headstart
        args = []
    moments = [job.ended_at, job.started_at, job.enqueued_at, job.created_at]
    return {
        "id": job.id,
        "queue": job.origin,
        "status": status,
        "function": job.func_name,
        "args": args,
        "description": job.description,
        "project": (job.meta or {}).get("project"),
        "created_at": iso(job.created_at),
        "enqueued_at": iso(job.enqueued_at),
        "started_at": iso(job.started_at),
        "ended_at": iso(end),
        "last_activity": iso(next((moment for moment in moments if moment is not None), None)),
        "duration_s": duration,
        "worker": job.worker_name,
        "error": _last_line(traceback),
        "traceback": traceback,
        "result": result.return_value if result is not None and status == "finished" else None,
        "progress": _progress(job),
        "retries_left": job.retries_left,
    }


def _progress(job: Job) -> dict | None:
    """{done, total, failed}: a job's own progress, or the progress it points at (an embedding pass whose
    chunks run as separate jobs on every worker)."""
    meta = job.meta or {}
    if meta.get("progress_key"):
        raw = job.connection.hgetall(meta["progress_key"])
        if raw:
            return {name: int(raw.get(name.encode(), 0)) for name in ("done", "total", "failed")}
    return meta.get("progress")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _last_line(traceback: str | None) -> str | None:
    lines = [line for line in (traceback or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def known_project(services: Services, project: object) -> str:
    """The project id, if headstart knows the project (a labeling config or versions); else NotFound."""
    identifier = project_id(project)
    if identifier not in services.projects.all() and not services.store.controls(identifier):
        known = ", ".join(services.projects.all()) or "none yet"
        raise NotFound(f"Project {identifier} is unknown to headstart (known: {known}). Connect the backend "
                       "to it in Label Studio (Settings → Model) so /setup records it.")
    return identifier


def served_version(services: Services, project: str) -> str:
    """The model_version /setup answers for `project` right now."""
    config = services.projects.label_config(project)
    if config is not None:
        return services.predictor.served(project, config).model_version
    controls = services.store.controls(project)  # versions but no config: name the current pointers
    current = services.store.current_numbers(project, controls)
    parts = [f"{control}-v{number}" for control, number in current.items() if number is not None]
    return "+".join(parts) if parts else model_version_of([], {})


def models(services: Services, project: object, *, limit: int = VERSIONS_SHOWN, before: int | None = None) -> dict:
    """The newest `limit` versions (numbered below `before`, when given) of every control of a project, oldest
    first: labels, metrics, parameters, promotion, current; `version_count` and `older` (the `before` of the
    next page, None when there is none) per control. Never reads every version."""
    identifier = known_project(services, project)
    store = services.store
    controls = []
    for control in store.controls(identifier):
        current = store.current_number(identifier, control)
        page, older = store.versions_page(identifier, control, limit=limit, before=before)
        controls.append({"control": control, "current": current, "version_count": store.count(identifier, control),
                         "older": older, "versions": [version_view(meta, current) for meta in reversed(page)]})
    return {"project": identifier, "model_version": served_version(services, identifier),
            "label_config_known": services.projects.label_config(identifier) is not None,
            "queue": queue_status(services, identifier), "controls": controls,
            "audit": audit_report.suspects(services, identifier)}


def version_view(meta: dict, current: int | None) -> dict:
    metrics = meta.get("metrics") or {}
    parameters = meta.get("parameters") or {}
    promotion = meta.get("promotion") or {}
    return {
        "version": meta["version"],
        "name": f"{meta['control']}-v{meta['version']}",
        "current": meta["version"] == current,
        "status": meta.get("status"),
        "reason": meta.get("status_reason"),
        "labels": meta.get("label_count"),
        "labels_per_class": meta.get("labels_per_class"),
        "classes": meta.get("classes"),
        "recipe": meta.get("recipe") if isinstance(meta.get("recipe"), str) else None,
        "selection": meta.get("selection"),  # the choice and its out-of-fold evidence, shown on hover
        "unlabeled_read": meta.get("pool_size"),  # unlabeled tasks' features the training placed prototypes with
        "cv_accuracy": metrics.get("cv_accuracy"),
        "cv_folds": metrics.get("cv_folds"),
        "train_accuracy": metrics.get("train_accuracy"),
        "trainable_parameters": parameters.get("trainable"),
        "non_trainable_parameters": parameters.get("non_trainable"),
        "backbone": meta.get("backbone_key") or meta.get("backbone"),
        "candidate_score": promotion.get("candidate_score"),
        "current_score": promotion.get("current_score"),
        "created_at": iso(meta.get("created_at")),
        "promoted_at": iso(meta.get("promoted_at")),
        "train_seconds": meta.get("train_seconds"),
        "job_id": meta.get("job_id"),
    }


def projects(services: Services) -> list[dict]:
    """Each known project with the model_version it serves and its controls' current versions."""
    views = []
    for project in services.projects.all():
        controls = services.store.controls(project)
        current = services.store.current_numbers(project, controls)
        views.append({"project": project, "model_version": served_version(services, project),
                      "queue": queue_status(services, project),
                      "controls": [{"control": control, "current": current[control],
                                    "versions": services.store.count(project, control)}
                                   for control in controls],
                      "coverage": audit_report.coverage(services, project)})
    return views


def status(services: Services) -> dict:
    """`headstart status`: Redis, queues, workers and projects at a glance."""
    redis = services.redis
    brief = [{key: view[key] for key in ("name", "state", "host", "current_job")} for view in workers(redis)]
    return {"redis": redis_info(redis, services.settings.redis_url), "suspended": suspended(redis),
            "queues": queues(redis), "workers": brief, "projects": projects(services),
            "killer_inputs": killer_inputs(services), "deleted_project_hints": project_data.hints(redis)}


def killer_inputs(services: Services) -> list[dict]:
    """Inputs that were in flight when a worker died, per project; `poison` ones are skipped (MEDIA_POISON_KILLS)."""
    return [{"project": project, **entry} for project in services.projects.all()
            for entry in services.features.poison.report(project)]


def access(services: Services) -> dict:
    """Who may call the Label Studio routes, and per project whether Label Studio's webhooks carry the credentials
    (`worker.jobs.secure_webhook` adds them; without them every submit's webhook is refused and nothing trains)."""
    settings = services.settings
    if not (settings.basic_auth_user or settings.basic_auth_pass):
        return {"basic_auth": False, "message": (
            "Open: /predict, /setup and /webhook answer anyone who reaches this backend. Set BASIC_AUTH_USER and "
            "BASIC_AUTH_PASS and give Label Studio the same user and password in the model's settings.")}
    auth = WebhookAuth(services.redis)
    webhooks = []
    for project in services.projects.all():
        state = auth.state(project) or {"state": "not tried yet", "message": "tried at the project's next /setup"}
        webhooks.append({"project": project, "state": state.get("state"), "at": iso(state.get("at")),
                         "message": state.get("message") or _webhook_note(state)})
    return {"basic_auth": True, "message": "Basic auth is on for /predict, /setup and /webhook.",
            "webhooks": webhooks}


def _webhook_note(state: dict) -> str:
    if state.get("state") == "ok":
        return f"webhook(s) {state.get('webhooks') or ''} carry the credentials".replace("  ", " ")
    if state.get("state") == "missing":
        return "Label Studio has no webhook pointing at this backend yet; looked for again at the next /setup"
    return ""


def overview(services: Services) -> dict:
    """Everything the /admin page shows, in one document (also GET /admin/api/overview)."""
    redis = services.redis
    return {"redis": redis_info(redis, services.settings.redis_url), "suspended": suspended(redis),
            "queues": queues(redis), "workers": workers(redis), "jobs": jobs(redis),
            "projects": [models(services, project) for project in services.projects.all()],
            "killer_inputs": killer_inputs(services), "access": access(services)}
