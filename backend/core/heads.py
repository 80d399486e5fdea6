"""The trainable head: one linear layer on frozen, L2-normalized features.

A softmax head serves single-choice controls; a sigmoid head (independent probabilities and a
threshold) serves `choice="multiple"`.
"""

from __future__ import annotations

import torch
from torch import nn


def build_head(feature_dim: int, num_classes: int) -> nn.Linear:
    """A fresh head for every retrain."""
    return nn.Linear(feature_dim, num_classes)


@torch.no_grad()
def head_probabilities(head: nn.Module, features: torch.Tensor, *, multi_label: bool) -> torch.Tensor:
    logits = head(features)
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)


def choose_classes(
    probabilities: torch.Tensor, classes: list[str], *, multi_label: bool, threshold: float
) -> list[tuple[list[str], float]]:
    """For each row: the chosen class names and a confidence score in [0, 1].

    Single choice: the arg-max class and its probability. Multiple choice: every class above
    `threshold` (the most likely one when none is), scored by the least certain decision.
    """
    choices = []
    for row in probabilities.tolist():
        if multi_label:
            picked = [index for index, p in enumerate(row) if p >= threshold]
            if not picked:
                picked = [max(range(len(row)), key=row.__getitem__)]
            certainty = min(max(p, 1 - p) for p in row)
            choices.append(([classes[index] for index in picked], certainty))
        else:
            best = max(range(len(row)), key=row.__getitem__)
            choices.append(([classes[best]], row[best]))
    return choices
