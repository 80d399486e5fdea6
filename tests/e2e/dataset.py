"""The images the end-to-end flows label and score: a fixed, documented subset of hymenoptera.

- labeling pool: the first POOL_PER_CLASS images (sorted by name) of each class of `train`; the
  flows annotate these in order, a few at a time, as an annotator would.
- evaluation set: all of `val` (153 images: 70 ants, 83 bees); never annotated, so every model
  version is scored on the same images, and one wrong prediction moves accuracy by 0.65 points.
- upload set: the train images after the pool, for the flow that uploads files to Label Studio.
Files are copied flat into one directory (Label Studio's local-files storage does not recurse by
default); the name carries the role and class only for people reading logs: the backend never
sees it as a label.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import HYMENOPTERA, dataset_images

CLASSES = ("ants", "bees")
POOL_PER_CLASS = 22


@dataclass(frozen=True)
class Image:
    file_name: str
    label: str
    role: str  # "pool" (to annotate) or "eval" (to score)


def _per_class(split: str, start: int, stop: int | None) -> list[tuple[Path, str]]:
    """Images [start:stop] of each class of `split`, classes in CLASSES order."""
    chosen: list[tuple[Path, str]] = []
    for label in CLASSES:
        chosen += [(path, cls) for path, cls in dataset_images(HYMENOPTERA, split) if cls == label][start:stop]
    return chosen


def copy_images(target: Path, *, pool_per_class: int = POOL_PER_CLASS) -> dict[str, Image]:
    """Copy the pool and the evaluation set into `target`; returns file name → Image."""
    target.mkdir(parents=True, exist_ok=True)
    images: dict[str, Image] = {}
    for role, chosen in (("pool", _per_class("train", 0, pool_per_class)), ("eval", _per_class("val", 0, None))):
        for path, label in chosen:
            name = f"{role}-{label}-{path.name}"
            shutil.copyfile(path, target / name)
            images[name] = Image(file_name=name, label=label, role=role)
    return images


def upload_set(per_class: int) -> list[tuple[Path, str]]:
    """Images for the upload flow: from `train`, after the pool, so none is shared with it."""
    return _per_class("train", POOL_PER_CLASS, POOL_PER_CLASS + per_class)
