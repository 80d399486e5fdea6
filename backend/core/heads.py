"""The trainable heads, by type: each version's metadata names its type (`meta["head"]`) and the
store rebuilds it from that record, so a new head type is one more entry in `HEAD_TYPES`.

`linear`: one linear layer on frozen, L2-normalized features. A softmax over it serves
single-choice controls; a sigmoid (independent probabilities and a threshold) serves
`choice="multiple"`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def build_head(feature_dim: int, num_classes: int) -> nn.Linear:
    """A fresh linear head for every retrain."""
    return nn.Linear(feature_dim, num_classes)


# head type -> builder from its record ({"type", "feature_dim", "num_classes"})
HEAD_TYPES: dict[str, Callable[[dict], nn.Module]] = {
    "linear": lambda record: build_head(record["feature_dim"], record["num_classes"]),
}


def head_record(head: nn.Module) -> dict:
    """What rebuilding `head` takes, saved in its version's metadata."""
    if isinstance(head, nn.Linear):
        return {"type": "linear", "feature_dim": head.in_features, "num_classes": head.out_features}
    raise TypeError(f"no head type is registered for {type(head).__name__}")


def rebuild_head(meta: dict) -> nn.Module:
    """An empty head of the type a version's metadata records (versions saved before the record: linear)."""
    record = meta.get("head") or {"type": "linear", "feature_dim": meta["feature_dim"],
                                  "num_classes": len(meta["classes"])}
    try:
        return HEAD_TYPES[record["type"]](record)
    except KeyError:
        raise TypeError(f"head type {record.get('type')!r} is not known to this headstart "
                        f"(known: {', '.join(HEAD_TYPES)}); upgrade it to serve this version") from None


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
