"""Which labels are probably wrong, and how much the model could label at a target precision.

Everything here works on out-of-fold, temperature-calibrated probabilities of the labeled examples
(each example scored by a head that never saw it), computed with the same head fitting as training:
- **suspects**, confident-learning style: per class, the threshold t_j is the mean probability of
  class j over the examples labeled j; an example labeled i whose probability of another class j
  reaches `CONFIDENT_SLACK` · t_j (and beats its own class) lands off the diagonal of the confident
  joint and is flagged (the cut). Every example is ranked by the probability of its given label
  (lowest first).
- **conflicts**: near-duplicate inputs (cosine of the features at least `duplicate_cosine`) whose
  labels differ.
- **auto-accept**: per class, the lowest confidence at which the predictions of that class reach
  a target precision out of fold, with a Wilson interval; and how many unlabeled rows a head
  would label above it.

Torch only: no Redis, RQ, Flask or Label Studio here. Nothing is relabeled: this only reports.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from backend.core.head_fitting import HeadRecipe, cross_validate, encode_targets, fit_temperature

MIN_LABELS_TO_JUDGE = 5  # per class (and per class absent, for multiple choice): one per fold of a 5-fold split
OOF_REPEATS = 1  # fold shuffles averaged (2 did not rank flipped labels better on hymenoptera / flowers12)
# t_j loosened by 10 %: on hymenoptera and flowers12 with 10 % flipped labels the plain confident joint (1.0) flagged
# at precision 0.98-1.0 but recall 0.71-0.78; 0.9 at precision 0.91-1.0, recall 0.76-0.88 (bench/README.md)
CONFIDENT_SLACK = 0.9
DUPLICATE_COSINE = 0.97  # re-encoded / resized copies of one image score above this with ImageNet backbones
WILSON_Z = 1.96  # 95 % interval
ALL_CLASSES = "*"  # the auto-accept key of a multiple-choice control: every class decision right


@dataclass(frozen=True)
class Suspect:
    """One labeled example, judged: `index` is its row in the inputs."""

    index: int
    given: list[str]
    suggested: list[str]  # the label the out-of-fold probabilities prefer
    given_probability: float  # calibrated probability of the given label (multiple: of its least likely decision)
    suggested_probability: float
    flagged: bool  # inside the confident-learning cut

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Conflict:
    first: int
    second: int
    cosine: float


@dataclass(frozen=True)
class Threshold:
    """The lowest confidence at which a class's out-of-fold predictions reach the target precision."""

    label: str
    threshold: float | None  # None: never reached
    precision: float | None  # out-of-fold precision above the threshold, against the given labels
    low: float | None  # its 95 % Wilson interval
    high: float | None
    support: int  # out-of-fold predictions above the threshold

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Audit:
    judged: bool
    reason: str  # why not judged, or what was judged
    ranking: list[Suspect] = field(default_factory=list)  # every judged example, most likely wrong first
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def suspects(self) -> list[Suspect]:
        return [suspect for suspect in self.ranking if suspect.flagged]


def out_of_fold_probabilities(
    features: torch.Tensor, targets: torch.Tensor, *, num_classes: int, multi_label: bool,
    recipe: HeadRecipe = HeadRecipe(), repeats: int = OOF_REPEATS,
) -> torch.Tensor | None:
    """Calibrated probabilities of every example from heads that never saw it (k-fold, `repeats`
    shuffles averaged); None when a class has too few examples for folds."""
    runs = []
    for repeat in range(repeats):
        validation = cross_validate(features, targets, num_classes=num_classes, multi_label=multi_label,
                                    recipe=dataclasses.replace(recipe, seed=recipe.seed + repeat))
        if validation.logits is None:
            return None
        temperature = fit_temperature(validation.logits, targets, multi_label=multi_label)
        scaled = validation.logits / temperature
        runs.append(torch.sigmoid(scaled) if multi_label else torch.softmax(scaled, dim=1))
    return torch.stack(runs).mean(dim=0)


def judge_labels(
    probabilities: torch.Tensor | None, labels: Sequence[Sequence[str]], classes: Sequence[str], *,
    multi_label: bool, min_labels: int = MIN_LABELS_TO_JUDGE,
) -> Audit:
    """Rank every labeled example by how unlikely its given label is; flag the confident-learning cut."""
    classes = list(classes)
    counts = {name: sum(name in names for names in labels) for name in classes}
    judged = [name for name in classes if counts[name] >= min_labels
              and (not multi_label or len(labels) - counts[name] >= min_labels)]
    needed = 1 if multi_label else 2
    if len(judged) < needed or probabilities is None:
        what = "with and without it" if multi_label else "labeled"
        return Audit(False, f"not enough labels to judge: each class needs {min_labels} examples {what} "
                            f"({'at least one class' if multi_label else 'two classes at least'}); has {counts}")
    targets = encode_targets(labels, classes, multi_label=multi_label)
    if multi_label:
        ranking = _judge_multiple(probabilities, targets, classes, [classes.index(name) for name in judged])
    else:
        ranking = _judge_single(probabilities, targets, classes, [classes.index(name) for name in judged])
    rare = sorted(set(classes) - set(judged))
    note = f"; not judged (fewer than {min_labels} labels): {', '.join(rare)}" if rare else ""
    return Audit(True, f"{len(ranking)} labels judged, {sum(s.flagged for s in ranking)} suspect{note}", ranking)


def _judge_single(probabilities, targets, classes, judged: list[int]) -> list[Suspect]:
    n, k = probabilities.shape
    thresholds = torch.full((k,), float("inf"))
    for j in judged:
        thresholds[j] = probabilities[targets == j, j].mean()
    given = probabilities[torch.arange(n), targets]
    others = probabilities.clone()
    others[torch.arange(n), targets] = -1.0
    # off the diagonal of the confident joint
    confident = (others >= CONFIDENT_SLACK * thresholds) & (others > given[:, None])
    confident_other = torch.where(confident, others, torch.full_like(others, -1.0))
    best_other = others.argmax(dim=1)
    rows = [i for i in range(n) if int(targets[i]) in judged]
    flagged = {row for row in rows if bool(confident[row].any())}
    ranking = []
    for row in sorted(rows, key=lambda row: float(given[row])):
        suggested = int(confident_other[row].argmax()) if confident[row].any() else int(best_other[row])
        ranking.append(Suspect(index=row, given=[classes[int(targets[row])]], suggested=[classes[suggested]],
                               given_probability=round(float(given[row]), 4),
                               suggested_probability=round(float(probabilities[row, suggested]), 4),
                               flagged=row in flagged))
    return ranking


def _judge_multiple(probabilities, targets, classes, judged: list[int]) -> list[Suspect]:
    targets = targets.bool()
    cols = torch.tensor(judged)
    present = probabilities[:, cols]
    given_mask = targets[:, cols]
    decision = torch.where(given_mask, present, 1 - present)  # probability of each given decision
    t_present = torch.stack([present[given_mask[:, c], c].mean() for c in range(len(judged))])
    t_absent = torch.stack([(1 - present[~given_mask[:, c], c]).mean() for c in range(len(judged))])
    # a decision is off the confident joint when the other decision reaches its class threshold
    off = torch.where(given_mask, (1 - present) >= CONFIDENT_SLACK * t_absent,
                      present >= CONFIDENT_SLACK * t_present) & (decision < 0.5)
    weakest = decision.min(dim=1)
    flagged = set(off.any(dim=1).nonzero().flatten().tolist())
    ranking = []
    for row in sorted(range(len(targets)), key=lambda r: float(weakest.values[r])):
        suggested_mask = targets[row].clone()
        for c, j in enumerate(judged):
            if decision[row, c] < 0.5:
                suggested_mask[j] = ~suggested_mask[j]
        given = [classes[j] for j in range(len(classes)) if targets[row, j]]
        suggested = [classes[j] for j in range(len(classes)) if suggested_mask[j]]
        ranking.append(Suspect(index=row, given=given, suggested=suggested,
                               given_probability=round(float(weakest.values[row]), 4),
                               suggested_probability=round(float(1 - weakest.values[row]), 4),
                               flagged=row in flagged))
    return ranking


def near_duplicate_conflicts(features: torch.Tensor, labels: Sequence[Sequence[str]], *,
                             cosine: float = DUPLICATE_COSINE, block: int = 1024) -> list[Conflict]:
    """Pairs of examples whose inputs are near-duplicates (cosine ≥ `cosine`) but whose labels differ."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    keys = [tuple(sorted(names)) for names in labels]
    conflicts = []
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T
        rows, cols = (similarity >= cosine).nonzero(as_tuple=True)
        for row, col in zip(rows.tolist(), cols.tolist()):
            first = start + row
            if col > first and keys[first] != keys[col]:
                conflicts.append(Conflict(first, col, round(float(similarity[row, col]), 4)))
    return sorted(conflicts, key=lambda conflict: -conflict.cosine)


def wilson_interval(successes: int, trials: int, z: float = WILSON_Z) -> tuple[float, float]:
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def auto_accept_thresholds(
    probabilities: torch.Tensor, labels: Sequence[Sequence[str]], classes: Sequence[str], *,
    multi_label: bool, target: float, multi_label_threshold: float = 0.5,
) -> dict[str, Threshold]:
    """Per class (multiple choice: one entry, `ALL_CLASSES`), the lowest confidence at which the
    out-of-fold predictions reach `target` precision against the given labels."""
    classes = list(classes)
    targets = encode_targets(labels, classes, multi_label=multi_label)
    if multi_label:
        decisions = probabilities >= multi_label_threshold
        right = (decisions == targets.bool()).all(dim=1)
        certainty = torch.maximum(probabilities, 1 - probabilities).min(dim=1).values
        return {ALL_CLASSES: _threshold(ALL_CLASSES, certainty, right, target)}
    confidence, predicted = probabilities.max(dim=1)
    return {name: _threshold(name, confidence[predicted == j], (targets == j)[predicted == j], target)
            for j, name in enumerate(classes)}


def _threshold(label: str, confidence: torch.Tensor, right: torch.Tensor, target: float) -> Threshold:
    order = confidence.argsort(descending=True)
    confidence, right = confidence[order], right[order]
    cumulative = right.float().cumsum(0)
    precision = cumulative / torch.arange(1, len(right) + 1)
    reaching = (precision >= target).nonzero().flatten()
    if len(reaching) == 0:
        return Threshold(label, None, None, None, None, 0)
    last = int(reaching[-1])
    while last + 1 < len(confidence) and confidence[last + 1] == confidence[last]:
        last -= 1  # a tie below the cut would be accepted too: stop above it
        if last < 0:
            return Threshold(label, None, None, None, None, 0)
    support, correct = last + 1, int(cumulative[last])
    low, high = wilson_interval(correct, support)
    lowest = math.floor(float(confidence[last]) * 1e6) / 1e6  # rounded down: the last accepted row stays above
    return Threshold(label, lowest, round(correct / support, 4),
                     round(low, 4), round(high, 4), support)


def accepted(probabilities: torch.Tensor, classes: Sequence[str], thresholds: dict[str, Threshold], *,
             multi_label: bool, multi_label_threshold: float = 0.5) -> list[list[str] | None]:
    """Per row, the label a head would give above its class's threshold, or None (left to people)."""
    classes = list(classes)
    if multi_label:
        threshold = thresholds.get(ALL_CLASSES)
        certainty = torch.maximum(probabilities, 1 - probabilities).min(dim=1).values
        return [[classes[j] for j in range(len(classes)) if probabilities[row, j] >= multi_label_threshold]
                if threshold and threshold.threshold is not None and certainty[row] >= threshold.threshold else None
                for row in range(len(probabilities))]
    confidence, predicted = probabilities.max(dim=1)
    out: list[list[str] | None] = []
    for p, j in zip(confidence.tolist(), predicted.tolist()):
        threshold = thresholds.get(classes[j])
        ok = threshold is not None and threshold.threshold is not None and p >= threshold.threshold
        out.append([classes[j]] if ok else None)
    return out
