"""Which labels are probably wrong, and how much the model could label at a target precision.

Everything here works on out-of-fold, temperature-calibrated probabilities of the labeled examples
(each example scored by a head that never saw it), computed with the same head fitting as training:
- **suspects**, confident learning (Northcutt et al., JAIR 2021): per class, the threshold t_j is the mean
  probability of class j over the examples labeled j. An example labeled i is flagged (the cut) when its given
  label is not confident (p_i < t_i) and another class j beats it and reaches t_j (the example lands off the
  diagonal of the confident joint) or t_i (it is as surely j as a typical label i is i). Every example is
  ranked by the probability of its given label (lowest first).
- **conflicts**: near-duplicate inputs (cosine of the features at least `duplicate_cosine`) whose
  labels differ.
- **auto-accept**: per class, the lowest confidence at which the predictions of that class reach a target
  precision out of fold, from the out-of-fold probabilities of the *served* head's recipe
  (`served_recipe_probabilities`): the thresholds are applied to that head, and recipes differ in how their
  confidence maps to accuracy (thresholds from another recipe's folds realized 0.959 instead of 0.98 on flowers12
  when a C=10 head was served). Precision against the given labels understates it when labels are noisy (a wrong
  label on an easy example counts as a model error), so it is corrected with the flip rates the calibrated
  confident joint estimates (`label_noise.py`), on an isotonic (non-increasing) fit of agreement against
  confidence; a Wilson interval comes with it. And how many unlabeled rows a head would label above it.

Torch only: no Redis, RQ, Flask or Label Studio here. Nothing is relabeled: this only reports.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from backend.core.head_fitting import HeadRecipe, cross_validate, encode_targets, fit_temperature
from backend.core.label_noise import estimate_noise, self_confidence_thresholds
from backend.core.recipe_choice import Choice, validate_choice
from backend.core.recipes import BY_NAME

MIN_LABELS_TO_JUDGE = 5  # per class (and per class absent, for multiple choice): one per fold of a 5-fold split
OOF_REPEATS = 1  # fold shuffles averaged (2 did not rank flipped labels better on hymenoptera / flowers12)
DUPLICATE_COSINE = 0.97  # re-encoded / resized copies of one image score above this with ImageNet backbones
WILSON_Z = 1.96  # 95 % interval
# below this P(given j | true j) - P(given j | true not j), the labels are too noisy for the correction to be trusted:
# precision is then taken against the given labels as they are (which understates it)
MIN_LABEL_AGREEMENT = 0.5
ALL_CLASSES = "*"  # the auto-accept key of a multiple-choice control: every class decision right
DEFAULT_RECIPE = "default"  # the audit's own recipe (`HeadRecipe()`: logistic regression at C=1), by name


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
    precision: float | None  # estimated precision above the threshold against the true labels (see `_threshold`)
    low: float | None  # its 95 % Wilson interval (of the observed agreement, corrected the same way)
    high: float | None
    support: int  # out-of-fold predictions above the threshold
    observed: float | None = None  # their precision against the given labels, uncorrected
    label_noise: float = 0.0  # estimated P(given label ≠ class | class): what `precision` is corrected for

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
    recipe: HeadRecipe = HeadRecipe(), repeats: int = OOF_REPEATS, keys: Sequence[int] | None = None,
) -> torch.Tensor | None:
    """Calibrated probabilities of every example from heads that never saw it (k-fold, `repeats`
    fold assignments averaged); None when a class has too few examples for folds. `keys`: the labels' task ids,
    which keep each label in its fold from one audit to the next, so a new label does not reshuffle the suspects."""
    runs = []
    for repeat in range(repeats):
        validation = cross_validate(features, targets, num_classes=num_classes, multi_label=multi_label,
                                    recipe=dataclasses.replace(recipe, seed=recipe.seed + repeat), keys=keys)
        if validation.logits is None:
            return None
        temperature = fit_temperature(validation.logits, targets, multi_label=multi_label)
        scaled = validation.logits / temperature
        runs.append(torch.sigmoid(scaled) if multi_label else torch.softmax(scaled, dim=1))
    return torch.stack(runs).mean(dim=0)


def served_recipe_probabilities(
    features: torch.Tensor, targets: torch.Tensor, selection: dict | None, *, num_classes: int, multi_label: bool,
    anchor: torch.nn.Linear | None = None, pool: torch.Tensor | None = None, keys: Sequence[int] | None = None,
) -> tuple[torch.Tensor | None, str]:
    """Calibrated out-of-fold probabilities of the recipe a served head was fitted with (`selection`, the
    version's recipe choice as `Choice.as_dict()` saved it), on the same folds the choice was made on, and that
    recipe's name: what the auto-accept thresholds must come from, since they are applied to that head. Without a
    usable choice (a version saved before recipe choice, or whose recipe this code no longer has), the default
    recipe's (`out_of_fold_probabilities`, named `DEFAULT_RECIPE`). None when a class has too few examples for
    folds. `anchor`: the control's zero-shot head, which a `zero_shot_anchored` choice is refitted on, and `pool`
    the unlabeled tasks' features a choice that uses them (`recipes.POOLED`) is (without them such a choice falls
    back to the default recipe too). `keys`: the labels' task ids, as the training passed them, for the same folds."""
    if not selection or not all(name in BY_NAME for name in selection.get("components") or ()) or \
            (Choice.from_dict(selection).needs_anchor and anchor is None) or \
            (Choice.from_dict(selection).needs_pool and pool is None):
        return out_of_fold_probabilities(features, targets, num_classes=num_classes,
                                         multi_label=multi_label, keys=keys), DEFAULT_RECIPE
    choice = validate_choice(Choice.from_dict(selection), features, targets, num_classes=num_classes,
                             multi_label=multi_label, anchor=anchor, pool=pool, keys=keys)
    logits = choice.validation.logits
    if logits is None:
        return None, choice.name
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)), choice.name


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
    thresholds = self_confidence_thresholds(probabilities, targets, judged)
    given = probabilities[torch.arange(n), targets]
    others = probabilities.clone()
    others[torch.arange(n), targets] = -1.0
    # another class reaches its own threshold (off the diagonal of the confident joint) or the given class's
    reach = torch.minimum(thresholds[None, :], thresholds[targets][:, None])
    confident = (others >= reach) & (others > given[:, None]) & (given < thresholds[targets])[:, None]
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
    # as for single choice, per class decision: the other decision reaches its own threshold or the given one's,
    # and beats the given decision, which is below its own threshold
    t_given = torch.where(given_mask, t_present, t_absent)
    t_other = torch.where(given_mask, t_absent, t_present)
    off = ((1 - decision) >= torch.minimum(t_given, t_other)) & (decision < 0.5) & (decision < t_given)
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
    out-of-fold predictions reach `target` precision against the true labels, estimated from the given
    ones corrected for the label noise the confident joint finds in them (single choice)."""
    classes = list(classes)
    targets = encode_targets(labels, classes, multi_label=multi_label)
    if multi_label:
        decisions = probabilities >= multi_label_threshold
        right = (decisions == targets.bool()).all(dim=1)
        certainty = torch.maximum(probabilities, 1 - probabilities).min(dim=1).values
        return {ALL_CLASSES: _threshold(ALL_CLASSES, certainty, right, target)}
    counts = torch.bincount(targets, minlength=len(classes))
    noise = estimate_noise(probabilities, targets, [j for j in range(len(classes)) if counts[j] >= MIN_LABELS_TO_JUDGE])
    confidence, predicted = probabilities.max(dim=1)
    return {name: _threshold(name, confidence[predicted == j], (targets == j)[predicted == j], target,
                             flipped_out=float(noise.flipped_out[j]), flipped_in=float(noise.flipped_in[j]))
            for j, name in enumerate(classes)}


def corrected_precision(observed: float, *, flipped_out: float, flipped_in: float) -> float:
    """The precision against the true labels of predictions whose agreement with the given labels is `observed`,
    when a label of the predicted class is wrong with probability `flipped_out` on its own examples and given
    with probability `flipped_in` to examples of other classes (label noise independent of the input within a
    class, confident learning's assumption): observed = p (1 - out) + (1 - p) in, solved for p. No correction
    (observed) when the estimate leaves the labels less than `MIN_LABEL_AGREEMENT` informative."""
    agreement = 1.0 - flipped_out - flipped_in
    if agreement < MIN_LABEL_AGREEMENT:
        return observed
    return min(1.0, max(0.0, (observed - flipped_in) / agreement))


def _threshold(label: str, confidence: torch.Tensor, right: torch.Tensor, target: float, *,
               flipped_out: float = 0.0, flipped_in: float = 0.0) -> Threshold:
    """The lowest confidence whose accepted rows reach `target`: agreement with the given labels as a monotone
    (isotonic) function of confidence, corrected for label noise, averaged over the rows above each cut."""
    order = confidence.argsort(descending=True)
    confidence, right = confidence[order], right[order].float()
    rows = torch.arange(1, len(right) + 1)
    local = torch.tensor([corrected_precision(a, flipped_out=flipped_out, flipped_in=flipped_in)
                          for a in decreasing_fit(right).tolist()])
    precision = local.cumsum(0) / rows  # non-increasing: one crossing of the target
    reaching = (precision >= target).nonzero().flatten()
    if len(reaching) == 0:
        return Threshold(label, None, None, None, None, 0)
    last = int(reaching[-1])
    while last + 1 < len(confidence) and confidence[last + 1] == confidence[last]:
        last -= 1  # a tie below the cut would be accepted too: stop above it
        if last < 0:
            return Threshold(label, None, None, None, None, 0)
    support, correct = last + 1, int(right[:last + 1].sum())
    low, high = wilson_interval(correct, support)
    correct_for = dict(flipped_out=flipped_out, flipped_in=flipped_in)
    lowest = math.floor(float(confidence[last]) * 1e6) / 1e6  # rounded down: the last accepted row stays above
    estimate = float(precision[last])  # the isotonic fit's mean, at or above the raw agreement's correction
    return Threshold(label, lowest, round(estimate, 4),
                     round(min(corrected_precision(low, **correct_for), estimate), 4),
                     round(max(corrected_precision(high, **correct_for), estimate), 4), support,
                     observed=round(correct / support, 4), label_noise=round(flipped_out, 4))


def decreasing_fit(values: torch.Tensor) -> torch.Tensor:
    """The non-increasing sequence closest to `values` in squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in values.tolist():
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] < blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return torch.tensor([total / count for total, count in blocks for _ in range(count)])


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
