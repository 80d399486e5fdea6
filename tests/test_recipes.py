"""The head recipes and the rule that chooses among them, on real MobileNetV2 features of real photos."""

from __future__ import annotations

import pytest
import torch

from backend.core.head_fitting import encode_targets
from backend.core.recipe_choice import BLEND, NoUsableRecipe, choose_recipe, fit_chosen
from backend.core.recipes import FAMILY, LOGREG_PATH, Recipe, RecipeFailed, family_for, fit_recipe


def split(hymenoptera_features, per_class: int):
    """The first `per_class` ants and bees to fit on, the other ones (of 20 each) to score on."""
    features, labels = hymenoptera_features
    targets = encode_targets([[name] for name in labels], ["ants", "bees"], multi_label=False)
    fit = [i for cls in (0, 1) for i in (targets == cls).nonzero().flatten().tolist()[:per_class]]
    held = [i for i in range(len(targets)) if i not in set(fit)]
    return features[fit], targets[fit], features[held], targets[held]


def accuracy(head, features, targets) -> float:
    return float((head(features).argmax(dim=1) == targets).float().mean())


@pytest.mark.parametrize("recipe", FAMILY, ids=lambda recipe: recipe.name)
def test_every_recipe_learns_ants_from_bees_from_ten_labels_each(hymenoptera_features, recipe):
    x, y, held_x, held_y = split(hymenoptera_features, 10)
    head = fit_recipe(recipe, x, y, num_classes=2, multi_label=False)
    score = accuracy(head, held_x, held_y)
    print(f"\n{recipe.name}: {score:.3f} on 20 held-out photos")
    assert score >= 0.85


def test_the_choice_is_the_simplest_within_fold_noise_of_the_best(hymenoptera_features):
    x, y, held_x, held_y = split(hymenoptera_features, 15)
    choice = choose_recipe(x, y, num_classes=2, multi_label=False)
    assert set(choice.evidence) == {recipe.name for recipe in FAMILY} | {BLEND}
    best = min(choice.evidence.values(), key=lambda scores: scores["log_loss"])
    assert choice.evidence[choice.name]["log_loss"] >= best["log_loss"]
    assert choice.validation.folds == 5 and len(choice.validation.correct) == len(y)
    head = fit_chosen(choice, x, y, num_classes=2, multi_label=False)
    scores = {recipe.name: accuracy(fit_recipe(recipe, x, y, num_classes=2, multi_label=False), held_x, held_y)
              for recipe in FAMILY}
    print(f"\nchosen {choice.name}: {accuracy(head, held_x, held_y):.3f}; each recipe: {scores}")
    assert accuracy(head, held_x, held_y) >= min(scores.values())
    # calibrated: the served scores are not the raw logits' (a temperature was folded in)
    assert choice.temperatures[choice.name] != 1.0 and choice.as_dict()["chosen_at_labels"] == len(y)


def test_one_label_per_class_uses_the_default_recipe_without_evidence(hymenoptera_features):
    x, y, _, _ = split(hymenoptera_features, 1)
    choice = choose_recipe(x, y, num_classes=2, multi_label=False)
    assert choice.name == "logreg_c1" and choice.evidence == {} and choice.validation.folds == 0


def test_multiple_choice_uses_the_logistic_path_only():
    assert family_for(multi_label=True) == LOGREG_PATH
    with pytest.raises(RecipeFailed):
        fit_recipe(FAMILY[-1], torch.randn(4, 8), torch.eye(2)[[0, 1, 0, 1]], num_classes=2, multi_label=True)


def test_a_recipe_that_produces_nans_is_skipped_with_its_reason(hymenoptera_features):
    x, y, _, _ = split(hymenoptera_features, 10)
    broken = Recipe("logreg_nan", "logreg", float("nan"))  # a NaN penalty: every weight becomes NaN
    choice = choose_recipe(x, y, num_classes=2, multi_label=False, family=(*FAMILY, broken))
    assert "logreg_nan" in choice.skipped and "non-finite" in choice.skipped["logreg_nan"], choice.skipped
    assert choice.name != "logreg_nan" and "logreg_nan" not in choice.evidence


def test_features_with_nans_train_no_head(hymenoptera_features):
    x, y, _, _ = split(hymenoptera_features, 10)
    poisoned = x.clone()
    poisoned[:, 0] = float("nan")
    with pytest.raises(NoUsableRecipe, match="NaN"):
        choose_recipe(poisoned, y, num_classes=2, multi_label=False)
