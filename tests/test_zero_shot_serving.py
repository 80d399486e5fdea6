"""Zero-shot pre-labels through the product: /setup and /predict before any label (`label-v0`), refused mappings,
the trained head taking over at its promotion, and v0 written for unlabeled tasks once their features are cached.

Real MobileNetV2 weights, real hymenoptera photos, a real Redis; Label Studio's API is the local stand-in.
"""

from __future__ import annotations

import pytest

from backend.common.queues import EMBED_QUEUE, queue
from backend.loop.services import build_services
from backend.server.app import create_app
from tests.fake_label_studio import FakeLabelStudio
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images
from tests.loop_helpers import annotation_event, local_url, run_burst_worker, set_up

PROJECT = 41


def config(*choices: str, multiple: bool = False) -> str:
    body = "".join(choice if choice.startswith("<") else f'<Choice value="{choice}"/>' for choice in choices)
    kind = ' choice="multiple"' if multiple else ""
    return (f'<View><Image name="image" value="$image"/><Choices name="label" toName="image"{kind}>{body}'
            '</Choices></View>')


@pytest.fixture
def zs_settings(loop_settings):
    return loop_settings.replace(zero_shot=True, train_min_interval_s=0)


@pytest.fixture
def zs_services(zs_settings, redis, encoders):
    return build_services(zs_settings, redis, encoders=encoders)


@pytest.fixture
def client(zs_settings, zs_services, redis):
    set_up(redis, PROJECT)
    return create_app(zs_settings, services=zs_services).test_client()


@pytest.fixture(scope="module")
def val_handful():
    """Five ants and five bees of the val split (tasks 1..10)."""
    val = dataset_images(HYMENOPTERA, "val")
    return [item for cls in ("ants", "bees") for item in [i for i in val if i[1] == cls][:5]]


def predict(client, items, label_config=CONFIG_2) -> list[dict]:
    tasks = [{"id": index, "data": {"image": local_url(path)}} for index, (path, _) in enumerate(items, start=1)]
    response = client.post("/predict", json={"tasks": tasks, "project": f"{PROJECT}.1", "label_config": label_config})
    assert response.status_code == 200, response.json
    return response.json["results"]


def setup(client, label_config):
    return client.post("/setup", json={"project": f"{PROJECT}.1", "schema": label_config})


def test_an_ants_and_bees_project_is_pre_labeled_before_any_label(client, zs_services, val_handful):
    assert setup(client, CONFIG_2).json["model_version"] == "label-v0"
    results = predict(client, val_handful)
    assert {result["model_version"] for result in results} == {"label-v0"}
    picked = [result["result"][0]["value"]["choices"] for result in results]
    correct = sum(choices == [cls] for choices, (_, cls) in zip(picked, val_handful))
    assert correct >= 9, picked
    assert all(0.5 <= result["score"] <= 1.0 for result in results)
    assert results[0]["result"][0] | {"value": None} == {"from_name": "label", "to_name": "image", "type": "choices",
                                                         "value": None}


def test_a_project_whose_choices_are_not_all_imagenet_classes_gets_nothing(client, zs_services, val_handful):
    for label_config in (config("ants", "wasps"), config("ants", "bees", multiple=True), config("ants")):
        assert setup(client, label_config).json["model_version"] == "untrained"
        results = predict(client, val_handful[:2], label_config)
        assert [result["result"] for result in results] == [[], []]
    assert zs_services.predictor.zero_shot.loaded == 0  # the classifier layer was never loaded for them


def test_predicted_values_map_choices_and_a_wrong_name_is_refused_at_setup(client, val_handful):
    mapped = config('<Choice value="Formicidae" predicted_values="ant"/>',
                    '<Choice value="Apis" predicted_values="bee"/>')
    assert setup(client, mapped).json["model_version"] == "label-v0"
    results = predict(client, val_handful, mapped)
    truth = {"ants": ["Formicidae"], "bees": ["Apis"]}
    assert sum(r["result"][0]["value"]["choices"] == truth[cls] for r, (_, cls) in zip(results, val_handful)) >= 9

    typo = config('<Choice value="Formicidae" predicted_values="antt"/>',
                  '<Choice value="Apis" predicted_values="bee"/>')
    refused = setup(client, typo)
    assert refused.status_code == 400 and refused.json["error"] == "UnknownModelClass"
    assert "'antt'" in refused.json["message"] and "'ant'" in refused.json["message"]
    results = predict(client, val_handful[:2], typo)  # /predict keeps answering: nothing zero-shot
    assert [(r["model_version"], r["result"]) for r in results] == [("untrained", [])] * 2


def test_zero_shot_off_keeps_the_empty_answer(zs_settings, redis, encoders, val_handful):
    off = zs_settings.replace(zero_shot=False)
    client = create_app(off, services=build_services(off, redis, encoders=encoders)).test_client()
    assert setup(client, CONFIG_2).json["model_version"] == "untrained"
    assert [r["result"] for r in predict(client, val_handful[:2])] == [[], []]


def test_the_first_promoted_head_takes_over_from_zero_shot(client, zs_settings, zs_services, redis, val_handful):
    assert setup(client, CONFIG_2).json["model_version"] == "label-v0"
    train = dataset_images(HYMENOPTERA, "train")
    labeled = [item for cls in ("ants", "bees") for item in [i for i in train if i[1] == cls][:2]]
    for offset, (path, cls) in enumerate(labeled):
        event = annotation_event(project=PROJECT, task_id=100 + offset, annotation_id=2000 + offset,
                                 url=local_url(path), choice=cls)
        assert client.post("/webhook", json=event).status_code == 200
    run_burst_worker(zs_settings, redis, zs_services)
    assert setup(client, CONFIG_2).json["model_version"] == "label-v1"
    results = predict(client, val_handful)
    assert {result["model_version"] for result in results} == {"label-v1"}
    assert all(result["result"] for result in results)


PROJECT_LS = 42


@pytest.fixture
def label_studio(val_handful):
    fake = FakeLabelStudio(label_config=CONFIG_2)
    for index, (path, cls) in enumerate(val_handful, start=1):
        fake.files[f"upload/{PROJECT_LS}/{index}-{path.name}"] = path.read_bytes()
        fake.tasks.append({"id": index, "data": {"image": f"/data/upload/{PROJECT_LS}/{index}-{path.name}"},
                           "annotations": [], "predictions": [], "total_annotations": 0, "project": PROJECT_LS,
                           "class": cls})
    yield fake.start()
    fake.stop()


def test_unlabeled_tasks_get_zero_shot_pre_labels_once_embedded(zs_settings, redis, encoders, label_studio):
    """First contact indexes and embeds the tasks; each embedding chunk then writes v0 for the tasks it embedded,
    once per task, without a label or a training."""
    settings = zs_settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token)
    services = build_services(settings, redis, encoders=encoders)
    client = create_app(settings, services=services).test_client()
    response = client.post("/setup", json={"project": f"{PROJECT_LS}.1", "schema": CONFIG_2})
    assert response.json["model_version"] == "label-v0"
    assert queue(EMBED_QUEUE, redis).count == 1
    run_burst_worker(settings, redis, services)
    pushed = label_studio.imported_predictions
    assert sorted(p["task"] for p in pushed) == [task["id"] for task in label_studio.tasks]
    assert {p["model_version"] for p in pushed} == {"label-v0"}
    truth = {task["id"]: task["class"] for task in label_studio.tasks}
    assert sum(p["result"][0]["value"]["choices"] == [truth[p["task"]]] for p in pushed) >= 9
    run_burst_worker(settings, redis, services)  # nothing queued again: no second v0 per task
    assert len(label_studio.imported_predictions) == len(label_studio.tasks)


TWO_CONTROLS = ('<View><Image name="image" value="$image"/>'
                '<Choices name="species" toName="image"><Choice value="ants"/><Choice value="bees"/></Choices>'
                '<Choices name="tags" toName="image" choice="multiple"><Choice value="insect"/><Choice value="ant"/>'
                '<Choice value="bee"/></Choices></View>')


def test_a_control_without_its_head_is_served_zero_shot_beside_a_trained_one(zs_services, hymenoptera_features,
                                                                              val_handful):
    from backend.loop.retrain import train_version

    features, labels = hymenoptera_features
    tags = train_version(zs_services.store, project="43", control="tags", classes=["insect", "ant", "bee"],
                         multi_label=True, features=features, labels=[["insect", n[:-1]] for n in labels],
                         task_ids=list(range(len(labels))), encoder=zs_services.encoders.get())
    zs_services.store.promote("43", "tags", tags.number)
    tasks = [{"id": index, "data": {"image": local_url(path)}} for index, (path, _) in enumerate(val_handful)]
    predictions = zs_services.predictor.predict(tasks, project="43", label_config=TWO_CONTROLS)
    assert {p["model_version"] for p in predictions} == {f"species-v0+tags-v{tags.number}"}
    by_control = [{region["from_name"]: region["value"]["choices"] for region in p["result"]} for p in predictions]
    assert all(set(controls) == {"species", "tags"} for controls in by_control)
    assert sum(controls["species"] == [cls] for controls, (_, cls) in zip(by_control, val_handful)) >= 9
