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


def test_a_label_keeps_its_fold_when_other_labels_come_and_go():
    """With task ids as keys, once a class has STABLE_FOLD_MIN labels a new or removed label moves no other label
    to another fold (the guard then compares two versions label by label on the same folds); the order the labels
    come in does not matter; smaller classes are dealt over every fold."""
    from backend.core.head_fitting import STABLE_FOLD_MIN, stratified_folds

    def fold_of(task_ids, classes):
        folds = stratified_folds(torch.tensor(classes), multi_label=False, seed=0, keys=task_ids)
        return {task_ids[int(i)]: number for number, fold in enumerate(folds) for i in fold}

    task_ids = [1000 + 3 * i for i in range(3 * STABLE_FOLD_MIN)]  # 1.5 x STABLE_FOLD_MIN per class, ids with gaps
    classes = [i % 2 for i in range(len(task_ids))]
    before = fold_of(task_ids, classes)
    assert len(set(before.values())) == 5
    grown = fold_of(task_ids + [1001], classes + [0])
    assert {task: grown[task] for task in before} == before
    shrunk = fold_of(task_ids[1:], classes[1:])
    assert shrunk == {task: before[task] for task in task_ids[1:]}
    order = list(reversed(range(len(task_ids))))
    assert fold_of([task_ids[i] for i in order], [classes[i] for i in order]) == before

    few = fold_of([7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    for cls_tasks in ([7, 8, 9, 10, 11], [12, 13, 14, 15, 16]):  # five labels, five folds: one each
        assert sorted(few[task] for task in cls_tasks) == [0, 1, 2, 3, 4]


def test_the_same_labels_in_another_order_validate_the_same(redis, encoders, hymenoptera_features):
    """The training job's out-of-fold results depend on which tasks hold which labels, not on the order the
    labels are read in: the folds follow the task ids."""
    features, labels = hymenoptera_features
    store, encoder = ModelStore(redis), encoders.get()
    ids = [5000 + 7 * i for i in range(len(labels))]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3)).tolist()
    first = train_version(store, project="2", control="label", classes=["ants", "bees"], multi_label=False,
                          features=features, labels=[[n] for n in labels], task_ids=ids, encoder=encoder)
    shuffled = train_version(store, project="2", control="label", classes=["ants", "bees"], multi_label=False,
                             features=features[order], labels=[[labels[i]] for i in order],
                             task_ids=[ids[i] for i in order], encoder=encoder)
    assert first.meta["out_of_fold_correct"] == shuffled.meta["out_of_fold_correct"]
    assert first.meta["selection"]["weights"] == shuffled.meta["selection"]["weights"]
