"""Few-shot text quality: 5 labeled bbc-news articles per topic, all of val predicted through /predict."""

from __future__ import annotations

import random

import torch

from backend.loop.features import MediaItem
from backend.loop.retrain import train_version
from backend.loop.services import build_services
from backend.server.app import create_app
from tests.helpers import BBC_CLASSES, dataset_texts
from tests.test_text_predict import TEXT_CONFIG

DRAWS = 5
PER_CLASS = 5
REFERENCE_K5 = 0.883  # logistic regression on frozen all-MiniLM-L6-v2, k=5 (bbc-news README)


def draw(train, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [index for cls in BBC_CLASSES
            for index in rng.sample([i for i, (_, label) in enumerate(train) if label == cls], PER_CLASS)]


def test_five_labels_per_topic_reach_the_reference_accuracy(settings, redis, encoders):
    # one /predict embeds all 444 val texts the first time: give it time on a busy CPU (quality is measured here)
    settings = settings.replace(predict_deadline_s=900)
    services = build_services(settings, redis, encoders=encoders)
    client = create_app(settings, services=services).test_client()
    train, val = dataset_texts("train"), dataset_texts("val")
    encoder = services.encoders.for_input("text")
    val_tasks = [{"id": len(train) + i, "data": {"text": text}} for i, (text, _) in enumerate(val)]
    accuracies = []
    for seed in range(DRAWS):
        labeled = draw(train, seed)
        vectors = services.features.features("1", [MediaItem(i, train[i][0], inline=True) for i in labeled], encoder)
        trained = train_version(services.store, project="1", control="topic", classes=list(BBC_CLASSES),
                                multi_label=False, features=torch.stack(vectors),
                                labels=[[train[i][1]] for i in labeled], task_ids=labeled, encoder=encoder)
        services.store.promote("1", "topic", trained.number)
        response = client.post("/predict", json={"tasks": val_tasks, "project": "1.17", "label_config": TEXT_CONFIG})
        results = response.json["results"]
        assert all(result["model_version"] == f"topic-v{trained.number}" for result in results)
        correct = sum(result["result"][0]["value"]["choices"] == [cls] for result, (_, cls) in zip(results, val))
        accuracies.append(correct / len(val))
    mean = sum(accuracies) / DRAWS
    print(f"\nbbc-news k={PER_CLASS}: accuracy per draw {[round(a, 3) for a in accuracies]}, mean {mean:.3f}")
    assert mean >= REFERENCE_K5 - 0.02
