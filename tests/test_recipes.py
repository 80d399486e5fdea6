"""The head recipes and the rule that chooses among them, on real MobileNetV2 features of real photos."""

from __future__ import annotations

import pytest
import torch

from backend.core import recipe_choice as recipe_choice_module, recipes as recipes_module
from backend.core.head_fitting import encode_targets
from backend.core.candidates import is_refit_enough
from backend.core.recipe_choice import (BLEND, MIN_BLEND_WEIGHT, Choice, NoUsableRecipe, choose_recipe, fit_chosen,
                                        validate_choice)
from backend.core.recipes import _coordinate_scale, _shrunk_scale
from backend.core.recipes import (ANCHORED, BY_NAME, FAMILY, LOGREG_PATH, SELF_TRAIN_CONFIDENCE, SELF_TRAINED,
                                  SINGLE_CHOICE, STANDARDIZED, Recipe, RecipeFailed, family_for, fit_recipe, linear)
from backend.core.zero_shot import ZeroShotClassifiers, anchor_for, match_choices


@pytest.fixture(scope="module")
def anchor():
    """The zero-shot head of ants/bees (ImageNet's "ant" and "bee"), what the training job passes."""
    return anchor_for(ZeroShotClassifiers(), "mobilenet_v2", ["ants", "bees"])


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
def test_every_recipe_learns_ants_from_bees_from_ten_labels_each(hymenoptera_features, recipe, anchor):
    x, y, held_x, held_y = split(hymenoptera_features, 10)
    # the held-out photos are also the unlabeled pool `prototype_refined` places its prototypes with (their labels unread)
    head = fit_recipe(recipe, x, y, num_classes=2, multi_label=False, anchor=anchor, pool=held_x)
    score = accuracy(head, held_x, held_y)
    print(f"\n{recipe.name}: {score:.3f} on 20 held-out photos")
    assert score >= 0.85


def test_the_blend_weighs_the_recipes_by_their_out_of_fold_log_loss(hymenoptera_features, anchor):
    x, y, held_x, held_y = split(hymenoptera_features, 15)
    choice = choose_recipe(x, y, num_classes=2, multi_label=False)
    single = {recipe.name for recipe in SINGLE_CHOICE}
    assert single <= set(choice.evidence) <= single | {BLEND}
    assert abs(sum(choice.weights.values()) - 1.0) < 1e-6 and set(choice.weights) == set(choice.components)
    assert all(weight >= MIN_BLEND_WEIGHT for weight in choice.weights.values())
    assert (choice.name == BLEND) == (len(choice.components) > 1)
    # the blend's out-of-fold log-loss is no worse than the best single recipe's (the weights minimise it)
    best = min(choice.evidence[recipe.name]["log_loss"] for recipe in SINGLE_CHOICE)
    assert choice.evidence[choice.name]["log_loss"] <= best + 1e-3
    assert choice.validation.folds == 5 and len(choice.validation.correct) == len(y)
    head = fit_chosen(choice, x, y, num_classes=2, multi_label=False)
    scores = {recipe.name: accuracy(fit_recipe(recipe, x, y, num_classes=2, multi_label=False, anchor=anchor,
                                               pool=held_x),
                                    held_x, held_y) for recipe in FAMILY}
    print(f"\nchosen {choice.name}: {accuracy(head, held_x, held_y):.3f}; each recipe: {scores}")
    assert accuracy(head, held_x, held_y) >= min(scores.values())
    # calibrated: the served scores are not the raw logits' (a temperature was folded in)
    assert choice.temperatures[choice.name] != 1.0 and choice.as_dict()["chosen_at_labels"] == len(y)


def test_one_label_per_class_uses_the_default_recipe_without_evidence(hymenoptera_features):
    x, y, _, _ = split(hymenoptera_features, 1)
    choice = choose_recipe(x, y, num_classes=2, multi_label=False)
    assert choice.name == "logreg_std_shrunk" and choice.evidence == {} and choice.validation.folds == 0


def test_multiple_choice_uses_the_logistic_path_only():
    assert family_for(multi_label=True) == LOGREG_PATH
    for single_choice_only in (STANDARDIZED, BY_NAME["prototype"]):
        with pytest.raises(RecipeFailed, match="single-choice"):
            fit_recipe(single_choice_only, torch.randn(4, 8), torch.eye(2)[[0, 1, 0, 1]], num_classes=2,
                       multi_label=True)


def test_standardizing_separates_many_similar_classes_better_than_any_c(flowers12_features):
    """Why `logreg_std` is in the family: at 5 labels per class on flowers12 (12 classes), logistic
    regression on the standardized features is more accurate on all of val (240 photos) than at any C
    on the raw features, where a few high-variance coordinates dominate the penalty."""
    (x, y), (val_x, val_y), classes = flowers12_features
    scores = {recipe.name: accuracy(fit_recipe(recipe, x, y, num_classes=len(classes), multi_label=False), val_x, val_y)
              for recipe in (*LOGREG_PATH, STANDARDIZED)}
    print(f"\nflowers12, 5 labels per class, accuracy on val: {scores}")
    assert scores["logreg_std"] >= scores["logreg_c1"] + 0.015  # 4 photos or more of 240
    assert scores["logreg_std"] > max(scores[recipe.name] for recipe in LOGREG_PATH)


def test_the_labels_own_folds_see_the_standardized_advantage(flowers12_features):
    """The choice can only serve `logreg_std` where the labels' own out-of-fold scores favour it: on the same
    60 flowers12 labels its calibrated out-of-fold log-loss is the lowest of the family's single recipes
    (measured 0.046 against 0.106 for C=1), no val photo involved."""
    (x, y), _, classes = flowers12_features
    choice = choose_recipe(x, y, num_classes=len(classes), multi_label=False)
    assert {recipe.name for recipe in SINGLE_CHOICE} <= set(choice.evidence) and choice.validation.folds == 5
    losses = {name: choice.evidence[name]["log_loss"] for name in ("logreg_c1", "logreg_std", "prototype")}
    print(f"\nout-of-fold log-loss: {losses}; chosen {choice.name} {choice.components}")
    assert losses["logreg_std"] == min(losses.values()) and losses["logreg_std"] < 0.75 * losses["logreg_c1"]


def test_the_standardized_head_is_one_linear_layer_on_the_raw_features(hymenoptera_features):
    """Standardizing is folded into the head's weights: serving feeds it the raw features, as every head;
    a retrain warm-started from the served head reaches the same optimum as a cold fit."""
    x, y, held_x, held_y = split(hymenoptera_features, 10)
    head = fit_recipe(STANDARDIZED, x, y, num_classes=2, multi_label=False)
    mean, std = x.mean(0), (x.var(0, unbiased=False) + 0.01 * x.var(0, unbiased=False).mean()).sqrt()
    scaled = fit_recipe(BY_NAME["logreg_c1"], (x - mean) / std, y, num_classes=2, multi_label=False)
    assert torch.allclose(head(held_x), scaled((held_x - mean) / std), atol=1e-4)
    more_x, more_y = torch.cat([x, held_x[:2]]), torch.cat([y, held_y[:2]])
    cold = fit_recipe(STANDARDIZED, more_x, more_y, num_classes=2, multi_label=False)
    warm = fit_recipe(STANDARDIZED, more_x, more_y, num_classes=2, multi_label=False, warm=head)
    assert torch.equal(cold(held_x).argmax(1), warm(held_x).argmax(1))
    assert torch.allclose(cold(held_x), warm(held_x), atol=1e-2)  # within L-BFGS's tolerance
    assert STANDARDIZED.as_dict() == {"name": "logreg_std", "kind": "standardized", "C": 1.0, "optimizer": "lbfgs",
                                      "class_balanced": True, "standardized": True, "variance_floor": 0.01}


def test_a_blend_refits_as_one_head_with_its_weights(flowers12_features):
    """The served blend is one linear layer: the weighted sum of its recipes' calibrated heads over the blend's
    temperature; a saved choice refits to the same head, and validating it keeps the weights."""
    (x, y), (val_x, val_y), classes = flowers12_features
    choice = choose_recipe(x, y, num_classes=len(classes), multi_label=False)
    print(f"\nflowers12, 60 labels: {choice.name} {choice.weights}")
    assert choice.name == BLEND and len(choice.components) >= 2  # 5 labels per class: more than one recipe counts
    head = fit_chosen(choice, x, y, num_classes=len(classes), multi_label=False)
    expected = sum(choice.weights[name] / choice.temperatures[name]
                   * fit_recipe(BY_NAME[name], x, y, num_classes=len(classes), multi_label=False)(val_x)
                   for name in choice.components) / choice.temperatures[BLEND]
    assert torch.allclose(head(val_x), expected, atol=1e-4)
    saved = Choice.from_dict(choice.as_dict())
    assert saved.weights == pytest.approx(choice.weights, abs=1e-5)
    assert torch.allclose(fit_chosen(saved, x, y, num_classes=len(classes), multi_label=False)(val_x), head(val_x),
                          atol=1e-3)
    assert validate_choice(saved, x, y, num_classes=len(classes), multi_label=False).weights == saved.weights


def test_a_blend_saved_before_weights_existed_refits_with_equal_weights(hymenoptera_features):
    x, y, held_x, held_y = split(hymenoptera_features, 10)
    record = {"recipe": BLEND, "components": ["logreg_c1", "prototype"],
              "temperatures": {"logreg_c1": 0.5, "prototype": 2.0, BLEND: 1.0}, "chosen_at_labels": len(y)}
    choice = Choice.from_dict(record)
    assert choice.weight_of("logreg_c1") == choice.weight_of("prototype") == 0.5
    assert accuracy(fit_chosen(choice, x, y, num_classes=2, multi_label=False), held_x, held_y) >= 0.85


def test_a_saved_choice_of_a_recipe_no_longer_chosen_among_still_refits(hymenoptera_features):
    """Versions chosen before the single-choice family became (C=1, standardized, prototype) name C=10 or C=100;
    their provisional refits still work (every recipe of FAMILY can be fitted by name)."""
    x, y, held_x, held_y = split(hymenoptera_features, 10)
    assert BY_NAME["logreg_c100"] not in family_for(multi_label=False)
    saved = Choice(name="logreg_c100", components=("logreg_c100",), temperatures={"logreg_c100": 2.0, BLEND: 1.0})
    head = fit_chosen(Choice.from_dict(saved.as_dict()), x, y, num_classes=2, multi_label=False)
    assert accuracy(head, held_x, held_y) >= 0.85


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


def test_the_anchored_recipe_is_offered_only_where_every_choice_matches_an_imagenet_class(hymenoptera_features,
                                                                                          anchor):
    classifiers = ZeroShotClassifiers()
    assert anchor is not None and tuple(anchor.weight.shape) == (2, 1280)
    assert anchor_for(classifiers, "mobilenet_v2", ["ants", "wasps"]) is None  # "wasps": no ImageNet class
    assert anchor_for(classifiers, "mobilenet_v2", ["ants", "bees"], multi_label=True) is None
    assert anchor_for(None, "mobilenet_v2", ["ants", "bees"]) is None  # ZERO_SHOT off
    assert ANCHORED not in family_for(multi_label=False) and family_for(multi_label=False, anchored=True)[0] == ANCHORED
    x, y, _, _ = split(hymenoptera_features, 10)
    plain = choose_recipe(x, y, num_classes=2, multi_label=False)
    assert ANCHORED.name not in plain.evidence and ANCHORED.name not in plain.components
    anchored = choose_recipe(x, y, num_classes=2, multi_label=False, anchor=anchor)
    assert ANCHORED.name in anchored.evidence


def test_the_anchor_is_the_zero_shot_classifier_as_one_linear_head(hymenoptera_features, anchor):
    features, _ = hymenoptera_features
    match = match_choices("mobilenet_v2", ["ants", "bees"])
    zero_shot = ZeroShotClassifiers().get("mobilenet_v2").probabilities(features, match)
    assert torch.allclose(torch.softmax(anchor(features), dim=1), zero_shot, atol=1e-5)


def test_one_label_per_class_with_an_anchor_starts_from_zero_shot(hymenoptera_features, anchor):
    x, y, held_x, held_y = split(hymenoptera_features, 1)
    choice = choose_recipe(x, y, num_classes=2, multi_label=False, anchor=anchor)
    assert choice.name == ANCHORED.name and choice.evidence == {}
    head = fit_chosen(choice, x, y, num_classes=2, multi_label=False, anchor=anchor)
    plain = fit_recipe(LOGREG_PATH[0], x, y, num_classes=2, multi_label=False)
    print(f"\none label per class: anchored {accuracy(head, held_x, held_y):.3f}, C=1 {accuracy(plain, held_x, held_y):.3f}")
    assert accuracy(head, held_x, held_y) >= max(0.9, accuracy(plain, held_x, held_y))


def test_an_anchored_choice_is_refitted_only_with_its_anchor(hymenoptera_features, anchor):
    x, y, held_x, held_y = split(hymenoptera_features, 10)
    saved = Choice(name=ANCHORED.name, components=(ANCHORED.name,), temperatures={ANCHORED.name: 1.5, BLEND: 1.0},
                   label_count=len(y)).as_dict()
    assert Choice.from_dict(saved).needs_anchor
    assert accuracy(fit_chosen(Choice.from_dict(saved), x, y, num_classes=2, multi_label=False, anchor=anchor),
                    held_x, held_y) >= 0.9
    with pytest.raises(NoUsableRecipe, match="zero-shot"):
        fit_chosen(Choice.from_dict(saved), x, y, num_classes=2, multi_label=False)
    # the training job re-chooses instead of refitting when the anchor is gone (ZERO_SHOT off, choices renamed)
    assert is_refit_enough({"selection": saved}, len(y), anchored=True)
    assert not is_refit_enough({"selection": saved}, len(y), anchored=False)


def test_an_anchor_of_nans_is_skipped_with_its_reason_and_never_chosen(hymenoptera_features, anchor):
    x, y, _, _ = split(hymenoptera_features, 10)
    broken = linear(torch.full_like(anchor.weight, float("nan")), anchor.bias)
    choice = choose_recipe(x, y, num_classes=2, multi_label=False, anchor=broken)
    assert ANCHORED.name in choice.skipped and "non-finite" in choice.skipped[ANCHORED.name], choice.skipped
    assert ANCHORED.name not in choice.components and ANCHORED.name not in choice.evidence


def test_the_shrunk_standardization_keeps_only_the_variance_differences_the_labels_can_tell():
    generator = torch.Generator().manual_seed(0)
    spread = torch.linspace(0.1, 3.0, 64)  # true standard deviations 30x apart
    for n, expected in ((3, (0.0, 0.6)), (400, (0.95, 1.0))):
        isotropic = torch.randn(n, 64, generator=generator)
        _, scale = _shrunk_scale(isotropic)
        assert float(scale.std() / scale.mean()) < 0.05  # equal variances: no standardizing from noise
        uneven = torch.randn(n, 64, generator=generator) * spread
        _, full = _coordinate_scale(uneven)
        _, shrunk = _shrunk_scale(uneven)
        kept = float(torch.corrcoef(torch.stack([shrunk.log(), full.log()]))[0, 1]) if n > 3 else None
        ratio = float((shrunk.log().std() / full.log().std()))
        assert expected[0] <= ratio <= expected[1], (n, ratio, kept)


def test_self_training_refits_with_the_unlabeled_tasks_it_is_sure_of(hymenoptera_features):
    """`logreg_std_selftrained` is `logreg_std` fitted again on the labels plus every unlabeled task the first fit
    gives SELF_TRAIN_CONFIDENCE or more, labeled with its predicted class (the pool's own labels are never passed)."""
    x, y, pool, _ = split(hymenoptera_features, 5)
    first = fit_recipe(STANDARDIZED, x, y, num_classes=2, multi_label=False)
    confidence, predicted = torch.softmax(first(pool), dim=1).max(dim=1)
    sure = confidence >= SELF_TRAIN_CONFIDENCE
    print(f"\n{int(sure.sum())} of {len(pool)} unlabeled photos are sure enough to count as labels")
    assert 0 < int(sure.sum()) < len(pool)
    expected = fit_recipe(STANDARDIZED, torch.cat([x, pool[sure]]), torch.cat([y, predicted[sure]]), num_classes=2,
                          multi_label=False)
    head = fit_recipe(SELF_TRAINED, x, y, num_classes=2, multi_label=False, pool=pool)
    assert torch.allclose(head(pool), expected(pool), atol=1e-2)  # within L-BFGS's tolerance (warm-started)
    assert SELF_TRAINED in family_for(multi_label=False, pooled=True)
    assert SELF_TRAINED not in family_for(multi_label=False) + family_for(multi_label=True, pooled=True)
    assert SELF_TRAINED.as_dict()["pseudo_label_confidence"] == SELF_TRAIN_CONFIDENCE


def test_self_training_with_no_unlabeled_task_sure_enough_is_the_standardized_head(hymenoptera_features,
                                                                                   monkeypatch):
    x, y, pool, _ = split(hymenoptera_features, 5)
    monkeypatch.setattr("backend.core.recipes.SELF_TRAIN_CONFIDENCE", 1.01)
    head = fit_recipe(SELF_TRAINED, x, y, num_classes=2, multi_label=False, pool=pool)
    assert torch.allclose(head(pool), fit_recipe(STANDARDIZED, x, y, num_classes=2, multi_label=False)(pool), atol=1e-4)


def test_self_training_builds_on_the_standardized_head_already_fitted_beside_it(hymenoptera_features, monkeypatch):
    """Where `logreg_std` is fitted on the same fold (a choice among the family, or a blend of both), the
    self-trained recipe takes that head as its first stage instead of fitting it again: one fit fewer per fold,
    the same out-of-fold scores and the same served head."""
    x, y, pool, _ = split(hymenoptera_features, 10)
    fits = []
    real_fit = recipes_module.fit_head
    monkeypatch.setattr(recipes_module, "fit_head", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    first = fit_recipe(STANDARDIZED, x, y, num_classes=2, multi_label=False)
    alone = fit_recipe(SELF_TRAINED, x, y, num_classes=2, multi_label=False, pool=pool)
    fits.clear()
    reused = fit_recipe(SELF_TRAINED, x, y, num_classes=2, multi_label=False, pool=pool,
                        fitted={STANDARDIZED.name: first})
    assert len(fits) == 1 and torch.equal(reused.weight, alone.weight) and torch.equal(reused.bias, alone.bias)

    keys = list(range(len(y)))
    choice = choose_recipe(x, y, num_classes=2, multi_label=False, family=(STANDARDIZED, SELF_TRAINED), pool=pool,
                           keys=keys)
    fits.clear()
    validated = validate_choice(choice, x, y, num_classes=2, multi_label=False, pool=pool, keys=keys)
    folds = validated.validation.folds
    assert folds >= 2 and len(fits) == 2 * folds  # logreg_std, then only the self-trained refit, per fold
    monkeypatch.setattr(recipe_choice_module, "fit_recipe",
                        lambda *a, fitted=None, **k: recipes_module.fit_recipe(*a, **k))  # nothing reused
    fits.clear()
    unshared = validate_choice(choice, x, y, num_classes=2, multi_label=False, pool=pool, keys=keys)
    assert len(fits) == 3 * folds
    assert torch.equal(unshared.validation.logits, validated.validation.logits)


def test_self_training_without_unlabeled_tasks_fails_and_its_choice_asks_for_them(hymenoptera_features):
    x, y, _, _ = split(hymenoptera_features, 5)
    with pytest.raises(RecipeFailed, match="logreg_std_selftrained needs the features of unlabeled tasks"):
        fit_recipe(SELF_TRAINED, x, y, num_classes=2, multi_label=False, pool=None)
    with pytest.raises(RecipeFailed, match="the pool has 3 features per task"):
        fit_recipe(SELF_TRAINED, x, y, num_classes=2, multi_label=False, pool=torch.randn(4, 3))
    selection = {"recipe": BLEND, "components": ["logreg_std", "logreg_std_selftrained"],
                 "weights": {"logreg_std": 0.5, "logreg_std_selftrained": 0.5},
                 "temperatures": {"logreg_std": 1.0, "logreg_std_selftrained": 1.0, BLEND: 1.0},
                 "chosen_at_labels": len(y)}
    assert Choice.from_dict(selection).needs_pool
    assert not Choice.from_dict({**selection, "components": ["logreg_std"]}).needs_pool
    # a refit of such a choice needs the unlabeled tasks: without any, the next training chooses again
    assert is_refit_enough({"selection": selection}, len(y), pooled=True)
    assert not is_refit_enough({"selection": selection}, len(y), pooled=False)
