"""What the label audit says, for people: suspects with links to their tasks, the auto-accept coverage line,
and the export of human labels plus machine labels above a precision target.

Reads the audits `backend.loop.audit` stored; changes nothing. Machine labels exist only in an export: they are
never written to the label mirror, so headstart never trains on them.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from backend.common.errors import NotEnoughLabels
from backend.core.audit import Threshold, auto_accept_thresholds
from backend.labelstudio.labeling_config import parse_label_config
from backend.loop.audit import latest, machine_labels
from backend.loop.retrain import current_head
from backend.loop.repredict import unlabeled_task_ids
from backend.loop.services import Services


def task_link(label_studio_url: str, project: str, task: int) -> str | None:
    """The task opened in Label Studio's Data Manager, or None without LABEL_STUDIO_URL."""
    if not label_studio_url:
        return None
    return f"{label_studio_url.rstrip('/')}/projects/{project}/data?task={task}"


def suspects(services: Services, project: str) -> list[dict]:
    """Per control: its latest audit's verdict, suspects most likely wrong first (with links) and conflicts."""
    config = services.projects.label_config(project)
    controls = [spec.control for spec in parse_label_config(config)] if config else services.store.controls(project)
    views = []
    for control in controls:
        record = latest(services, project, control)
        if record is None:
            views.append({"control": control, "audited": False, "judged": False,
                          "reason": "no audit yet: it runs after the first training that fits a head",
                          "suspects": [], "conflicts": []})
            continue
        url = services.settings.label_studio_url
        views.append({"control": control, "audited": True, "judged": record["judged"], "reason": record["reason"],
                      "model_version": record["model_version"], "at": record["at"], "labels": record["labels"],
                      "suspects": [{**s, "link": task_link(url, project, s["task"])} for s in record["suspects"]],
                      "conflicts": record["conflicts"], "auto_accept": record.get("auto_accept")})
    return views


def coverage_line(auto_accept: dict | None) -> str | None:
    """"at 98% precision the model would label 1,240 of 3,100 remaining tasks", or None before any audit."""
    if not auto_accept:
        return None
    line = (f"at {auto_accept['target']:.0%} precision the model would label {auto_accept['would_label']:,} "
            f"of {auto_accept['remaining']:,} remaining tasks")
    missing = auto_accept["remaining"] - auto_accept["embedded"]
    return line + (f" ({missing:,} not embedded yet)" if missing > 0 else "")


def coverage(services: Services, project: str) -> list[dict]:
    """Per audited control: the coverage line and the per-class thresholds."""
    return [{"control": view["control"], "line": coverage_line(view.get("auto_accept")),
             "thresholds": (view.get("auto_accept") or {}).get("thresholds")}
            for view in suspects(services, project) if view.get("auto_accept")]


def export_lines(services: Services, project: str, *, min_precision: float) -> Iterator[dict]:
    """Label Studio export records (JSON lines): every human-labeled task with its annotations, then every
    unlabeled task that every served head labels at `min_precision` or better, as a prediction marked `machine`."""
    config = services.projects.label_config(project)
    specs = parse_label_config(config) if config else []
    heads = {spec.control: current_head(services, project, spec) for spec in specs}
    if not specs or not any(heads.values()):
        raise NotEnoughLabels(f"Project {project} has no head yet, so there are no machine labels to export: label "
                              "a few tasks of each class and let a training finish (`headstart models "
                              f"{project}`), then export again.")
    human: dict[int, dict] = {}
    for record in services.labels.records(project):
        if record.get("cancelled"):
            continue
        task = human.setdefault(record["task"], {"id": record["task"], "data": record["data"], "annotations": [],
                                                 "predictions": [], "label_source": "human"})
        task["annotations"].append({"result": record["result"], "ground_truth": record["ground_truth"],
                                    "updated_at": record["updated_at"]})
    yield from (human[task] for task in sorted(human))
    remaining = unlabeled_task_ids(services, project)
    results: dict[int, list[dict]] = {}
    scores: dict[int, float] = {}
    versions = []
    for spec in specs:
        head = heads[spec.control]
        record = latest(services, project, spec.control)
        if head is None or not record or not record.get("out_of_fold"):
            continue
        versions.append(f"{spec.control}-v{head.number}")
        thresholds = _thresholds(record, spec, min_precision, services.settings.multi_label_threshold)
        for task, (label, confidence) in machine_labels(services, project, spec, head, remaining, thresholds).items():
            if label is not None:
                results.setdefault(task, []).append(spec.result(label))
                scores[task] = min(confidence, scores.get(task, 1.0))
    complete = [task for task in sorted(results) if len(results[task]) == len(versions)]  # every control labeled
    data = services.tasks.data(project, complete)
    for task in complete:
        yield {"id": task, "data": data.get(task, {}), "annotations": [], "label_source": "machine",
               "predictions": [{"result": results[task], "score": scores[task], "model_version": "+".join(versions),
                                "machine_label": True, "min_precision": min_precision,
                                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]}


def _thresholds(record: dict, spec, min_precision: float, multi_label_threshold: float) -> dict[str, Threshold]:
    oof = record["out_of_fold"]
    return auto_accept_thresholds(torch.tensor(oof["probabilities"]), oof["labels"], oof["classes"],
                                  multi_label=spec.multi_label, target=min_precision,
                                  multi_label_threshold=multi_label_threshold)
