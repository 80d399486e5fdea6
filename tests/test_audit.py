"""The label audit on real MobileNetV2 features of real photos (backend/core/audit.py): flipped labels rank first,
near-duplicates with different labels are found, too few labels are refused, auto-accept thresholds hold."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from backend.core.audit import (ALL_CLASSES, DEFAULT_RECIPE, accepted, auto_accept_thresholds, corrected_precision,
                                decreasing_fit, judge_labels, near_duplicate_conflicts, out_of_fold_probabilities,
                                served_recipe_probabilities, wilson_interval)
from backend.core.candidates import fit_candidate
from backend.core.head_fitting import encode_targets
from backend.core.label_noise import estimate_noise
from backend.core.recipes import BY_NAME

CLASSES = ["ants", "bees"]
FLIPPED = [3, 11, 24, 37]  # two ants labeled bees, two bees labeled ants


def _flipped(names: list[str]) -> list[list[str]]:
    other = {"ants": "bees", "bees": "ants"}
    return [[other[name]] if row in FLIPPED else [name] for row, name in enumerate(names)]


def _oof(features, labels, *, multi_label=False):
    targets = encode_targets(labels, CLASSES, multi_label=multi_label)
    return out_of_fold_probabilities(features, targets, num_classes=2, multi_label=multi_label)


def test_flipped_labels_rank_first_and_fall_in_the_cut(hymenoptera_features):
    features, names = hymenoptera_features
    labels = _flipped(names)
    audit = judge_labels(_oof(features, labels), labels, CLASSES, multi_label=False)
    assert audit.judged
    assert len(audit.ranking) == len(labels)
    top = {suspect.index for suspect in audit.ranking[:len(FLIPPED) + 2]}
    assert len(top & set(FLIPPED)) >= len(FLIPPED) - 1, [s.index for s in audit.ranking[:8]]
    flagged = {suspect.index for suspect in audit.suspects}
    assert len(flagged & set(FLIPPED)) >= len(FLIPPED) // 2  # 20 labels per class: the cut is cautious
    assert len(flagged - set(FLIPPED)) <= 1, flagged
    first = audit.ranking[0]
    assert first.suggested != first.given and first.suggested_probability > first.given_probability
    probabilities = [suspect.given_probability for suspect in audit.ranking]
    assert probabilities == sorted(probabilities)


def test_clean_labels_give_few_suspects(hymenoptera_features):
    features, names = hymenoptera_features
    labels = [[name] for name in names]
    audit = judge_labels(_oof(features, labels), labels, CLASSES, multi_label=False)
    assert audit.judged and len(audit.suspects) <= 2


def test_multiple_choice_flipped_decisions_are_found(hymenoptera_features):
    features, names = hymenoptera_features
    labels = _flipped(names)
    audit = judge_labels(_oof(features, labels, multi_label=True), labels, CLASSES, multi_label=True)
    assert audit.judged
    top = {suspect.index for suspect in audit.ranking[:len(FLIPPED) + 2]}
    assert len(top & set(FLIPPED)) >= len(FLIPPED) - 1
    assert {s.index for s in audit.suspects} & set(FLIPPED)
    assert all(s.suggested != s.given for s in audit.suspects)


def test_not_enough_labels_to_judge(hymenoptera_features):
    features, names = hymenoptera_features
    one_class = [["ants"]] * 20
    assert "not enough labels to judge" in judge_labels(None, one_class, CLASSES, multi_label=False).reason
    few = [0, 1, 2, 20, 21, 22]  # three per class: fewer than the five folds
    labels = [[names[i]] for i in few]
    verdict = judge_labels(_oof(features[few], labels), labels, CLASSES, multi_label=False)
    assert not verdict.judged and not verdict.ranking and "not enough labels to judge" in verdict.reason
    rare = [[name] for name in names[:23]]  # 20 ants, 3 bees: multiple choice with a rare class
    verdict = judge_labels(_oof(features[:23], rare, multi_label=True), rare, CLASSES, multi_label=True)
    assert not verdict.judged and "not enough labels to judge" in verdict.reason


def test_near_duplicates_with_different_labels_conflict(hymenoptera_features):
    features, names = hymenoptera_features
    labels = [[name] for name in names]
    assert near_duplicate_conflicts(features, labels) == []  # 40 different photos
    copy = features[5] + 0.001 * torch.randn(features.shape[1])  # the same photo again, re-encoded
    conflicts = near_duplicate_conflicts(torch.cat([features, copy[None]]), labels + [["bees"]])
    assert [(c.first, c.second) for c in conflicts] == [(5, 40)] and conflicts[0].cosine > 0.99
    assert near_duplicate_conflicts(torch.cat([features, copy[None]]), labels + [[names[5]]]) == []


def test_auto_accept_threshold_reaches_its_target_out_of_fold(hymenoptera_features):
    features, names = hymenoptera_features
    labels = [[name] for name in names]
    probabilities = _oof(features, labels)
    thresholds = auto_accept_thresholds(probabilities, labels, CLASSES, multi_label=False, target=0.95)
    for name, threshold in thresholds.items():
        j = CLASSES.index(name)
        above = (probabilities.argmax(1) == j) & (probabilities[:, j] >= threshold.threshold)
        right = [names[i] == name for i in above.nonzero().flatten().tolist()]
        assert len(right) == threshold.support > 0
        assert sum(right) / len(right) == pytest.approx(threshold.observed, abs=1e-4)
        assert threshold.precision >= 0.95 and threshold.precision >= threshold.observed  # corrected for label noise
        assert threshold.low <= threshold.precision <= threshold.high
    machine = accepted(probabilities, CLASSES, thresholds, multi_label=False)
    assert sum(label is not None for label in machine) == sum(t.support for t in thresholds.values())
    noise = [[CLASSES[i % 2]] for i in range(len(names))]  # labels unrelated to the photos
    hopeless = auto_accept_thresholds(_oof(features, noise), noise, CLASSES, multi_label=False, target=0.99)
    assert all(t.threshold is None or t.support < 5 for t in hopeless.values())
    multiple = auto_accept_thresholds(_oof(features, labels, multi_label=True), labels, CLASSES, multi_label=True,
                                      target=0.95)
    assert list(multiple) == [ALL_CLASSES] and multiple[ALL_CLASSES].precision >= 0.95


@pytest.fixture(scope="module")
def hymenoptera_train(encoders):
    """Real MobileNetV2 features of 80 ants and 80 bees (train split) and their labels (0 ants, 1 bees)."""
    from backend.core.images import decode_image
    from tests.helpers import HYMENOPTERA, dataset_images

    train = [item for cls in CLASSES for item in [i for i in dataset_images(HYMENOPTERA, "train") if i[1] == cls][:80]]
    encoder = encoders.get()
    images = [decode_image(path.read_bytes(), max_pixels=10**9, min_side=encoder.resize_size) for path, _ in train]
    return encoder.embed(images), torch.tensor([CLASSES.index(cls) for _, cls in train])


def _flip(truth: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, set[int]]:
    """`fraction` of the labels turned into the other class, drawn with `seed`."""
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(truth)), round(fraction * len(truth))))
    given = truth.clone()
    for row in flipped:
        given[row] = 1 - given[row]
    return given, flipped


def test_the_cut_finds_most_flipped_labels_and_little_else(hymenoptera_train):
    """The issue's goal for the cut (precision >= 0.9 at recall >= 0.8), on 160 hymenoptera train photos with
    10 % of their labels flipped, over 3 draws (the old rule, another class at 0.9 of its threshold: 0.85)."""
    features, truth = hymenoptera_train
    precision, recall = [], []
    for seed in range(3):
        given, flipped = _flip(truth, 0.1, seed)
        labels = [[CLASSES[int(c)]] for c in given]
        audit = judge_labels(_oof(features, labels), labels, CLASSES, multi_label=False)
        flagged = {suspect.index for suspect in audit.suspects}
        precision.append(len(flagged & flipped) / len(flagged))
        recall.append(len(flagged & flipped) / len(flipped))
    assert statistics.mean(precision) >= 0.9 and statistics.mean(recall) >= 0.8, (precision, recall)


def test_a_suspect_is_a_label_that_is_not_confident_and_loses_to_a_confident_class(hymenoptera_train):
    features, truth = hymenoptera_train
    given, _ = _flip(truth, 0.2, seed=7)
    labels = [[CLASSES[int(c)]] for c in given]
    probabilities = _oof(features, labels)
    thresholds = [float(probabilities[given == j, j].mean()) for j in range(2)]
    audit = judge_labels(probabilities, labels, CLASSES, multi_label=False)
    assert audit.suspects
    for suspect in audit.ranking:
        i, j = CLASSES.index(suspect.given[0]), CLASSES.index(suspect.suggested[0])
        p_given, p_other = float(probabilities[suspect.index, i]), float(probabilities[suspect.index, j])
        expected = p_given < thresholds[i] and p_other > p_given and p_other >= min(thresholds)
        assert suspect.flagged == expected, (suspect, thresholds)


def test_label_noise_estimate_follows_the_flipped_fraction(hymenoptera_train):
    features, truth = hymenoptera_train
    for fraction in (0.0, 0.1, 0.2):
        given, _ = _flip(truth, fraction, seed=1)
        labels = [[CLASSES[int(c)]] for c in given]
        noise = estimate_noise(_oof(features, labels), given, [0, 1])
        assert abs(float(noise.flipped_out.mean()) - fraction) <= 0.05, (fraction, noise)
        assert abs(float(noise.joint.sum()) - 1) < 1e-5


def test_auto_accept_on_noisy_labels_is_not_needlessly_cautious(hymenoptera_train):
    """With 10 % of the labels flipped, the thresholds from the noisy labels still reach the target against the
    true labels, and accept most of what the thresholds from the clean labels accept (94 % of these photos;
    precision against the noisy labels, the old rule, accepted 3-13 %: every flipped easy photo counted as a model
    error)."""
    features, truth = hymenoptera_train
    target = 0.98

    def judged(labels_of: torch.Tensor) -> tuple[float, float]:
        labels = [[CLASSES[int(c)]] for c in labels_of]
        probabilities = _oof(features, labels)
        thresholds = auto_accept_thresholds(probabilities, labels, CLASSES, multi_label=False, target=target)
        machine = accepted(probabilities, CLASSES, thresholds, multi_label=False)
        rows = [row for row, label in enumerate(machine) if label is not None]
        right = sum(machine[row] == [CLASSES[int(truth[row])]] for row in rows)
        return right / max(len(rows), 1), len(rows) / len(truth)

    _, clean_coverage = judged(truth)
    draws = [judged(_flip(truth, 0.1, seed)[0]) for seed in range(3)]
    assert all(precision >= target - 0.015 for precision, _ in draws), draws
    assert statistics.mean(coverage for _, coverage in draws) >= 0.75 * clean_coverage, (draws, clean_coverage)


@pytest.mark.parametrize("recipe", ["prototype", "logreg_c100"])
def test_auto_accept_probabilities_are_the_served_recipes_own_out_of_fold(hymenoptera_train, encoders, recipe):
    """The thresholds are applied to the served head, so they come from its recipe's folds (the folds and
    temperatures its choice was scored on), not from the default recipe's: a head fitted another way maps
    confidence to accuracy differently (on flowers12 a C=10 head served under the default recipe's thresholds
    realized 0.959 against a 0.98 target)."""
    features, truth = hymenoptera_train
    given, _ = _flip(truth, 0.1, seed=0)
    labels = [[CLASSES[int(c)]] for c in given]
    task_ids = [100 + 3 * i for i in range(len(labels))]
    candidate = fit_candidate(control="label", classes=CLASSES, multi_label=False, features=features, labels=labels,
                              task_ids=task_ids, encoder=encoders.get(), family=(BY_NAME[recipe],))
    assert candidate.meta["recipe"] == recipe
    served, name = served_recipe_probabilities(features, given, candidate.meta["selection"], num_classes=2,
                                               multi_label=False, keys=task_ids)
    assert name == recipe
    chosen_on = torch.softmax(candidate.validation.logits, dim=1)  # what the choice scored the recipe on
    assert torch.allclose(served, chosen_on, atol=1e-3)
    default = out_of_fold_probabilities(features, given, num_classes=2, multi_label=False)
    assert not torch.allclose(served, default, atol=0.05)
    thresholds = auto_accept_thresholds(served, labels, CLASSES, multi_label=False, target=0.95)
    machine = accepted(chosen_on, CLASSES, thresholds, multi_label=False)
    assert sum(label is not None for label in machine) == sum(t.support for t in thresholds.values()) > 0
    # a version saved before recipe choice, or with a recipe this code no longer has: the default recipe's
    for selection in (None, {**candidate.meta["selection"], "recipe": "gone", "components": ["gone"]}):
        fallback, name = served_recipe_probabilities(features, given, selection, num_classes=2, multi_label=False)
        assert name == DEFAULT_RECIPE and torch.allclose(fallback, default)


def test_decreasing_fit_pools_adjacent_violators():
    fitted = decreasing_fit(torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(fitted, torch.tensor([1, 1, 2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 0]))
    assert bool((fitted[1:] <= fitted[:-1]).all())


def test_corrected_precision_inverts_the_noise():
    # 10 % of class j's examples carry another label, 5 % of the others carry j: observed = p * 0.9 + (1 - p) * 0.05
    p = 0.98
    observed = p * 0.9 + (1 - p) * 0.05
    assert corrected_precision(observed, flipped_out=0.1, flipped_in=0.05) == pytest.approx(p)
    assert corrected_precision(0.6, flipped_out=0.4, flipped_in=0.3) == 0.6  # too noisy to correct: as observed


def test_wilson_interval():
    low, high = wilson_interval(98, 100)
    assert 0.92 < low < 0.98 < high < 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
