"""The label audit on real MobileNetV2 features of real photos (backend/core/audit.py): flipped labels rank first,
near-duplicates with different labels are found, too few labels are refused, auto-accept thresholds hold."""

from __future__ import annotations

import torch

from backend.core.audit import (ALL_CLASSES, accepted, auto_accept_thresholds, judge_labels, near_duplicate_conflicts,
                                out_of_fold_probabilities, wilson_interval)
from backend.core.head_fitting import encode_targets

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
        assert sum(right) / len(right) == threshold.precision >= 0.95
        assert threshold.low <= threshold.precision <= threshold.high
    machine = accepted(probabilities, CLASSES, thresholds, multi_label=False)
    assert sum(label is not None for label in machine) == sum(t.support for t in thresholds.values())
    noise = [[CLASSES[i % 2]] for i in range(len(names))]  # labels unrelated to the photos
    hopeless = auto_accept_thresholds(_oof(features, noise), noise, CLASSES, multi_label=False, target=0.99)
    assert all(t.threshold is None or t.support < 5 for t in hopeless.values())
    multiple = auto_accept_thresholds(_oof(features, labels, multi_label=True), labels, CLASSES, multi_label=True,
                                      target=0.95)
    assert list(multiple) == [ALL_CLASSES] and multiple[ALL_CLASSES].precision >= 0.95


def test_wilson_interval():
    low, high = wilson_interval(98, 100)
    assert 0.92 < low < 0.98 < high < 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
