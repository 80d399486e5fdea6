"""`predict`: /predict through `headstart serve` (gunicorn, default settings) against raw torch.

- uncached: one task per request, its embedding not in the cache (the cache keys are flushed
  before each request), against raw decode + transform + forward of the same image file in this
  process, with the same torch thread count as the server (TORCH_THREADS). Interleaved, so both
  see the same machine noise.
- cached: the same task again and again (the embedding comes from Redis).
- batch: 64 uncached tasks in one request, against raw batched throughput: decode + transform
  the 64 files, then forward them at the best of several batch sizes (so the baseline is no straw man).

Raw means what one would write by hand: PIL open + convert, the weights' transforms, the plain
torchvision MobileNetV2 without its classifier, torch.no_grad.
"""

from __future__ import annotations

import io
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import models

from backend.core.torch_runtime import set_torch_threads
from backend.loop.retrain import train_version
from backend.loop.features import MediaItem
from backend.loop.services import build_services
from backend.common.settings import Settings
from bench import data
from bench.harness import RESULTS_DIR, Run, goal, median, percentile, print_table, rounded
from bench.stack import Stack

NAME = "predict"
PROJECT = 1
RAW_BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True)
class Params:
    singles: int
    cached: int
    batch: int
    batch_repeats: int


FULL = Params(singles=60, cached=60, batch=64, batch_repeats=5)
QUICK = Params(singles=2, cached=3, batch=4, batch_repeats=1)


class RawPipeline:
    """Hand-written inference: decode, the weights' transforms, the plain network."""

    def __init__(self):
        weights = models.MobileNet_V2_Weights.IMAGENET1K_V1
        self.model = models.mobilenet_v2(weights=weights)
        self.model.classifier = nn.Identity()
        self.model.eval()
        self.transforms = weights.transforms()

    def tensor(self, path: Path) -> torch.Tensor:
        return self.transforms(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model(batch), dim=1)


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    settings = Settings(local_files_document_root=str(data.HYMENOPTERA))
    set_torch_threads(settings.torch_threads)  # the server's default, for the raw baseline
    train, val = data.images("hymenoptera", "train"), data.images("hymenoptera", "val")
    random.Random(0).shuffle(val)
    classes = data.classes_of(train)
    config = data.label_config(classes)
    raw = RawPipeline()

    with Stack(env={"LOCAL_FILES_DOCUMENT_ROOT": str(data.HYMENOPTERA)}, quick=quick) as stack:
        services = build_services(settings.replace(redis_url=stack.redis_server.url), stack.redis)
        _train_head(services, train, classes)
        client = stack.client()
        _warm_up(stack, config, val[:2 if quick else 8])
        singles = _singles(stack, client, raw, config, val[:params.singles], services)
        cached = _cached(client, config, val[0], params.cached)
        batches = [_batch(stack, client, raw, config, val[:params.batch]) for _ in range(params.batch_repeats)]
        client.close()

    server_ms = [s["server_ms"] for s in singles]
    raw_ms = [s["raw_ms"] for s in singles]
    batch_img_per_s = median(b["server_img_per_s"] for b in batches)
    raw_batch_img_per_s = median(b["raw_img_per_s"] for b in batches)
    results = {
        "uncached_p50_ms": rounded(percentile(server_ms, 50), 1),
        "uncached_p95_ms": rounded(percentile(server_ms, 95), 1),
        "raw_p50_ms": rounded(percentile(raw_ms, 50), 1),
        "raw_p95_ms": rounded(percentile(raw_ms, 95), 1),
        "uncached_ratio": rounded(percentile(server_ms, 50) / percentile(raw_ms, 50), 2),
        "in_process_p50_ms": rounded(percentile([s["in_process_ms"] for s in singles], 50), 1),
        "cached_p50_ms": rounded(percentile(cached, 50), 2),
        "cached_p95_ms": rounded(percentile(cached, 95), 2),
        "batch_tasks": params.batch,
        "batch_img_per_s": rounded(batch_img_per_s, 1),
        "raw_batch_img_per_s": rounded(raw_batch_img_per_s, 1),
        "batch_ratio": rounded(batch_img_per_s / raw_batch_img_per_s, 2),
        "raw_forward_only_img_per_s": rounded(median(b["raw_forward_img_per_s"] for b in batches), 1),
        "raw_best_batch_size": [b["raw_best_batch_size"] for b in batches],
        "torch_threads": settings.torch_threads,
        "server": {"workers": settings.workers, "threads": settings.threads},
        "singles": singles,
        "batches": batches,
    }
    notes = ["hymenoptera val images (JPEG, median 500x375); server: `headstart serve` with default settings",
             "uncached: Redis embedding-cache and media-digest keys flushed before each request",
             "in_process_p50_ms: the product's Predictor.predict called in the bench process (no HTTP), same images"]
    goals = {"uncached_ratio": goal(results["uncached_ratio"], 1.2, at_least=False),
             "cached_p50_ms": goal(results["cached_p50_ms"], 10, at_least=False),
             "batch_ratio": goal(results["batch_ratio"], 0.9, at_least=True)}
    record = bench_run.finish(results, goals=goals, notes=notes)
    print_table("predict", ["what", "headstart", "raw", "ratio"], [
        ["1 uncached image, p50 ms", results["uncached_p50_ms"], results["raw_p50_ms"], results["uncached_ratio"]],
        ["1 uncached image, p95 ms", results["uncached_p95_ms"], results["raw_p95_ms"], ""],
        ["1 uncached image in process (no HTTP), p50 ms", results["in_process_p50_ms"], "", ""],
        ["1 cached image, p50 ms", results["cached_p50_ms"], "", ""],
        [f"{params.batch} tasks, images/s", batch_img_per_s, raw_batch_img_per_s, results["batch_ratio"]],
    ])
    return record


def _train_head(services, train, classes: list[str]) -> None:
    """A promoted head, so /predict embeds and classifies (an untrained project answers at once)."""
    chosen = [item for cls in classes for item in [i for i in train if i[1] == cls][:10]]
    encoder = services.encoders.get()
    items = [MediaItem(task_id, data.local_url(data.HYMENOPTERA, path)) for task_id, (path, _) in enumerate(chosen)]
    features = torch.stack(services.features.features(str(PROJECT), items, encoder))
    trained = train_version(services.store, project=str(PROJECT), control=data.CONTROL, classes=classes,
                            multi_label=False, features=features, labels=[[cls] for _, cls in chosen],
                            task_ids=list(range(len(chosen))), encoder=encoder)
    services.store.promote(str(PROJECT), data.CONTROL, trained.number)


def _body(config: str, items, first_id: int = 10_000) -> dict:
    tasks = [data.task(first_id + i, data.local_url(data.HYMENOPTERA, path)) for i, (path, _) in enumerate(items)]
    return {"tasks": tasks, "project": f"{PROJECT}.1", "label_config": config}


def _predict(client, body: dict) -> float:
    started = time.perf_counter()
    status, answer = client.post("/predict", body)
    elapsed = time.perf_counter() - started
    if status != 200 or not all(result["result"] for result in answer.get("results", [])):
        raise RuntimeError(f"/predict answered {status} without predictions: {str(answer)[:300]}")
    return elapsed


def _flush_embeddings(stack: Stack) -> None:
    for pattern in ("headstart:emb:*", "headstart:media:*"):
        keys = list(stack.redis.scan_iter(pattern, count=1000))
        if keys:
            stack.redis.delete(*keys)


def _warm_up(stack: Stack, config: str, items) -> None:
    """Pairs of concurrent requests until every gunicorn worker has loaded the backbone."""
    for start in range(0, len(items), 2):
        threads = [threading.Thread(target=lambda item=item: _predict(stack.client(), _body(config, [item])))
                   for item in items[start:start + 2]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    _flush_embeddings(stack)


def _singles(stack: Stack, client, raw: RawPipeline, config: str, items, services) -> list[dict]:
    """Per image: through the server, raw, and the product's Predictor called in this process
    (which splits the server's overhead into HTTP serving and the feature path)."""
    measured = []
    for item in items:
        _flush_embeddings(stack)
        server_s = _predict(client, _body(config, [item]))
        started = time.perf_counter()
        raw.forward(raw.tensor(item[0]).unsqueeze(0))
        raw_s = time.perf_counter() - started
        _flush_embeddings(stack)
        started = time.perf_counter()
        services.predictor.predict(_body(config, [item])["tasks"], project=str(PROJECT), label_config=config)
        in_process_s = time.perf_counter() - started
        measured.append({"image": item[0].name, "server_ms": round(server_s * 1000, 2),
                         "raw_ms": round(raw_s * 1000, 2), "in_process_ms": round(in_process_s * 1000, 2)})
    return measured


def _cached(client, config: str, item, count: int) -> list[float]:
    body = _body(config, [item])
    _predict(client, body)
    return [round(_predict(client, body) * 1000, 3) for _ in range(count)]


def _batch(stack: Stack, client, raw: RawPipeline, config: str, items) -> dict:
    _flush_embeddings(stack)
    server_s = _predict(client, _body(config, items))
    started = time.perf_counter()
    tensors = torch.stack([raw.tensor(path) for path, _ in items])
    prepare_s = time.perf_counter() - started
    forward_s = {}
    for size in RAW_BATCH_SIZES:
        started = time.perf_counter()
        for start in range(0, len(items), size):
            raw.forward(tensors[start:start + size])
        forward_s[size] = time.perf_counter() - started
    best = min(forward_s, key=forward_s.get)
    return {"server_s": round(server_s, 3), "server_img_per_s": round(len(items) / server_s, 2),
            "raw_prepare_s": round(prepare_s, 3), "raw_forward_s": {str(k): round(v, 3) for k, v in forward_s.items()},
            "raw_best_batch_size": best, "raw_img_per_s": round(len(items) / (prepare_s + forward_s[best]), 2),
            "raw_forward_img_per_s": round(len(items) / forward_s[best], 2)}
