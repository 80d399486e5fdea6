"""The images the end-to-end flows label and score: a fixed, documented subset of hymenoptera.

- labeling pool: the first POOL_PER_CLASS images (sorted by name) of each class of `train`; the
  flows annotate these in order, a few at a time, as an annotator would.
- evaluation set: the first EVAL_PER_CLASS images of each class of `val`; never annotated, so the
  accuracy of every model version is measured on the same images.
80 evaluation images keep a run within minutes on two CPU cores while one wrong prediction moves
accuracy by only 1.25 points. Files are copied flat into one directory (Label Studio's local-files
storage does not recurse by default); the name carries the split and class only for people reading
logs: the backend never sees it as a label.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import HYMENOPTERA, dataset_images

CLASSES = ("ants", "bees")
POOL_PER_CLASS = 14
EVAL_PER_CLASS = 40


@dataclass(frozen=True)
class Image:
    file_name: str
    label: str
    role: str  # "pool" (to annotate) or "eval" (to score)


def _first_per_class(split: str, per_class: int) -> list[tuple[Path, str]]:
    chosen: list[tuple[Path, str]] = []
    for label in CLASSES:
        chosen += [(path, cls) for path, cls in dataset_images(HYMENOPTERA, split) if cls == label][:per_class]
    return chosen


def copy_images(target: Path, *, pool_per_class: int = POOL_PER_CLASS,
                eval_per_class: int = EVAL_PER_CLASS) -> dict[str, Image]:
    """Copy the subset into `target`; returns file name → Image."""
    target.mkdir(parents=True, exist_ok=True)
    images: dict[str, Image] = {}
    for role, split, per_class in (("pool", "train", pool_per_class), ("eval", "val", eval_per_class)):
        for path, label in _first_per_class(split, per_class):
            name = f"{role}-{label}-{path.name}"
            shutil.copyfile(path, target / name)
            images[name] = Image(file_name=name, label=label, role=role)
    return images


def upload_subset(per_class: int) -> list[tuple[Path, str]]:
    """Images for the upload flow: from `val`, after the evaluation subset, so none is shared."""
    chosen: list[tuple[Path, str]] = []
    for label in CLASSES:
        chosen += [(path, cls) for path, cls in dataset_images(HYMENOPTERA, "val")
                   if cls == label][EVAL_PER_CLASS:EVAL_PER_CLASS + per_class]
    return chosen
