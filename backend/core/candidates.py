"""From features + labels to a candidate head: fitted, cross-validated, calibrated, described.

Nothing here writes anything: the retrain pipeline (`backend.loop.retrain`) decides whether a
candidate is served and saves it once, with that decision in its metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from backend.common.errors import NotEnoughLabels
from backend.core.backbones import count_parameters
from backend.core.encoders import Encoder
from backend.core.head_fitting import (HeadRecipe, Validation, calibrate, cross_validate, encode_targets, fit_head,
                                       fit_temperature, predicted_correctly)
from backend.core.heads import head_record


@dataclass(frozen=True)
class Candidate:
    head: nn.Module
    meta: dict
    validation: Validation


def fit_candidate(
    *, control: str, classes: Sequence[str], multi_label: bool, features: torch.Tensor,
    labels: Sequence[Sequence[str]], task_ids: Sequence[int], encoder: Encoder,
    recipe: HeadRecipe = HeadRecipe(), extra_meta: dict | None = None,
) -> Candidate:
    """Fit a head on all labels, cross-validate the recipe and calibrate the head's scores."""
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
        "backbone": encoder.name,
        "backbone_key": encoder.key,
        "modality": encoder.modality,
        "feature_dim": encoder.feature_dim,
        "preprocessing": encoder.preprocessing(),
        "head": head_record(head),
        "classes": classes,
        "multi_label": multi_label,
        "label_count": len(labels),
        "labels_per_class": {name: sum(name in names for names in labels) for name in classes},
        "metrics": {
            "cv_accuracy": validation.accuracy,
            "cv_folds": validation.folds,
            "train_accuracy": sum(train_correct) / len(train_correct),
        },
        "parameters": {"trainable": count_parameters(head), "non_trainable": encoder.parameter_count},
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
    return Candidate(head=head, meta=meta, validation=validation)
