"""`retention`: Redis memory per 1,000 images, and after 5,000 labels with one version per submit.

Measured by Redis itself (`MEMORY USAGE` of every key written, exact for hashes and sets), with the
backend's own classes writing what a project of that size holds:
- **per 1,000 images**: cached features (MobileNetV2, 1280-d float32, synthetic values: their size does not
  depend on them), the URL → digest map, the task index, the label mirror (every image labeled) and one
  version's prediction ledger;
- **versions after 5,000 labels, one version per submit**: 5,000 head versions, version k trained on k labels,
  each with metadata shaped by a real fitted candidate (`fit_candidate` on synthetic features of the real
  dimension) and per-label lists of k entries, saved through `ModelStore`: **before** retention (every
  version keeps its per-label detail; each version's size is measured as it is written, then the key is
  dropped so the Redis stays small) and **after** (the default `VERSION_DETAIL_KEEP`/`REJECTED_VERSIONS_KEEP`).

The Redis is a private `redis-server`, or HEADSTART_BENCH_REDIS_URL (its database is flushed).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import redis as redis_lib
import torch

from bench.harness import RESULTS_DIR, Run, goal, print_table
from bench.resources import RedisServer
from backend.common import redis_keys
from backend.core.backbones import backbone_key, get_spec
from backend.core.candidates import fit_candidate
from backend.core.embedding_cache import EmbeddingCache, MediaDigests, content_digest
from backend.core.encoders import EncoderPool
from backend.core.retention import Retention
from backend.core.store import ModelStore
from backend.labelstudio.label_mirror import LabelStore
from backend.labelstudio.task_index import TaskIndex
from backend.loop.repredict import PredictionLedger

NAME = "retention"
BACKBONE = "mobilenet_v2"
CLASSES = ["ants", "bees"]
PROJECT = "1"


@dataclass(frozen=True)
class Params:
    images: int
    labels: int


FULL = Params(images=1000, labels=5000)
QUICK = Params(images=50, labels=40)


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench = Run(NAME, quick=quick, results_dir=results_dir)
    with _redis() as (redis, where):
        inputs = measure_inputs(redis, params.images)
        redis.flushdb()
        versions = measure_versions(redis, params.labels)
        redis.flushdb()
    per_image = inputs["total_bytes"] / params.images
    results = {
        "redis": where,
        "images": params.images,
        "per_1000_images_mb": round(inputs["total_bytes"] / params.images * 1000 / 2**20, 2),
        "per_1000_images": {name: round(size / params.images * 1000 / 2**20, 3)
                            for name, size in inputs["bytes"].items()},
        "labels": params.labels,
        "versions_before_mb": round(versions["before_bytes"] / 2**20, 1),
        "versions_after_mb": round(versions["after_bytes"] / 2**20, 2),
        "after_to_before": round(versions["after_bytes"] / versions["before_bytes"], 3),
        "project_after_labels_mb": {
            "before": round((versions["before_bytes"] + per_image * params.labels) / 2**20, 1),
            "after": round((versions["after_bytes"] + per_image * params.labels) / 2**20, 1)},
        "versions": versions,
    }
    print_table(f"Redis memory ({where})", ["what", "MB"],
                [[f"per 1,000 images: {name}", value] for name, value in results["per_1000_images"].items()]
                + [["per 1,000 images, in all", results["per_1000_images_mb"]],
                   [f"{params.labels} versions, one per submit, before retention", results["versions_before_mb"]],
                   [f"{params.labels} versions, after retention", results["versions_after_mb"]]])
    goals = {"after_to_before": goal(results["after_to_before"], 0.25, at_least=False)}
    return bench.finish(results, goals=goals, notes=[
        "MEMORY USAGE of every key written, summed; features are synthetic vectors of the real dimension (1280, "
        "float32); version metadata is shaped by a real fitted candidate, with k-entry per-label lists for "
        "version k. 'before': every version keeps its per-label detail (measured per version as written).",
        "Kept by retention for every version: its tensors and summary (it can still be listed, promoted, rolled "
        "back to), so 'after' still grows by a few KB per version; the quadratic part is gone.",
    ])


@contextlib.contextmanager
def _redis():
    explicit = os.environ.get("HEADSTART_BENCH_REDIS_URL")
    if explicit:
        connection = redis_lib.Redis.from_url(explicit)
        connection.flushdb()
        yield connection, explicit
        return
    server = RedisServer(appendonly=False).start()
    try:
        yield redis_lib.Redis.from_url(server.url), "a private redis-server " + _version(server.url)
    finally:
        server.cleanup()


def _version(url: str) -> str:
    return str(redis_lib.Redis.from_url(url).info("server").get("redis_version"))


def measure_inputs(redis, images: int) -> dict:
    """Bytes of what `images` labeled images of one project cost in Redis, by kind."""
    dim = get_spec(BACKBONE).feature_dim
    key = backbone_key(BACKBONE, "")
    urls = {task: f"/data/upload/{PROJECT}/{task:08x}-IMG_{task:05d}.jpg" for task in range(1, images + 1)}
    digests = {url: content_digest(url.encode()) for url in urls.values()}
    EmbeddingCache(redis, key).put_many({digest: torch.randn(dim) for digest in digests.values()})
    MediaDigests(redis, PROJECT).put_many(digests)
    TaskIndex(redis).put_many(PROJECT, ({"id": task, "data": {"image": url}} for task, url in urls.items()))
    mirror = LabelStore(redis)
    for task, url in urls.items():
        mirror.put(PROJECT, _annotation(task), {"id": task, "data": {"image": url}})
    PredictionLedger(redis).answer(PROJECT, "label-v1", list(urls))  # as /predict records its answers
    sizes = {
        "features": sum(_usage(redis, redis_keys.embedding(key, digest)) for digest in digests.values()),
        "url_digests": _usage(redis, redis_keys.media_digests(PROJECT)),
        "task_index": _usage(redis, redis_keys.task_index(PROJECT)),
        "label_mirror": _usage(redis, redis_keys.labels(PROJECT)),
        "prediction_ledger_per_version": _usage(redis, redis_keys.predicted(PROJECT, "label-v1")),
    }
    return {"bytes": sizes, "total_bytes": sum(sizes.values())}


def measure_versions(redis, labels: int) -> dict:
    """Bytes of `labels` versions (version k trained on k labels) before and after retention."""
    template, head = _template()
    started = time.perf_counter()
    keep_all = ModelStore(redis, Retention(detail_keep=labels + 1, rejected_keep=labels + 1))
    before, largest = 0, 0
    for k in range(1, labels + 1):
        number = keep_all.save(PROJECT, "label", head, _meta(template, k), promote=True)
        size = _usage(redis, redis_keys.head_version(PROJECT, "label", number))
        before, largest = before + size, max(largest, size)
        if number > 1:  # measured: drop it, or 'before' would hold every version in this Redis at once
            redis.delete(redis_keys.head_version(PROJECT, "label", number - 1))
    before_s = time.perf_counter() - started
    redis.flushdb()
    started = time.perf_counter()
    store = ModelStore(redis, Retention())
    for k in range(1, labels + 1):
        store.save(PROJECT, "label", head, _meta(template, k), promote=True)
    after_s = time.perf_counter() - started
    keys = [key for key in redis.scan_iter(match=f"headstart:head:{PROJECT}:*")]
    after = sum(_usage(redis, key) for key in keys)
    detailed = sum("trained_on" in meta for meta in store.versions(PROJECT, "label"))
    return {"before_bytes": before, "after_bytes": after, "largest_version_bytes": largest,
            "versions_kept": store.count(PROJECT, "label"), "versions_with_detail_after": detailed,
            "write_s_before": round(before_s, 1), "write_s_after": round(after_s, 1),
            "per_write_ms_after": round(after_s / labels * 1000, 2)}


def _template() -> tuple[dict, torch.nn.Module]:
    """A real candidate's metadata (recipe choice, calibration, metrics) and head, fitted on synthetic features."""
    encoder = EncoderPool(default_name=BACKBONE).get()
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(60, encoder.feature_dim, generator=generator), dim=1)
    names = [[CLASSES[i % 2]] for i in range(60)]
    features[::2] += 0.05  # separable enough for a real choice among recipes
    candidate = fit_candidate(control="label", classes=CLASSES, multi_label=False, features=features, labels=names,
                              task_ids=list(range(1, 61)), encoder=encoder)
    return candidate.meta, candidate.head


def _meta(template: dict, k: int) -> dict:
    """Version k's metadata: the template's summary, per-label lists of k labels, as `retrain` saves it."""
    tasks = range(1, k + 1)
    return {**template, "label_count": k, "labels_per_class": {name: (k + (i == 0)) // 2 for i, name in
                                                                enumerate(CLASSES)},
            "trained_on": {str(task): [CLASSES[task % 2]] for task in tasks},
            "out_of_fold_correct": {str(task): task % 7 != 0 for task in tasks},
            "media_errors": {}, "unknown_labels": 0, "job_id": f"{k:08x}-0000-4000-8000-000000000000",
            "label_snapshot": k, "promotion": {"promote": True, "reason": "validates 0.950 vs current 0.948 on the "
                                               f"same {k} labels (3 examples gained, 2 lost)",
                                               "candidate_score": 0.95, "current_score": 0.948}}


def _annotation(task: int) -> dict:
    """An annotation as Label Studio's webhook and API give it (one choice)."""
    return {"id": 100_000 + task, "task": task, "was_cancelled": False, "ground_truth": False,
            "updated_at": "2026-12-01T12:00:00.123456Z",
            "result": [{"id": f"r{task:09d}", "type": "choices", "value": {"choices": [CLASSES[task % 2]]},
                        "origin": "manual", "to_name": "image", "from_name": "label"}]}


def _usage(redis, key) -> int:
    return int(redis.memory_usage(key, samples=0) or 0)
