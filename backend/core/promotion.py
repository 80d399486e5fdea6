"""The negative-transfer guard: promote a candidate only if it validates at least as well as the
current version on the same labels.

Both are scored out of sample, example by example, on exactly the current labels: the candidate by
its k-fold out-of-fold predictions; the current head by its own out-of-fold result for labels it
was trained on (unchanged since), and by its real prediction for labels it never saw.

"At least as well" is judged with a paired (McNemar-style) test on those per-example results, not
by comparing two noisy means: the candidate is rejected only when the examples it gets wrong and
the current head gets right outnumber the reverse by more than chance explains (one-sided, about
2 %). Re-shuffled folds alone therefore almost never block a new label from being served, while a
backbone or recipe that really transfers worse is kept out. The folds are not reshuffled either: a
label's fold follows from its task id (`head_fitting.stratified_folds`), so the examples the two
versions disagree on are mostly those the new labels changed: `python -m bench guard` counted 268
such examples over 900 one-label-more trainings against 1,405 with the folds reshuffled per
training, and 0 rejections of a true label against 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from backend.core.store import HeadVersion
from backend.core.head_fitting import encode_targets
from backend.core.head_fitting import predicted_correctly

REJECT_Z = 2.0  # one-sided normal quantile of the paired test
MIN_NET_LOSSES = 2  # never reject over a single example


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
    current_correct = current_results(current, task_ids=task_ids, labels=labels, features=current_features)
    candidate_oof = candidate_meta.get("out_of_fold_correct")
    if candidate_oof is None or current_correct is None:
        return Decision(True, "too few labels to compare; the newest labels win", candidate_score,
                        _mean(current_correct))
    candidate_correct = [bool(candidate_oof[str(task)]) for task in task_ids]
    current_score = _mean(current_correct)
    lost = sum(old and not new for old, new in zip(current_correct, candidate_correct))
    won = sum(new and not old for old, new in zip(current_correct, candidate_correct))
    comparison = (f"validates {candidate_score:.3f} vs current {current_score:.3f} on the same "
                  f"{len(task_ids)} labels ({won} examples gained, {lost} lost)")
    if lost - won >= MIN_NET_LOSSES and lost - won > REJECT_Z * math.sqrt(lost + won):
        return Decision(False, f"rejected: {comparison}", candidate_score, current_score)
    return Decision(True, comparison, candidate_score, current_score)


def current_results(
    current: HeadVersion, *, task_ids: Sequence[int], labels: Sequence[Sequence[str]],
    features: torch.Tensor | None,
) -> list[bool] | None:
    """Per label: is the current head right, out of sample? None if that cannot be measured."""
    trained_on = current.meta.get("trained_on") or {}
    out_of_fold = current.meta.get("out_of_fold_correct")
    unseen = [i for i, (task, names) in enumerate(zip(task_ids, labels)) if trained_on.get(str(task)) != list(names)]
    if len(unseen) < len(task_ids) and out_of_fold is None:
        return None
    if unseen and features is None:
        return None
    unseen_set = set(unseen)
    correct = [False if i in unseen_set else bool(out_of_fold[str(task)]) for i, task in enumerate(task_ids)]
    if unseen:
        targets = encode_targets([labels[i] for i in unseen], current.classes, multi_label=current.multi_label)
        for i, ok in zip(unseen, predicted_correctly(current.head, features[unseen], targets,
                                                     multi_label=current.multi_label)):
            correct[i] = ok
    return correct


def _mean(values: list[bool] | None) -> float | None:
    return sum(values) / len(values) if values else None
