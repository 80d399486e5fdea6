"""`retrain`: one more annotation on a project of ~1,000 labeled images, until the new head is served.

headstart: POST /webhook ANNOTATION_CREATED to `headstart serve` (gunicorn) with `headstart worker`
listening, timed until the store's current pointer names the new version (then /setup is checked
to report it). The project's 950-odd earlier labels are seeded into the label mirror and their
embeddings cached through the product's FeatureSource, as months of labeling would have left them.

Baselines, in the same run: the naive recipe (bench.naive: re-decode everything, 10 epochs through
the frozen network), measured at two smaller label counts and extrapolated along that line to the
project's size, because at 1,000 labels it alone would take most of the 20-minute budget (the JSON
and the table say so); and the physical floor, decode + embed the one new image and fit the head on
the cached features, called directly (backend.core). `core_s` adds the promotion guard's
cross-validation to the floor, which splits headstart's time into serving machinery and validation.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.torch_runtime import set_torch_threads
from backend.core.images import decode_image
from backend.core.head_fitting import encode_targets
from backend.core.head_fitting import cross_validate, fit_head
from backend.loop.features import MediaItem
from backend.labelstudio.label_mirror import LabelStore, annotation_record
from backend.labelstudio.projects import ProjectRegistry
from backend.loop.services import build_services
from backend.common.settings import Settings
from bench import data
from bench.harness import RESULTS_DIR, Run, goal, median, print_table, rounded
from bench.naive import naive_retrain
from bench.stack import Stack

PROJECT = 1
NAME = "retrain"
POLL_S = 0.002
SERVE_TIMEOUT_S = 120
EMBED_CHUNK = 64


@dataclass(frozen=True)
class Params:
    seed_labels: int                 # labels the project has before the measured annotations
    repeats: int                     # measured annotations (one retrain each)
    naive_sizes: tuple[int, ...]     # label counts the naive baseline is measured at
    naive_epochs: int = 10


FULL = Params(seed_labels=952, repeats=7, naive_sizes=(48, 192))
QUICK = Params(seed_labels=24, repeats=1, naive_sizes=(6, 12), naive_epochs=1)


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    items = data.images("flowers12", "train", "val")
    random.Random(0).shuffle(items)
    classes = data.classes_of(items)
    config = data.label_config(classes)
    seeded, arriving = items[:params.seed_labels], items[params.seed_labels:params.seed_labels + 1 + params.repeats]
    settings = Settings(local_files_document_root=str(data.FLOWERS))
    set_torch_threads(settings.torch_threads)  # the worker's default, for the floor measured here

    with Stack(env={"LOCAL_FILES_DOCUMENT_ROOT": str(data.FLOWERS)}, worker=True, quick=quick) as stack:
        services = build_services(settings.replace(redis_url=stack.redis_server.url), stack.redis)
        _seed(services, seeded, config)
        client = stack.client()
        label_count = len(seeded)
        # the first arrival trains version 1 (and warms the worker up); it is not timed
        _annotate(stack, client, services, config, arriving[0], label_count)
        label_count += 1
        runs = []
        for item in arriving[1:]:
            time.sleep(0 if quick else settings.train_min_interval_s + 0.5)  # quiet: the next submit trains at once
            headstart = _annotate(stack, client, services, config, item, label_count)
            label_count += 1
            runs.append({**headstart, **_direct(services, seeded + arriving[:label_count - len(seeded)], classes)})
        client.close()

    naive = [naive_retrain(seeded[:size], epochs=params.naive_epochs) for size in params.naive_sizes]
    served = [r for r in runs if r["outcome"] == "promoted"]
    headstart_s = median(r["headstart_s"] for r in served) if served else None
    floor_s = median(r["floor_s"] for r in runs)
    core_s = median(r["core_s"] for r in runs)
    slope, intercept = _line([(n["labels"], n["seconds"]) for n in naive])
    naive_s = intercept + slope * label_count
    largest = naive[-1]
    results = {
        "labels": label_count,
        "headstart_s": rounded(headstart_s),
        "submit_to_served_p50_s": rounded(headstart_s),  # the same median, under the name the checks read
        "naive_s": rounded(naive_s, 1),
        "floor_s": rounded(floor_s, 4),
        "speedup_vs_naive": rounded(naive_s / headstart_s, 1) if served else None,
        "ratio_to_floor": rounded(headstart_s / floor_s, 2) if served else None,
        "naive_extrapolated": True,
        "naive_measured": [{"labels": n["labels"], "seconds": rounded(n["seconds"], 2),
                            "decode_s": rounded(n["decode_s"], 2)} for n in naive],
        "naive_epochs": params.naive_epochs,
        "naive_s_per_label": rounded(slope, 4),
        "speedup_vs_naive_measured_lower_bound": rounded(largest["seconds"] / headstart_s, 1) if served else None,
        "core_s": rounded(core_s, 4),
        "ratio_to_core": rounded(headstart_s / core_s, 2) if served else None,
        "rejected_runs": len(runs) - len(served),
        "runs": runs,
    }
    sizes = " and ".join(str(n["labels"]) for n in naive)
    notes = [
        f"naive_s is EXTRAPOLATED to {label_count} labels from naive runs measured at {sizes} labels "
        f"({params.naive_epochs} epochs each; a straight line through them, its cost being linear in labels); "
        f"measuring it at {label_count} would take most of this benchmark budget. "
        "speedup_vs_naive_measured_lower_bound compares with the largest measured naive run instead",
        "headstart_s: median over promoted runs of POST /webhook → the store's current pointer names the new "
        "version (rejected runs, if any, never serve a new version and are listed in runs)",
        "floor_s: decode + embed the new image and fit_head on the cached features, in this process, "
        f"{settings.torch_threads} torch thread(s) like the worker",
        "core_s: floor_s plus the 5-fold cross-validation the promotion guard runs (backend.core, no HTTP/queue)",
    ]
    goals = {"speedup_vs_naive": goal(results["speedup_vs_naive"], 100, at_least=True),
             "ratio_to_floor": goal(results["ratio_to_floor"], 1.5, at_least=False),
             "submit_to_served_p50_s": goal(results["submit_to_served_p50_s"], 1.0, at_least=False)}
    record = bench_run.finish(results, goals=goals, notes=notes)
    print_table(f"retrain ({label_count} labels)", ["what", "seconds"], [
        ["headstart: webhook → new version served", headstart_s],
        ["floor: embed 1 image + fit head", floor_s],
        ["core: floor + the guard's cross-validation", core_s],
        *[[f"naive: LS example recipe, measured at {n['labels']} labels", n["seconds"]] for n in naive],
        [f"naive: extrapolated to {label_count} labels", naive_s],
        ["speedup vs naive (extrapolated)", results["speedup_vs_naive"]],
        [f"speedup vs naive measured at {largest['labels']} (lower bound)",
         results["speedup_vs_naive_measured_lower_bound"]],
        ["ratio to floor", results["ratio_to_floor"]],
    ])
    return record


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through `points`."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return slope, mean_y - slope * mean_x


def _seed(services, items, config: str) -> None:
    """Labels in the mirror (marked synced) and their embeddings cached, as a long-running project has."""
    project = str(PROJECT)
    ProjectRegistry(services.redis).remember(project, config)
    records = {}
    for task_id, (path, cls) in enumerate(items, start=1):
        records[task_id] = annotation_record(data.annotation(task_id, task_id, cls),
                                             data.task(task_id, data.local_url(data.FLOWERS, path)))
    LabelStore(services.redis).replace_all(project, records)
    encoder = services.encoders.get()
    media = [MediaItem(task_id, data.local_url(data.FLOWERS, path)) for task_id, (path, _) in enumerate(items, 1)]
    for start in range(0, len(media), EMBED_CHUNK):
        services.features.features(project, media[start:start + EMBED_CHUNK], encoder)


def _annotate(stack: Stack, client, services, config: str, item, label_count: int) -> dict:
    """Post one ANNOTATION_CREATED and time it until its version is served (or rejected)."""
    path, cls = item
    task_id = label_count + 1
    project = str(PROJECT)
    expected = max((meta["version"] for meta in services.store.versions(project, data.CONTROL)), default=0) + 1
    body = data.webhook_event(data.recorded_body("ANNOTATION_CREATED"), project=PROJECT, config=config,
                              annotation_=data.annotation(task_id, task_id, cls),
                              task_=data.task(task_id, data.local_url(data.FLOWERS, path)))
    started = time.perf_counter()
    status, answer = client.post("/webhook", body)
    if status != 200:
        raise RuntimeError(f"/webhook answered {status}: {answer}")
    outcome = _wait_for_version(stack, services, project, expected)
    seconds = time.perf_counter() - started
    meta = services.store.meta(project, data.CONTROL, expected)
    served = client.post("/setup", {"project": f"{PROJECT}.1", "schema": config})[1].get("model_version")
    if outcome == "promoted" and served != f"{data.CONTROL}-v{expected}":
        raise RuntimeError(f"version {expected} was promoted but /setup serves {served}")
    return {"labels": label_count + 1, "headstart_s": round(seconds, 4), "outcome": outcome, "version": expected,
            "job_train_seconds": meta.get("train_seconds"), "job_fit_seconds": meta.get("fit_seconds"),
            "served": served}


def _wait_for_version(stack: Stack, services, project: str, number: int) -> str:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while True:
        if services.store.current_number(project, data.CONTROL) == number:
            return "promoted"
        meta = services.store.meta(project, data.CONTROL, number)
        if meta is not None and meta.get("status") == "rejected":
            return "rejected"
        if time.monotonic() > deadline:
            raise RuntimeError(f"version {number} was not served within {SERVE_TIMEOUT_S} s\n"
                               f"{stack.log_tail('worker')}")
        time.sleep(POLL_S)


def _direct(services, items, classes: list[str]) -> dict:
    """The same work called directly: decode + embed the last item, fit a head on it plus the others'
    cached features (floor_s), and also run the guard's cross-validation (core_s)."""
    encoder = services.encoders.get()
    *known, (new_path, _) = items
    cached = services.features.features(
        str(PROJECT), [MediaItem(i, data.local_url(data.FLOWERS, path)) for i, (path, _) in enumerate(known, 1)],
        encoder)
    cached = torch.stack(cached)
    targets = encode_targets([[cls] for _, cls in items], classes, multi_label=False)
    started = time.perf_counter()
    image = decode_image(new_path.read_bytes(), max_pixels=services.settings.media_max_pixels,
                         min_side=encoder.resize_size)
    features = torch.cat([cached, encoder.embed([image])])
    fit_head(features, targets, num_classes=len(classes), multi_label=False)
    floor_s = time.perf_counter() - started
    cross_validate(features, targets, num_classes=len(classes), multi_label=False)
    return {"floor_s": round(floor_s, 4), "core_s": round(time.perf_counter() - started, 4)}
