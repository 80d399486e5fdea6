"""The head recipes: a small fixed family of ways to turn features + labels into a linear head.

Every recipe yields one `nn.Linear` of raw (uncalibrated) logits on any feature vector, so the
store, the guard and serving never need to know which recipe made a head:

- `logreg_c1`, `logreg_c10`, `logreg_c100`: L2-regularized logistic regression (softmax, or
  one-vs-rest sigmoid for multiple choice) along a short C path, each fit warm-started from the
  previous one. Small C is safe with few labels; large C fits well-separated classes better.
- `prototype`: nearest class centroid by cosine similarity around the centre of the classes (closed
  form; strong at 1-2 labels per class).
- `blend`: the average of two recipes' calibrated logits (chosen by `backend.core.recipe_choice`).

Single choice uses the whole family; multiple choice uses the logistic path (the closed-form
recipes model one class per example).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backend.core.head_fitting import HeadRecipe, fit_head

PROTOTYPE_SCALE = 20.0  # logits = 20 × cosine similarity before calibration (softmax over cosines is flat)


@dataclass(frozen=True)
class Recipe:
    """One member of the family: `kind` says how it is fitted, `C` the logistic regularization."""

    name: str
    kind: str  # "logreg" | "prototype"
    C: float | None = None

    def as_dict(self) -> dict:
        record = {"name": self.name, "kind": self.kind}
        if self.C is not None:
            record.update(C=self.C, optimizer="lbfgs", class_balanced=True)
        return record


LOGREG_PATH = (Recipe("logreg_c1", "logreg", 1.0), Recipe("logreg_c10", "logreg", 10.0),
               Recipe("logreg_c100", "logreg", 100.0))
FAMILY: tuple[Recipe, ...] = (*LOGREG_PATH, Recipe("prototype", "prototype"))
BY_NAME = {recipe.name: recipe for recipe in FAMILY}


class RecipeFailed(ValueError):
    """A recipe did not produce a usable head (did not converge, or produced NaNs); the reason says which."""


def family_for(*, multi_label: bool) -> tuple[Recipe, ...]:
    return LOGREG_PATH if multi_label else FAMILY


def fit_recipe(recipe: Recipe, features: torch.Tensor, targets: torch.Tensor, *, num_classes: int,
               multi_label: bool, warm: nn.Linear | None = None) -> nn.Linear:
    """A head of raw logits fitted by `recipe`; raises RecipeFailed when its result is not usable."""
    if recipe.kind == "logreg":
        try:
            head = fit_head(features, targets, num_classes=num_classes, multi_label=multi_label,
                            recipe=HeadRecipe(inverse_regularization=recipe.C), warm=warm)
        except RuntimeError as exc:  # L-BFGS's line search stops on non-finite steps
            raise RecipeFailed(f"{recipe.name} did not converge (non-finite loss: {exc})") from None
    elif multi_label:
        raise RecipeFailed(f"{recipe.name} serves single-choice controls only")
    elif recipe.kind == "prototype":
        head = _prototype(features, targets, num_classes)
    else:
        raise RecipeFailed(f"unknown recipe kind {recipe.kind!r}")
    check_finite(head, recipe.name)
    return head


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


def _class_means(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    one_hot = nn.functional.one_hot(targets, num_classes).float()
    counts = one_hot.sum(0)
    means = (one_hot.T @ features.float()) / counts.clamp(min=1).unsqueeze(1)
    return means, counts


def _prototype(features, targets, num_classes) -> nn.Linear:
    means, counts = _class_means(features, targets, num_classes)
    # centred on the mean of the class means: what all classes share says nothing about which one it is
    center = means[counts > 0].mean(0)
    directions = PROTOTYPE_SCALE * nn.functional.normalize(means - center, dim=1)
    # a class without labels never wins
    bias = torch.where(counts > 0, -(directions @ center), torch.tensor(-1e4))
    return linear(directions, bias)

