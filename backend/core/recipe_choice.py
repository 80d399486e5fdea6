"""Choose a control's head by the cross-validation the guard runs anyway, and fit it calibrated.

The same rule runs on every project: each recipe of the control's family (`backend.core.recipes`:
for single choice, logistic regression at C=1 on the raw and on the standardized features and the
class prototypes) is fitted on the same stratified folds, and its out-of-fold logits get their own
temperature. The served head is the blend of those calibrated logits whose convex weights minimise
the out-of-fold log-loss (stacking): where one recipe is best, it takes (nearly) all the weight and
is served alone; where recipes err on different examples, the blend beats each. A recipe with less
than `MIN_BLEND_WEIGHT` is left out, so a retrain refits only what the blend uses. All heads are
linear, so the blend is one linear head again.

Why weights and not a pick: with 2 to 5 labels per class the folds are too small to tell recipes
apart reliably. The earlier rule (the simplest recipe within one standard error of the best) then
served C=1 on flowers12, 2 points below the standardized recipe; over 20 draws of k labels per class
it trailed the best reference by up to 1.06 points there (k=2), the blend by at most 0.15 (k=20).

A recipe that fails (no convergence, NaNs) is skipped with its reason, and never blended. With too
few labels to hold any out (a class with one label), no score exists and `logreg_std_shrunk` is used
(`NO_VALIDATION_RECIPE`: logistic regression on features standardized as far as the labels tell the
coordinates' variances apart). At one label per class, mean of 5 draws, it scored 71.8 / 68.3 / 64.6 %
on hymenoptera / flowers12 / bbc-news, against 71.8 / 68.0 / 64.5 for C=1 on the raw features and
64.6 / 68.6 / 60.2 for the fully standardized one, which trusts variances estimated from 2 or 5 labels.

Where the control's choices are ImageNet classes of the backbone (an `anchor` is passed in), the
family also holds `zero_shot_anchored`, the recipe without validation: a correction penalized toward
the zero-shot classifier instead of toward zero (hymenoptera: 95 to 97 % at 1 to 20 labels per class,
against 72 to 95 % for the best reference). A poor match gets little weight.

Where the training is given the features of the project's unlabeled tasks (a `pool`), the family also holds
`prototype_refined`, the class prototypes placed with them, and `logreg_std_selftrained`, the standardized logistic
regression refitted with the unlabeled tasks it is sure of as labels. `prototype_refined` is the recipe without
validation too: at one label per class, 20 draws, it scored 17.6 / 5.9 points above the better reference on
bbc-news / flowers12, where `logreg_std_shrunk` scores +0.0 / +0.2. The pool's labels are never known; it changes
only where the prototypes sit, and the out-of-fold scores judge that like any recipe.

A choice is a plain record (`Choice.as_dict()`, saved in each version's `selection` metadata) so the
next training can refit the same recipes with the same weights and temperatures without choosing again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import nn

from backend.common.errors import HeadstartError
from backend.core.head_fitting import Validation, fit_temperature, stratified_folds
from backend.core.recipes import (ANCHORED, BY_NAME, REFINED, Recipe, RecipeFailed, check_finite, family_for,
                                  fit_recipe, linear)

log = logging.getLogger(__name__)

NO_VALIDATION_RECIPE = "logreg_std_shrunk"
NO_VALIDATION_POOLED = REFINED.name  # the default where unlabeled tasks' features are given
NO_VALIDATION_MULTI_LABEL = "logreg_c1"
BLEND = "blend"
MIN_BLEND_WEIGHT = 0.02  # a recipe with less weight is left out of the blend (its share renormalized away)
ANCHORED_NAME = ANCHORED.name


class NoUsableRecipe(HeadstartError):
    """Every recipe of the family failed on these features (or the chosen one did); the reasons are in
    the message. No version is saved."""


@dataclass
class Choice:
    """The head to serve: `name` (a recipe, or `blend` of `components` with `weights`), its temperatures
    and the evidence."""

    name: str
    components: tuple[str, ...]
    temperatures: dict[str, float]
    weights: dict[str, float] = field(default_factory=dict)  # per component; none saved: equal weights
    evidence: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    label_count: int = 0
    validation: Validation = field(default_factory=lambda: Validation(folds=0), repr=False)

    def weight_of(self, name: str) -> float:
        return self.weights.get(name, 1.0 / len(self.components))

    @property
    def needs_anchor(self) -> bool:
        """Whether refitting this choice needs the control's zero-shot head."""
        return ANCHORED_NAME in self.components

    @property
    def needs_pool(self) -> bool:
        """Whether refitting this choice needs the features of the project's unlabeled tasks."""
        return any(BY_NAME[name].uses_pool for name in self.components if name in BY_NAME)

    def as_dict(self) -> dict:
        return {"recipe": self.name, "components": list(self.components),
                "weights": {name: round(self.weight_of(name), 5) for name in self.components},
                "temperatures": {name: round(value, 5) for name, value in self.temperatures.items()},
                "evidence": self.evidence, "skipped": self.skipped, "chosen_at_labels": self.label_count,
                "rule": "blend of the calibrated recipes, weights minimising out-of-fold log-loss" if self.evidence else
                        "too few labels to validate: the default recipe"}

    @classmethod
    def from_dict(cls, record: dict) -> "Choice":
        return cls(name=record["recipe"], components=tuple(record["components"]),
                   temperatures=dict(record["temperatures"]), weights=dict(record.get("weights") or {}),
                   evidence=dict(record.get("evidence") or {}), skipped=dict(record.get("skipped") or {}),
                   label_count=int(record.get("chosen_at_labels", 0)))


def default_choice(*, multi_label: bool, label_count: int, anchored: bool = False, pooled: bool = False) -> Choice:
    name = NO_VALIDATION_MULTI_LABEL if multi_label else ANCHORED_NAME if anchored else \
        NO_VALIDATION_POOLED if pooled else NO_VALIDATION_RECIPE
    return Choice(name=name, components=(name,), temperatures={name: 1.0, BLEND: 1.0}, label_count=label_count)


def choose_recipe(features: torch.Tensor, targets: torch.Tensor, *, num_classes: int, multi_label: bool,
                  family: tuple[Recipe, ...] | None = None, seed: int = 0,
                  anchor: nn.Linear | None = None, pool: torch.Tensor | None = None,
                  keys: Sequence[int] | None = None) -> Choice:
    """Score every recipe of `family` out of fold and return their blend (or the one recipe it keeps), with
    the evidence.

    `anchor`: the control's zero-shot head (`backend.core.zero_shot.anchor_for`), or None; `pool`: features of
    the project's unlabeled tasks (`backend.loop.retrain.unlabeled_pool`), or None; `keys`: the labels' task ids,
    which fix each label's fold from one training to the next (`stratified_folds`)."""
    anchored = anchor is not None and not multi_label
    pooled = pool is not None and len(pool) > 0 and not multi_label
    folds = stratified_folds(targets, multi_label=multi_label, seed=seed, keys=keys)
    if folds is None:
        return default_choice(multi_label=multi_label, label_count=len(targets), anchored=anchored, pooled=pooled)
    family = family or family_for(multi_label=multi_label, anchored=anchored, pooled=pooled)
    raw, skipped = _out_of_fold_logits(family, features, targets, folds, num_classes=num_classes,
                                       multi_label=multi_label, anchor=anchor, pool=pool)
    if not raw:
        raise NoUsableRecipe("no head recipe produced a usable head: "
                             + "; ".join(f"{name}: {why}" for name, why in skipped.items())
                             + ". Check the features for NaNs (the encoder or its weights file).")
    temperatures = {name: fit_temperature(logits, targets, multi_label=multi_label) for name, logits in raw.items()}
    calibrated = {name: raw[name] / temperatures[name] for name in raw}
    evidence = {name: _scores(logits, targets, multi_label=multi_label) for name, logits in calibrated.items()}
    weights = _blend_weights(calibrated, targets, multi_label=multi_label)
    components = tuple(weights)
    if len(components) == 1:
        name, served = components[0], calibrated[components[0]]
    else:
        mixed = sum(weights[part] * calibrated[part] for part in components)
        temperatures[BLEND] = fit_temperature(mixed, targets, multi_label=multi_label)
        name, served = BLEND, mixed / temperatures[BLEND]
        evidence[BLEND] = _scores(served, targets, multi_label=multi_label)
    for part, weight in weights.items():
        evidence[part]["weight"] = round(weight, 4)
    temperatures.setdefault(BLEND, 1.0)
    validation = Validation(folds=len(folds), correct=_correct(served, targets, multi_label=multi_label),
                            logits=served)
    return Choice(name=name, components=components, temperatures=temperatures, weights=weights, evidence=evidence,
                  skipped=skipped, label_count=len(targets), validation=validation)


def validate_choice(choice: Choice, features: torch.Tensor, targets: torch.Tensor, *, num_classes: int,
                    multi_label: bool, seed: int = 0, anchor: nn.Linear | None = None,
                    pool: torch.Tensor | None = None, keys: Sequence[int] | None = None) -> Choice:
    """Cross-validate only the chosen recipe (the cheap path between re-choices): fresh temperatures
    and out-of-fold results for it, the choice itself kept. `keys` as for `choose_recipe`."""
    folds = stratified_folds(targets, multi_label=multi_label, seed=seed, keys=keys)
    if folds is None:
        return replace(choice, temperatures=dict(choice.temperatures), validation=Validation(folds=0))
    recipes = tuple(BY_NAME[name] for name in choice.components)
    raw, skipped = _out_of_fold_logits(recipes, features, targets, folds, num_classes=num_classes,
                                       multi_label=multi_label, anchor=anchor, pool=pool)
    if len(raw) < len(recipes):
        raise NoUsableRecipe("the chosen recipe failed: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    temperatures = dict(choice.temperatures)
    for name, logits in raw.items():
        temperatures[name] = fit_temperature(logits, targets, multi_label=multi_label)
    calibrated = sum(choice.weight_of(name) * raw[name] / temperatures[name] for name in choice.components)
    if len(choice.components) > 1:
        temperatures[BLEND] = fit_temperature(calibrated, targets, multi_label=multi_label)
        calibrated = calibrated / temperatures[BLEND]
    validation = Validation(folds=len(folds), correct=_correct(calibrated, targets, multi_label=multi_label),
                            logits=calibrated)
    return replace(choice, temperatures=temperatures, validation=validation)


def fit_chosen(choice: Choice, features: torch.Tensor, targets: torch.Tensor, *, num_classes: int,
               multi_label: bool, warm: nn.Linear | None = None, anchor: nn.Linear | None = None,
               pool: torch.Tensor | None = None) -> nn.Linear:
    """The chosen recipe fitted on all labels with its temperatures folded in: the head to serve.

    `warm`: the served head of the same choice (calibrated), to warm-start a logistic fit from;
    `anchor`: the zero-shot head, for a choice of `zero_shot_anchored`; `pool`: the unlabeled tasks'
    features, for a choice that uses them (`recipes.POOLED`)."""
    weight = torch.zeros(num_classes, features.shape[1])
    bias = torch.zeros(num_classes)
    fitted: dict[str, nn.Linear] = {}  # the parts fitted cold, which a later part may build on (`fit_recipe`)
    for name in choice.components:
        temperature = choice.temperatures.get(name, 1.0)
        start = None
        if warm is not None and len(choice.components) == 1:
            start = linear(warm.weight * temperature, warm.bias * temperature)
        try:
            part = fit_recipe(BY_NAME[name], features, targets, num_classes=num_classes, multi_label=multi_label,
                              warm=start, anchor=anchor, pool=pool, fitted=fitted)
        except RecipeFailed as exc:
            raise NoUsableRecipe(f"the chosen recipe {name} failed on all labels: {exc}") from None
        if start is None:
            fitted[name] = part
        weight += choice.weight_of(name) * part.weight / temperature
        bias += choice.weight_of(name) * part.bias / temperature
    blend_temperature = choice.temperatures.get(BLEND, 1.0) if len(choice.components) > 1 else 1.0
    head = linear(weight / blend_temperature, bias / blend_temperature)
    check_finite(head, choice.name)
    return head


def _blend_weights(calibrated: dict[str, torch.Tensor], targets: torch.Tensor, *,
                   multi_label: bool) -> dict[str, float]:
    """Convex weights over the recipes (in family order) that minimise the out-of-fold log-loss of the
    weighted sum of their calibrated logits; weights under MIN_BLEND_WEIGHT are dropped, the rest renormalized."""
    names = list(calibrated)
    if len(names) == 1:
        return {names[0]: 1.0}
    stacked = torch.stack([calibrated[name] for name in names]).detach()
    logits = torch.zeros(len(names), requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        mixed = torch.einsum("r,rnc->nc", torch.softmax(logits, dim=0), stacked)
        loss = _per_example_loss(mixed, targets, multi_label=multi_label).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    share = torch.softmax(logits.detach(), dim=0)
    if not torch.isfinite(share).all():  # a degenerate fit: the single recipe of lowest log-loss
        losses = [float(_per_example_loss(calibrated[name], targets, multi_label=multi_label).mean())
                  for name in names]
        return {names[losses.index(min(losses))]: 1.0}
    kept = {name: float(weight) for name, weight in zip(names, share) if float(weight) >= MIN_BLEND_WEIGHT}
    total = sum(kept.values())
    return {name: weight / total for name, weight in kept.items()}


def _per_example_loss(calibrated, targets, *, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return nn.functional.binary_cross_entropy_with_logits(calibrated, targets.float(), reduction="none").mean(1)
    return nn.functional.cross_entropy(calibrated, targets, reduction="none")


def _out_of_fold_logits(recipes, features, targets, folds, *, num_classes, multi_label, anchor=None, pool=None):
    """name -> out-of-fold raw logits, for every recipe that worked on every fold; name -> why for the rest."""
    raw = {recipe.name: torch.zeros(len(targets), num_classes) for recipe in recipes}
    skipped: dict[str, str] = {}
    for held_out in folds:
        mask = torch.ones(len(targets), dtype=torch.bool)
        mask[held_out] = False
        previous_logistic = None  # the C path: each fit starts where the smaller C ended
        fitted: dict[str, nn.Linear] = {}  # this fold's heads fitted cold, which a later recipe may build on
        for recipe in recipes:
            if recipe.name in skipped:
                continue
            warm = previous_logistic if recipe.kind == "logreg" else None
            try:
                head = fit_recipe(recipe, features[mask], targets[mask], num_classes=num_classes,
                                  multi_label=multi_label, warm=warm, anchor=anchor, pool=pool, fitted=fitted)
                with torch.no_grad():
                    logits = head(features[held_out])
                if not torch.isfinite(logits).all():
                    raise RecipeFailed(f"{recipe.name} produced non-finite scores on held-out examples")
            except RecipeFailed as exc:
                skipped[recipe.name] = str(exc)
                log.warning("head recipe %s skipped: %s", recipe.name, exc)
                continue
            raw[recipe.name][held_out] = logits
            if warm is None:
                fitted[recipe.name] = head
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
