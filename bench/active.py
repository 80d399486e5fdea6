"""`active`: labels needed in Label Studio's random order against headstart's order, through a real Label Studio.

A simulated annotator asks Label Studio for the next task (`GET /api/projects/{id}/next`, what the
labeling stream does) and labels it with the truth, up to LABELS_PER_CLASS labels per class of
`train`. Random order: a project on Label Studio's "Uniform sampling" (no backend needed for its
order). headstart's order: a project connected to `headstart serve` + one `headstart worker` with
ACTIVE_LEARNING on; after each label the annotator waits until the worker is idle (the training and
the queue refresh a person's labeling time would cover). The order each run produced is then
scored offline: at every checkpoint, a head fitted with the product's recipe (`fit_head`) on the
labeled tasks' features, accuracy on all of `val`. Target: 95% of the accuracy with every `train`
label; `labels_to_target` is the first checkpoint at or above it (the budget + 1 when never).
AULC is the mean accuracy over the checkpoints. Writes bench/results/active.json and active.png.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from backend.common import redis_keys
from backend.core.head_fitting import fit_head
from backend.core.image_encoder import load_image_encoder
from backend.core.torch_runtime import set_torch_threads
from bench import data
from bench.accuracy import _accuracy, _embed
from bench.harness import RESULTS_DIR
from bench.label_studio import LabelStudioServer, ensure_installed
from bench.loop import LoopStack
from bench.ls_api import LabelStudioApi
from bench.processes import wait_until

NAME = "active"
SETS = ("hymenoptera", "flowers12")
ORDERS = ("random", "headstart")
LABELS_PER_CLASS = 20
QUICK_LABELS_PER_CLASS = {"hymenoptera": 20, "flowers12": 10}  # --quick: one seed, fewer flowers labels
TARGET_FRACTION = 0.95
IDLE_TIMEOUT_S = 120
FRONT_TIMEOUT_S = 600
IDLE_POLL_S = 0.1  # how often the annotator looks whether the worker is idle (0.5 s added 0.25 s a label)


def checkpoints(classes: int, budget: int) -> list[int]:
    step = 2 if classes <= 2 else classes // 2
    return list(range(step, budget + 1, step))


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR, seeds: int | None = None,
        sets: tuple[str, ...] = SETS) -> dict:
    """Measure `sets` (each with `seeds` seeds: 1 with --quick, else 3) and merge them into active.json: a set not
    measured keeps its earlier cell, so the sets can be measured in separate runs."""
    seeds = seeds if seeds is not None else 1 if quick else 3
    unknown = [name for name in sets if name not in SETS]
    if unknown or seeds < 1:
        raise ValueError(f"active: sets must be among {SETS} and seeds at least 1; got {list(sets)}, {seeds}")
    set_torch_threads(1)
    encoder = load_image_encoder("mobilenet_v2")
    root = Path(tempfile.mkdtemp(prefix="headstart-bench-active-"))
    results: dict = {"target_fraction": TARGET_FRACTION}
    try:
        with contextlib.ExitStack() as cleanup:
            documents = root / "documents"
            server = LabelStudioServer(ensure_installed(), data_dir=_mkdir(root / "label-studio"),
                                       documents_root=_mkdir(documents), log_path=root / "logs" / "label-studio.log")
            cleanup.callback(server.stop)
            server.start()
            api = LabelStudioApi(server.url, server.credentials.legacy_token)
            stack = LoopStack(env={"LABEL_STUDIO_URL": server.url,
                                   "LABEL_STUDIO_API_KEY": server.credentials.legacy_token,
                                   "LOCAL_FILES_DOCUMENT_ROOT": str(documents), "ACTIVE_LEARNING": "true",
                                   "LOG_LEVEL": "INFO"},
                              workers=1, serve=True, log_dir=root / "logs")
            cleanup.enter_context(stack)
            for name in sets:
                per_class = QUICK_LABELS_PER_CLASS[name] if quick else LABELS_PER_CLASS
                began = time.time()
                results[name] = {"seeds": seeds, "quick": quick,
                                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)),
                                 **_one_set(name, api, stack, documents, encoder, seeds, per_class)}
                results[name]["wall_s"] = round(time.time() - began, 1)
                print(json.dumps({k: v for k, v in results[name].items() if k != "curves"}), flush=True)
    except BaseException:
        print(f"active: failed; logs kept in {root / 'logs'}", file=sys.stderr, flush=True)
        raise
    results_dir.mkdir(parents=True, exist_ok=True)
    earlier = results_dir / f"{NAME}.json"
    kept = json.loads(earlier.read_text()) if earlier.exists() else {}
    results = {**{name: kept[name] for name in SETS if name in kept and name not in sets and "seeds" in kept[name]},
               **results}
    earlier.write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, results_dir / f"{NAME}.png")
    shutil.rmtree(root, ignore_errors=True)
    return results


def _one_set(name: str, api: LabelStudioApi, stack: LoopStack, documents: Path, encoder, seeds: int,
             per_class: int) -> dict:
    train, val = data.images(name, "train"), data.images(name, "val")
    classes = data.classes_of(train)
    folder = _mkdir(documents / name)
    for index, (path, _) in enumerate(train):
        shutil.copyfile(path, folder / f"{index:04d}.jpg")
    file_class = {f"{index:04d}.jpg": cls for index, (path, cls) in enumerate(train)}
    x_train, x_val = _embed(encoder, train), _embed(encoder, val)
    y_val = torch.tensor([classes.index(cls) for _, cls in val])
    everything = fit_head(x_train, torch.tensor([classes.index(cls) for _, cls in train]), num_classes=len(classes),
                          multi_label=False)
    ceiling = _accuracy(everything, x_val, y_val)
    budget = per_class * len(classes)
    marks = checkpoints(len(classes), budget)
    runs = {order: [] for order in ORDERS}
    for seed in range(seeds):
        for order in ORDERS:
            began = time.perf_counter()
            labeled = _label_through_label_studio(api, stack, name, folder, file_class, classes, order, budget, seed)
            index_of = {f"{index:04d}": index for index in range(len(train))}
            rows = [index_of[Path(file).stem] for file, _ in labeled]
            curve = [_score(x_train, rows[:mark], [classes.index(c) for _, c in labeled[:mark]], classes, x_val, y_val)
                     for mark in marks]
            runs[order].append({"curve": curve, "to_target": _to_target(curve, marks, ceiling, budget)})
            print(f"  {name} seed {seed} {order}: {budget} labels in {time.perf_counter() - began:.0f} s; "
                  f"accuracy at {marks[0]}/{marks[len(marks) // 4]}/{marks[-1]} labels: "
                  f"{curve[0]:.3f}/{curve[len(marks) // 4]:.3f}/{curve[-1]:.3f}", flush=True)
    mean_curve = {order: [round(statistics.mean(r["curve"][i] for r in runs[order]), 4) for i in range(len(marks))]
                  for order in ORDERS}
    to_target = {order: statistics.mean(r["to_target"] for r in runs[order]) for order in ORDERS}
    return {"classes": len(classes), "labels_per_class": per_class, "train": len(train), "val": len(val), "all_labels_accuracy": round(ceiling, 4),
            "target_accuracy": round(TARGET_FRACTION * ceiling, 4), "checkpoints": marks,
            "labels_to_target_random": round(to_target["random"], 1),
            "labels_to_target_headstart": round(to_target["headstart"], 1),
            "aulc_random": round(statistics.mean(mean_curve["random"]), 4),
            "aulc_headstart": round(statistics.mean(mean_curve["headstart"]), 4),
            "label_savings": round(1 - to_target["headstart"] / to_target["random"], 3),
            "per_seed_to_target": {order: [r["to_target"] for r in runs[order]] for order in ORDERS},
            "curves": mean_curve}


def _label_through_label_studio(api: LabelStudioApi, stack: LoopStack, name: str, folder: Path,
                                file_class: dict[str, str], classes: list[str], order: str, budget: int,
                                seed: int) -> list[tuple[str, str]]:
    """Label `budget` tasks in the order Label Studio's /next serves them; (file name, class) in that order."""
    project = api.create_project(f"{name} {order} {seed}", data.label_config(classes))["id"]
    api.add_local_storage(project, folder)
    file_of = {task["id"]: Path(task["data"]["image"].split("d=", 1)[1]).name for task in api.tasks(project)}
    if order == "random":
        api.patch(f"/api/projects/{project}", {"sampling": "Uniform sampling"})
    else:
        api.post("/api/ml", {"url": f"http://127.0.0.1:{stack.port}", "project": project, "title": "headstart"})
        wait_until(lambda: _front_published(api, stack, project), timeout_s=FRONT_TIMEOUT_S,
                   what=f"headstart's first picks for {name}")
    labeled = []
    for _ in range(budget):
        task = api.get(f"/api/projects/{project}/next")
        label = file_class[file_of[task["id"]]]
        api.post(f"/api/tasks/{task['id']}/annotations", {"result": [{
            "from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]})
        labeled.append((file_of[task["id"]], label))
        if order == "headstart":
            time.sleep(0.3)  # the webhook's training request lands
            wait_until(lambda: _idle(stack), timeout_s=IDLE_TIMEOUT_S, interval_s=IDLE_POLL_S, what="the worker idle")
    return labeled


def _front_published(api: LabelStudioApi, stack: LoopStack, project: int) -> bool:
    tag = stack.redis.hget(redis_keys.active(str(project)), "tag")
    return tag is not None and api.get(f"/api/projects/{project}")["model_version"] == tag.decode()


def _idle(stack: LoopStack) -> bool:
    from rq import Queue
    from rq.registry import StartedJobRegistry

    from backend.common.queues import QUEUE_NAMES
    return all(Queue(q, connection=stack.redis).count == 0 and
               StartedJobRegistry(q, connection=stack.redis).count == 0 for q in QUEUE_NAMES)


def _score(x_train, rows, labels, classes, x_val, y_val) -> float:
    if len(set(labels)) < 2:  # one class seen: every prediction is that class
        return 100.0 * float((y_val == labels[0]).float().mean()) if labels else 0.0
    head = fit_head(x_train[rows], torch.tensor(labels), num_classes=len(classes), multi_label=False)
    return _accuracy(head, x_val, y_val)


def _to_target(curve: list[float], marks: list[int], ceiling: float, budget: int) -> int:
    return next((mark for mark, accuracy in zip(marks, curve) if accuracy >= TARGET_FRACTION * ceiling), budget + 1)


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in SETS if name in results]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names):
        cell = results[name]
        for order, style in (("random", "--"), ("headstart", "-")):
            axis.plot(cell["checkpoints"], cell["curves"][order], style, label=f"{order} (Label Studio /next)")
        axis.axhline(cell["target_accuracy"], color="grey", linewidth=0.8, label="95% of all labels")
        axis.set_title(f"{name}: {cell['classes']} classes, {cell['seeds']} seed(s)")
        axis.set_xlabel("labels")
        axis.set_ylabel("val accuracy")
        axis.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
