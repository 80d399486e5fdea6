"""Dropping a deleted project's data from Redis, and the PROJECT_DELETED hint that asks for it.

A PROJECT_DELETED webhook is a hint like any other (its body could be forged): `/webhook` only records it
(`record_hint`) and, with Label Studio's API configured, queues `worker.jobs.forget_deleted_project`, which
asks Label Studio for the project and drops its data only when the answer is 404. Without the API nothing is
deleted: the hint stays (shown by `headstart status`), and `headstart forget PROJECT` drops the data by hand.

What is dropped (`forget_project`): every key `backend.common.redis_keys.project_data` names (versions and
heads, the label mirror and its hints, the task index, the prediction ledgers, training and queue markers,
audit, active-learning state, the project's record) and the embeddings of the project's inputs that no other
project's media map or task index names (the embedding cache is content-addressed and shared). Queued jobs of
the project are cancelled first, and a running training of it makes the job wait (RQ retries it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from redis import Redis

from backend.common import redis_keys
from backend.common.queues import cancel_project_jobs

log = logging.getLogger(__name__)

SCAN_COUNT = 1000


def record_hint(redis: Redis, project: str, *, state: str, message: str) -> None:
    redis.set(redis_keys.project_deleted(project), json.dumps({"at": time.time(), "state": state, "message": message}))


def check_pending(redis: Redis, project: str, *, within_s: float) -> bool:
    """Whether a check of a PROJECT_DELETED hint was queued less than `within_s` ago (repeated deliveries share it;
    one older than that, e.g. a job that failed for good, is queued again)."""
    raw = redis.get(redis_keys.project_deleted(project))
    hint = json.loads(raw) if raw is not None else {}
    return hint.get("state") == "queued" and time.time() - float(hint.get("at", 0)) < within_s


def hint_state(redis: Redis, project: str) -> str | None:
    raw = redis.get(redis_keys.project_deleted(project))
    return json.loads(raw).get("state") if raw is not None else None


def hints(redis: Redis) -> list[dict]:
    """Every recorded PROJECT_DELETED hint still standing: {project, at, state, message}."""
    out = []
    for key in redis.scan_iter(match=redis_keys.project_deleted("*"), count=SCAN_COUNT):
        raw = redis.get(key)
        if raw is not None:
            out.append({"project": key.decode().rsplit(":", 1)[1], **json.loads(raw)})
    return sorted(out, key=lambda hint: int(hint["project"]) if hint["project"].isdigit() else 0)


def forget_project(redis: Redis, project: str) -> dict:
    """Drop everything headstart keeps for `project` (see the module doc); returns what was dropped."""
    cancelled = cancel_project_jobs(redis, project)
    mine = _input_digests(redis, project)
    keys, patterns = redis_keys.project_data(project)
    doomed = set(keys)
    for pattern in patterns:
        doomed.update(key.decode() for key in redis.scan_iter(match=pattern, count=SCAN_COUNT))
    others = set()
    for other in (member.decode() for member in redis.smembers(redis_keys.PROJECTS)):
        if other != project:
            others |= _input_digests(redis, other)
    shared_only = mine - others
    embeddings = [key for key in redis.scan_iter(match=redis_keys.embedding("*", "*"), count=SCAN_COUNT)
                  if key.decode().rsplit(":", 1)[1] in shared_only] if shared_only else []
    deleted = 0
    listed = sorted(doomed) + [key.decode() for key in embeddings]
    for start in range(0, len(listed), 500):
        deleted += redis.delete(*listed[start:start + 500])
    redis.srem(redis_keys.PROJECTS, project)
    log.warning("project %s: its data was dropped from Redis (%d keys, %d embeddings, %d queued jobs cancelled)",
                project, deleted, len(embeddings), cancelled)
    return {"project": project, "keys": deleted, "embeddings": len(embeddings), "jobs_cancelled": cancelled}


def _input_digests(redis: Redis, project: str) -> set[str]:
    """Content digests of the project's inputs: its media URLs' (when fetched) and its inline texts' (every
    string of its indexed tasks' and labeled tasks' data, hashed as `MediaItem.inline_bytes` does)."""
    digests = {value.decode() for value in redis.hvals(redis_keys.media_digests(project))}
    for key, field in ((redis_keys.task_index(project), None), (redis_keys.labels(project), "data")):
        for _, raw in redis.hscan_iter(key, count=SCAN_COUNT):
            record = json.loads(raw)
            data = record.get(field) if field else record
            for value in (data or {}).values() if isinstance(data, dict) else ():
                if isinstance(value, str):
                    digests.add(hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest())
    return digests
