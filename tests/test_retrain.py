"""Promote-then-validate: a version served before its validation is rolled back when it validates worse."""

from __future__ import annotations

import torch

from backend.core.candidates import fit_candidate, fit_provisional, is_refit_enough
from backend.labelstudio.labeling_config import parse_label_config
from backend.loop.retrain import settle_provisional, zero_shot_anchor
from backend.loop.services import build_services
from tests.helpers import CONFIG_2

UNMATCHED = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
             '<Choice value="A"/><Choice value="B"/></Choices></View>')
TEXT = ('<View><Text name="text" value="$text"/><Choices name="topic" toName="text">'
        '<Choice value="ants"/><Choice value="bees"/></Choices></View>')

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


def test_the_job_anchors_on_zero_shot_only_where_serving_zero_shot_would(settings, redis, encoders, services,
                                                                        hymenoptera_features):
    """ants/bees on the image backbone with ZERO_SHOT on: the anchored recipe is chosen among, refitted and
    validated with the anchor; ZERO_SHOT off, choices without ImageNet classes, or a text input: none."""
    features, names = hymenoptera_features
    labels, ids = [[name] for name in names], list(range(1, len(names) + 1))
    spec, encoder = parse_label_config(CONFIG_2)[0], services.encoders.get()
    assert zero_shot_anchor(services, spec, encoder) is None  # the tests' settings: ZERO_SHOT off
    services = build_services(settings.replace(zero_shot=True), redis, encoders=encoders)
    store = services.store
    anchor = zero_shot_anchor(services, spec, encoder)
    assert anchor is not None
    assert zero_shot_anchor(services, parse_label_config(UNMATCHED)[0], encoder) is None
    text_spec = parse_label_config(TEXT)[0]
    assert zero_shot_anchor(services, text_spec, services.encoders.for_input("text")) is None

    older = fit_candidate(control="label", classes=spec.classes, multi_label=False, features=features[:-1],
                          labels=labels[:-1], task_ids=ids[:-1], encoder=encoder, anchor=anchor)
    assert "zero_shot_anchored" in older.meta["selection"]["evidence"]
    first = save_promoted(store, older)
    current = store.load(PROJECT, "label", first)
    provisional = fit_provisional(control="label", classes=spec.classes, multi_label=False, features=features,
                                  labels=labels, task_ids=ids, encoder=encoder, served=current.head,
                                  served_meta=current.meta, anchor=anchor)
    second = save_promoted(store, provisional)
    outcome = settle_provisional(services, PROJECT, spec, current, provisional, second, features=features,
                                 labels=labels, task_ids=ids, anchor=anchor)
    assert outcome["status"] == "promoted", outcome
    assert store.meta(PROJECT, "label", second)["selection"]["recipe"] == older.meta["selection"]["recipe"]
