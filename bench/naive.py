"""The retraining recipe of Label Studio's removed `pytorch_transfer_learning` example, as the baseline.

What its `fit` did on every training request: re-read and decode every labeled image (Resize 224,
CenterCrop 224, ImageNet normalization), build a fresh pretrained network with the extractor
frozen, and train the classifier layer with SGD (lr 0.001, momentum 0.9, StepLR 7/0.1) for 10
epochs of shuffled batches of 32, with the network in train mode. Here the network is the same
MobileNetV2 headstart serves, so only the recipe differs.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import models, transforms

BATCH_SIZE = 32
IMAGE_SIZE = 224

_TRANSFORMS = transforms.Compose([
    transforms.Resize(IMAGE_SIZE),
    transforms.CenterCrop(IMAGE_SIZE),
    transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])


def _fresh_model(num_classes: int) -> tuple[nn.Module, nn.Linear]:
    model = models.mobilenet_v2(weights=models.MobileNet_V2_Weights.IMAGENET1K_V1)
    for parameter in model.parameters():
        parameter.requires_grad = False
    head = nn.Linear(model.last_channel, num_classes)
    model.classifier[-1] = head
    return model, head


def naive_retrain(items: list[tuple[Path, str]], *, epochs: int = 10, seed: int = 0) -> dict:
    """Time one naive retrain on `items` ((path, class) pairs). Returns seconds and what was done."""
    started = time.perf_counter()
    classes = sorted({cls for _, cls in items})
    index = {name: position for position, name in enumerate(classes)}
    images, labels = [], []
    for path, cls in items:
        with open(path, "rb") as handle:
            images.append(_TRANSFORMS(Image.open(handle).convert("RGB")))
        labels.append(index[cls])
    decoded_s = time.perf_counter() - started
    torch.manual_seed(seed)
    model, head = _fresh_model(len(classes))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    order = list(range(len(images)))
    shuffle = random.Random(seed)
    model.train()
    for _ in range(epochs):
        shuffle.shuffle(order)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            inputs = torch.stack([images[i] for i in batch])
            targets = torch.tensor([labels[i] for i in batch])
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "decode_s": decoded_s, "labels": len(items), "epochs": epochs,
            "final_loss": loss.item()}
