"""What the `loop` benchmark reads back from a running stack: served versions, jobs, queue state,
cached embeddings, and which annotator action each served version reflects.

Everything here only reads headstart's Redis (the store's version records, RQ's registries, the
embedding cache's keys); nothing is written.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import (DeferredJobRegistry, FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry,
                         StartedJobRegistry)
from rq.serializers import JSONSerializer

from backend.common import redis_keys
from backend.core.store import ModelStore
from bench.annotators import Action
from bench.harness import percentile
from bench.ls_proxy import ProxiedRequest

CONTROL = "label"
TRAIN_JOB_SUFFIX = ".train_project"


# --- queues and jobs ------------------------------------------------------------------------------

def queues(redis: Redis) -> list[Queue]:
    """Every RQ queue this Redis knows (whatever headstart names them)."""
    return Queue.all(connection=redis, serializer=JSONSerializer)


def pending_jobs(redis: Redis) -> int:
    """Jobs queued, running, scheduled (retries) or deferred, over every queue."""
    return sum(q.count + StartedJobRegistry(queue=q).count + ScheduledJobRegistry(queue=q).count
               + DeferredJobRegistry(queue=q).count for q in queues(redis))


def wait_until_idle(redis: Redis, *, timeout_s: float, quiet_s: float = 1.0, poll_s: float = 0.1) -> float | None:
    """Wait until no job is pending for `quiet_s` in a row; the seconds it took, or None on timeout."""
    started = time.monotonic()
    quiet_since = None
    while time.monotonic() - started < timeout_s:
        if pending_jobs(redis) == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= quiet_s:
                return quiet_since - started
        else:
            quiet_since = None
        time.sleep(poll_s)
    return None


@dataclass(frozen=True)
class JobRecord:
    id: str
    func: str
    status: str
    started_at: float | None
    ended_at: float | None
    result: object

    @property
    def kind(self) -> str:
        return self.func.rsplit(".", 1)[-1]


def finished_jobs(redis: Redis) -> list[JobRecord]:
    """Every finished or failed job of every queue, oldest start first."""
    records = []
    for q in queues(redis):
        ids = FinishedJobRegistry(queue=q).get_job_ids() + FailedJobRegistry(queue=q).get_job_ids()
        for job in Job.fetch_many(ids, connection=redis, serializer=JSONSerializer):
            if job is None:
                continue
            status = job.get_status(refresh=False)
            records.append(JobRecord(id=job.id, func=job.func_name, status=getattr(status, "value", str(status)),
                                     started_at=_timestamp(job.started_at), ended_at=_timestamp(job.ended_at),
                                     result=job.return_value() if status == "finished" else None))
    return sorted(records, key=lambda record: record.started_at or 0.0)


def _timestamp(moment: datetime.datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # RQ writes UTC
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def trainings(jobs: list[JobRecord]) -> list[JobRecord]:
    """Training jobs that ran the retrain pipeline (not the ones that found another training running)."""
    def deferred(job: JobRecord) -> bool:
        return isinstance(job.result, dict) and str(job.result.get("status", "")).startswith("deferred")

    return [job for job in jobs if job.func.endswith(TRAIN_JOB_SUFFIX) and job.started_at and job.ended_at
            and not deferred(job)]


def requests_in(job: JobRecord, requests: list[ProxiedRequest]) -> list[ProxiedRequest]:
    """The requests that arrived while `job` ran (exact with one worker: its jobs do not overlap)."""
    return [request for request in requests if job.started_at <= request.at <= job.ended_at]


def endpoint(path: str) -> str:
    """A request path without its query and ids: /api/tasks/12/annotations?x=1 → /api/tasks/{id}/annotations."""
    bare = path.split("?", 1)[0].rstrip("/")
    return "/".join("{id}" if part.isdigit() else part for part in bare.split("/")) or "/"


# --- embeddings -----------------------------------------------------------------------------------

def embedded_count(redis: Redis) -> int:
    """Cached embeddings in this Redis (every encoder), counted by key."""
    return sum(1 for _ in redis.scan_iter(match=redis_keys.embedding("*", "*"), count=1000))


def wait_for_embedding(redis: Redis, job_id: str, *, expected: int, timeout_s: float,
                       poll_s: float = 0.05, quiet_s: float = 1.0) -> float | None:
    """Seconds until job `job_id` is over, no job is pending and `expected` embeddings are cached (or, if some
    input never embeds, until nothing was pending for `quiet_s`); None after `timeout_s`.

    Both conditions are needed: a job is briefly in no registry between its dequeue and its start, and a
    job that fans out (chunks) is over long before the embeddings are.
    """
    started = time.monotonic()
    quiet_since = None
    while time.monotonic() - started < timeout_s:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        over = job.get_status(refresh=False) in ("finished", "failed", "stopped", "canceled")
        if over and pending_jobs(redis) == 0:
            now = time.monotonic()
            if embedded_count(redis) >= expected:
                return now - started
            quiet_since = quiet_since or now
            if now - quiet_since >= quiet_s:
                return quiet_since - started
        else:
            quiet_since = None
        time.sleep(poll_s)
    return None


# --- served versions ------------------------------------------------------------------------------

class ServedWatcher:
    """Polls the store's current pointer of one project's control, recording when each version was first
    seen served (a fallback for versions whose record lacks `promoted_at`)."""

    def __init__(self, redis: Redis, project: str, *, control: str = CONTROL, poll_s: float = 0.05):
        self.store = ModelStore(redis)
        self.project = project
        self.control = control
        self.poll_s = poll_s
        self.first_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="served-watcher", daemon=True)

    def start(self) -> "ServedWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.is_set():
            number = self.store.current_number(self.project, self.control)
            if number is not None and number not in self.first_seen:
                self.first_seen[number] = time.time()
            self._stop.wait(self.poll_s)

    def served(self) -> list[dict]:
        """Every version that was served, with `served_at`, oldest first."""
        versions = []
        for meta in self.store.versions(self.project, self.control):
            served_at = meta.get("promoted_at") or self.first_seen.get(meta["version"])
            if served_at is not None and (meta.get("status") == "promoted" or meta["version"] in self.first_seen):
                versions.append({**meta, "served_at": served_at})
        return sorted(versions, key=lambda meta: meta["served_at"])


def reflects(meta: dict, action: Action) -> bool:
    """Whether a version was trained on the state of the task that `action` left."""
    trained_on = meta.get("trained_on")
    if trained_on is None:
        raise KeyError(f"version {meta.get('version')} records no trained_on: cannot tell which labels it saw")
    if action.label is None:
        return str(action.task) not in trained_on
    return trained_on.get(str(action.task)) == [action.label]


def latencies(actions: list[Action], served: list[dict], *, observed_until: float) -> list[dict]:
    """For each action: seconds from its sending to the first served version that reflects it.

    An action that no version ever reflected is `superseded` when a later action changed the same task
    (e.g. a mistake corrected before any training read it), else `unserved`: its latency is then the
    lower bound `observed_until - sent_at`.
    """
    out = []
    for index, action in enumerate(actions):
        later = any(other.task == action.task for other in actions[index + 1:])
        hit = next((meta for meta in served if meta["served_at"] > action.sent_at and reflects(meta, action)), None)
        if hit is not None:
            outcome, seconds, version = "served", hit["served_at"] - action.sent_at, hit["version"]
        elif later:
            outcome, seconds, version = "superseded", None, None
        else:
            outcome, seconds, version = "unserved", observed_until - action.sent_at, None
        out.append({"kind": action.kind, "task": action.task, "sent_at": action.sent_at, "outcome": outcome,
                    "seconds": None if seconds is None else round(seconds, 3), "version": version})
    return out


def first_trainable(actions: list[Action], *, min_labels_per_class: int) -> int | None:
    """Index of the first action after which the labels can train a single-choice head: two classes
    with at least `min_labels_per_class` labeled tasks each (backend.loop.retrain.label_shortage)."""
    live: dict[int, str] = {}
    for index, action in enumerate(actions):
        if action.label is None:
            live.pop(action.task, None)
        else:
            live[action.task] = action.label
        counts: dict[str, int] = {}
        for label in live.values():
            counts[label] = counts.get(label, 0) + 1
        if sum(count >= min_labels_per_class for count in counts.values()) >= 2:
            return index
    return None


def spread(values: list[float]) -> dict:
    """p50, p95 and max of `values` (None when empty)."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": max(values)}
