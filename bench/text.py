"""`text`: text classification on frozen all-MiniLM-L6-v2 (bbc-news), against its baselines in the same run.

- accuracy per k (labels per topic, 5 draws): heads the product trains (`train_version`, scored through the
  product's Predictor on all of val) against the dataset README's reference heads (logistic regression
  C=1, and a linear layer trained with Adam) fitted here on the same features.
- embedding throughput on CPU with 1 torch thread: the product's FeatureSource (prepare, sha256, cache
  writes) against the raw encoder (`SentenceTransformer.encode`, normalized) on the same texts, interleaved.
- retrain after one label: `retrain_project` (the worker job's pipeline: labels → features → fit → guard →
  save) after one new label whose text was never embedded, called in process.
- /predict through `headstart serve`: one task per request, p50 uncached (cache keys flushed) and cached.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.torch_runtime import set_torch_threads
from backend.loop.features import MediaItem
from backend.loop.retrain import retrain_project, train_version
from backend.loop.services import build_services
from backend.common.settings import Settings
from bench.accuracy import _adam_head, _logreg_accuracy
from bench.harness import RESULTS_DIR, Run, goal, median, percentile, print_table, rounded
from bench.resources import BBC_CLASSES, dataset_texts, offline_text_model
from bench.stack import Stack

NAME = "text"
CONTROL = "topic"
CONFIG = ('<View><Text name="text" value="$text"/><Choices name="topic" toName="text">'
          + "".join(f'<Choice value="{c}"/>' for c in BBC_CLASSES) + '</Choices></View>')
EMBED_CHUNK = 64


@dataclass(frozen=True)
class Params:
    ks: tuple
    seeds: int
    train_cap: int | None  # articles of train embedded (None: all)
    val_cap: int | None
    throughput_texts: int
    throughput_repeats: int
    retrains: int
    predicts: int


FULL = Params(ks=(1, 2, 5, 10, 20, "all"), seeds=5, train_cap=None, val_cap=None, throughput_texts=120,
              throughput_repeats=3, retrains=5, predicts=30)
QUICK = Params(ks=(1, 2), seeds=1, train_cap=40, val_cap=20, throughput_texts=6, throughput_repeats=1, retrains=1,
               predicts=3)


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    model = offline_text_model()
    settings = Settings(text_encoder=model)
    set_torch_threads(settings.torch_threads)
    train, val = _capped(dataset_texts("train"), params.train_cap), _capped(dataset_texts("val"), params.val_cap)

    with Stack(env={"TEXT_ENCODER": model, "HF_HUB_OFFLINE": "1"}, quick=quick) as stack:
        services = build_services(settings.replace(redis_url=stack.redis_server.url), stack.redis)
        encoder = services.encoders.for_input("text")
        throughput = _throughput(services, stack, encoder, val[:params.throughput_texts], params.throughput_repeats)
        accuracy = _accuracy(services, encoder, train, val, params)
        retrain = _retrain(services, train, params.retrains)
        predict = _predict(services, stack, val, params.predicts)

    worst_k, worst_gap = min(((k, cell["headstart"] - max(cell["ref_logreg"], cell["ref_linear"]))
                              for k, cell in accuracy.items()), key=lambda pair: pair[1])
    results = {
        "encoder": encoder.key, "train": len(train), "val": len(val), "accuracy": accuracy,
        "worst_gap": round(worst_gap, 2), "worst_gap_k": str(worst_k),
        **throughput, "retrain_s": retrain["median_s"], "retrain_runs": retrain["runs"],
        **predict, "torch_threads": settings.torch_threads,
    }
    notes = ["bbc-news (../shared/datasets/bbc-news), 5 topics; accuracy in % on val, mean over draws",
             "embedding: CPU, TORCH_THREADS=1, texts cut by the model's own truncation (256 word pieces)",
             "retrain_s: retrain_project in process after one new label (its text never embedded)",
             "predict: `headstart serve` with default settings, one task per request"]
    goals = {"worst_gap": goal(results["worst_gap"], 0, at_least=True),
             "embed_ratio": goal(results["embed_ratio"], 0.9, at_least=True)}
    record = bench_run.finish(results, goals=goals, notes=notes)
    print_table("text: accuracy (%) by labels per topic", ["k", "headstart", "ref logreg", "ref linear"],
                [[k, c["headstart"], c["ref_logreg"], c["ref_linear"]] for k, c in accuracy.items()])
    print_table("text: speed", ["what", "headstart", "raw", "ratio"], [
        ["texts/s embedded (CPU, 1 thread)", results["embed_texts_per_s"], results["raw_texts_per_s"],
         results["embed_ratio"]],
        ["retrain after one label, s", results["retrain_s"], "", ""],
        ["/predict 1 uncached text, p50 ms", results["predict_uncached_p50_ms"], "", ""],
        ["/predict 1 cached text, p50 ms", results["predict_cached_p50_ms"], "", ""],
    ])
    return record


def _capped(items: list, cap: int | None) -> list:
    if cap is None:
        return items
    per_class = max(1, cap // len(BBC_CLASSES))
    return [item for cls in BBC_CLASSES for item in [i for i in items if i[1] == cls][:per_class]]


def _items(texts, first_id: int) -> list[MediaItem]:
    return [MediaItem(first_id + i, text, inline=True) for i, (text, _) in enumerate(texts)]


def _flush_embeddings(stack: Stack) -> None:
    keys = list(stack.redis.scan_iter("headstart:emb:*", count=1000))
    if keys:
        stack.redis.delete(*keys)


def _throughput(services, stack, encoder, texts, repeats: int) -> dict:
    """Product FeatureSource against the raw encoder on the same texts, interleaved."""
    product, raw = [], []
    strings = [text for text, _ in texts]
    encoder.model.encode(strings[:4], normalize_embeddings=True)  # warm-up
    for _ in range(repeats):
        _flush_embeddings(stack)
        started = time.perf_counter()
        services.features.features("900", _items(texts, 0), encoder)
        product.append(len(texts) / (time.perf_counter() - started))
        started = time.perf_counter()
        encoder.model.encode(strings, batch_size=32, normalize_embeddings=True, convert_to_tensor=True)
        raw.append(len(texts) / (time.perf_counter() - started))
    return {"embed_texts_per_s": rounded(median(product), 2), "raw_texts_per_s": rounded(median(raw), 2),
            "embed_ratio": rounded(median(product) / median(raw), 3), "throughput_texts": len(texts)}


def _accuracy(services, encoder, train, val, params: Params) -> dict:
    """Per k: the product's heads (scored through its Predictor) and the two reference heads, same draws."""
    for start in range(0, len(train), EMBED_CHUNK):
        services.features.features("1", _items(train[start:start + EMBED_CHUNK], start), encoder)
    for start in range(0, len(val), EMBED_CHUNK):
        services.features.features("1", _items(val[start:start + EMBED_CHUNK], 100_000 + start), encoder)
    x = torch.stack(services.features.cached("1", _items(train, 0), encoder))
    x_val = torch.stack(services.features.cached("1", _items(val, 100_000), encoder))
    y = torch.tensor([BBC_CLASSES.index(cls) for _, cls in train])
    y_val = torch.tensor([BBC_CLASSES.index(cls) for _, cls in val])
    val_tasks = [{"id": 100_000 + i, "data": {"text": text}} for i, (text, _) in enumerate(val)]
    cells = {}
    for k in params.ks:
        scores = {"headstart": [], "ref_logreg": [], "ref_linear": []}
        for seed in range(1 if k == "all" else params.seeds):
            chosen = _draw(y, k, seed)
            trained = train_version(services.store, project="1", control=CONTROL, classes=list(BBC_CLASSES),
                                    multi_label=False, features=x[chosen], labels=[[train[i][1]] for i in chosen],
                                    task_ids=chosen, encoder=encoder)
            services.store.promote("1", CONTROL, trained.number)
            predictions, _ = services.predictor.predict_cached(val_tasks, project="1", label_config=CONFIG)
            correct = sum(p["result"] and p["result"][0]["value"]["choices"] == [cls]
                          for p, (_, cls) in zip(predictions, val))
            scores["headstart"].append(100.0 * correct / len(val))
            scores["ref_logreg"].append(_logreg_accuracy(x[chosen], y[chosen], x_val, y_val))
            head = _adam_head(x[chosen], y[chosen], len(BBC_CLASSES), seed)
            with torch.no_grad():
                scores["ref_linear"].append(100.0 * float((head(x_val).argmax(1) == y_val).float().mean()))
        cells[str(k)] = {name: round(statistics.fmean(values), 2) for name, values in scores.items()}
        cells[str(k)].update({f"{name}_std": round(statistics.pstdev(values), 2) for name, values in scores.items()})
    return cells


def _draw(y: torch.Tensor, k, seed: int) -> list[int]:
    if k == "all":
        return list(range(len(y)))
    rng = random.Random(seed)
    return sorted(i for label in range(len(BBC_CLASSES))
                  for i in rng.sample((y == label).nonzero().flatten().tolist(), min(k, int((y == label).sum()))))


def _annotation(task: int, cls: str) -> dict:
    return {"id": task, "task": task, "updated_at": "2026-01-01T00:00:00Z",
            "result": [{"from_name": CONTROL, "to_name": "text", "type": "choices", "value": {"choices": [cls]}}]}


def _retrain(services, train, runs: int) -> dict:
    """Seed 10 labels per topic, train once (warm-up), then time `runs` retrains each after one more label."""
    project = "2"
    services.projects.remember(project, CONFIG)
    per_class = {cls: [i for i, (_, label) in enumerate(train) if label == cls] for cls in BBC_CLASSES}
    seeded = [i for cls in BBC_CLASSES for i in per_class[cls][:2 if len(train) < 100 else 10]]
    for i in seeded:
        services.labels.put(project, _annotation(i, train[i][1]), {"id": i, "data": {"text": train[i][0]}})
    retrain_project(services, project, job_id="warm-up")
    fresh = [i for i in range(len(train)) if i not in set(seeded)][-runs:]
    measured = []
    for i in fresh:
        services.labels.put(project, _annotation(i, train[i][1]), {"id": i, "data": {"text": train[i][0]}})
        started = time.perf_counter()
        summary = retrain_project(services, project, job_id=f"bench-{i}")
        measured.append({"seconds": round(time.perf_counter() - started, 3),
                         "status": summary["controls"][CONTROL]["status"]})
    return {"median_s": rounded(median(run["seconds"] for run in measured), 3), "runs": measured}


def _predict(services, stack, val, count: int) -> dict:
    """/predict through gunicorn with the head the accuracy pass left served."""
    client = stack.client()

    def post(task_id: int, text: str) -> float:
        body = {"tasks": [{"id": task_id, "data": {"text": text}}], "project": "1.1", "label_config": CONFIG}
        started = time.perf_counter()
        status, answer = client.post("/predict", body)
        elapsed = time.perf_counter() - started
        if status != 200 or not answer["results"][0]["result"]:
            raise RuntimeError(f"/predict answered {status} without a prediction: {str(answer)[:300]}")
        return elapsed * 1000

    for i in range(4):  # every gunicorn worker loads the encoder
        post(i, val[i][0])
    uncached = []
    for i in range(count):
        _flush_embeddings(stack)
        uncached.append(post(i, val[i % len(val)][0]))
    cached = [post(0, val[0][0]) for _ in range(count)]
    client.close()
    return {"predict_uncached_p50_ms": rounded(percentile(uncached, 50), 1),
            "predict_uncached_p95_ms": rounded(percentile(uncached, 95), 1),
            "predict_cached_p50_ms": rounded(percentile(cached, 50), 2),
            "predict_cached_p95_ms": rounded(percentile(cached, 95), 2)}
