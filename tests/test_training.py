"""Head fitting and validation on real features."""

from __future__ import annotations

import torch

from backend.core.head_fitting import encode_targets
from backend.core.head_fitting import HeadRecipe, cross_validate, fit_head, predicted_correctly


def targets_of(labels):
    return encode_targets([[name] for name in labels], ["ants", "bees"], multi_label=False)


def test_fitting_is_deterministic(hymenoptera_features):
    features, labels = hymenoptera_features
    first = fit_head(features, targets_of(labels), num_classes=2, multi_label=False)
    second = fit_head(features, targets_of(labels), num_classes=2, multi_label=False)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)


def test_cross_validation_is_out_of_fold_and_close_to_reference(hymenoptera_features):
    features, labels = hymenoptera_features
    validation = cross_validate(features, targets_of(labels), num_classes=2, multi_label=False)
    assert validation.folds == 5 and len(validation.correct) == len(labels)
    in_sample = fit_head(features, targets_of(labels), num_classes=2, multi_label=False)
    in_sample_accuracy = sum(predicted_correctly(in_sample, features, targets_of(labels), multi_label=False)) / len(labels)
    assert 0.8 <= validation.accuracy < in_sample_accuracy  # honest: held-out examples are harder


def test_one_example_of_a_class_means_no_validation(hymenoptera_features):
    features, labels = hymenoptera_features
    keep = [0, 1, 2, 25]  # three ants, one bee
    validation = cross_validate(features[keep], targets_of([labels[i] for i in keep]), num_classes=2, multi_label=False)
    assert validation.accuracy is None and validation.folds == 0


def test_multi_label_heads_learn_independent_classes(hymenoptera_features):
    features, labels = hymenoptera_features
    # two overlapping tags: "insect" on everything, the true class as a second tag
    names = [["insect", name] for name in labels]
    targets = encode_targets(names, ["insect", "ants", "bees"], multi_label=True)
    head = fit_head(features, targets, num_classes=3, multi_label=True)
    correct = predicted_correctly(head, features, targets, multi_label=True)
    assert sum(correct) >= 0.9 * len(labels)
    validation = cross_validate(features, targets, num_classes=3, multi_label=True)
    assert validation.accuracy is not None and validation.accuracy >= 0.75


def test_stronger_regularization_shrinks_the_weights(hymenoptera_features):
    features, labels = hymenoptera_features
    loose = fit_head(features, targets_of(labels), num_classes=2, multi_label=False)
    tight = fit_head(features, targets_of(labels), num_classes=2, multi_label=False,
                     recipe=HeadRecipe(inverse_regularization=0.01))
    assert tight.weight.norm() < loose.weight.norm()


def test_calibration_makes_confident_scores_without_changing_decisions(hymenoptera_features):
    from backend.core.heads import head_probabilities
    from backend.core.head_fitting import calibrate, fit_temperature

    features, labels = hymenoptera_features
    targets = targets_of(labels)
    validation = cross_validate(features, targets, num_classes=2, multi_label=False)
    temperature = fit_temperature(validation.logits, targets, multi_label=False)
    assert temperature < 1.0  # the regularized head is timid: its logits are scaled up
    head = fit_head(features, targets, num_classes=2, multi_label=False)
    before = head_probabilities(head, features, multi_label=False)
    calibrate(head, temperature)
    after = head_probabilities(head, features, multi_label=False)
    assert torch.equal(before.argmax(1), after.argmax(1))
    assert after.max(1).values.mean() > before.max(1).values.mean()
    # honest on held-out examples: the mean calibrated confidence is near the out-of-fold accuracy
    held_out = torch.softmax(validation.logits / temperature, dim=1).max(1).values.mean()
    assert abs(float(held_out) - validation.accuracy) < 0.1
