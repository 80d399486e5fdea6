"""Helpers shared by the fault, security, fuzz and media tests: a real served head, real images."""

from __future__ import annotations

from backend.core.images import decode_image
from backend.loop.retrain import train_version
from backend.loop.services import Services
from tests.helpers import HYMENOPTERA, dataset_images

CONFIG_AB = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
             '<Choice value="A"/><Choice value="B"/></Choices></View>')


def ant_and_bee_images(count: int = 3):
    """(path, class) pairs: `count` ants then `count` bees from the training split."""
    train = dataset_images(HYMENOPTERA, "train")
    return [item for cls in ("ants", "bees") for item in [i for i in train if i[1] == cls][:count]]


def promote_real_head(services: Services, project: str, *, classes=("A", "B"), control: str = "label") -> int:
    """Train a head on real hymenoptera features (ants → classes[0], bees → classes[1]) and serve it."""
    encoder = services.encoders.get()
    pairs = ant_and_bee_images(3)
    images = [decode_image(path.read_bytes(), max_pixels=10 ** 8) for path, _ in pairs]
    labels = [[classes[0]] if cls == "ants" else [classes[1]] for _, cls in pairs]
    trained = train_version(services.store, project=project, control=control, classes=list(classes),
                            multi_label=False, features=encoder.embed(images), labels=labels,
                            task_ids=list(range(1, len(pairs) + 1)), encoder=encoder)
    services.store.promote(project, control, trained.number)
    return trained.number
