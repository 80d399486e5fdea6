"""A per-project mirror of Label Studio's annotations in Redis. Label Studio stays the source of truth.

Fed by webhook payloads, and rebuilt from Label Studio's API (`backend.labelstudio.sync`) on START_TRAINING, on
first contact with a project and whenever the mirror cannot be trusted.

Which annotation wins when a task has several: a ground-truth annotation first; otherwise the most
recently updated one. Cancelled (skipped) annotations never count. The choice is made per
control, among the annotations that make a choice for that control.

Keys, for project P:
  headstart:labels:P          hash annotation id → JSON {task, data, result, ground_truth, cancelled, updated_at}
  headstart:labels:P:stale    set when the mirror must be rebuilt from Label Studio before training
  headstart:labels:P:changes  counter of webhook writes (a resync that overlaps one stays stale)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis import Redis

from backend.common import redis_keys
from backend.common.errors import BadRequest
from backend.labelstudio.labeling_config import HeadSpec, choices_in



@dataclass(frozen=True)
class Example:
    task_id: int
    url: str
    choices: list[str]


def annotation_record(annotation: dict, task: dict) -> dict:
    """The fields of an annotation (and its task) that training needs."""
    task_id = annotation.get("task")
    if isinstance(task_id, dict):
        task_id = task_id.get("id")
    if not isinstance(task_id, int) and isinstance(task, dict):
        task_id = task.get("id")
    if not isinstance(task_id, int) or not isinstance(annotation.get("id"), int):
        raise BadRequest("An annotation needs an integer 'id' and 'task'.")
    result = annotation.get("result")
    data = task.get("data") if isinstance(task, dict) else None
    return {
        "task": task_id,
        "data": data if isinstance(data, dict) else {},
        "result": result if isinstance(result, list) else [],
        "ground_truth": bool(annotation.get("ground_truth")),
        "cancelled": bool(annotation.get("was_cancelled")),
        "updated_at": str(annotation.get("updated_at") or annotation.get("created_at") or ""),
    }


class LabelStore:
    def __init__(self, redis: Redis):
        self.redis = redis

    def _key(self, project: str, suffix: str = "") -> str:
        return redis_keys.labels_meta(project, suffix) if suffix else redis_keys.labels(project)

    def put(self, project: str, annotation: dict, task: dict) -> None:
        record = annotation_record(annotation, task)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._key(project), str(annotation["id"]), json.dumps(record))
        pipe.incr(self._key(project, "changes"))
        pipe.execute()

    def delete(self, project: str, annotation_ids: list[int]) -> bool:
        """Forget these annotations. False when some were unknown (the mirror is then marked stale)."""
        if not annotation_ids:
            return True
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self._key(project), *[str(i) for i in annotation_ids])
        pipe.incr(self._key(project, "changes"))
        removed = pipe.execute()[0]
        if removed < len(annotation_ids):
            self.mark_stale(project)
            return False
        return True

    def change_count(self, project: str) -> int:
        """How many webhook writes the mirror has had; a resync reads it before reading Label Studio."""
        return int(self.redis.get(self._key(project, "changes")) or 0)

    def replace_all(self, project: str, records: dict[int, dict], *, changes_before: int | None = None) -> None:
        """Swap in a full copy (from a resync) atomically, and mark the mirror trusted.

        If webhook writes arrived since `change_count` answered `changes_before`, the copy may
        predate them: it is still swapped in, but the mirror stays stale, so the next training
        (which those webhooks queued) resyncs instead of training without them forever.
        """
        staging, changes = self._key(project, "staging"), self._key(project, "changes")

        def swap(pipe) -> None:
            missed = changes_before is not None and int(pipe.get(changes) or 0) != changes_before
            pipe.multi()
            pipe.delete(staging)
            if records:
                pipe.hset(staging, mapping={str(i): json.dumps(r) for i, r in records.items()})
                pipe.rename(staging, self._key(project))
            else:
                pipe.delete(self._key(project))
            if missed:
                pipe.set(self._key(project, "stale"), 1)
            else:
                pipe.delete(self._key(project, "stale"))
            pipe.set(self._key(project, "synced"), 1)

        self.redis.transaction(swap, changes)

    def mark_stale(self, project: str) -> None:
        self.redis.set(self._key(project, "stale"), 1)

    def needs_sync(self, project: str) -> bool:
        """Stale, or never synced from Label Studio (first contact)."""
        stale, synced = self.redis.mget(self._key(project, "stale"), self._key(project, "synced"))
        return stale is not None or synced is None

    def records(self, project: str) -> list[dict]:
        return [json.loads(raw) for raw in self.redis.hvals(self._key(project))]

    def examples(self, project: str, spec: HeadSpec) -> tuple[list[Example], int]:
        """The winning labels for `spec`, one per task, and how many choices were unknown to it."""
        winners: dict[int, dict] = {}
        unknown = 0
        for record in self.records(project):
            if record["cancelled"]:
                continue
            choices = choices_in(record["result"], spec)
            if choices is None:
                continue
            if any(choice not in spec.classes for choice in choices):
                unknown += 1
                continue
            if not spec.multi_label and len(choices) != 1:
                unknown += 1
                continue
            current = winners.get(record["task"])
            if current is None or _rank(record) > _rank(current):
                winners[record["task"]] = {**record, "choices": choices}
        examples = [
            Example(task_id=task, url=str(record["data"].get(spec.data_key, "")), choices=record["choices"])
            for task, record in sorted(winners.items())
        ]
        return examples, unknown


def _rank(record: dict) -> tuple[bool, str]:
    return record["ground_truth"], record["updated_at"]
