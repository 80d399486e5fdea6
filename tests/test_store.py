"""The model store: versions in Redis, safetensors + JSON, one current pointer every process agrees on."""

from __future__ import annotations

import json

import pytest
import torch

from backend.core.heads import build_head
from backend.core.store import ModelStore
from backend.loop.retrain import train_version


def test_a_saved_version_round_trips_and_is_not_served_until_promoted(redis, encoders, hymenoptera_features):
    features, labels = hymenoptera_features
    store = ModelStore(redis)
    trained = train_version(store, project="4", control="label", classes=["ants", "bees"], multi_label=False,
                            features=features, labels=[[n] for n in labels], task_ids=list(range(len(labels))),
                            encoder=encoders.get())
    assert store.current_number("4", "label") is None
    store.promote("4", "label", trained.number)
    assert store.current_number("4", "label") == trained.number
    loaded = store.load("4", "label", trained.number)
    assert loaded.classes == ["ants", "bees"]
    assert torch.allclose(loaded.head(features), loaded.head(features))
    meta = loaded.meta
    assert meta["backbone"] == "mobilenet_v2" and meta["status"] == "promoted"
    assert meta["parameters"] == {"trainable": 1280 * 2 + 2, "non_trainable": 2_223_872}
    assert meta["preprocessing"]["l2_normalize"] is True
    assert meta["label_count"] == len(labels) and meta["metrics"]["cv_folds"] == 5


def test_versions_are_stored_without_pickles(redis):
    store = ModelStore(redis)
    number = store.save("4", "label", build_head(8, 3), {"classes": ["a", "b", "c"], "feature_dim": 8,
                                                        "multi_label": False})
    tensors, meta = redis.hmget(f"headstart:head:4:label:{number}", ["tensors", "meta"])
    header_length = int.from_bytes(tensors[:8], "little")
    header = json.loads(tensors[8:8 + header_length])  # the safetensors layout: JSON header + raw tensors
    assert set(header) >= {"weight", "bias"}
    assert json.loads(meta)["classes"] == ["a", "b", "c"]


def test_a_second_process_sees_the_new_current_version(redis, redis_url):
    import redis as redis_lib

    writer, reader = ModelStore(redis), ModelStore(redis_lib.Redis.from_url(redis_url))
    first = writer.save("4", "label", build_head(8, 2), {"classes": ["a", "b"], "feature_dim": 8, "multi_label": False})
    second = writer.save("4", "label", build_head(8, 2), {"classes": ["a", "b"], "feature_dim": 8, "multi_label": False})
    writer.promote("4", "label", first)
    assert reader.current_number("4", "label") == first
    writer.promote("4", "label", second)
    assert reader.current_number("4", "label") == second
    assert [meta["version"] for meta in reader.versions("4", "label")] == [first, second]


def test_promoting_a_missing_version_fails_and_keeps_the_pointer(redis):
    store = ModelStore(redis)
    number = store.save("4", "label", build_head(8, 2), {"classes": ["a", "b"], "feature_dim": 8, "multi_label": False})
    store.promote("4", "label", number)
    with pytest.raises(KeyError):
        store.promote("4", "label", 99)
    assert store.current_number("4", "label") == number


def test_a_promotion_judged_against_an_older_head_does_not_replace_a_newer_one(redis):
    """A training re-run after its worker was thought dead races the one that replaced it: the stale one loses."""
    store = ModelStore(redis)
    meta = {"classes": ["a", "b"], "feature_dim": 8, "multi_label": False}
    first = store.save("4", "label", build_head(8, 2), meta, promote=True, replaces=None)
    newer = store.save("4", "label", build_head(8, 2), meta, promote=True, replaces=first)
    stale = store.save("4", "label", build_head(8, 2), meta, promote=True, replaces=first)  # judged against v1
    assert store.current_number("4", "label") == newer
    assert store.meta("4", "label", stale)["status"] == "superseded"
    assert store.meta("4", "label", newer)["status"] == "promoted"


def test_a_head_trained_on_an_older_label_snapshot_never_replaces_a_newer_one(redis):
    """Even judged against the served head itself (a retry that starts after the newer training promoted)."""
    store = ModelStore(redis)
    meta = {"classes": ["a", "b"], "feature_dim": 8, "multi_label": False}
    newer = store.save("4", "label", build_head(8, 2), {**meta, "label_snapshot": 8}, promote=True, replaces=None)
    stale = store.save("4", "label", build_head(8, 2), {**meta, "label_snapshot": 7}, promote=True, replaces=newer)
    assert store.current_number("4", "label") == newer
    assert store.meta("4", "label", stale)["status"] == "superseded"
    later = store.save("4", "label", build_head(8, 2), {**meta, "label_snapshot": 9}, promote=True, replaces=newer)
    assert store.current_number("4", "label") == later
