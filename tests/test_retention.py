"""Retention: per-label detail only on the served, rollback-target and newest versions; old rejected ones deleted."""

from __future__ import annotations

import pytest

from backend.common import redis_keys
from backend.common.errors import ConfigurationError
from backend.core.heads import build_head
from backend.core.retention import Retention
from backend.core.store import ModelStore

P, C = "4", "label"


def meta(labels: int, status: str | None = None) -> dict:
    record = {"classes": ["a", "b"], "feature_dim": 8, "multi_label": False, "label_count": labels,
              "metrics": {"cv_accuracy": 0.9}, "recipe": "logistic",
              "trained_on": {str(task): ["a" if task % 2 else "b"] for task in range(labels)},
              "out_of_fold_correct": {str(task): True for task in range(labels)},
              "media_errors": {"999": "MediaError: 404"}}
    return {**record, "status": status} if status else record


def save(store: ModelStore, labels: int, *, promote: bool = False, status: str | None = None) -> int:
    return store.save(P, C, build_head(8, 2), meta(labels, status), promote=promote)


def test_only_the_served_its_rollback_target_and_the_newest_versions_keep_per_label_detail(redis):
    store = ModelStore(redis, Retention(detail_keep=2, rejected_keep=100))
    first = save(store, 10, promote=True)
    served = save(store, 11, promote=True)  # first is now its rollback target
    later = [save(store, 12 + i) for i in range(5)]  # candidates, never served
    detailed = {m["version"] for m in store.versions(P, C) if "trained_on" in m}
    assert detailed == {first, served, *later[-2:]}
    old = store.meta(P, C, later[0])
    assert "out_of_fold_correct" not in old and "media_errors" not in old and old["media_error_count"] == 1
    assert old["label_count"] == 12 and old["metrics"] == {"cv_accuracy": 0.9} and old["recipe"] == "logistic"
    assert [m["version"] for m in store.versions(P, C)] == list(range(1, 8))  # every version is still listed

    newest = save(store, 20, promote=True)
    detailed = {m["version"] for m in store.versions(P, C) if "trained_on" in m}
    assert detailed == {served, later[-1], newest}  # `first` is two promotions back: summary only
    assert store.rollback_target(P, C) == (newest, served)
    assert store.load(P, C, first).meta["label_count"] == 10  # its tensors are kept: it can still be served
    store.rollback(P, C)
    assert store.meta(P, C, served)["trained_on"] == meta(11)["trained_on"]  # what the next guard reads


def test_old_rejected_versions_are_deleted_but_never_the_served_one(redis):
    store = ModelStore(redis, Retention(detail_keep=1, rejected_keep=2))
    served = save(store, 10, promote=True)
    rejected = [save(store, 11 + i, status="rejected") for i in range(4)]
    superseded = store.save(P, C, build_head(8, 2), meta(15), promote=True, replaces=rejected[0])
    assert store.meta(P, C, superseded)["status"] == "superseded"
    assert [m["version"] for m in store.versions(P, C)] == [served, rejected[-1], superseded]
    assert not redis.exists(redis_keys.head_version(P, C, rejected[0]))  # tensors and metadata both
    store.promote(P, C, rejected[-1])  # an admin serves a rejected version: from now on it is kept
    for i in range(3):
        save(store, 20 + i, status="rejected")
    assert store.current_number(P, C) == rejected[-1] and store.meta(P, C, rejected[-1]) is not None
    assert store.meta(P, C, served) is not None  # promoted versions are never pruned
    assert save(store, 30) == superseded + 4  # numbers of deleted versions are never handed out again


def test_versions_written_before_retention_are_found_once(redis):
    keep_all = ModelStore(redis, Retention(detail_keep=1000, rejected_keep=1000))
    numbers = [keep_all.save(P, C, build_head(8, 2), meta(5, "rejected" if i % 2 else None)) for i in range(8)]
    for what in ("detailed", "rejected", "swept"):  # as a store of an earlier release left them
        redis.delete(f"headstart:head:{P}:{C}:{what}")
    for number in numbers:
        redis.hdel(redis_keys.head_version(P, C, number), "status", "promoted_at", "label_snapshot")
    keep_all.promote(P, C, 1)  # the served one: an earlier release's metadata is read for its promotion time
    ModelStore(redis, Retention(detail_keep=2, rejected_keep=1)).retain(P, C)
    left = {m["version"]: m for m in keep_all.versions(P, C)}
    assert [n for n in numbers if n not in left] == [2, 4, 6]  # rejected, older than the newest one
    assert [n for n, m in left.items() if "trained_on" in m] == [1, 7, 8]


def test_keeping_no_rejected_version_is_refused(settings):
    with pytest.raises(ConfigurationError, match="REJECTED_VERSIONS_KEEP"):
        settings.replace(rejected_versions_keep=0).check()
