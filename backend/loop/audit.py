"""The label audit after a training: suspect labels, near-duplicate conflicts and auto-accept coverage
per control, kept in Redis next to the served version, and suspect markers in Label Studio.

It runs as its own background job (`worker.jobs.audit_labels`), queued after each training that fitted
a head, so a training never waits for it. It reads the label mirror the training just confirmed and
the cached features (it embeds nothing), computes its own out-of-fold probabilities with the head
fitting functions (`backend.core.audit`: the default recipe's for the suspects, the served head's recipe's for
auto-accept, whose thresholds are applied to that head), and changes no label: a suspect stays a suspect until a
person corrects it, and the next training's audit then drops it, marker included. Each label keeps its fold from
one audit to the next (the folds follow the task ids), so a new label does not make other suspects come and go.

In Label Studio each suspect is a prediction of model version `headstart-suspect` on its task, whose
result is the suggested label, `score` the suggested label's probability and `mislabeling` the
probability that the given label is wrong. The Data Manager filters on it: Filters → "Prediction
model versions" contains `headstart-suspect` (Label Studio 1.23.2 filters neither task `meta` nor
`mislabeling`, see `data_manager/managers.py` `apply_filters`).
"""

from __future__ import annotations

import json
import logging
import time

import torch

from backend.common import redis_keys
from backend.core.audit import (Audit, accepted, auto_accept_thresholds, judge_labels, near_duplicate_conflicts,
                                out_of_fold_probabilities, served_recipe_probabilities)
from backend.core.head_fitting import encode_targets
from backend.core.heads import head_probabilities
from backend.core.recipe_choice import Choice
from backend.core.store import HeadVersion
from backend.labelstudio.labeling_config import HeadSpec, parse_label_config
from backend.loop.features import MediaItem
from backend.loop.repredict import unlabeled_task_ids
from backend.loop.retrain import current_head, unlabeled_pool, zero_shot_anchor
from backend.loop.services import Services

log = logging.getLogger(__name__)

SUSPECT_MODEL_VERSION = "headstart-suspect"
QUEUED_TTL_S = 600


def audit_project(services: Services, project: str) -> dict:
    """Audit every control of the project; store each audit; bring Label Studio's suspect markers in line."""
    config = services.projects.label_config(project)
    if config is None:
        return {"project": project, "status": "skipped: no labeling config known yet"}
    records = {spec.control: audit_control(services, project, spec) for spec in parse_label_config(config)}
    pipe = services.redis.pipeline(transaction=False)
    for control, record in records.items():
        pipe.set(redis_keys.audit(project, control), json.dumps(record))
    pipe.execute()
    markers = {}
    if services.settings.suspect_markers and services.can_reach_label_studio:
        specs = {spec.control: spec for spec in parse_label_config(config)}
        markers = sync_markers(services, project, specs, records)
    return {"project": project, "markers": markers,
            "controls": {control: {"judged": r["judged"], "reason": r["reason"], "suspects": len(r["suspects"]),
                                   "conflicts": len(r["conflicts"]), "model_version": r["model_version"]}
                         for control, r in records.items()}}


def audit_control(services: Services, project: str, spec: HeadSpec) -> dict:
    """The audit record of one control (JSON-ready): under the served head, from cached features."""
    head = current_head(services, project, spec)
    record = {"project": project, "control": spec.control, "at": time.time(), "judged": False, "suspects": [],
              "conflicts": [], "auto_accept": None, "out_of_fold": None, "labels": 0,
              "model_version": f"{spec.control}-v{head.number}" if head else None}
    if head is None:
        return {**record, "reason": "no head is served yet: nothing to judge the labels with"}
    examples, _ = services.labels.examples(project, spec)
    encoder = services.encoders.for_key(head.meta["backbone"], head.backbone_key)
    vectors = services.features.cached(project, [MediaItem(e.task_id, e.url, spec.inline) for e in examples], encoder)
    rows = [i for i, vector in enumerate(vectors) if vector is not None]
    examples = [examples[i] for i in rows]
    record["labels"] = len(examples)
    if not examples:
        return {**record, "reason": "not enough labels to judge: no labeled task has cached features yet"}
    features = torch.stack([vectors[i] for i in rows])
    labels = [example.choices for example in examples]
    task_ids = [example.task_id for example in examples]
    probabilities = _oof(features, labels, task_ids, spec)
    audit: Audit = judge_labels(probabilities, labels, spec.classes, multi_label=spec.multi_label)
    conflicts = near_duplicate_conflicts(features, labels)
    record.update(judged=audit.judged, reason=audit.reason, conflicts=[
        {"tasks": [task_ids[c.first], task_ids[c.second]], "labels": [labels[c.first], labels[c.second]],
         "cosine": c.cosine} for c in conflicts])
    record["suspects"] = [{"task": task_ids[s.index], "rank": rank, "given": s.given, "suggested": s.suggested,
                           "given_probability": s.given_probability,
                           "suggested_probability": s.suggested_probability}
                          for rank, s in enumerate(audit.suspects, start=1)]
    if probabilities is not None:
        # auto-accept: the served head's own recipe out of fold, since its thresholds are applied to that head
        targets = encode_targets(labels, spec.classes, multi_label=spec.multi_label)
        selection = head.meta.get("selection")
        pool = unlabeled_pool(services, project, spec, encoder) \
            if selection and Choice.from_dict(selection).needs_pool else None
        served, recipe = served_recipe_probabilities(features, targets, selection,
                                                     num_classes=len(spec.classes), multi_label=spec.multi_label,
                                                     anchor=zero_shot_anchor(services, spec, encoder), pool=pool,
                                                     keys=task_ids)
        if served is not None:
            record["out_of_fold"] = {"tasks": task_ids, "classes": list(spec.classes), "recipe": recipe,
                                     "probabilities": [[round(p, 5) for p in row] for row in served.tolist()],
                                     "labels": labels}
            record["auto_accept"] = coverage(services, project, spec, head, served, labels,
                                             target=services.settings.auto_accept_precision)
    return record


def coverage(services: Services, project: str, spec: HeadSpec, head: HeadVersion, probabilities: torch.Tensor,
             labels: list[list[str]], *, target: float) -> dict:
    """Per class, the threshold reaching `target` precision out of fold, and how many of the remaining (unlabeled,
    embedded) tasks the served head would label above it."""
    thresholds = auto_accept_thresholds(probabilities, labels, spec.classes, multi_label=spec.multi_label,
                                        target=target, multi_label_threshold=services.settings.multi_label_threshold)
    remaining = unlabeled_task_ids(services, project)
    scored = machine_labels(services, project, spec, head, remaining, thresholds)
    return {"target": target, "thresholds": {name: t.as_dict() for name, t in thresholds.items()},
            "remaining": len(remaining), "embedded": len(scored),
            "would_label": sum(label is not None for label, _ in scored.values())}


def machine_labels(services: Services, project: str, spec: HeadSpec, head: HeadVersion, task_ids: list[int],
                   thresholds: dict) -> dict[int, tuple[list[str] | None, float]]:
    """Task id → (the served head's label above its class threshold, or None; its confidence), for tasks whose
    input is embedded under the head's encoder."""
    data = services.tasks.data(project, task_ids)
    items = [MediaItem.of_task(task, data[task], spec.data_key, inline=spec.inline)
             for task in task_ids if task in data]
    encoder = services.encoders.for_key(head.meta["backbone"], head.backbone_key)
    vectors = services.features.cached(project, items, encoder) if items else []
    kept = [(item.task_id, vector) for item, vector in zip(items, vectors) if vector is not None]
    if not kept:
        return {}
    probabilities = head_probabilities(head.head, torch.stack([vector for _, vector in kept]),
                                       multi_label=head.multi_label)
    labels = accepted(probabilities, head.classes, thresholds, multi_label=head.multi_label,
                      multi_label_threshold=services.settings.multi_label_threshold)
    confidence = (torch.maximum(probabilities, 1 - probabilities).min(dim=1).values if head.multi_label
                  else probabilities.max(dim=1).values)
    return {task: (label, round(float(p), 5)) for (task, _), label, p in zip(kept, labels, confidence.tolist())}


def latest(services: Services, project: str, control: str) -> dict | None:
    """The stored audit of a control, or None when none was made."""
    raw = services.redis.get(redis_keys.audit(project, control))
    return json.loads(raw) if raw else None


def sync_markers(services: Services, project: str, specs: dict[str, HeadSpec], records: dict[str, dict]) -> dict:
    """Make the `headstart-suspect` predictions in Label Studio match the suspects: write new ones, delete the
    ones whose task is no longer suspect (or whose suggestion changed)."""
    key = redis_keys.audit_markers(project)
    existing = {field.decode(): json.loads(value) for field, value in services.redis.hgetall(key).items()}
    wanted = {f"{control}:{s['task']}": s for control, record in records.items() for s in record["suspects"]}
    client = services.label_studio()
    deleted = written = 0
    for name, marker in existing.items():
        if name not in wanted or wanted[name]["suggested"] != marker["suggested"]:
            try:
                client.predictions.delete(id=marker["prediction"])
            except Exception as exc:  # already gone with its task: nothing left to clear
                if getattr(exc, "status_code", None) != 404:
                    raise
            services.redis.hdel(key, name)
            deleted += 1
    for name, suspect in wanted.items():
        if name in existing and existing[name]["suggested"] == suspect["suggested"]:
            continue
        control = name.split(":", 1)[0]
        try:
            prediction = client.predictions.create(
                task=suspect["task"], result=[specs[control].result(suspect["suggested"])],
                score=suspect["suggested_probability"], mislabeling=round(1 - suspect["given_probability"], 4),
                model_version=SUSPECT_MODEL_VERSION)
        except Exception as exc:  # the task was deleted since the labels were read: nothing to mark
            if getattr(exc, "status_code", None) not in (400, 404):
                raise
            continue
        services.redis.hset(key, name, json.dumps({"prediction": prediction.id, "suggested": suspect["suggested"]}))
        written += 1
    log.info("project %s: suspect markers: %d written, %d cleared", project, written, deleted)
    return {"written": written, "cleared": deleted, "standing": len(wanted)}


def _oof(features: torch.Tensor, labels: list[list[str]], task_ids: list[int],
         spec: HeadSpec) -> torch.Tensor | None:
    present = {name for names in labels for name in names}
    if not spec.multi_label and len(present) < 2:
        return None
    targets = encode_targets(labels, spec.classes, multi_label=spec.multi_label)
    return out_of_fold_probabilities(features, targets, num_classes=len(spec.classes), multi_label=spec.multi_label,
                                     keys=task_ids)
