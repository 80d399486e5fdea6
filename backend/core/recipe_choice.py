"""Choose a control's head recipe by the cross-validation the guard runs anyway, and fit it calibrated.

The same rule runs on every project: each recipe of the control's family (`backend.core.recipes`:
for single choice, logistic regression at C=1 on the raw and on the standardized features and the
class prototypes) is fitted on the same stratified folds; its out-of-fold logits get their own
temperature; the blend of the best logistic and the best closed-form recipe is scored too; the
lowest calibrated out-of-fold log-loss wins, unless a simpler recipe is within one standard error of
it (then the simpler one does: fold noise alone never buys flexibility). A recipe that fails (no
convergence, NaNs) is skipped with its reason, and never chosen. With too few labels to hold any
out (a class with one label), no score exists and `logreg_std_shrunk` is used (`NO_VALIDATION_RECIPE`:
logistic regression on features standardized as far as the labels tell the coordinates' variances
apart). At one label per class, mean of 5 draws, it scored 71.8 / 68.3 / 64.6 % on hymenoptera /
flowers12 / bbc-news, against 71.8 / 68.0 / 64.5 for C=1 on the raw features and 64.6 / 68.6 /
60.2 for the fully standardized one, which trusts variances estimated from 2 or 5 labels.

Where the control's choices are ImageNet classes of the backbone (an `anchor` is passed in), the
family also holds `zero_shot_anchored`, and it comes first in the simplicity order and is the recipe
without validation: a correction penalized toward the zero-shot classifier has fewer effective
degrees of freedom than one penalized toward zero, and the one-standard-error rule then serves it
unless another recipe beats it by more than fold noise (hymenoptera, 5 draws: 95.2 to 97.6 % at 1 to
20 labels per class, against 71.8 to 94.9 % for the best reference). A poor match loses the CV.

A choice is a plain record (`Choice.as_dict()`, saved in each version's `selection` metadata) so the
next training can refit the same recipe with the same temperatures without choosing again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from backend.common.errors import HeadstartError
from backend.core.head_fitting import Validation, _stratified_folds, fit_temperature
from backend.core.recipes import ANCHORED, BY_NAME, Recipe, RecipeFailed, check_finite, family_for, fit_recipe, linear

log = logging.getLogger(__name__)

NO_VALIDATION_RECIPE = "logreg_std_shrunk"
NO_VALIDATION_MULTI_LABEL = "logreg_c1"
BLEND = "blend"
# simplest first: the order the one-standard-error rule prefers
SIMPLICITY = ("zero_shot_anchored", "logreg_c1", "prototype", "logreg_c10", BLEND, "logreg_c100", "logreg_std",
              "logreg_std_shrunk")
ANCHORED_NAME = ANCHORED.name


class NoUsableRecipe(HeadstartError):
    """Every recipe of the family failed on these features (or the chosen one did); the reasons are in
    the message. No version is saved."""


@dataclass
class Choice:
    """The recipe to serve (`name`, made of `components`), its temperatures and the evidence."""

    name: str
    components: tuple[str, ...]
    temperatures: dict[str, float]
    evidence: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    label_count: int = 0
    validation: Validation = field(default_factory=lambda: Validation(folds=0), repr=False)

    @property
    def needs_anchor(self) -> bool:
        """Whether refitting this choice needs the control's zero-shot head."""
        return ANCHORED_NAME in self.components

    def as_dict(self) -> dict:
        return {"recipe": self.name, "components": list(self.components),
                "temperatures": {name: round(value, 5) for name, value in self.temperatures.items()},
                "evidence": self.evidence, "skipped": self.skipped, "chosen_at_labels": self.label_count,
                "rule": "simplest within one standard error of the lowest calibrated out-of-fold log-loss" if self.evidence else
                        "too few labels to validate: the default recipe"}

    @classmethod
    def from_dict(cls, record: dict) -> "Choice":
        return cls(name=record["recipe"], components=tuple(record["components"]),
                   temperatures=dict(record["temperatures"]), evidence=dict(record.get("evidence") or {}),
                   skipped=dict(record.get("skipped") or {}), label_count=int(record.get("chosen_at_labels", 0)))


def default_choice(*, multi_label: bool, label_count: int, anchored: bool = False) -> Choice:
    name = NO_VALIDATION_MULTI_LABEL if multi_label else ANCHORED_NAME if anchored else NO_VALIDATION_RECIPE
    return Choice(name=name, components=(name,), temperatures={name: 1.0, BLEND: 1.0}, label_count=label_count)


def choose_recipe(features: torch.Tensor, targets: torch.Tensor, *, num_classes: int, multi_label: bool,
                  family: tuple[Recipe, ...] | None = None, seed: int = 0,
                  anchor: nn.Linear | None = None) -> Choice:
    """Score every recipe of `family` out of fold and return the best one, with the evidence.

    `anchor`: the control's zero-shot head (`backend.core.zero_shot.anchor_for`), or None."""
    anchored = anchor is not None and not multi_label
    folds = _stratified_folds(targets, multi_label=multi_label, seed=seed)
    if folds is None:
        return default_choice(multi_label=multi_label, label_count=len(targets), anchored=anchored)
    family = family or family_for(multi_label=multi_label, anchored=anchored)
    raw, skipped = _out_of_fold_logits(family, features, targets, folds, num_classes=num_classes,
                                       multi_label=multi_label, anchor=anchor)
    if not raw:
        raise NoUsableRecipe("no head recipe produced a usable head: "
                             + "; ".join(f"{name}: {why}" for name, why in skipped.items())
                             + ". Check the features for NaNs (the encoder or its weights file).")
    temperatures = {name: fit_temperature(logits, targets, multi_label=multi_label) for name, logits in raw.items()}
    calibrated = {name: raw[name] / temperatures[name] for name in raw}
    by_name = {recipe.name: recipe for recipe in family}
    logistic = [name for name in calibrated if by_name[name].is_logistic]
    closed = [name for name in calibrated if name not in logistic]
    evidence = {name: _scores(logits, targets, multi_label=multi_label) for name, logits in calibrated.items()}
    components = {name: (name,) for name in calibrated}
    if logistic and closed:
        best_logistic = min(logistic, key=lambda name: evidence[name]["log_loss"])
        best_closed = min(closed, key=lambda name: evidence[name]["log_loss"])
        mixed = (calibrated[best_logistic] + calibrated[best_closed]) / 2
        temperatures[BLEND] = fit_temperature(mixed, targets, multi_label=multi_label)
        calibrated[BLEND] = mixed / temperatures[BLEND]
        evidence[BLEND] = _scores(calibrated[BLEND], targets, multi_label=multi_label)
        components[BLEND] = (best_logistic, best_closed)
    name = _simplest_within_one_error(calibrated, evidence, targets, multi_label=multi_label)
    temperatures.setdefault(BLEND, 1.0)
    validation = Validation(folds=len(folds), correct=_correct(calibrated[name], targets, multi_label=multi_label),
                            logits=calibrated[name])
    return Choice(name=name, components=components[name], temperatures=temperatures, evidence=evidence,
                  skipped=skipped, label_count=len(targets), validation=validation)


def validate_choice(choice: Choice, features: torch.Tensor, targets: torch.Tensor, *, num_classes: int,
                    multi_label: bool, seed: int = 0, anchor: nn.Linear | None = None) -> Choice:
    """Cross-validate only the chosen recipe (the cheap path between re-choices): fresh temperatures
    and out-of-fold results for it, the choice itself kept."""
    folds = _stratified_folds(targets, multi_label=multi_label, seed=seed)
    if folds is None:
        return Choice(name=choice.name, components=choice.components, temperatures=dict(choice.temperatures),
                      evidence=choice.evidence, skipped=choice.skipped, label_count=choice.label_count)
    recipes = tuple(BY_NAME[name] for name in choice.components)
    raw, skipped = _out_of_fold_logits(recipes, features, targets, folds, num_classes=num_classes,
                                       multi_label=multi_label, anchor=anchor)
    if len(raw) < len(recipes):
        raise NoUsableRecipe("the chosen recipe failed: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    temperatures = dict(choice.temperatures)
    for name, logits in raw.items():
        temperatures[name] = fit_temperature(logits, targets, multi_label=multi_label)
    calibrated = sum(raw[name] / temperatures[name] for name in choice.components) / len(choice.components)
    if len(choice.components) > 1:
        temperatures[BLEND] = fit_temperature(calibrated, targets, multi_label=multi_label)
        calibrated = calibrated / temperatures[BLEND]
    validation = Validation(folds=len(folds), correct=_correct(calibrated, targets, multi_label=multi_label),
                            logits=calibrated)
    return Choice(name=choice.name, components=choice.components, temperatures=temperatures,
                  evidence=choice.evidence, skipped=choice.skipped, label_count=choice.label_count,
                  validation=validation)


def fit_chosen(choice: Choice, features: torch.Tensor, targets: torch.Tensor, *, num_classes: int,
               multi_label: bool, warm: nn.Linear | None = None, anchor: nn.Linear | None = None) -> nn.Linear:
    """The chosen recipe fitted on all labels with its temperatures folded in: the head to serve.

    `warm`: the served head of the same choice (calibrated), to warm-start a logistic fit from;
    `anchor`: the zero-shot head, for a choice of `zero_shot_anchored`."""
    weight = torch.zeros(num_classes, features.shape[1])
    bias = torch.zeros(num_classes)
    for name in choice.components:
        temperature = choice.temperatures.get(name, 1.0)
        start = None
        if warm is not None and len(choice.components) == 1:
            start = linear(warm.weight * temperature, warm.bias * temperature)
        try:
            part = fit_recipe(BY_NAME[name], features, targets, num_classes=num_classes, multi_label=multi_label,
                              warm=start, anchor=anchor)
        except RecipeFailed as exc:
            raise NoUsableRecipe(f"the chosen recipe {name} failed on all labels: {exc}") from None
        weight += part.weight / temperature
        bias += part.bias / temperature
    share = len(choice.components) * (choice.temperatures.get(BLEND, 1.0) if len(choice.components) > 1 else 1.0)
    head = linear(weight / share, bias / share)
    check_finite(head, choice.name)
    return head


def _simplest_within_one_error(calibrated: dict, evidence: dict, targets, *, multi_label: bool) -> str:
    """The one-standard-error rule: the simplest recipe whose out-of-fold log-loss is within one
    standard error (of the paired per-example difference) of the best one. A more flexible recipe
    must win by more than fold noise to be served."""
    losses = {name: _per_example_loss(logits, targets, multi_label=multi_label) for name, logits in calibrated.items()}
    best = min(evidence, key=lambda candidate: evidence[candidate]["log_loss"])
    for name in sorted(calibrated, key=_complexity):
        difference = losses[name] - losses[best]
        error = float(difference.std()) / math.sqrt(len(difference)) if len(difference) > 1 else 0.0
        if float(difference.mean()) <= error:
            evidence[name]["within_one_error_of"] = best
            return name
    return best


def _complexity(name: str) -> int:
    return SIMPLICITY.index(name) if name in SIMPLICITY else len(SIMPLICITY)


def _per_example_loss(calibrated, targets, *, multi_label: bool) -> torch.Tensor:
    with torch.no_grad():
        if multi_label:
            return nn.functional.binary_cross_entropy_with_logits(calibrated, targets.float(),
                                                                  reduction="none").mean(1)
        return nn.functional.cross_entropy(calibrated, targets, reduction="none")


def _out_of_fold_logits(recipes, features, targets, folds, *, num_classes, multi_label, anchor=None):
    """name -> out-of-fold raw logits, for every recipe that worked on every fold; name -> why for the rest."""
    raw = {recipe.name: torch.zeros(len(targets), num_classes) for recipe in recipes}
    skipped: dict[str, str] = {}
    for held_out in folds:
        mask = torch.ones(len(targets), dtype=torch.bool)
        mask[held_out] = False
        previous_logistic = None  # the C path: each fit starts where the smaller C ended
        for recipe in recipes:
            if recipe.name in skipped:
                continue
            try:
                head = fit_recipe(recipe, features[mask], targets[mask], num_classes=num_classes,
                                  multi_label=multi_label, warm=previous_logistic if recipe.kind == "logreg" else None,
                                  anchor=anchor)
                with torch.no_grad():
                    logits = head(features[held_out])
                if not torch.isfinite(logits).all():
                    raise RecipeFailed(f"{recipe.name} produced non-finite scores on held-out examples")
            except RecipeFailed as exc:
                skipped[recipe.name] = str(exc)
                log.warning("head recipe %s skipped: %s", recipe.name, exc)
                continue
            raw[recipe.name][held_out] = logits
            if recipe.kind == "logreg":
                previous_logistic = head
    return {name: logits for name, logits in raw.items() if name not in skipped}, skipped


def _scores(calibrated: torch.Tensor, targets: torch.Tensor, *, multi_label: bool) -> dict:
    with torch.no_grad():
        if multi_label:
            loss = nn.functional.binary_cross_entropy_with_logits(calibrated, targets.float())
        else:
            loss = nn.functional.cross_entropy(calibrated, targets)
    correct = _correct(calibrated, targets, multi_label=multi_label)
    value = float(loss)
    return {"log_loss": round(value, 5) if math.isfinite(value) else float("inf"),
            "accuracy": round(sum(correct) / len(correct), 4)}


def _correct(calibrated: torch.Tensor, targets: torch.Tensor, *, multi_label: bool) -> list[bool]:
    if multi_label:
        return ((calibrated >= 0) == targets.bool()).all(dim=1).tolist()
    return (calibrated.argmax(dim=1) == targets).tolist()
