"""The head recipes: a small fixed family of ways to turn features + labels into a linear head.

Every recipe yields one `nn.Linear` of raw (uncalibrated) logits on any feature vector, so the
store, the guard and serving never need to know which recipe made a head:

- `logreg_c1`, `logreg_c10`, `logreg_c100`: L2-regularized logistic regression (softmax, or
  one-vs-rest sigmoid for multiple choice) along a short C path, each fit warm-started from the
  previous one. Small C is safe with few labels; large C fits well-separated classes better.
- `logreg_std`: the same logistic regression at C=1 on features standardized per coordinate (each
  one's mean and standard deviation over the labels), folded back into one linear head on the raw
  features. On L2-normalized backbone features a few high-variance coordinates dominate the
  Euclidean penalty, so plain logistic regression leans on them whatever its C; standardizing lets
  the many quiet coordinates count, which separates many similar classes (flowers12) better than
  any C of the path. This is also why a linear head trained with Adam (per-coordinate step sizes,
  so in effect standardized) beats the plain path there; unlike Adam it has one optimum, so a
  retrain warm-starts from the served head and takes a few L-BFGS iterations.
- `logreg_std_shrunk`: `logreg_std` with each coordinate's variance shrunk toward the mean variance as
  far as the labels cannot tell them apart (empirical Bayes on the log variances: a sample variance
  of n labels has log-noise of variance trigamma((n-1)/2); only the spread beyond that is kept).
  With one label per class it standardizes where the coordinates' variances really differ (flowers12
  image features, shrink 0.77) and hardly at all where they are noise (2 or 5 labels, or isotropic
  text features): the recipe used without validation (`backend.core.recipe_choice`).
- `prototype`: nearest class centroid by cosine similarity around the centre of the classes (closed
  form; strong at 1-2 labels per class).
- `zero_shot_anchored`: logistic regression at C=1 whose logits are the backbone's own ImageNet
  classifier restricted to the choices (`backend.core.zero_shot.ImageNetClassifier.anchor`) plus a
  correction, the penalty on the correction only: the L2 prior pulls toward the zero-shot classifier
  instead of toward zero. Offered only where every choice matches an ImageNet class (the anchor is
  passed in); hymenoptera's ant/bee is such a project, where zero-shot alone scores 96.7 % and plain
  logistic regression needs all 244 labels to come near it. Folded back into one linear head
  (anchor weights + correction), so serving needs no change.
- `prototype_refined`: the class prototypes refined on the project's unlabeled tasks (`pool`): a few
  rounds of soft k-means, each unlabeled task counted toward every prototype by its softmax over the
  cosines, all of them together weighing `POOL_WEIGHT` times the labels. Where the classes form clusters
  the encoder already separates (news topics under a sentence encoder), a handful of labels per class
  names the clusters and the unlabeled tasks place them: on bbc-news at 1 / 2 labels per topic, 20 draws,
  the rest of train as the pool, it alone scored 17.6 / 15.1 points above logistic regression at C=1. Offered
  only when the training is given a pool (`backend.loop.retrain.unlabeled_pool`); its labels are never known.
- `logreg_std_selftrained`: one round of self-training on the project's unlabeled tasks (`pool`): `logreg_std`
  fitted on the labels predicts the pool, and is fitted again on the labels plus every unlabeled task it
  predicts with a probability of at least `SELF_TRAIN_CONFIDENCE` (0.9), each counted as a label of its predicted
  class (at most `SELF_TRAIN_MAX`, 500, spread evenly over them: with 1,000 flowers12-like labels and a pool of
  2,000 it fits in 0.37 s against 0.17 s for logreg_std, 0.55 s without the cap; the bench's cells moved by
  ≤ 0.11 point with it). Where the labels cover a class's region thinly, the confident unlabeled tasks around
  them fill it in: on flowers12, 20 draws, the rest of train as the pool, the blend with it scored 84.4 / 94.3 /
  95.5 / 96.1 % at 2 / 5 / 10 / 20 labels per class against 83.8 / 92.4 / 94.2 / 95.9 % without it (bbc-news
  k=10 / 20: +0.1 / +0.3; hymenoptera: within the draws' noise; `bench/README.md`). Offered only when the
  training is given a pool, like `prototype_refined`; the pool's labels are never known, and the out-of-fold
  scores judge it like any recipe.
- `blend`: a weighted sum of several recipes' calibrated logits, the weights fitted on out-of-fold
  log-loss (`backend.core.recipe_choice`).

A new single-choice head blends `SINGLE_CHOICE` (C=1, standardized, prototype), with `zero_shot_anchored` too
where an anchor exists and `POOLED` (`prototype_refined`, `logreg_std_selftrained`) where a pool exists; multiple
choice blends the logistic path (`logreg_std`, the anchored and the closed-form recipes serve single choice only).
Every recipe of `FAMILY` can still be refitted by name, for versions chosen before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from backend.core.head_fitting import HeadRecipe, fit_head

SCALE_FLOOR = 0.01  # `standardized`: variance floor, a share of the mean per-coordinate variance
PROTOTYPE_SCALE = 20.0  # logits = 20 × cosine similarity before calibration (softmax over cosines is flat)
POOL_WEIGHT = 3.0  # `prototype_refined`: the unlabeled tasks together weigh 3 × the labels
POOL_ROUNDS = 5  # `prototype_refined`: soft k-means rounds
SELF_TRAIN_CONFIDENCE = 0.9  # `logreg_std_selftrained`: an unlabeled task this sure of its class counts as a label
SELF_TRAIN_MAX = 500  # ... at most this many of them, evenly spread over the sure ones: a bounded cost per fit


@dataclass(frozen=True)
class Recipe:
    """One member of the family: `kind` says how it is fitted, `C` the logistic regularization."""

    name: str
    kind: str  # "logreg" | "standardized" | "shrunk" | "anchored" | "prototype" | "refined" | "selftrained"
    C: float | None = None

    @property
    def uses_pool(self) -> bool:
        """Whether fitting it needs the features of the project's unlabeled tasks (it is one of `POOLED`)."""
        return self in POOLED

    def as_dict(self) -> dict:
        record = {"name": self.name, "kind": self.kind}
        if self.C is not None:
            record.update(C=self.C, optimizer="lbfgs", class_balanced=True)
        if self.kind in ("standardized", "shrunk", "selftrained"):
            record.update(standardized=True, variance_floor=SCALE_FLOOR)
        if self.kind == "shrunk":
            record.update(variance_shrinkage="empirical Bayes on log variances")
        if self.kind == "anchored":
            record.update(anchor="the backbone's ImageNet classifier restricted to the choices")
        if self.kind == "refined":
            record.update(pool="the project's unlabeled tasks", pool_weight=POOL_WEIGHT, rounds=POOL_ROUNDS)
        if self.kind == "selftrained":
            record.update(pool="the project's unlabeled tasks", rounds=1,
                          pseudo_label_confidence=SELF_TRAIN_CONFIDENCE, pseudo_labels_max=SELF_TRAIN_MAX)
        return record


LOGREG_PATH = (Recipe("logreg_c1", "logreg", 1.0), Recipe("logreg_c10", "logreg", 10.0),
               Recipe("logreg_c100", "logreg", 100.0))
STANDARDIZED = Recipe("logreg_std", "standardized", 1.0)
PROTOTYPE = Recipe("prototype", "prototype")
ANCHORED = Recipe("zero_shot_anchored", "anchored", 1.0)
SHRUNK = Recipe("logreg_std_shrunk", "shrunk", 1.0)
REFINED = Recipe("prototype_refined", "refined")
SELF_TRAINED = Recipe("logreg_std_selftrained", "selftrained", 1.0)
POOLED: tuple[Recipe, ...] = (REFINED, SELF_TRAINED)  # the recipes offered where unlabeled tasks' features are given
# single choice: logistic regression on the raw and on the standardized features, and the closed form
SINGLE_CHOICE: tuple[Recipe, ...] = (LOGREG_PATH[0], STANDARDIZED, PROTOTYPE)
# every recipe a saved choice may name
FAMILY: tuple[Recipe, ...] = (*LOGREG_PATH, STANDARDIZED, PROTOTYPE, ANCHORED, SHRUNK, *POOLED)
BY_NAME = {recipe.name: recipe for recipe in FAMILY}


class RecipeFailed(ValueError):
    """A recipe did not produce a usable head (did not converge, or produced NaNs); the reason says which."""


def family_for(*, multi_label: bool, anchored: bool = False, pooled: bool = False) -> tuple[Recipe, ...]:
    """The recipes a new choice is made among (a saved choice may name any recipe of `FAMILY`);
    `anchored`: a zero-shot anchor exists for the control; `pooled`: unlabeled tasks' features are given
    (both single choice only)."""
    if multi_label:
        return LOGREG_PATH
    return (*((ANCHORED,) if anchored else ()), *SINGLE_CHOICE, *(POOLED if pooled else ()))


def fit_recipe(recipe: Recipe, features: torch.Tensor, targets: torch.Tensor, *, num_classes: int,
               multi_label: bool, warm: nn.Linear | None = None, anchor: nn.Linear | None = None,
               pool: torch.Tensor | None = None, fitted: Mapping[str, nn.Linear] | None = None) -> nn.Linear:
    """A head of raw logits fitted by `recipe`; raises RecipeFailed when its result is not usable.

    `anchor`: the zero-shot head of raw logits `zero_shot_anchored` starts from (None: that recipe fails);
    `pool`: features of unlabeled tasks, which `prototype_refined` places its prototypes with and
    `logreg_std_selftrained` pseudo-labels (None: they fail); `fitted`: heads of other recipes already fitted,
    without a warm start, on these same features and targets, by name (`logreg_std_selftrained` takes
    `logreg_std`'s as its first stage instead of fitting it again; the result is the same)."""
    if recipe.kind == "logreg":
        try:
            head = fit_head(features, targets, num_classes=num_classes, multi_label=multi_label,
                            recipe=HeadRecipe(inverse_regularization=recipe.C), warm=warm)
        except RuntimeError as exc:  # L-BFGS's line search stops on non-finite steps
            raise RecipeFailed(f"{recipe.name} did not converge (non-finite loss: {exc})") from None
    elif multi_label:
        raise RecipeFailed(f"{recipe.name} serves single-choice controls only")
    elif recipe.kind in ("standardized", "shrunk"):
        head = _standardized(recipe, features, targets, num_classes, warm)
    elif recipe.kind == "anchored":
        head = _anchored(recipe, features, targets, num_classes, warm, anchor)
    elif recipe.kind == "prototype":
        head = _prototype(features, targets, num_classes)
    elif recipe.kind == "refined":
        head = _refined_prototype(features, targets, num_classes, pool)
    elif recipe.kind == "selftrained":
        first = (fitted or {}).get(STANDARDIZED.name) if warm is None else None
        head = _self_trained(recipe, features, targets, num_classes, warm, pool, first=first)
    else:
        raise RecipeFailed(f"unknown recipe kind {recipe.kind!r}")
    check_finite(head, recipe.name)
    return head


def _standardized(recipe: Recipe, features, targets, num_classes, warm) -> nn.Linear:
    """Logistic regression on features scaled to unit variance per coordinate, folded back into one
    linear head on the raw features (w / scale, bias - w · mean / scale)."""
    mean, scale = _shrunk_scale(features) if recipe.kind == "shrunk" else _coordinate_scale(features)
    start = None
    if warm is not None:  # the same head in the scaled coordinates
        start = linear(warm.weight * scale, warm.bias + warm.weight @ mean)
    try:
        fitted = fit_head((features.float() - mean) / scale, targets, num_classes=num_classes, multi_label=False,
                          recipe=HeadRecipe(inverse_regularization=recipe.C), warm=start)
    except RuntimeError as exc:
        raise RecipeFailed(f"{recipe.name} did not converge (non-finite loss: {exc})") from None
    weight = fitted.weight / scale
    return linear(weight, fitted.bias - weight @ mean)


def _self_trained(recipe: Recipe, features, targets, num_classes, warm, pool: torch.Tensor | None, *,
                  first: nn.Linear | None = None) -> nn.Linear:
    """`logreg_std` on the labels (`first`, where it is already fitted), then on the labels plus the unlabeled tasks
    it is at least SELF_TRAIN_CONFIDENCE sure of (at most SELF_TRAIN_MAX, spread evenly over them in the pool's
    order), each labeled with its predicted class (the standardizing follows both)."""
    _check_pool(recipe, features, pool)
    if first is None:
        first = _standardized(STANDARDIZED, features, targets, num_classes, warm)
    with torch.no_grad():
        confidence, predicted = torch.softmax(first(pool.float()), dim=1).max(dim=1)
    sure = (confidence >= SELF_TRAIN_CONFIDENCE).nonzero().flatten()
    if len(sure) == 0:
        return first
    if len(sure) > SELF_TRAIN_MAX:
        sure = sure[torch.linspace(0, len(sure) - 1, SELF_TRAIN_MAX).long()]
    return _standardized(recipe, torch.cat([features.float(), pool.float()[sure]]),
                         torch.cat([targets, predicted[sure]]), num_classes, warm if warm is not None else first)


def _check_pool(recipe: Recipe, features: torch.Tensor, pool: torch.Tensor | None) -> None:
    if pool is None or len(pool) == 0:
        raise RecipeFailed(f"{recipe.name} needs the features of unlabeled tasks, and none were given")
    if pool.shape[1] != features.shape[1]:
        raise RecipeFailed(f"{recipe.name}: the pool has {pool.shape[1]} features per task, the labels "
                           f"{features.shape[1]}")


def _anchored(recipe: Recipe, features, targets, num_classes, warm, anchor: nn.Linear | None) -> nn.Linear:
    """Logistic regression of a correction to the anchor's logits (penalty on the correction only), folded
    into one head: anchor weights + correction. A zero correction is the zero-shot classifier itself."""
    if anchor is None:
        raise RecipeFailed(f"{recipe.name} needs the zero-shot classifier of the choices, and there is none "
                           "(a choice matches no ImageNet class, ZERO_SHOT is off, or the input is not an image)")
    if tuple(anchor.weight.shape) != (num_classes, features.shape[1]):
        raise RecipeFailed(f"{recipe.name}: the anchor has shape {tuple(anchor.weight.shape)}, the head needs "
                           f"({num_classes}, {features.shape[1]})")
    start = None
    if warm is not None:  # the served head's correction
        start = linear(warm.weight - anchor.weight, warm.bias - anchor.bias)
    with torch.no_grad():
        offset = anchor(features.float())
    try:
        correction = fit_head(features, targets, num_classes=num_classes, multi_label=False,
                              recipe=HeadRecipe(inverse_regularization=recipe.C), warm=start, offset=offset)
    except RuntimeError as exc:
        raise RecipeFailed(f"{recipe.name} did not converge (non-finite loss: {exc})") from None
    return linear(correction.weight + anchor.weight, correction.bias + anchor.bias)


def _coordinate_scale(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and standard deviation, the variance floored at 1 % of the average one so a
    coordinate that barely varies among the labels is not blown up into a strong feature."""
    features = features.float()
    variance = features.var(0, unbiased=False)
    return features.mean(0), (variance + SCALE_FLOOR * variance.mean()).sqrt()


def _shrunk_scale(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_coordinate_scale`, each log variance shrunk toward their mean by tau² / (tau² + noise): noise =
    trigamma((n-1)/2), the variance of the log of a sample variance of n values; tau² = what the log
    variances spread beyond it (0 when the spread is all noise: no standardizing at all)."""
    mean, scale = _coordinate_scale(features)
    log_variance = (2 * scale.log()).double()
    degrees = max(features.shape[0] - 1, 1)
    noise = float(torch.special.polygamma(1, torch.tensor(degrees / 2.0, dtype=torch.float64)))
    spread = max(0.0, float(log_variance.var()) - noise) if len(log_variance) > 1 else 0.0
    centre = log_variance.mean()
    shrunk = centre + spread / (spread + noise) * (log_variance - centre)
    return mean, (shrunk / 2).exp().float()


def check_finite(head: nn.Linear, name: str) -> None:
    if not (torch.isfinite(head.weight).all() and torch.isfinite(head.bias).all()):
        raise RecipeFailed(f"{name} produced non-finite weights (NaN or inf); it is skipped")


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    head.eval()
    for parameter in head.parameters():
        parameter.requires_grad_(False)
    return head


def _class_sums(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the sum of its labeled features and how many there are."""
    one_hot = nn.functional.one_hot(targets, num_classes).float()
    return one_hot.T @ features.float(), one_hot.sum(0)


def _class_means(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums, counts = _class_sums(features, targets, num_classes)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


def _prototype(features, targets, num_classes) -> nn.Linear:
    means, counts = _class_means(features, targets, num_classes)
    # centred on the mean of the class means: what all classes share says nothing about which one it is
    center = means[counts > 0].mean(0)
    directions = PROTOTYPE_SCALE * nn.functional.normalize(means - center, dim=1)
    # a class without labels never wins
    bias = torch.where(counts > 0, -(directions @ center), torch.tensor(-1e4))
    return linear(directions, bias)


def _refined_prototype(features, targets, num_classes, pool: torch.Tensor | None) -> nn.Linear:
    """Cosine prototypes: the labels' class means, then `POOL_ROUNDS` rounds of soft k-means in which the pool's
    tasks add their features to each prototype in proportion to softmax(PROTOTYPE_SCALE × cosine)."""
    _check_pool(REFINED, features, pool)
    features, pool = nn.functional.normalize(features.float(), dim=1), nn.functional.normalize(pool.float(), dim=1)
    labeled_sums, counts = _class_sums(features, targets, num_classes)
    pool_share = POOL_WEIGHT * len(targets) / len(pool)  # the weight of one unlabeled task
    prototypes = nn.functional.normalize(labeled_sums, dim=1)
    for _ in range(POOL_ROUNDS):
        membership = torch.softmax(PROTOTYPE_SCALE * pool @ prototypes.T, dim=1)
        prototypes = nn.functional.normalize(labeled_sums + pool_share * membership.T @ pool, dim=1)
    bias = torch.where(counts > 0, torch.tensor(0.0), torch.tensor(-1e4))  # a class without labels never wins
    return linear(PROTOTYPE_SCALE * prototypes, bias)
