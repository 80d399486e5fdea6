"""From features + labels to a candidate head: recipe chosen, fitted, calibrated, described.

Nothing here writes anything: the retrain pipeline (`backend.loop.retrain`) decides whether a
candidate is served and saves it, with that decision in its metadata.

Two ways to a candidate:
- `fit_candidate`: choose the recipe by cross-validation (`backend.core.recipe_choice`), fit it on
  all labels; the candidate arrives validated.
- `fit_provisional`: refit the served version's recipe, with its temperatures, warm-started from its
  weights: one fit, the floor's cost. It arrives unvalidated; `validate_provisional` cross-validates it
  afterwards. This holds while the labels have grown by less than `RECHOOSE_GROWTH` since the recipe
  was chosen (`is_refit_enough`); beyond, `fit_candidate` chooses again.
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
from backend.core.head_fitting import Validation, encode_targets, predicted_correctly
from backend.core.heads import head_record
from backend.core.recipe_choice import Choice, choose_recipe, fit_chosen, validate_choice
from backend.core.recipes import Recipe

RECHOOSE_GROWTH = 1.1  # choose the recipe again once the labels have grown by 10 % since it was chosen


@dataclass(frozen=True)
class Candidate:
    head: nn.Module
    meta: dict
    validation: Validation
    choice: Choice


def fit_candidate(
    *, control: str, classes: Sequence[str], multi_label: bool, features: torch.Tensor,
    labels: Sequence[Sequence[str]], task_ids: Sequence[int], encoder: Encoder,
    extra_meta: dict | None = None, family: tuple[Recipe, ...] | None = None, anchor: nn.Linear | None = None,
    pool: torch.Tensor | None = None,
) -> Candidate:
    """Choose the recipe by out-of-fold log-loss, fit it on all labels, calibrated.

    `anchor`: the control's zero-shot head (`backend.core.zero_shot.anchor_for`), or None; `pool`: features of
    the project's unlabeled tasks (`backend.loop.retrain.unlabeled_pool`), or None."""
    targets = _targets(control, classes, multi_label, features, labels, task_ids)
    started = time.perf_counter()
    choice = choose_recipe(features, targets, num_classes=len(classes), multi_label=multi_label, family=family,
                           anchor=anchor, pool=pool, keys=task_ids)
    fit_started = time.perf_counter()
    head = fit_chosen(choice, features, targets, num_classes=len(classes), multi_label=multi_label, anchor=anchor,
                      pool=pool)
    return _described(head, choice, choice.validation, control=control, classes=classes, multi_label=multi_label,
                      features=features, targets=targets, labels=labels, task_ids=task_ids, encoder=encoder,
                      fit_seconds=time.perf_counter() - fit_started, started=started,
                      extra_meta={**(extra_meta or {}), "pool_size": _pool_size(pool)})


def fit_provisional(
    *, control: str, classes: Sequence[str], multi_label: bool, features: torch.Tensor,
    labels: Sequence[Sequence[str]], task_ids: Sequence[int], encoder: Encoder, served: nn.Module,
    served_meta: dict, extra_meta: dict | None = None, anchor: nn.Linear | None = None,
    pool: torch.Tensor | None = None,
) -> Candidate:
    """The served version's recipe refitted on the current labels, not yet validated (see module doc)."""
    targets = _targets(control, classes, multi_label, features, labels, task_ids)
    started = time.perf_counter()
    choice = Choice.from_dict(served_meta["selection"])
    head = fit_chosen(choice, features, targets, num_classes=len(classes), multi_label=multi_label, warm=served,
                      anchor=anchor, pool=pool)
    return _described(head, choice, Validation(folds=0), control=control, classes=classes, multi_label=multi_label,
                      features=features, targets=targets, labels=labels, task_ids=task_ids, encoder=encoder,
                      fit_seconds=time.perf_counter() - started, started=started,
                      extra_meta={**(extra_meta or {}), "pool_size": _pool_size(pool)}, validated=False)


def validate_provisional(
    provisional: Candidate, *, classes: Sequence[str], multi_label: bool, features: torch.Tensor,
    labels: Sequence[Sequence[str]], task_ids: Sequence[int], anchor: nn.Linear | None = None,
    pool: torch.Tensor | None = None,
) -> dict:
    """The metadata completing a provisional version: its recipe cross-validated on the current labels
    (out-of-fold results for the guard, fresh temperatures for the next refit)."""
    targets = encode_targets(labels, classes, multi_label=multi_label)
    started = time.perf_counter()
    choice = validate_choice(provisional.choice, features, targets, num_classes=len(classes), multi_label=multi_label,
                             anchor=anchor, pool=pool, keys=task_ids)
    validation = choice.validation
    return {
        "metrics": {**provisional.meta["metrics"], "cv_accuracy": validation.accuracy, "cv_folds": validation.folds},
        "out_of_fold_correct": _out_of_fold(task_ids, validation),
        "selection": choice.as_dict(),
        "validated": True,
        "validate_seconds": round(time.perf_counter() - started, 4),
    }


def is_refit_enough(served_meta: dict, label_count: int, *, anchored: bool = False, pooled: bool = False) -> bool:
    """Whether the served version's recipe choice still holds for `label_count` labels: it has one,
    the labels have grown by less than `RECHOOSE_GROWTH` since it was made, a choice anchored on
    the zero-shot head still has one (`anchored`: the control has an anchor now), and a choice that
    uses the unlabeled tasks (`prototype_refined`, `logreg_std_selftrained`) still has some (`pooled`)."""
    selection = served_meta.get("selection")
    if not selection:
        return False
    choice = Choice.from_dict(selection)
    if (choice.needs_anchor and not anchored) or (choice.needs_pool and not pooled):
        return False
    return label_count < RECHOOSE_GROWTH * max(int(selection.get("chosen_at_labels", 0)), 1)


def _targets(control, classes, multi_label, features, labels, task_ids) -> torch.Tensor:
    if len(features) != len(labels) or len(labels) != len(task_ids):
        raise ValueError("features, labels and task_ids must have the same length")
    present = {name for names in labels for name in names}
    if not multi_label and len(present) < 2:
        raise NotEnoughLabels(
            f"Control {control!r} needs labeled examples of at least two classes to train a head; "
            f"it has {sorted(present) or 'none'}."
        )
    return encode_targets(labels, list(classes), multi_label=multi_label)


def _pool_size(pool: torch.Tensor | None) -> int:
    return 0 if pool is None else len(pool)


def _out_of_fold(task_ids, validation: Validation) -> dict | None:
    return {str(task): ok for task, ok in zip(task_ids, validation.correct)} if validation.correct else None


def _described(head, choice: Choice, validation: Validation, *, control, classes, multi_label, features, targets,
               labels, task_ids, encoder: Encoder, fit_seconds: float, started: float, extra_meta: dict | None,
               validated: bool = True) -> Candidate:
    classes = list(classes)
    train_correct = predicted_correctly(head, features, targets, multi_label=multi_label)
    temperature = choice.temperatures.get(choice.name if len(choice.components) == 1 else "blend", 1.0)
    meta = {
        "control": control,
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
        "recipe": choice.name,
        "selection": choice.as_dict(),
        "validated": validated,
        "calibration": {"method": "temperature scaling on out-of-fold logits", "temperature": round(temperature, 4),
                        "temperatures": {name: round(value, 4) for name, value in choice.temperatures.items()}},
        "trained_on": {str(task): list(names) for task, names in zip(task_ids, labels)},
        "out_of_fold_correct": _out_of_fold(task_ids, validation),
        "fit_seconds": round(fit_seconds, 4),
        "train_seconds": round(time.perf_counter() - started, 4),
        **(extra_meta or {}),
    }
    return Candidate(head=head, meta=meta, validation=validation, choice=choice)
