"""A per-project index of Label Studio's tasks in Redis: each task's id and the data its inputs come from.

Re-prediction and embedding read the index instead of paging through every task in Label Studio
after each promotion. It is filled once when a project is first seen (or its labeling config
changes), kept current by TASKS_CREATED / TASKS_DELETED webhooks (both confirmed against Label Studio by
id, never taken from the webhook body), and can be rebuilt at any time (`headstart embed PROJECT`).
"""

from __future__ import annotations

import json
from typing import Iterable

from label_studio_sdk.client import LabelStudio
from redis import Redis

from backend.common import redis_keys
from backend.common.errors import LabelStudioUnavailable

PAGE_SIZE = 500
IDS_PER_REQUEST = 500


class TaskIndex:
    def __init__(self, redis: Redis):
        self.redis = redis

    def put_many(self, project: str, tasks: Iterable[dict]) -> int:
        """Index these tasks (as Label Studio lists them); returns how many."""
        mapping = {str(task["id"]): json.dumps(task.get("data") or {}) for task in tasks
                   if isinstance(task.get("id"), int)}
        if mapping:
            self.redis.hset(redis_keys.task_index(project), mapping=mapping)
        return len(mapping)

    def replace_all(self, project: str, tasks: Iterable[dict]) -> int:
        """Swap in a complete listing of the project's tasks."""
        key, staging = redis_keys.task_index(project), redis_keys.task_index(project) + ":staging"
        mapping = {str(task["id"]): json.dumps(task.get("data") or {}) for task in tasks
                   if isinstance(task.get("id"), int)}
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(staging)
        if mapping:
            pipe.hset(staging, mapping=mapping)
            pipe.rename(staging, key)
        else:
            pipe.delete(key)
        pipe.set(redis_keys.task_index_built(project), 1)
        pipe.execute()
        return len(mapping)

    def remove(self, project: str, task_ids: Iterable[int]) -> None:
        fields = [str(task_id) for task_id in task_ids]
        if fields:
            self.redis.hdel(redis_keys.task_index(project), *fields)

    def is_built(self, project: str) -> bool:
        return bool(self.redis.exists(redis_keys.task_index_built(project)))

    def data(self, project: str, task_ids: Iterable[int] | None = None) -> dict[int, dict]:
        """task id → its data, for the given tasks (those indexed) or for every indexed task."""
        key = redis_keys.task_index(project)
        if task_ids is None:
            return {int(task): json.loads(raw) for task, raw in self.redis.hgetall(key).items()}
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return {}
        raws = self.redis.hmget(key, [str(task) for task in ids])
        return {task: json.loads(raw) for task, raw in zip(ids, raws) if raw is not None}

    def count(self, project: str) -> int:
        return int(self.redis.hlen(redis_keys.task_index(project)))


def read_tasks(client: LabelStudio, project: str, *, ids: list[int] | None = None) -> list[dict]:
    """Tasks of the project from Label Studio's task list (id and data only): all of them, or those with `ids`.

    Tasks asked for by id that Label Studio no longer has are simply absent from the answer.
    """
    try:
        if ids is None:
            return _pages(client, project, query=None)
        tasks = []
        for start in range(0, len(ids), IDS_PER_REQUEST):
            chunk = ids[start:start + IDS_PER_REQUEST]
            query = json.dumps({"selectedItems": {"all": False, "included": chunk}})
            tasks += _pages(client, project, query=query)
        return tasks
    except LabelStudioUnavailable:
        raise
    except Exception as exc:
        raise LabelStudioUnavailable(
            f"Could not list tasks of project {project} ({type(exc).__name__}: {exc}). Check LABEL_STUDIO_URL, "
            "LABEL_STUDIO_API_KEY and that the user can see the project."
        ) from None


def _pages(client: LabelStudio, project: str, *, query: str | None) -> list[dict]:
    tasks: list[dict] = []
    page = 1
    while True:
        pager = client.tasks.list(project=int(project), fields="task_only", query=query, page=page,
                                  page_size=PAGE_SIZE)
        batch = [task.model_dump() if hasattr(task, "model_dump") else task for task in pager.items or []]
        tasks += [{"id": task.get("id"), "data": task.get("data") or {}} for task in batch]
        total = getattr(pager.response, "total", None)
        if not batch or (total is not None and len(tasks) >= total):
            return tasks
        page += 1
