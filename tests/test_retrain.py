"""Promote-then-validate: a version served before its validation is rolled back when it validates worse."""

from __future__ import annotations

import torch

from backend.core.candidates import fit_candidate, fit_provisional, is_refit_enough
from backend.labelstudio.labeling_config import parse_label_config
from backend.loop.retrain import settle_provisional
from tests.helpers import CONFIG_2

PROJECT = "5"


def save_promoted(store, candidate) -> int:
    return store.save(PROJECT, "label", candidate.head, {**candidate.meta, "status": "promoted"}, promote=True)


def test_a_provisional_version_that_validates_worse_is_rolled_back(services, hymenoptera_features):
    features, names = hymenoptera_features
    labels, ids = [[name] for name in names], list(range(1, len(names) + 1))
    spec, encoder, store = parse_label_config(CONFIG_2)[0], services.encoders.get(), services.store
    good = fit_candidate(control="label", classes=spec.classes, multi_label=False, features=features,
                         labels=labels, task_ids=ids, encoder=encoder)
    first = save_promoted(store, good)
    current = store.load(PROJECT, "label", first)
    assert is_refit_enough(current.meta, len(labels))
    # the same labels on features that carry no information, refitted and served before validation
    noise = torch.nn.functional.normalize(torch.randn_like(features), dim=1)
    provisional = fit_provisional(control="label", classes=spec.classes, multi_label=False, features=noise,
                                  labels=labels, task_ids=ids, encoder=encoder, served=current.head,
                                  served_meta=current.meta)
    assert provisional.meta["validated"] is False and provisional.meta["out_of_fold_correct"] is None
    second = save_promoted(store, provisional)
    assert store.current_number(PROJECT, "label") == second

    outcome = settle_provisional(services, PROJECT, spec, current, provisional, second, features=noise,
                                 labels=labels, task_ids=ids)

    assert outcome["status"] == "rejected"
    assert store.current_number(PROJECT, "label") == first
    meta = store.meta(PROJECT, "label", second)
    print(f"\n{meta['status_reason']}")
    assert meta["status"] == "rejected" and meta["status_reason"].startswith("rolled back after validation")
    assert meta["promotion"]["candidate_score"] < meta["promotion"]["current_score"]
    assert meta["validated"] is True and meta["metrics"]["cv_accuracy"] is not None


def test_a_provisional_version_that_validates_as_well_stays_served_with_its_evidence(services, hymenoptera_features):
    features, names = hymenoptera_features
    labels, ids = [[name] for name in names], list(range(1, len(names) + 1))
    spec, encoder, store = parse_label_config(CONFIG_2)[0], services.encoders.get(), services.store
    older = fit_candidate(control="label", classes=spec.classes, multi_label=False, features=features[:-1],
                          labels=labels[:-1], task_ids=ids[:-1], encoder=encoder)
    first = save_promoted(store, older)
    current = store.load(PROJECT, "label", first)
    provisional = fit_provisional(control="label", classes=spec.classes, multi_label=False, features=features,
                                  labels=labels, task_ids=ids, encoder=encoder, served=current.head,
                                  served_meta=current.meta)
    second = save_promoted(store, provisional)

    outcome = settle_provisional(services, PROJECT, spec, current, provisional, second, features=features,
                                 labels=labels, task_ids=ids)

    assert outcome["status"] == "promoted" and store.current_number(PROJECT, "label") == second
    meta = store.meta(PROJECT, "label", second)
    assert meta["validated"] is True and meta["promotion"]["promote"] is True
    assert meta["selection"]["recipe"] == older.meta["selection"]["recipe"]
    assert set(meta["out_of_fold_correct"]) == {str(task) for task in ids}
