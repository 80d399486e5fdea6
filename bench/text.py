"""`text`: text classification on frozen all-MiniLM-L6-v2 (bbc-news), against its baselines in the same run.

- accuracy per k (labels per topic, 20 draws, each cell with its gap's standard error over the draws, or at
  k=all, one draw, over the articles): heads the product
  trains (`train_version`, scored through the product's Predictor on all of val) against the dataset
  README's reference heads (logistic regression C=1, and a linear layer trained with Adam) fitted here on
  the same features, and the recipe the product chose per draw. The product's training is given, as the job
  gives it the project's unlabeled tasks (`unlabeled_pool`), the features of the rest of train (their labels
  unread); val is never in it. The features are the product's (FeatureSource into its Redis cache); each article is
  embedded once and its vector kept in HEADSTART_BENCH_EMBEDDINGS (default ~/.cache/headstart/bench-embeddings,
  `bench.embedding_files`: one file per encoder key and library versions, one vector per sha256 of the
  text), so a re-run loads them into the product's cache instead of embedding 2,125 articles again.
  --quick neither reads nor writes that folder. Goal: no cell below the better reference by more than two
  standard errors of its gap (`worst_gap_stderrs` ≥ -2; the dataset README's "match or beat" as a test).
- embedding throughput on CPU with 1 torch thread: the product's FeatureSource (prepare, sha256, cache
  writes; its embedding cache flushed first, never the file above) against the raw encoder
  (`SentenceTransformer.encode`, normalized) on the same texts, interleaved chunk by chunk.
- retrain after one label: `retrain_project` (the worker job's pipeline: labels → features → fit → guard →
  save) after one new label whose text's embedding is deleted first, called in process.
- /predict through `headstart serve`: one task per request, p50 uncached (cache keys flushed) and cached.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.common import redis_keys
from backend.core.embedding_cache import EmbeddingCache, content_digest
from backend.core.torch_runtime import set_torch_threads
from backend.loop.features import MediaItem
from backend.loop.retrain import retrain_project, train_version
from backend.loop.services import build_services
from backend.common.settings import Settings
from bench.accuracy import _adam_head, gap_stderr, logreg_predictions, unlabeled_rest
from bench.embedding_files import EmbeddingFiles
from bench.harness import RESULTS_DIR, Run, goal, median, percentile, print_table, rounded
from bench.resources import BBC_CLASSES, dataset_texts, offline_text_model
from bench.stack import Stack

NAME = "text"
CONTROL = "topic"
CONFIG = ('<View><Text name="text" value="$text"/><Choices name="topic" toName="text">'
          + "".join(f'<Choice value="{c}"/>' for c in BBC_CLASSES) + '</Choices></View>')
EMBED_CHUNK = 64
ADAM_STEP_PROBES = (200, 300, 600)  # k=all: the Adam reference at fewer and more steps than its 300
GAP_STDERRS = -2.0  # goal: no cell's gap to the better reference more than 2 standard errors below zero
THROUGHPUT_CHUNK = 24  # texts per interleaved pair (product, raw): short pairs see the same load on both sides


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


FULL = Params(ks=(1, 2, 5, 10, 20, "all"), seeds=20, train_cap=None, val_cap=None, throughput_texts=120,
              throughput_repeats=3, retrains=5, predicts=30)
QUICK = Params(ks=(1, 2), seeds=1, train_cap=40, val_cap=20, throughput_texts=6, throughput_repeats=1, retrains=1,
               predicts=3)


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    model = offline_text_model()
    files_dir = None if quick else Path(os.environ.get("HEADSTART_BENCH_EMBEDDINGS")
                                        or Path.home() / ".cache" / "headstart" / "bench-embeddings")
    settings = Settings(text_encoder=model)
    set_torch_threads(settings.torch_threads)
    train, val = _capped(dataset_texts("train"), params.train_cap), _capped(dataset_texts("val"), params.val_cap)

    with Stack(env={"TEXT_ENCODER": model, "HF_HUB_OFFLINE": "1"}, quick=quick) as stack:
        services = build_services(settings.replace(redis_url=stack.redis_server.url), stack.redis)
        encoder = services.encoders.for_input("text")
        sections = _Sections()
        with sections.timed("throughput"):
            throughput = _throughput(services, stack, encoder, val[:params.throughput_texts],
                                     params.throughput_repeats)
        files = EmbeddingFiles(files_dir, encoder.key) if files_dir else None
        with sections.timed("accuracy"):
            accuracy, features_source = _accuracy(services, encoder, train, val, params, files)
        with sections.timed("retrain"):
            retrain = _retrain(services, encoder, train, params.retrains)
        with sections.timed("predict"):
            predict = _predict(services, stack, val, params.predicts)

    worst_k, worst_gap = min(((k, gap_of(cell)) for k, cell in accuracy.items()), key=lambda pair: pair[1])
    results = {
        "encoder": encoder.key, "train": len(train), "val": len(val), "accuracy": accuracy,
        "accuracy_features": features_source,
        "worst_gap": round(worst_gap, 2), "worst_gap_k": str(worst_k),
        "worst_gap_stderrs": worst_gap_in_stderrs(accuracy),
        **throughput, "retrain_s": retrain["median_s"], "retrain_runs": retrain["runs"],
        **predict, "torch_threads": settings.torch_threads, "section_s": sections.seconds,
    }
    notes = ["bbc-news (../shared/datasets/bbc-news), 5 topics; accuracy in % on val, mean over draws",
             "embedding: CPU, TORCH_THREADS=1, texts cut by the model's own truncation (256 word pieces); "
             f"{THROUGHPUT_CHUNK}-text pairs, product and raw back to back, first side alternating; "
             "embed_ratio = raw seconds / product seconds summed over the pairs (embed_ratio_cpu: process CPU time)",
             "accuracy features: the product's, embedded in this run or read from the embedding file of an "
             "earlier run with the same encoder and library versions (accuracy_features says how many of each)",
             "retrain_s: retrain_project in process after one new label (its text's embedding deleted first)",
             "predict: `headstart serve` with default settings, one task per request"]
    goals = {"worst_gap_stderrs": goal(results["worst_gap_stderrs"], GAP_STDERRS, at_least=True),
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


class _Sections:
    """Wall seconds per section of the run, so a slow run says where its time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 1)


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
    """Product FeatureSource against the raw encoder on the same texts, interleaved chunk by chunk.

    Each pair embeds one chunk both ways back to back, the side that goes first alternating, so load from
    other processes falls on both sides alike; the ratio is over the summed times of all pairs."""
    strings = [text for text, _ in texts]
    encoder.model.encode(strings[:4], normalize_embeddings=True)  # warm-up
    spent = {"product": [0.0, 0.0], "raw": [0.0, 0.0]}  # wall s, process CPU s
    pair_ratios = []
    for _ in range(repeats):
        for start in range(0, len(texts), THROUGHPUT_CHUNK):
            chunk, items = strings[start:start + THROUGHPUT_CHUNK], _items(texts[start:start + THROUGHPUT_CHUNK], start)
            sides = {
                "product": lambda: services.features.features("900", items, encoder),
                "raw": lambda: encoder.model.encode(chunk, batch_size=32, normalize_embeddings=True,
                                                    convert_to_tensor=True),
            }
            order = ["product", "raw"] if len(pair_ratios) % 2 == 0 else ["raw", "product"]
            _flush_embeddings(stack)
            pair = {}
            for side in order:
                wall, cpu = time.perf_counter(), time.process_time()
                sides[side]()
                pair[side] = time.perf_counter() - wall
                spent[side][0] += pair[side]
                spent[side][1] += time.process_time() - cpu
            pair_ratios.append(pair["raw"] / pair["product"])
    embedded = len(texts) * repeats
    return {"embed_texts_per_s": rounded(embedded / spent["product"][0], 2),
            "raw_texts_per_s": rounded(embedded / spent["raw"][0], 2),
            "embed_ratio": rounded(spent["raw"][0] / spent["product"][0], 3),
            "embed_ratio_cpu": rounded(spent["raw"][1] / spent["product"][1], 3),
            "embed_pair_ratios": [rounded(min(pair_ratios), 3), rounded(median(pair_ratios), 3),
                                  rounded(max(pair_ratios), 3)],
            "throughput_texts": len(texts), "throughput_pairs": len(pair_ratios)}


def _features(services, encoder, texts, first_id: int, files: EmbeddingFiles | None) -> tuple[torch.Tensor, dict]:
    """The product's cached features of `texts` (as inline tasks from `first_id`), and how many were read from
    `files` (put into the product's cache as they are) and embedded now (through its FeatureSource)."""
    items = _items(texts, first_id)
    digests = [content_digest(item.inline_bytes()) for item in items]
    stored = files.get_many(digests) if files is not None else {}
    EmbeddingCache(services.redis, encoder.key).put_many(stored)
    missing = [i for i, vector in enumerate(services.features.cached("1", items, encoder)) if vector is None]
    for start in range(0, len(missing), EMBED_CHUNK):
        services.features.features("1", [items[i] for i in missing[start:start + EMBED_CHUNK]], encoder)
    vectors = services.features.cached("1", items, encoder)
    unfiled = {digest: vector for digest, vector in zip(digests, vectors) if digest not in stored}
    if files is not None and unfiled:  # also those the throughput pass left in the product's cache
        files.put_many(unfiled)
    return torch.stack(vectors), {"embedded": len(missing), "from_file": len(stored)}


def _accuracy(services, encoder, train, val, params: Params, files: EmbeddingFiles | None) -> tuple[dict, dict]:
    """Per k: the product's heads (scored through its Predictor) and the two reference heads, same draws;
    and where the features came from."""
    x, from_train = _features(services, encoder, train, 0, files)
    x_val, from_val = _features(services, encoder, val, 100_000, files)
    source = {key: from_train[key] + from_val[key] for key in ("embedded", "from_file")}
    source["file"] = files.path.name if files else None
    y = torch.tensor([BBC_CLASSES.index(cls) for _, cls in train])
    y_val = torch.tensor([BBC_CLASSES.index(cls) for _, cls in val])
    val_tasks = [{"id": 100_000 + i, "data": {"text": text}} for i, (text, _) in enumerate(val)]
    cells = {}
    for k in params.ks:
        scores = {"headstart": [], "ref_logreg": [], "ref_linear": []}
        hits: dict[str, torch.Tensor] = {}  # the last draw's per-article correctness (k=all has one draw)
        recipes: dict[str, int] = {}
        for seed in range(1 if k == "all" else params.seeds):
            chosen = _draw(y, k, seed)
            trained = train_version(services.store, project="1", control=CONTROL, classes=list(BBC_CLASSES),
                                    multi_label=False, features=x[chosen], labels=[[train[i][1]] for i in chosen],
                                    task_ids=chosen, encoder=encoder, pool=unlabeled_rest(x, chosen))
            services.store.promote("1", CONTROL, trained.number)
            recipes[trained.meta["recipe"]] = recipes.get(trained.meta["recipe"], 0) + 1
            predictions, _ = services.predictor.predict_cached(val_tasks, project="1", label_config=CONFIG)
            head = _adam_head(x[chosen], y[chosen], len(BBC_CLASSES), seed)
            with torch.no_grad():
                hits = {"headstart": torch.tensor([bool(p["result"]) and p["result"][0]["value"]["choices"] == [cls]
                                                   for p, (_, cls) in zip(predictions, val)]),
                        "ref_logreg": logreg_predictions(x[chosen], y[chosen], x_val) == y_val,
                        "ref_linear": head(x_val).argmax(1) == y_val}
            for name, correct in hits.items():
                scores[name].append(100.0 * float(correct.float().mean()))
        cells[str(k)] = {name: round(statistics.fmean(values), 2) for name, values in scores.items()}
        cells[str(k)].update({f"{name}_std": round(statistics.pstdev(values), 2) for name, values in scores.items()})
        if len(scores["headstart"]) > 1:
            cells[str(k)].update(gap_stderr=gap_stderr(scores), gap_stderr_over="draws")
        else:  # one draw (k=all): the paired differences are the articles'
            per_article = {name: (100.0 * correct.float()).tolist() for name, correct in hits.items()}
            cells[str(k)].update(gap_stderr=gap_stderr(per_article), gap_stderr_over="articles")
        cells[str(k)]["recipes"] = recipes
        if k == "all":
            cells[str(k)]["recipe_evidence"] = trained.meta["selection"].get("evidence", {})
            cells[str(k)]["ref_linear_by_steps"] = _adam_by_steps(x, y, x_val, y_val)
    return cells, source


def _adam_by_steps(x, y, x_val, y_val) -> dict[str, float]:
    """The Adam reference on all labels (seed 0) at fewer and more steps than its 300: how much of its
    figure is its step count."""
    accuracy = {}
    for steps in ADAM_STEP_PROBES:
        with torch.no_grad():
            predicted = _adam_head(x, y, len(BBC_CLASSES), 0, steps=steps)(x_val).argmax(1)
        accuracy[str(steps)] = round(100.0 * float((predicted == y_val).float().mean()), 2)
    return accuracy


def gap_of(cell: dict) -> float:
    """A cell's product accuracy minus the better reference's, in points."""
    return cell["headstart"] - max(cell["ref_logreg"], cell["ref_linear"])


def worst_gap_in_stderrs(accuracy: dict) -> float:
    """The lowest cell's gap to the better reference in units of its standard error (`gap_stderr`); a cell
    below the reference whose gap has no spread to measure counts as infinitely far below."""
    ratios = []
    for cell in accuracy.values():
        gap = gap_of(cell)
        stderr = cell.get("gap_stderr") or 0.0
        ratios.append(gap / stderr if stderr > 0 else (0.0 if gap >= 0 else -math.inf))
    return round(min(ratios), 2)


def _draw(y: torch.Tensor, k, seed: int) -> list[int]:
    if k == "all":
        return list(range(len(y)))
    rng = random.Random(seed)
    return sorted(i for label in range(len(BBC_CLASSES))
                  for i in rng.sample((y == label).nonzero().flatten().tolist(), min(k, int((y == label).sum()))))


def _annotation(task: int, cls: str) -> dict:
    return {"id": task, "task": task, "updated_at": "2026-01-01T00:00:00Z",
            "result": [{"from_name": CONTROL, "to_name": "text", "type": "choices", "value": {"choices": [cls]}}]}


def _retrain(services, encoder, train, runs: int) -> dict:
    """Seed 10 labels per topic, train once (warm-up), then time `runs` retrains each after one more label
    whose text's embedding is deleted first, so the retrain embeds it."""
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
        digest = content_digest(_items([train[i]], i)[0].inline_bytes())
        services.redis.delete(redis_keys.embedding(encoder.key, digest))
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
