"""`predict`: /predict through `headstart serve` (gunicorn, default settings) against raw torch.

- uncached: one task per request, its embedding not in the cache (the cache keys are flushed
  before each request), against raw decode + transform + forward of the same image file in a raw
  process of its own, with the same torch thread count as the server (TORCH_THREADS). Interleaved, so
  both see the same machine noise.
- in process: the product's `Predictor` called in the bench process against the raw pipeline in the
  bench process, interleaved: the feature path's overhead without HTTP and without a second process.
- cached: the same task again and again (the embedding comes from Redis).
- batch: 64 uncached tasks in one request, against raw batched throughput in the raw process: decode +
  transform the 64 files, then forward them at the best of several batch sizes (so the baseline is no
  straw man).

Rounds of fresh process pairs. On this 2-core VM two processes running the identical raw pipeline
side by side differed by up to 1.5x within one run (their p50 ratio was 0.66-0.99 over four runs; 0.93-1.11
with both pinned to one CPU; 2026-12-02), so one server against the bench process measured which process
got the better placement as much as the product. Each of `ROUNDS` rounds therefore starts a fresh server
and a fresh raw process, both pinned (with this process and the round's Redis) to one CPU, the rounds
alternating CPUs, and the headline ratios are the median over rounds. Pinning also means the product's
fetch-pool thread cannot overlap its decoding with anything, as raw cannot: the comparison is like for like.

Raw means what one would write by hand: PIL open + convert, the weights' transforms, the plain
torchvision MobileNetV2 without its classifier, torch.no_grad.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
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
RAW_PROCESS_TIMEOUT_S = 300


@dataclass(frozen=True)
class Params:
    rounds: int
    singles: int
    cached: int
    batch: int
    batch_repeats: int


FULL = Params(rounds=6, singles=40, cached=40, batch=64, batch_repeats=2)
QUICK = Params(rounds=1, singles=2, cached=3, batch=4, batch_repeats=1)


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

    def single_s(self, path: Path) -> float:
        """Seconds for one file: read, decode, transform, forward."""
        started = time.perf_counter()
        self.forward(self.tensor(path).unsqueeze(0))
        return time.perf_counter() - started

    def batch(self, paths: list[Path]) -> dict:
        """Throughput on `paths`: decode + transform all, then forward at the best of RAW_BATCH_SIZES."""
        started = time.perf_counter()
        tensors = torch.stack([self.tensor(path) for path in paths])
        prepare_s = time.perf_counter() - started
        forward_s = {}
        for size in RAW_BATCH_SIZES:
            started = time.perf_counter()
            for start in range(0, len(paths), size):
                self.forward(tensors[start:start + size])
            forward_s[size] = time.perf_counter() - started
        best = min(forward_s, key=forward_s.get)
        return {"raw_prepare_s": round(prepare_s, 3), "raw_forward_s": {str(k): round(v, 3) for k, v in forward_s.items()},
                "raw_best_batch_size": best, "raw_img_per_s": round(len(paths) / (prepare_s + forward_s[best]), 2),
                "raw_forward_img_per_s": round(len(paths) / forward_s[best], 2)}


class RawProcess:
    """`RawPipeline` in a process of its own, as the server is: each call returns what the child measured
    (the pipe's time is not counted)."""

    def __init__(self, torch_threads: int):
        self.torch_threads = torch_threads

    def __enter__(self) -> "RawProcess":
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_serve_raw, args=(child, self.torch_threads), daemon=True)
        self._process.start()
        self._ask("ready", None)
        return self

    def __exit__(self, *exc_info) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send(None)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def single_s(self, path: Path) -> float:
        return self._ask("single", str(path))

    def batch(self, paths: list[Path]) -> dict:
        return self._ask("batch", [str(path) for path in paths])

    def _ask(self, kind: str, payload):
        self._pipe.send((kind, payload))
        if not self._pipe.poll(RAW_PROCESS_TIMEOUT_S):
            raise RuntimeError(f"the raw process did not answer {kind!r} within {RAW_PROCESS_TIMEOUT_S} s")
        return self._pipe.recv()


def _serve_raw(pipe, torch_threads: int) -> None:
    """The raw process: answers ("ready" | "single" | "batch", payload) until it receives None."""
    set_torch_threads(torch_threads)
    raw = RawPipeline()
    while (message := pipe.recv()) is not None:
        kind, payload = message
        if kind == "single":
            pipe.send(raw.single_s(Path(payload)))
        elif kind == "batch":
            pipe.send(raw.batch([Path(path) for path in payload]))
        else:
            pipe.send(True)


@contextlib.contextmanager
def pinned_to(cpu: int):
    """This process, and every process it starts meanwhile, on `cpu` only."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def move_to(pid: int, cpu: int) -> None:
    """Every thread of process `pid` onto `cpu` (a process's threads keep the CPUs they were started with)."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(thread), {cpu})


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    settings = Settings(local_files_document_root=str(data.HYMENOPTERA))
    set_torch_threads(settings.torch_threads)  # the server's default, for the raw baselines
    train, val = data.images("hymenoptera", "train"), data.images("hymenoptera", "val")
    random.Random(0).shuffle(val)
    classes = data.classes_of(train)
    config = data.label_config(classes)
    raw = RawPipeline()
    cpus = sorted(os.sched_getaffinity(0))
    rounds = []
    for number in range(params.rounds):
        cpu, other = cpus[number % len(cpus)], cpus[(number + 1) % len(cpus)]
        rounds.append(_round(number, cpu, other, params, settings, raw, train, val, classes, config, quick=quick))
        print(f"  round {number + 1}/{params.rounds} (CPU {cpu}): uncached {rounds[-1]['uncached_ratio']}x raw, "
              f"in process {rounds[-1]['in_process_ratio']}x, batch {rounds[-1]['batch_ratio']}x", flush=True)

    singles = [single for one in rounds for single in one["singles"]]
    batches = [batch for one in rounds for batch in one["batches"]]
    server_ms = [s["server_ms"] for s in singles]
    raw_ms = [s["raw_ms"] for s in singles]
    cached = [ms for one in rounds for ms in one["cached_ms"]]
    results = {
        "uncached_p50_ms": rounded(percentile(server_ms, 50), 1),
        "uncached_p95_ms": rounded(percentile(server_ms, 95), 1),
        "raw_p50_ms": rounded(percentile(raw_ms, 50), 1),
        "raw_p95_ms": rounded(percentile(raw_ms, 95), 1),
        "uncached_ratio": rounded(median(one["uncached_ratio"] for one in rounds), 2),
        "uncached_ratio_per_round": [one["uncached_ratio"] for one in rounds],
        "in_process_p50_ms": rounded(percentile([s["in_process_ms"] for s in singles], 50), 1),
        "in_process_raw_p50_ms": rounded(percentile([s["in_process_raw_ms"] for s in singles], 50), 1),
        "in_process_ratio": rounded(median(one["in_process_ratio"] for one in rounds), 2),
        "cached_p50_ms": rounded(percentile(cached, 50), 2),
        "cached_p95_ms": rounded(percentile(cached, 95), 2),
        "batch_tasks": params.batch,
        "batch_img_per_s": rounded(median(b["server_img_per_s"] for b in batches), 1),
        "raw_batch_img_per_s": rounded(median(b["raw_img_per_s"] for b in batches), 1),
        "batch_ratio": rounded(median(one["batch_ratio"] for one in rounds), 2),
        "batch_ratio_per_round": [one["batch_ratio"] for one in rounds],
        "raw_forward_only_img_per_s": rounded(median(b["raw_forward_img_per_s"] for b in batches), 1),
        "raw_best_batch_size": [b["raw_best_batch_size"] for b in batches],
        "torch_threads": settings.torch_threads,
        "server": {"workers": settings.workers, "threads": settings.threads},
        "rounds": rounds,
    }
    notes = ["hymenoptera val images (JPEG, median 500x375); server: `headstart serve` with default settings",
             f"{params.rounds} rounds, each a fresh server and a fresh raw process pinned with the bench to one CPU "
             "(rounds alternate CPUs); ratios are the median over rounds of each round's p50 ratio; ms are pooled",
             "uncached: Redis embedding-cache and media-digest keys flushed before each request; raw in its own process",
             "in_process: the product's Predictor called in the bench process against RawPipeline in the bench "
             "process (no HTTP, one process)"]
    goals = {"uncached_ratio": goal(results["uncached_ratio"], 1.2, at_least=False),
             "cached_p50_ms": goal(results["cached_p50_ms"], 10, at_least=False),
             "batch_ratio": goal(results["batch_ratio"], 0.9, at_least=True)}
    record = bench_run.finish(results, goals=goals, notes=notes)
    print_table("predict", ["what", "headstart", "raw", "ratio"], [
        ["1 uncached image, p50 ms", results["uncached_p50_ms"], results["raw_p50_ms"], results["uncached_ratio"]],
        ["1 uncached image, p95 ms", results["uncached_p95_ms"], results["raw_p95_ms"], ""],
        ["1 uncached image in process (no HTTP), p50 ms", results["in_process_p50_ms"],
         results["in_process_raw_p50_ms"], results["in_process_ratio"]],
        ["1 cached image, p50 ms", results["cached_p50_ms"], "", ""],
        [f"{params.batch} tasks, images/s", results["batch_img_per_s"], results["raw_batch_img_per_s"],
         results["batch_ratio"]],
    ])
    return record


def _round(number: int, cpu: int, other: int, params: Params, settings: Settings, raw: RawPipeline, train, val,
           classes, config: str, *, quick: bool) -> dict:
    """One fresh server and one fresh raw process, both on `cpu`; Redis and this process (the client, and the
    in-process measurements) on `other`, as a deployment's Redis does not share the backend's core."""
    with contextlib.ExitStack() as scope:
        with pinned_to(cpu):
            stack = scope.enter_context(Stack(env={"LOCAL_FILES_DOCUMENT_ROOT": str(data.HYMENOPTERA)}, quick=quick))
            raw_process = scope.enter_context(RawProcess(settings.torch_threads))
        move_to(stack.redis_server.process.pid, other)
        scope.enter_context(pinned_to(other))
        services = build_services(settings.replace(redis_url=stack.redis_server.url), stack.redis)
        _train_head(services, train, classes)
        client = stack.client()
        warm_up = val[:2 if quick else 8]
        _warm_up(stack, config, warm_up)
        for path, _ in warm_up:
            raw_process.single_s(path)
        items = val[(number * params.singles) % len(val):][:params.singles] or val[:params.singles]
        singles = _singles(stack, client, raw, raw_process, config, items, services)
        cached = _cached(client, config, items[0], params.cached)
        batches = [_batch(stack, client, raw_process, config, val[:params.batch]) for _ in range(params.batch_repeats)]
        client.close()
    server_ms, raw_ms = [s["server_ms"] for s in singles], [s["raw_ms"] for s in singles]
    return {"cpu": cpu, "redis_and_client_cpu": other,
            "uncached_ratio": rounded(percentile(server_ms, 50) / percentile(raw_ms, 50), 3),
            "in_process_ratio": rounded(percentile([s["in_process_ms"] for s in singles], 50)
                                        / percentile([s["in_process_raw_ms"] for s in singles], 50), 3),
            "batch_ratio": rounded(median(b["server_img_per_s"] / b["raw_img_per_s"] for b in batches), 3),
            "singles": singles, "cached_ms": cached, "batches": batches}


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


def _singles(stack: Stack, client, raw: RawPipeline, raw_process: RawProcess, config: str, items,
             services) -> list[dict]:
    """Per image: through the server against the raw process, and the product's Predictor called in this
    process against the raw pipeline in this process (which splits the server's overhead into HTTP serving
    and the feature path)."""
    measured = []
    for item in items:
        _flush_embeddings(stack)
        server_s = _predict(client, _body(config, [item]))
        raw_s = raw_process.single_s(item[0])
        _flush_embeddings(stack)
        started = time.perf_counter()
        services.predictor.predict(_body(config, [item])["tasks"], project=str(PROJECT), label_config=config)
        in_process_s = time.perf_counter() - started
        in_process_raw_s = raw.single_s(item[0])
        measured.append({"image": item[0].name, "server_ms": round(server_s * 1000, 2),
                         "raw_ms": round(raw_s * 1000, 2), "in_process_ms": round(in_process_s * 1000, 2),
                         "in_process_raw_ms": round(in_process_raw_s * 1000, 2)})
    return measured


def _cached(client, config: str, item, count: int) -> list[float]:
    body = _body(config, [item])
    _predict(client, body)
    return [round(_predict(client, body) * 1000, 3) for _ in range(count)]


def _batch(stack: Stack, client, raw_process: RawProcess, config: str, items) -> dict:
    _flush_embeddings(stack)
    server_s = _predict(client, _body(config, items))
    return {"server_s": round(server_s, 3), "server_img_per_s": round(len(items) / server_s, 2),
            **raw_process.batch([path for path, _ in items])}
