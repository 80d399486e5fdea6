"""A per-project mirror of Label Studio's annotations in Redis. Label Studio stays the source of truth.

With Label Studio's API configured, only what Label Studio's API answers is written here
(`backend.labelstudio.sync`): webhooks leave *hints* (the tasks and annotations they say changed), and
the next training confirms them by id. Without the API, webhook payloads are written directly.

Which annotation wins when a task has several: a ground-truth annotation first; otherwise the most
recently updated one. Cancelled (skipped) annotations never count. The choice is made per
control, among the annotations that make a choice for that control.

Keys, for project P (all named in `backend.common.redis_keys`):
  headstart:labels:P                  hash annotation id → JSON {task, data, result, ground_truth, cancelled, updated_at}
  headstart:labels:P:stale            counter, bumped when the mirror must be fully re-read before training
  headstart:labels:P:synced           set once the mirror was fully read from Label Studio
  headstart:labels:P:changes          counter of webhook writes (a full read that overlaps one stays stale)
  headstart:labels:P:hints            set of task:ID / annotation:ID / expect:[…] / check, for the next training to confirm
  headstart:labels:P:hints:confirming the hints a training is confirming (kept until written, merged on retry)
  headstart:labels:P:watermark        the newest task updated_at a full or incremental read has seen
  headstart:labels:P:checked          present (with a TTL) while the last look for unannounced changes is recent
  headstart:labels:P:config           the labeling config of the last full read
  headstart:labels:P:snapshot         counter, bumped as each training starts reading the labels
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable

from redis import Redis

from backend.common import redis_keys
from backend.common.errors import BadRequest
from backend.labelstudio.labeling_config import HeadSpec, choices_in



CHECK = "check"  # the hint START_TRAINING leaves: look for changes no webhook announced
EXPECT = "expect:"  # prefix of the hint a created/updated annotation leaves: JSON [annotation, task, attempt, updated_at]
CONFIG = "config"  # the hint a webhook naming another labeling config leaves: read the config from Label Studio
MAX_HINTS = 10_000  # pending task/annotation hints per project; beyond it, only CHECK is added (it finds them too)
SAME_EVENT = ("updated_at", "result", "ground_truth", "cancelled")  # what tells one annotation event from another


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


@dataclass(frozen=True)
class Expected:
    """An annotation a webhook announced as created or updated: Label Studio's API should show it (at least
    as new as `updated_at`). The webhook can arrive before Label Studio's task list shows it, so the
    first read may not see it yet; `attempt` counts the reads that did not, `announced_at` (Unix time) is when
    the webhook arrived (0: unknown)."""
    annotation: int
    task: int
    attempt: int = 0
    updated_at: str = ""
    announced_at: float = 0.0

    def member(self) -> str:
        return EXPECT + json.dumps([self.annotation, self.task, self.attempt, self.updated_at, self.announced_at])

    def age_s(self, now: float) -> float:
        return now - self.announced_at if self.announced_at else float("inf")

    def seen_in(self, records: dict[int, dict]) -> bool:
        """Whether Label Studio's answer holds this annotation, at least as new as announced."""
        record = records.get(self.annotation)
        if record is None:
            return False
        held, announced = _instant(record.get("updated_at")), _instant(self.updated_at)
        return held is None or announced is None or held >= announced


@dataclass(frozen=True)
class Hints:
    """What webhooks said changed since the last confirmation."""
    tasks: frozenset[int] = frozenset()
    annotations: frozenset[int] = frozenset()
    check: bool = False
    expected: frozenset[Expected] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.tasks or self.annotations or self.check or self.expected)


@dataclass(frozen=True)
class FullRead:
    """The mirror's bookkeeping when a full read began: what may not be lost if it changes meanwhile."""
    changes: int
    stale: bytes | None
    hints: Hints = field(default_factory=Hints)


class LabelStore:
    def __init__(self, redis: Redis):
        self.redis = redis

    def _key(self, project: str, suffix: str = "") -> str:
        return redis_keys.labels_meta(project, suffix) if suffix else redis_keys.labels(project)

    def put(self, project: str, annotation: dict, task: dict) -> None:
        """Write a webhook's annotation as the label (only where Label Studio's API is not configured)."""
        record = annotation_record(annotation, task)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._key(project), str(annotation["id"]), json.dumps(record))
        pipe.incr(self._key(project, "changes"))
        pipe.execute()

    def delete(self, project: str, annotation_ids: list[int]) -> bool:
        """Forget these annotations (a webhook's word, without the API). False when some were unknown (the
        mirror is then marked stale)."""
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

    def replace_all(self, project: str, records: dict[int, dict], *, changes_before: int | None = None,
                    started: FullRead | None = None, watermark: str | None = None, config: str | None = None) -> None:
        """Swap in a full copy (from a full read) atomically, and mark the mirror trusted.

        If webhook writes arrived (or the mirror was marked stale) since the read began (`started`,
        or `changes_before` from `change_count`), the copy may predate them: it is still swapped in,
        but the mirror stays stale, so the next training reads everything again instead of training
        without them forever. `watermark` and `config` record where incremental reads start from.
        """
        staging, changes, stale = self._key(project, "staging"), self._key(project, "changes"), self._key(project, "stale")
        if started is not None:
            changes_before = started.changes

        def swap(pipe) -> None:
            missed = changes_before is not None and int(pipe.get(changes) or 0) != changes_before
            missed = missed or (started is not None and pipe.get(stale) != started.stale)
            pipe.multi()
            pipe.delete(staging)
            if records:
                pipe.hset(staging, mapping={str(i): json.dumps(r) for i, r in records.items()})
                pipe.rename(staging, self._key(project))
            else:
                pipe.delete(self._key(project))
            if missed:
                pipe.incr(stale)
            else:
                pipe.delete(stale)
            pipe.set(self._key(project, "synced"), 1)
            if watermark is not None:
                pipe.set(redis_keys.label_watermark(project), watermark)
            if config is not None:
                pipe.set(redis_keys.label_read_config(project), config)
            if started is not None and started.hints:
                pipe.delete(redis_keys.label_hints_confirming(project))  # the read covered them

        self.redis.transaction(swap, changes, stale)

    def begin_full_read(self, project: str) -> FullRead:
        """Note the bookkeeping before reading everything from Label Studio (and take the hints it covers)."""
        hints = self.take_hints(project)
        changes, stale = self.redis.mget(self._key(project, "changes"), self._key(project, "stale"))
        return FullRead(changes=int(changes or 0), stale=stale, hints=hints)

    def begin_snapshot(self, project: str) -> int:
        """A new label snapshot number for a training about to read the labels: higher than every earlier one, so a
        version trained on it can tell whether it saw newer labels than another (`ModelStore.save`)."""
        return int(self.redis.incr(self._key(project, "snapshot")))

    def mark_stale(self, project: str) -> None:
        self.redis.incr(self._key(project, "stale"))

    def needs_sync(self, project: str) -> bool:
        """Stale, or never fully read from Label Studio (first contact, or Redis lost the mirror)."""
        stale, synced = self.redis.mget(self._key(project, "stale"), self._key(project, "synced"))
        return stale is not None or synced is None

    # --- hints: what webhooks said changed, confirmed against Label Studio by the next training ---

    def add_hints(self, project: str, *, tasks: Iterable[int] = (), annotations: Iterable[int] = (),
                  check: bool = False, config: bool = False, expected: Iterable[Expected] = ()) -> int:
        """Record what to confirm; returns how many hints did not fit under MAX_HINTS (a forged or huge burst).
        Those are replaced by CHECK: the next training reads the tasks updated since the last read, and compares
        Label Studio's totals with the mirror, so a change behind a dropped hint is still found."""
        expected = list(expected)
        members = [f"task:{i}" for i in [*tasks, *(e.task for e in expected)]] + \
            [f"annotation:{i}" for i in annotations] + [e.member() for e in expected]
        flags = [CHECK] if check else []
        flags += [CONFIG] if config else []
        if not members and not flags:
            return 0
        over = int(self.redis.eval(_ADD_HINTS, 1, redis_keys.label_hints(project), MAX_HINTS,
                                   *members[:MAX_HINTS], *flags))
        over += max(0, len(members) - MAX_HINTS)
        if over:
            self.redis.sadd(redis_keys.label_hints(project), CHECK)
        return over

    def take_config_hint(self, project: str) -> bool:
        """Whether a webhook named another labeling config since the last training (and forget that it did)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.srem(redis_keys.label_hints(project), CONFIG)
        pipe.srem(redis_keys.label_hints_confirming(project), CONFIG)
        return any(pipe.execute())

    def take_hints(self, project: str) -> Hints:
        """Move the pending hints into the confirming set (merged with any a failed training left there)."""
        pending, confirming = redis_keys.label_hints(project), redis_keys.label_hints_confirming(project)
        pipe = self.redis.pipeline(transaction=True)
        pipe.sunionstore(confirming, [confirming, pending])
        pipe.delete(pending)
        pipe.smembers(confirming)
        members = {member.decode() for member in pipe.execute()[-1]}
        return _parse_hints(members)

    def hints_confirmed(self, project: str) -> None:
        """The confirmation of the taken hints is written: forget them."""
        self.redis.delete(redis_keys.label_hints_confirming(project))

    def hints_pending(self, project: str) -> bool:
        """Hints wait for a training, or a training is confirming some."""
        return bool(self.redis.exists(redis_keys.label_hints(project), redis_keys.label_hints_confirming(project)))

    def is_confirmed(self, project: str, annotation_id: int, record: dict) -> bool:
        """The mirror already holds this annotation exactly so (same `updated_at`, result and flags): a
        repeated delivery of one event changes nothing."""
        if not record.get("updated_at"):
            return False
        raw = self.redis.hget(self._key(project), str(annotation_id))
        held = json.loads(raw) if raw is not None else None
        return held is not None and all(held[name] == record[name] for name in SAME_EVENT)

    def knows_any(self, project: str, annotation_ids: list[int]) -> bool:
        return bool(annotation_ids) and any(self.redis.hmget(self._key(project), [str(i) for i in annotation_ids]))

    def tasks_of(self, project: str, annotation_ids: Iterable[int]) -> set[int]:
        """The tasks these annotations belong to, as far as the mirror knows them."""
        ids = [str(i) for i in annotation_ids]
        raws = self.redis.hmget(self._key(project), ids) if ids else []
        return {json.loads(raw)["task"] for raw in raws if raw is not None}

    def replace_tasks(self, project: str, task_ids: Iterable[int], records: dict[int, dict]) -> None:
        """Make the mirror hold exactly `records` (annotation id → record, as Label Studio has them) for these
        tasks: annotations Label Studio no longer has, or of tasks it no longer has, are removed."""
        wanted = set(task_ids) | {record["task"] for record in records.values()}
        if not wanted:
            return
        gone = [annotation for annotation, raw in self.redis.hgetall(self._key(project)).items()
                if json.loads(raw)["task"] in wanted and int(annotation) not in records]
        pipe = self.redis.pipeline(transaction=True)
        if gone:
            pipe.hdel(self._key(project), *gone)
        if records:
            pipe.hset(self._key(project), mapping={str(i): json.dumps(r) for i, r in records.items()})
        pipe.execute()

    def counts(self, project: str) -> tuple[int, int]:
        """(tasks with a non-cancelled annotation, non-cancelled annotations): what Label Studio's task list
        reports as `total` and `total_annotations` for the tasks whose `total_annotations` > 0."""
        live = [record for record in self.records(project) if not record["cancelled"]]
        return len({record["task"] for record in live}), len(live)

    def watermark(self, project: str) -> str | None:
        raw = self.redis.get(redis_keys.label_watermark(project))
        return raw.decode() if raw is not None else None

    def check_due(self, project: str, every_s: float) -> bool:
        """Whether the last look for changes no webhook announced is `every_s` old or more; True marks one as
        done now (so of trainings running at once, one looks)."""
        return bool(self.redis.set(redis_keys.label_checked(project), 1, nx=True, px=max(1, int(every_s * 1000))))

    def checked(self, project: str, every_s: float) -> None:
        """A read just covered every change (a full read): the next look is due in `every_s`."""
        self.redis.set(redis_keys.label_checked(project), 1, px=max(1, int(every_s * 1000)))

    def set_watermark(self, project: str, watermark: str) -> None:
        self.redis.set(redis_keys.label_watermark(project), watermark)

    def read_config(self, project: str) -> str | None:
        """The labeling config the mirror was last fully read under."""
        raw = self.redis.get(redis_keys.label_read_config(project))
        return raw.decode() if raw is not None else None

    def records(self, project: str) -> list[dict]:
        return [json.loads(raw) for raw in self.redis.hvals(self._key(project))]

    def labeled_tasks(self, project: str) -> set[int]:
        """The tasks holding a non-cancelled annotation in the mirror."""
        return {record["task"] for record in self.records(project) if not record.get("cancelled")}

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


# SADD the hints (ARGV[2:]) while the set holds fewer than ARGV[1]; flags (check, config) always fit. Returns how
# many hints were left out. Atomic, so concurrent webhooks cannot push the set past the cap.
_ADD_HINTS = """
local cap, n, over = tonumber(ARGV[1]), redis.call('SCARD', KEYS[1]), 0
for i = 2, #ARGV do
  local member = ARGV[i]
  if member == 'check' or member == 'config' then
    redis.call('SADD', KEYS[1], member)
  elseif n < cap then
    n = n + redis.call('SADD', KEYS[1], member)
  else
    over = over + 1
  end
end
return over
"""


def _rank(record: dict) -> tuple[bool, str]:
    return record["ground_truth"], record["updated_at"]


def _parse_hints(members: set[str]) -> Hints:
    tasks, annotations, expected = set(), set(), set()
    for member in members:
        if member.startswith(EXPECT):
            parsed = _expected(member[len(EXPECT):])
            if parsed is not None:
                expected.add(parsed)
            continue
        kind, _, value = member.partition(":")
        if kind == "task" and value.isdigit():
            tasks.add(int(value))
        elif kind == "annotation" and value.isdigit():
            annotations.add(int(value))
    return Hints(tasks=frozenset(tasks), annotations=frozenset(annotations), check=CHECK in members,
                 expected=frozenset(expected))


def _expected(raw: str) -> Expected | None:
    try:
        annotation, task, attempt, updated, *rest = json.loads(raw)  # hints written before announced_at have 4
    except (ValueError, TypeError):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (annotation, task, attempt)):
        return None
    announced = rest[0] if rest and isinstance(rest[0], (int, float)) and not isinstance(rest[0], bool) else 0.0
    return Expected(annotation, task, attempt, updated if isinstance(updated, str) else "", float(announced))


def _instant(value) -> datetime | None:
    """An ISO timestamp as an aware datetime (Label Studio writes `…Z`), or None when it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
