"""The negative-transfer guard: promote a candidate only if it validates at least as well as the
current version on the same labels.

Both are scored out of sample on exactly the current labels: the candidate by its k-fold
out-of-fold predictions; the current head by its own out-of-fold result for labels it was trained
on (unchanged since), and by its real prediction for labels it never saw. One example's worth of
difference (1/n) is treated as a tie, so noise alone never blocks a new label from being served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from backend.core.store import HeadVersion
from backend.core.trainer import encode_targets
from backend.core.training import predicted_correctly


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_score: float | None
    current_score: float | None

    def as_dict(self) -> dict:
        return {"promote": self.promote, "reason": self.reason,
                "candidate_score": self.candidate_score, "current_score": self.current_score}


def decide(
    candidate_meta: dict, current: HeadVersion | None, *, task_ids: Sequence[int],
    labels: Sequence[Sequence[str]], current_features: torch.Tensor | None,
) -> Decision:
    candidate_score = candidate_meta["metrics"]["cv_accuracy"]
    if current is None:
        return Decision(True, "first version", candidate_score, None)
    current_score = score_current(current, task_ids=task_ids, labels=labels, features=current_features)
    if candidate_score is None or current_score is None:
        return Decision(True, "too few labels to compare; the newest labels win", candidate_score, current_score)
    tolerance = 1.0 / len(task_ids)
    if candidate_score + tolerance >= current_score:
        return Decision(True, f"validates {candidate_score:.3f} vs current {current_score:.3f} on the same "
                              f"{len(task_ids)} labels", candidate_score, current_score)
    return Decision(False, f"rejected: validates {candidate_score:.3f}, below the current version's "
                           f"{current_score:.3f} on the same {len(task_ids)} labels", candidate_score, current_score)


def score_current(
    current: HeadVersion, *, task_ids: Sequence[int], labels: Sequence[Sequence[str]],
    features: torch.Tensor | None,
) -> float | None:
    """The current head's out-of-sample accuracy on these labels, or None if it cannot be measured."""
    trained_on = current.meta.get("trained_on") or {}
    out_of_fold = current.meta.get("out_of_fold_correct")
    unseen = [i for i, (task, names) in enumerate(zip(task_ids, labels))
              if trained_on.get(str(task)) != list(names)]
    unseen_set = set(unseen)
    seen = [i for i in range(len(task_ids)) if i not in unseen_set]
    if seen and out_of_fold is None:
        return None
    correct = [bool(out_of_fold[str(task_ids[i])]) for i in seen]
    if unseen:
        if features is None:
            return None
        unseen_labels = [labels[i] for i in unseen]
        targets = encode_targets(unseen_labels, current.classes, multi_label=current.multi_label)
        correct += predicted_correctly(current.head, features[unseen], targets, multi_label=current.multi_label)
    return sum(correct) / len(correct) if correct else None
