"""From features + labels to a saved head version: the one training entry point.

Used by the worker's training job, by tests and by benchmarks alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from backend.core.backbones import count_parameters
from backend.core.embedding import Embedder
from backend.core.store import ModelStore
from backend.core.training import (HeadRecipe, Validation, calibrate, cross_validate, fit_head, fit_temperature,
                                   predicted_correctly)
from backend.common.errors import NotEnoughLabels


@dataclass(frozen=True)
class TrainedVersion:
    number: int
    meta: dict
    validation: Validation


def encode_targets(labels: Sequence[Sequence[str]], classes: Sequence[str], *, multi_label: bool) -> torch.Tensor:
    """Class indices (single choice) or a 0/1 matrix (multiple choice) in `classes` order."""
    index = {name: position for position, name in enumerate(classes)}
    if multi_label:
        targets = torch.zeros(len(labels), len(classes))
        for row, names in enumerate(labels):
            for name in names:
                targets[row, index[name]] = 1.0
        return targets
    return torch.tensor([index[names[0]] for names in labels], dtype=torch.long)


def train_version(
    store: ModelStore, *, project: str, control: str, classes: Sequence[str], multi_label: bool,
    features: torch.Tensor, labels: Sequence[Sequence[str]], task_ids: Sequence[int],
    embedder: Embedder, recipe: HeadRecipe = HeadRecipe(), extra_meta: dict | None = None,
) -> TrainedVersion:
    """Fit a head on all labels, cross-validate the recipe, and save it as a candidate version."""
    classes = list(classes)
    if len(features) != len(labels) or len(labels) != len(task_ids):
        raise ValueError("features, labels and task_ids must have the same length")
    present = {name for names in labels for name in names}
    if not multi_label and len(present) < 2:
        raise NotEnoughLabels(
            f"Control {control!r} needs labeled examples of at least two classes to train a head; "
            f"it has {sorted(present) or 'none'}."
        )
    started = time.perf_counter()
    targets = encode_targets(labels, classes, multi_label=multi_label)
    head = fit_head(features, targets, num_classes=len(classes), multi_label=multi_label, recipe=recipe)
    fit_seconds = time.perf_counter() - started
    validation = cross_validate(features, targets, num_classes=len(classes), multi_label=multi_label, recipe=recipe)
    temperature = 1.0
    if validation.logits is not None:
        temperature = fit_temperature(validation.logits, targets, multi_label=multi_label)
        calibrate(head, temperature)
    train_correct = predicted_correctly(head, features, targets, multi_label=multi_label)
    meta = {
        "backbone": embedder.spec.name,
        "backbone_key": embedder.key,
        "feature_dim": embedder.feature_dim,
        "preprocessing": embedder.preprocessing(),
        "classes": classes,
        "multi_label": multi_label,
        "label_count": len(labels),
        "labels_per_class": {name: sum(name in names for names in labels) for name in classes},
        "metrics": {
            "cv_accuracy": validation.accuracy,
            "cv_folds": validation.folds,
            "train_accuracy": sum(train_correct) / len(train_correct),
        },
        "parameters": {"trainable": count_parameters(head), "non_trainable": embedder.parameter_count},
        "recipe": recipe.as_dict(),
        "calibration": {"method": "temperature scaling on out-of-fold logits", "temperature": round(temperature, 4)},
        "trained_on": {str(task): list(names) for task, names in zip(task_ids, labels)},
        "out_of_fold_correct": (
            {str(task): ok for task, ok in zip(task_ids, validation.correct)} if validation.correct else None
        ),
        "fit_seconds": round(fit_seconds, 4),
        "train_seconds": round(time.perf_counter() - started, 4),
        **(extra_meta or {}),
    }
    number = store.save(project, control, head, meta)
    return TrainedVersion(number=number, meta=store.meta(project, control, number), validation=validation)
