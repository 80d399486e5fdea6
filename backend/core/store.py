"""Head versions in Redis: tensors as safetensors, metadata as JSON, a current pointer.

Every gunicorn worker and RQ worker on any host reads the same keys, so they agree on the
current version without a shared disk. A version is written once, complete (tensors, metadata and,
when it is promoted, the pointer, in one transaction); later only its status changes (an admin's
promotion or rollback) and a version promoted before its validation gets that validation added
(`amend`, `withdraw`), and retention may drop an old version's per-label lists or delete an old rejected
one; its tensors never change, so no reader ever sees a half-written version.

Keys, for project P and control C:
  headstart:head:P:C:N        hash {tensors, meta, status, promoted_at, label_snapshot}   version N (tensors
                              immutable once written; the last three repeat the metadata's, read cheaply)
  headstart:head:P:C:next     counter                the last version number handed out
  headstart:head:P:C:current  string N               the version being served
  headstart:heads:P           set of C               the controls that have versions

After each write the store applies its `Retention` (`backend.core.retention`): per-label detail only on
the served, rollback-target and newest versions; old rejected versions deleted. Listings read a page of
versions at a time (`versions_page`) and count them without their metadata (`count`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis import Redis
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from backend.common import redis_keys
from backend.core.heads import rebuild_head
from backend.core.retention import PRUNABLE_STATUSES, Retention, previous_promoted, retain, stored_meta



ANY_CURRENT = -1  # `ModelStore.save(replaces=...)`: promote whatever version is served now


@dataclass(frozen=True)
class HeadVersion:
    """A stored head and everything needed to use it correctly."""

    project: str
    control: str
    number: int
    head: nn.Module
    meta: dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def multi_label(self) -> bool:
        return self.meta["multi_label"]

    @property
    def backbone_key(self) -> str:
        return self.meta["backbone_key"]


class ModelStore:
    def __init__(self, redis: Redis, retention: Retention | None = None):
        self.redis = redis
        self.retention = retention or Retention()

    def _key(self, project: str, control: str, suffix: str | int) -> str:
        if suffix == "next":
            return redis_keys.head_counter(project, control)
        if suffix == "current":
            return redis_keys.head_current(project, control)
        return redis_keys.head_version(project, control, int(suffix))

    def save(self, project: str, control: str, head: nn.Module, meta: dict, *, promote: bool = False,
             reason: str = "", replaces: int | None = ANY_CURRENT) -> int:
        """Write a new version in one transaction and return its number.

        The metadata is written once, complete: with `promote` the version is saved as promoted and
        the current pointer moves to it in the same transaction; otherwise it is kept, unserved, with
        its status (default "candidate") and `reason`. A promotion is judged against the version served
        when the candidate was compared (`replaces`: its number, or None for none; ANY_CURRENT skips the check):
        if another process moved the pointer
        meanwhile (a job re-run after its worker was thought dead, racing the job that replaced it), the
        candidate is saved as "superseded" instead of replacing a newer head. So is one whose `label_snapshot` (the
        labels its training read, `backend.loop.retrain`) is older than the served version's, whatever `replaces`
        says: a run that read the labels before the served version's training did never replaces it.
        """
        number = int(self.redis.incr(self._key(project, control, "next")))
        now = time.time()
        tensors = save_tensors({name: value.detach().contiguous() for name, value in head.state_dict().items()})
        current_key = self._key(project, control, "current")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.watch(current_key)
            current = pipe.get(current_key)
            current = int(current) if current is not None else None
            record = {**meta, "version": number, "project": project, "control": control,
                      "created_at": meta.get("created_at", now)}
            served_snapshot = self._snapshot(pipe, project, control, current) if promote else None
            if promote and replaces != ANY_CURRENT and current != replaces:
                promote = False
                record.update(status="superseded", status_reason=(
                    f"not served: v{current} replaced v{replaces} while this candidate was judged"))
            elif promote and served_snapshot is not None and record.get("label_snapshot") is not None \
                    and record["label_snapshot"] < served_snapshot:
                promote = False
                record.update(status="superseded", status_reason=(
                    f"not served: v{current} was trained on newer labels (snapshot {served_snapshot}, this one "
                    f"{record['label_snapshot']}): a stale re-run of a training"))
            elif promote:
                record.update(status="promoted", status_reason=reason or "promoted", promoted_at=now)
            else:
                record.setdefault("status", "candidate")
                if reason:
                    record["status_reason"] = reason
            pipe.multi()
            pipe.hset(self._key(project, control, number), mapping={"tensors": tensors, **stored_meta(record)})
            pipe.sadd(redis_keys.head_controls(project), control)
            pipe.sadd(redis_keys.head_detailed(project, control), number)
            if record["status"] in PRUNABLE_STATUSES:
                pipe.sadd(redis_keys.head_rejected(project, control), number)
            if promote:
                pipe.set(current_key, number)
            pipe.execute()
        self.retain(project, control)
        return number

    def _snapshot(self, pipe, project: str, control: str, number: int | None) -> int | None:
        """The label snapshot version `number` was trained on (None: unknown, or no such version)."""
        if number is None:
            return None
        key = self._key(project, control, number)
        field = pipe.hget(key, "label_snapshot")
        if field is not None:
            return int(field) if field else None
        raw = pipe.hget(key, "meta")  # written before the field existed
        snapshot = json.loads(raw).get("label_snapshot") if raw is not None else None
        return int(snapshot) if isinstance(snapshot, int) else None

    def retain(self, project: str, control: str) -> dict:
        """Drop old versions' per-label detail and old rejected versions (see `backend.core.retention`)."""
        return retain(self.redis, project, control, self.retention)

    def numbering_started(self, project: str, control: str) -> bool:
        """Whether P/C has a version counter (absent on first contact, or after Redis lost its data)."""
        return bool(self.redis.exists(self._key(project, control, "next")))

    def continue_numbering(self, project: str, control: str, after: int) -> None:
        """Make the next version of P/C number at least `after` + 1 (never lowers the counter): numbers that Label
        Studio already stores predictions of are not handed out again."""
        key = self._key(project, control, "next")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.watch(key)
            current = int(pipe.get(key) or 0)
            pipe.multi()
            pipe.set(key, max(current, int(after)))
            pipe.execute()

    def promote(self, project: str, control: str, number: int, *, reason: str = "promoted") -> None:
        """Make `number` the version every process serves. Its status and the pointer change in one
        transaction, so a process killed midway never leaves a "promoted" version that is not served."""
        key = self._key(project, control, number)
        raw = self.redis.hget(key, "meta")
        if raw is None:
            raise KeyError(f"No version {number} of {project}/{control}")
        meta = {**json.loads(raw), "status": "promoted", "status_reason": reason, "promoted_at": time.time()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=stored_meta(meta))
        pipe.set(self._key(project, control, "current"), number)
        pipe.srem(redis_keys.head_rejected(project, control), number)  # served again: never pruned
        pipe.execute()

    def amend(self, project: str, control: str, number: int, updates: dict) -> dict:
        """Add `updates` to a version's metadata (its validation, found after it was promoted)."""
        key = self._key(project, control, number)
        with self.redis.pipeline() as pipe:
            pipe.watch(key)
            raw = pipe.hget(key, "meta")
            if raw is None:
                raise KeyError(f"No version {number} of {project}/{control}")
            meta = {**json.loads(raw), **updates}
            pipe.multi()
            pipe.hset(key, mapping=stored_meta(meta))
            pipe.execute()
        return meta

    def withdraw(self, project: str, control: str, number: int, *, back_to: int | None, updates: dict,
                 reason: str) -> bool:
        """Mark version `number` rejected (with `updates`) and, if it is still the one served, serve
        `back_to` again (None: nothing), in one transaction; returns whether the pointer moved."""
        key, current_key = self._key(project, control, number), self._key(project, control, "current")
        with self.redis.pipeline() as pipe:
            pipe.watch(key, current_key)
            raw = pipe.hget(key, "meta")
            if raw is None:
                raise KeyError(f"No version {number} of {project}/{control}")
            served = pipe.get(current_key)
            moved = served is not None and int(served) == number
            meta = {**json.loads(raw), **updates, "status": "rejected", "status_reason": reason,
                    "rolled_back_at": time.time()}
            pipe.multi()
            pipe.hset(key, mapping=stored_meta(meta))
            pipe.sadd(redis_keys.head_rejected(project, control), number)
            if moved and back_to is not None:
                pipe.set(current_key, back_to)
            elif moved:
                pipe.delete(current_key)
            pipe.execute()
        self.retain(project, control)
        return moved

    def rollback_target(self, project: str, control: str) -> tuple[int, int]:
        """(current, previous): the version served now and the one a rollback would serve instead.

        The previous version is the promoted one promoted most recently before the current one, so
        repeated rollbacks walk back through the promotions. Raises LookupError when there is none.
        """
        current = self.current_number(project, control)
        if current is None:
            raise LookupError(f"{project}/{control} has no current version to roll back from")
        metas = {meta["version"]: meta for meta in self.versions(project, control)}
        if current not in metas:
            raise LookupError(f"{project}/{control}: the current pointer names a missing version {current}")
        target = previous_promoted(metas, current)
        if target is None:
            raise LookupError(f"{project}/{control}-v{current} is the first promoted version; "
                              "there is none to roll back to")
        return current, target

    def rollback(self, project: str, control: str, *, reason: str = "rolled back") -> tuple[int, int]:
        """Serve the previous version (see `rollback_target`); returns (left, now current).

        The version left is marked `rolled_back`, so it is never a rollback target again (it can
        still be promoted by hand). A promotion racing with this makes it raise WatchError instead
        of interleaving.
        """
        current_key = self._key(project, control, "current")
        with self.redis.pipeline() as pipe:
            pipe.watch(current_key)
            current, target = self.rollback_target(project, control)
            left = {**self.meta(project, control, current), "status": "rolled_back", "status_reason": reason,
                    "rolled_back_at": time.time()}
            pipe.multi()
            pipe.hset(self._key(project, control, current), mapping=stored_meta(left))
            pipe.set(current_key, target)
            pipe.execute()
        return current, target

    def current_number(self, project: str, control: str) -> int | None:
        raw = self.redis.get(self._key(project, control, "current"))
        return int(raw) if raw is not None else None

    def current_numbers(self, project: str, controls: list[str]) -> dict[str, int | None]:
        """Current version of each control, in one round trip."""
        if not controls:
            return {}
        raw = self.redis.mget([self._key(project, control, "current") for control in controls])
        return {control: int(value) if value is not None else None for control, value in zip(controls, raw)}

    def load(self, project: str, control: str, number: int) -> HeadVersion:
        tensors, meta = self.redis.hmget(self._key(project, control, number), ["tensors", "meta"])
        if tensors is None or meta is None:
            raise KeyError(f"No version {number} of {project}/{control}")
        meta = json.loads(meta)
        state = load_tensors(tensors)
        head = rebuild_head(meta)
        head.load_state_dict(state)
        head.eval()
        return HeadVersion(project=project, control=control, number=number, head=head, meta=meta)

    def meta(self, project: str, control: str, number: int) -> dict | None:
        raw = self.redis.hget(self._key(project, control, number), "meta")
        return json.loads(raw) if raw is not None else None

    def versions(self, project: str, control: str) -> list[dict]:
        """Metadata of every version, oldest first."""
        last = int(self.redis.get(self._key(project, control, "next")) or 0)
        pipe = self.redis.pipeline()
        for number in range(1, last + 1):
            pipe.hget(self._key(project, control, number), "meta")
        return [json.loads(raw) for raw in pipe.execute() if raw is not None]

    def versions_page(self, project: str, control: str, *, limit: int, before: int | None = None,
                      statuses: tuple[str, ...] | None = None) -> tuple[list[dict], int | None]:
        """(metadata of up to `limit` versions numbered below `before` (None: all), newest first, only those with one
        of `statuses` when given; the `before` of the next page, None when there is none). Reads a page's worth of
        versions at a time, never every one."""
        top = int(self.redis.get(self._key(project, control, "next")) or 0) + 1
        number = min(top, before) if before is not None else top
        page: list[dict] = []
        while number > 1 and len(page) < limit:
            numbers = list(range(number - 1, max(number - 1 - max(limit, 50), 0), -1))
            pipe = self.redis.pipeline(transaction=False)
            for candidate in numbers:
                pipe.hget(self._key(project, control, candidate), "meta")
            for candidate, raw in zip(numbers, pipe.execute()):
                number = candidate
                if raw is None:
                    continue
                meta = json.loads(raw)
                if statuses is None or meta.get("status") in statuses:
                    page.append(meta)
                    if len(page) == limit:
                        break
        return page, (number if number > 1 and len(page) == limit else None)

    def count(self, project: str, control: str) -> int:
        """How many versions of P/C are stored (without reading their metadata)."""
        last = int(self.redis.get(self._key(project, control, "next")) or 0)
        pipe = self.redis.pipeline(transaction=False)
        for number in range(1, last + 1):
            pipe.exists(self._key(project, control, number))
        return sum(pipe.execute())

    def controls(self, project: str) -> list[str]:
        return sorted(member.decode() for member in self.redis.smembers(redis_keys.head_controls(project)))
