"""What the model store keeps of old versions: per-label detail only for recent ones, few rejected ones.

Each version's metadata carries per-label lists (`DETAIL_FIELDS`: which label each task had when it was
trained, its out-of-fold result, its media errors). With about one version per submit they grow with
the square of the label count, so after every write the store (`ModelStore.save`, `withdraw`) applies a
`Retention`:
- **Per-label detail** stays on the served version, on its rollback target (the version a rollback
  would serve; the guard reads its `trained_on`/`out_of_fold_correct` once it is served again) and on
  the newest `detail_keep` versions. Older versions keep their summary (counts, scores, status, recipe,
  timestamps, tensors): they are still listed, promoted or rolled back to, and a training judged
  against one that lost its detail scores it by its real predictions on every label instead.
- **Rejected and superseded versions** (never served, or withdrawn after their validation) beyond the
  newest `rejected_keep` are deleted, tensors and metadata; the served version and its rollback target
  are promoted ones, never deleted. Version numbers are never handed out again.

Only the versions that may still need work are looked at (two small sets per control, below), so a
write costs the same after 5,000 versions as after 5. Versions written before these sets existed are
found once, by one pass over the control's versions (`sweep`).

Keys, for project P and control C (`backend.common.redis_keys`):
  headstart:head:P:C:detailed   set of N   versions that may still carry per-label detail
  headstart:head:P:C:rejected   set of N   rejected or superseded versions not deleted yet
  headstart:head:P:C:swept      string     present once the two sets cover every version
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import WatchError

from backend.common import redis_keys

DETAIL_FIELDS = ("trained_on", "out_of_fold_correct", "media_errors")
PRUNABLE_STATUSES = ("rejected", "superseded")
SWEEP_BATCH = 50  # versions read at once by the one-time sweep (each may carry large per-label lists)


@dataclass(frozen=True)
class Retention:
    """How much of old versions the store keeps (VERSION_DETAIL_KEEP, REJECTED_VERSIONS_KEEP)."""

    detail_keep: int = 3
    rejected_keep: int = 20

    def __post_init__(self):
        if self.detail_keep < 0 or self.rejected_keep < 1:  # the training reads back the version it just saved
            raise ValueError("VERSION_DETAIL_KEEP must be 0 or more, REJECTED_VERSIONS_KEEP 1 or more")


def stored_meta(meta: dict) -> dict:
    """The hash fields a version's metadata is written as: the JSON, and its status, promotion time and label
    snapshot again, so `retain` (and the stale-run check) read them without the (large) metadata."""
    snapshot = meta.get("label_snapshot")
    return {"meta": json.dumps(meta), "status": str(meta.get("status") or ""),
            "promoted_at": repr(float(meta["promoted_at"])) if meta.get("promoted_at") is not None else "",
            "label_snapshot": str(snapshot) if isinstance(snapshot, int) else ""}


def has_detail(meta: dict) -> bool:
    return any(field in meta for field in DETAIL_FIELDS)


def summary_of(meta: dict) -> dict:
    """The version's metadata without its per-label lists (their sizes are kept)."""
    summary = {key: value for key, value in meta.items() if key not in DETAIL_FIELDS}
    if isinstance(meta.get("media_errors"), dict):
        summary["media_error_count"] = len(meta["media_errors"])
    summary["detail_dropped_at"] = time.time()
    return summary


def previous_promoted(metas: dict[int, dict], current: int | None) -> int | None:
    """Among `metas` (number → metadata), the version a rollback from `current` serves: the promoted one
    promoted most recently before it (see `ModelStore.rollback_target`)."""
    if current is None or current not in metas:
        return None
    since = metas[current].get("promoted_at", float("inf"))
    earlier = [meta for number, meta in metas.items() if number != current
               and meta.get("status") == "promoted" and meta.get("promoted_at", 0) < since]
    return max(earlier, key=lambda meta: meta.get("promoted_at", 0))["version"] if earlier else None


def retain(redis: Redis, project: str, control: str, retention: Retention) -> dict:
    """Apply `retention` to P/C now; returns {trimmed, deleted}: the version numbers changed."""
    sweep(redis, project, control)
    current_raw = redis.get(redis_keys.head_current(project, control))
    current = int(current_raw) if current_raw is not None else None
    last = int(redis.get(redis_keys.head_counter(project, control)) or 0)
    detailed = sorted(int(member) for member in redis.smembers(redis_keys.head_detailed(project, control)))
    newest = set(range(last - retention.detail_keep + 1, last + 1))
    leaving = [number for number in detailed if number not in newest and number != current]
    trimmed = []
    if leaving:  # only then is anything read: a write costs nothing more while every version keeps its detail
        facts = _facts(redis, project, control, sorted(set(detailed) | ({current} if current else set())))
        target = previous_promoted(facts, current)
        trimmed = [number for number in leaving if number != target and _trim(redis, project, control, number)]
    rejected = sorted(int(member) for member in redis.smembers(redis_keys.head_rejected(project, control)))
    old = rejected[:len(rejected) - retention.rejected_keep]
    deleted = [number for number in old if number != current and _delete_unserved(redis, project, control, number)]
    return {"trimmed": trimmed, "deleted": deleted}


def sweep(redis: Redis, project: str, control: str) -> None:
    """Once per control: put every existing version that has detail, or is rejected, in the sets `retain` reads."""
    marker = redis_keys.head_swept(project, control)
    if redis.exists(marker):
        return
    last = int(redis.get(redis_keys.head_counter(project, control)) or 0)
    for start in range(1, last + 1, SWEEP_BATCH):
        numbers = list(range(start, min(start + SWEEP_BATCH, last + 1)))
        for number, meta in _metas(redis, project, control, numbers).items():
            if has_detail(meta):
                redis.sadd(redis_keys.head_detailed(project, control), number)
            if meta.get("status") in PRUNABLE_STATUSES:
                redis.sadd(redis_keys.head_rejected(project, control), number)
    redis.set(marker, 1)


def _facts(redis: Redis, project: str, control: str, numbers: list[int]) -> dict[int, dict]:
    """{version, status, promoted_at} of these versions, from their small hash fields (or, for a version written
    before those existed, its metadata)."""
    pipe = redis.pipeline(transaction=False)
    for number in numbers:
        pipe.hmget(redis_keys.head_version(project, control, number), ["status", "promoted_at"])
    facts, unknown = {}, []
    for number, (status, promoted_at) in zip(numbers, pipe.execute()):
        if status is None:
            unknown.append(number)
            continue
        facts[number] = {"version": number, "status": status.decode()}
        if promoted_at:
            facts[number]["promoted_at"] = float(promoted_at)
    return {**facts, **_metas(redis, project, control, unknown)}


def _metas(redis: Redis, project: str, control: str, numbers: list[int]) -> dict[int, dict]:
    pipe = redis.pipeline(transaction=False)
    for number in numbers:
        pipe.hget(redis_keys.head_version(project, control, number), "meta")
    return {number: json.loads(raw) for number, raw in zip(numbers, pipe.execute()) if raw is not None}


def _trim(redis: Redis, project: str, control: str, number: int) -> bool:
    """Drop version `number`'s per-label detail (unless it changed meanwhile: the next write retries)."""
    key, detailed = redis_keys.head_version(project, control, number), redis_keys.head_detailed(project, control)
    try:
        with redis.pipeline() as pipe:
            pipe.watch(key)
            raw = pipe.hget(key, "meta")
            meta = json.loads(raw) if raw is not None else None
            pipe.multi()
            if meta is not None and has_detail(meta):
                pipe.hset(key, mapping=stored_meta(summary_of(meta)))
            pipe.srem(detailed, number)
            pipe.execute()
        return meta is not None and has_detail(meta)
    except WatchError:
        return False


def _delete_unserved(redis: Redis, project: str, control: str, number: int) -> bool:
    """Delete version `number` if it is still rejected or superseded and not served; either way it leaves the set."""
    key, current_key = redis_keys.head_version(project, control, number), redis_keys.head_current(project, control)
    try:
        with redis.pipeline() as pipe:
            pipe.watch(key, current_key)
            raw, served = pipe.hget(key, "meta"), pipe.get(current_key)
            prunable = raw is not None and json.loads(raw).get("status") in PRUNABLE_STATUSES \
                and (served is None or int(served) != number)
            pipe.multi()
            if prunable:
                pipe.delete(key)
                pipe.srem(redis_keys.head_detailed(project, control), number)
            pipe.srem(redis_keys.head_rejected(project, control), number)
            pipe.execute()
        return prunable
    except WatchError:
        return False
