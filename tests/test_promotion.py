"""The negative-transfer guard: it keeps worse heads out, but fold noise never blocks a new label."""

from __future__ import annotations

import torch

from backend.core.promotion import decide
from backend.core.store import ModelStore
from backend.loop.retrain import train_version


def retrain(store, encoder, features, labels, upto):
    ids = list(range(upto))
    trained = train_version(store, project="2", control="label", classes=["ants", "bees"], multi_label=False,
                            features=features[:upto], labels=[[n] for n in labels[:upto]], task_ids=ids,
                            encoder=encoder)
    return trained, ids


def test_adding_labels_one_by_one_with_the_same_recipe_is_always_promoted(redis, encoders, hymenoptera_features):
    features, labels = hymenoptera_features
    order = [i for pair in zip(range(20), range(20, 40)) for i in pair]  # alternate ants and bees
    features, labels = features[order], [labels[i] for i in order]
    store, encoder = ModelStore(redis), encoders.get()
    first, _ = retrain(store, encoder, features, labels, 20)
    store.promote("2", "label", first.number)
    decisions = []
    for upto in range(21, 41):
        candidate, ids = retrain(store, encoder, features, labels, upto)
        current = store.load("2", "label", store.current_number("2", "label"))
        decision = decide(candidate.meta, current, task_ids=ids, labels=[[n] for n in labels[:upto]],
                          current_features=features[:upto])
        decisions.append(decision)
        if decision.promote:
            store.promote("2", "label", candidate.number)
    rejected = [d.reason for d in decisions if not d.promote]
    print(f"\n{len(decisions)} retrains, one label more each: {len(rejected)} rejected")
    assert rejected == []


def test_a_head_that_loses_many_examples_is_rejected(redis, encoders, hymenoptera_features):
    features, labels = hymenoptera_features
    store, encoder = ModelStore(redis), encoders.get()
    good, ids = retrain(store, encoder, features, labels, 40)
    store.promote("2", "label", good.number)
    # the same labels on features that carry no information: a backbone that does not transfer
    noise = torch.nn.functional.normalize(torch.randn_like(features), dim=1)
    bad = train_version(store, project="2", control="label", classes=["ants", "bees"], multi_label=False,
                        features=noise, labels=[[n] for n in labels], task_ids=ids, encoder=encoder)
    current = store.load("2", "label", good.number)
    decision = decide(bad.meta, current, task_ids=ids, labels=[[n] for n in labels], current_features=features)
    assert not decision.promote and decision.reason.startswith("rejected")
    assert decision.candidate_score < decision.current_score
