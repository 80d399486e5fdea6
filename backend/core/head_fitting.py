"""Fit a head on cached features, and estimate how well it generalizes.

The recipe is L2-regularized logistic regression (softmax or one-vs-rest sigmoid) fitted to
convergence with L-BFGS, full batch, class-balanced, deterministic. On a few thousand labeled
images it takes well under a second on one CPU thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from backend.core.heads import build_head, head_probabilities
from backend.common.errors import NotEnoughLabels

MAX_FOLDS = 5
STABLE_FOLD_MIN = 4 * MAX_FOLDS  # a class with this many labels keeps each label's fold (`stratified_folds`)
_MASK64 = (1 << 64) - 1
LBFGS_MAX_ITER = 100
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.02, 20.0


@dataclass(frozen=True)
class HeadRecipe:
    """Hyper-parameters of a head fit; saved with each version."""

    inverse_regularization: float = 1.0  # C, as in logistic regression
    max_iter: int = LBFGS_MAX_ITER
    seed: int = 0

    def as_dict(self) -> dict:
        return {"type": "linear", "optimizer": "lbfgs", "C": self.inverse_regularization,
                "max_iter": self.max_iter, "seed": self.seed, "class_balanced": True}


@dataclass
class Validation:
    """Out-of-sample correctness of each labeled example (k-fold), or None when too few labels."""

    folds: int
    correct: list[bool] | None = field(default=None)
    logits: torch.Tensor | None = field(default=None, repr=False)  # out-of-fold, for calibration

    @property
    def accuracy(self) -> float | None:
        if not self.correct:
            return None
        return sum(self.correct) / len(self.correct)


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


def fit_head(
    features: torch.Tensor, targets: torch.Tensor, *, num_classes: int, multi_label: bool,
    recipe: HeadRecipe = HeadRecipe(), warm: nn.Linear | None = None, offset: torch.Tensor | None = None,
) -> nn.Linear:
    """Fit a fresh head. `targets` are class indices (single) or a 0/1 matrix (multiple).

    `warm` (a head of raw logits of the same shape) starts L-BFGS from its weights instead of zero:
    the optimum is the same, reached in fewer iterations when the labels changed little.
    `offset` (n, classes): fixed logits added to the head's during the fit (a prior the head corrects);
    the returned head is only the correction, the caller adds the prior back.
    """
    if features.shape[0] == 0:
        raise NotEnoughLabels("No labeled examples to train on. Label a few tasks first.")
    torch.manual_seed(recipe.seed)
    head = build_head(features.shape[1], num_classes)
    with torch.no_grad():
        if warm is not None and tuple(warm.weight.shape) == tuple(head.weight.shape):
            head.weight.copy_(warm.weight)
            head.bias.copy_(warm.bias)
        else:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
    loss_of = _loss_function(features, targets, num_classes=num_classes, multi_label=multi_label,
                             penalty=1.0 / (2.0 * recipe.inverse_regularization * features.shape[0]), offset=offset)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=recipe.max_iter,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of(head)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    head.eval()
    for parameter in head.parameters():
        parameter.requires_grad_(False)
    return head


def _loss_function(features, targets, *, num_classes, multi_label, penalty, offset=None):
    features = features.float()
    offset = torch.zeros(()) if offset is None else offset.float()
    if multi_label:
        targets = targets.float()
        positives = targets.sum(0).clamp(min=1)
        negatives = (targets.shape[0] - targets.sum(0)).clamp(min=1)
        pos_weight = negatives / positives
        criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    else:
        counts = torch.bincount(targets, minlength=num_classes).float()
        weights = torch.where(counts > 0, targets.shape[0] / (num_classes * counts.clamp(min=1)), 0.0)
        criterion = nn.CrossEntropyLoss(weight=weights)

    def loss_of(head: nn.Linear) -> torch.Tensor:
        return criterion(head(features) + offset, targets) + penalty * head.weight.pow(2).sum()

    return loss_of


def predicted_correctly(
    head: nn.Module, features: torch.Tensor, targets: torch.Tensor, *, multi_label: bool, threshold: float = 0.5
) -> list[bool]:
    """Per example: does the head's decision equal the label (all classes, for multiple choice)?"""
    probabilities = head_probabilities(head, features, multi_label=multi_label)
    if multi_label:
        return ((probabilities >= threshold) == targets.bool()).all(dim=1).tolist()
    return (probabilities.argmax(dim=1) == targets).tolist()


def cross_validate(
    features: torch.Tensor, targets: torch.Tensor, *, num_classes: int, multi_label: bool,
    recipe: HeadRecipe = HeadRecipe(), keys: Sequence[int] | None = None,
) -> Validation:
    """Stratified k-fold (k ≤ 5) out-of-fold correctness; None when a class has one example. `keys`: the labels'
    task ids, which fix each label's fold (`stratified_folds`)."""
    folds = stratified_folds(targets, multi_label=multi_label, seed=recipe.seed, keys=keys)
    if folds is None:
        return Validation(folds=0)
    correct = [False] * features.shape[0]
    logits = torch.zeros(features.shape[0], num_classes)
    for held_out in folds:
        mask = torch.ones(features.shape[0], dtype=torch.bool)
        mask[held_out] = False
        head = fit_head(features[mask], targets[mask], num_classes=num_classes,
                        multi_label=multi_label, recipe=recipe)
        with torch.no_grad():
            logits[held_out] = head(features[held_out])
        for index, ok in zip(held_out.tolist(),
                             predicted_correctly(head, features[held_out], targets[held_out],
                                                 multi_label=multi_label)):
            correct[index] = ok
    return Validation(folds=len(folds), correct=correct, logits=logits)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, multi_label: bool) -> float:
    """The temperature T that makes softmax(logits / T) (or sigmoid) honest on held-out examples.

    A strongly regularized head is right but timid (scores near 0.5 at 95 % accuracy); scaling
    its logits by the T that minimises the out-of-fold log-loss keeps every decision and makes the
    score mean what it says, so annotators can trust and sort by it.
    """
    log_t = torch.zeros(1, requires_grad=True)
    criterion = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
    target = targets.float() if multi_label else targets
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = criterion(logits / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


def calibrate(head: nn.Linear, temperature: float) -> None:
    """Fold a temperature into the head, so serving needs no extra step."""
    with torch.no_grad():
        head.weight /= temperature
        head.bias /= temperature


def stratified_folds(targets: torch.Tensor, *, multi_label: bool, seed: int,
                     keys: Sequence[int] | None = None) -> list[torch.Tensor] | None:
    """Up to `MAX_FOLDS` folds (index tensors), every class spread over them; None when a class has one example.

    With `keys` (the examples' task ids) each example's fold follows from its key, so the folds of two trainings
    agree: in a class of `STABLE_FOLD_MIN` labels or more a label's fold is its key's hash modulo the fold count,
    and a new label moves no other one (the guard compares a candidate with the served version label by label,
    and with reshuffled folds that comparison moved by chance: a version could lose five examples it did not
    change); in a smaller class the labels are dealt in turn in their keys' hash order, which keeps every fold
    holding some of the class. Without keys, each class is shuffled by `seed` and dealt in turn."""
    strata = _strata(targets, multi_label=multi_label)
    counts = torch.bincount(strata)
    smallest = int(counts[counts > 0].min())
    if smallest < 2 or len(counts[counts > 0]) < 2 and not multi_label:
        return None
    if keys is not None and len(keys) != len(targets):
        raise ValueError(f"{len(keys)} keys for {len(targets)} examples")
    fold_count = min(MAX_FOLDS, smallest)
    generator = torch.Generator().manual_seed(seed)
    assignment = torch.empty_like(strata)
    for stratum in strata.unique():
        members = (strata == stratum).nonzero().flatten()
        if keys is None:
            members = members[torch.randperm(len(members), generator=generator)]
        else:
            hashes = [_key_hash(int(keys[i]), seed) for i in members.tolist()]
            by_hash = [h % fold_count for h in hashes]
            if len(members) >= STABLE_FOLD_MIN and len(set(by_hash)) > 1:
                assignment[members] = torch.tensor(by_hash, dtype=assignment.dtype)
                continue
            members = members[sorted(range(len(members)), key=hashes.__getitem__)]
        assignment[members] = torch.arange(len(members)) % fold_count
    folds = [(assignment == fold).nonzero().flatten() for fold in range(fold_count)]
    return [fold for fold in folds if len(fold)]


def _key_hash(key: int, seed: int) -> int:
    """A well-mixed 64-bit hash of (key, seed) (splitmix64), the same in every process (unlike `hash`)."""
    value = (key * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _strata(targets: torch.Tensor, *, multi_label: bool) -> torch.Tensor:
    if not multi_label:
        return targets.long()
    # stratify multiple choice by the most frequent of each example's classes
    frequency = targets.float().sum(0)
    return (targets.float() * (frequency + 1)).argmax(dim=1)
