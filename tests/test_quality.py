"""Few-shot quality: 5 labeled hymenoptera images per class, the val split predicted through /predict."""

from __future__ import annotations

import random

import pytest
import torch

from backend.server.app import create_app
from backend.loop.retrain import train_version
from backend.loop.features import MediaItem
from backend.loop.services import build_services
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images

DRAWS = 5
PER_CLASS = 5


def local_url(path) -> str:
    return f"/data/local-files/?d={path.relative_to(HYMENOPTERA).as_posix()}"


@pytest.fixture
def services(settings, redis, encoders):
    return build_services(settings.replace(local_files_document_root=str(HYMENOPTERA)), redis, encoders=encoders)


def draw(train, seed: int):
    rng = random.Random(seed)
    chosen = []
    for cls in ("ants", "bees"):
        chosen += rng.sample([item for item in train if item[1] == cls], PER_CLASS)
    return chosen


def test_five_labels_per_class_reach_reference_accuracy(services):
    client = create_app(services.settings, services=services).test_client()
    train, val = dataset_images(HYMENOPTERA, "train"), dataset_images(HYMENOPTERA, "val")
    task_of = {path: index for index, (path, _) in enumerate(train + val)}
    encoder = services.encoders.get()
    val_tasks = [{"id": task_of[path], "data": {"image": local_url(path)}} for path, _ in val]
    accuracies = []
    for seed in range(DRAWS):
        labeled = draw(train, seed)
        vectors = services.features.features(
            "1", [MediaItem(task_of[path], local_url(path)) for path, _ in labeled], encoder)
        trained = train_version(services.store, project="1", control="label", classes=["ants", "bees"],
                                multi_label=False, features=torch.stack(vectors),
                                labels=[[cls] for _, cls in labeled],
                                task_ids=[task_of[path] for path, _ in labeled], encoder=encoder)
        services.store.promote("1", "label", trained.number)
        response = client.post("/predict", json={"tasks": val_tasks, "project": "1.17",
                                                 "label_config": CONFIG_2})
        results = response.json["results"]
        assert all(result["model_version"] == f"label-v{trained.number}" for result in results)
        correct = sum(result["result"][0]["value"]["choices"] == [cls] for result, (_, cls) in zip(results, val))
        accuracies.append(correct / len(val))
    mean = sum(accuracies) / DRAWS
    print(f"\nhymenoptera k={PER_CLASS}: accuracy per draw {[round(a, 3) for a in accuracies]}, mean {mean:.3f}")
    assert mean >= 0.89
