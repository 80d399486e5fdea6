"""Predictions for configs with several controls and with choice="multiple"."""

from __future__ import annotations

import pytest

from backend.loop.retrain import train_version
from backend.loop.predictor import model_version_of, project_id
from backend.common.errors import BadRequest
from backend.labelstudio.labeling_config import parse_label_config
from backend.loop.services import build_services
from tests.helpers import HYMENOPTERA, dataset_images

CONFIG = ('<View><Image name="image" value="$image"/>'
          '<Choices name="species" toName="image"><Choice value="ants"/><Choice value="bees"/></Choices>'
          '<Choices name="tags" toName="image" choice="multiple"><Choice value="insect"/><Choice value="ant"/>'
          '<Choice value="bee"/></Choices></View>')


@pytest.fixture
def services(settings, redis, encoders):
    return build_services(settings.replace(local_files_document_root=str(HYMENOPTERA)), redis, encoders=encoders)


def test_each_control_gets_its_result_and_the_score_is_the_least_certain(services, hymenoptera_features):
    features, labels = hymenoptera_features
    encoder = services.encoders.get()
    ids = list(range(len(labels)))
    species = train_version(services.store, project="3", control="species", classes=["ants", "bees"],
                            multi_label=False, features=features, labels=[[n] for n in labels], task_ids=ids,
                            encoder=encoder)
    tags = train_version(services.store, project="3", control="tags", classes=["insect", "ant", "bee"],
                         multi_label=True, features=features, labels=[["insect", n[:-1]] for n in labels],
                         task_ids=ids, encoder=encoder)
    services.store.promote("3", "species", species.number)
    services.store.promote("3", "tags", tags.number)

    val = dataset_images(HYMENOPTERA, "val")[:3] + dataset_images(HYMENOPTERA, "val")[-3:]
    tasks = [{"id": i, "data": {"image": f"/data/local-files/?d={p.relative_to(HYMENOPTERA).as_posix()}"}}
             for i, (p, _) in enumerate(val)]
    predictions = services.predictor.predict(tasks, project="3", label_config=CONFIG)
    assert {p["model_version"] for p in predictions} == {f"species-v{species.number}+tags-v{tags.number}"}
    correct = 0
    for prediction, (_, cls) in zip(predictions, val):
        by_control = {region["from_name"]: region["value"]["choices"] for region in prediction["result"]}
        assert set(by_control) == {"species", "tags"}
        assert "insect" in by_control["tags"]
        correct += by_control["species"] == [cls]
        assert 0 < prediction["score"] <= 1
    assert correct >= 5


def test_the_version_string_changes_with_any_control():
    specs = parse_label_config(CONFIG)

    class Head:
        def __init__(self, number):
            self.number = number

    assert model_version_of(specs, {}) == "untrained"
    assert model_version_of(specs, {"tags": Head(2)}) == "tags-v2"
    assert model_version_of(specs, {"species": Head(1), "tags": Head(2)}) == "species-v1+tags-v2"


@pytest.mark.parametrize("raw, expected", [("7.1717000000", "7"), (7, "7"), ("12", "12")])
def test_project_ids_are_read_like_label_studio_sends_them(raw, expected):
    assert project_id(raw) == expected


@pytest.mark.parametrize("raw", [None, "", "abc.1", True, "-1"])
def test_bad_project_ids_are_refused(raw):
    with pytest.raises(BadRequest):
        project_id(raw)
