"""N distinct real images for the `loop` benchmark's Label Studio project, with their true class.

Both shared sets (flowers12 and hymenoptera, train + val: 1,357 files, 14 classes) in a shuffled
order; past them, deterministic variants of the same photos (a horizontal flip, a crop of 80% of
each side at a seeded offset, or both) until there are N. Every file is written flat into one
directory (Label Studio's local-files storage does not recurse) and every file's bytes differ, so
headstart's content-addressed embedding cache sees N different inputs.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.resources import FLOWERS, HYMENOPTERA, dataset_images

SOURCES = (("flowers12", FLOWERS), ("hymenoptera", HYMENOPTERA))
VARIANTS = ("flip", "crop", "flip-crop")
CROP_SIDE = 0.8
JPEG_QUALITY = 90


@dataclass(frozen=True)
class LoopImage:
    file_name: str
    label: str


def originals(seed: int = 0) -> list[tuple[Path, str]]:
    """(path, class) of every distinct photo of both shared sets (train and val), shuffled by `seed`.

    A few files of the sets are byte-identical copies of others; only the first of each is kept.
    """
    items, seen = [], set()
    for _, root in SOURCES:
        for split in ("train", "val"):
            for path, label in dataset_images(root, split):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if digest not in seen:
                    seen.add(digest)
                    items.append((path, label))
    random.Random(seed).shuffle(items)
    return items


def classes() -> list[str]:
    return sorted({label for _, label in originals()})


def write_images(target: Path, count: int, *, seed: int = 0) -> list[LoopImage]:
    """Write `count` distinct images into `target`; returns them in task order."""
    from PIL import Image

    target.mkdir(parents=True, exist_ok=True)
    photos = originals(seed)
    images: list[LoopImage] = []
    digests: set[str] = set()
    for index in range(count):
        round_, position = divmod(index, len(photos))
        path, label = photos[position]
        stem = f"{label}-{position:04d}-{path.stem}"
        if round_ == 0:
            name = f"{stem}{path.suffix.lower()}"
            shutil.copyfile(path, target / name)
        else:
            # a plain flip exists once per photo; later rounds crop at fresh seeded offsets
            kind = VARIANTS[round_ - 1] if round_ <= len(VARIANTS) else VARIANTS[1 + round_ % 2]
            name = f"{stem}-v{round_}-{kind}.jpg"
            with Image.open(path) as photo:
                _variant(photo.convert("RGB"), kind, random.Random(f"{seed}-{index}")).save(
                    target / name, quality=JPEG_QUALITY)
        digest = hashlib.sha256((target / name).read_bytes()).hexdigest()
        if digest in digests:
            raise RuntimeError(f"{name} has the same bytes as an earlier image: the variants are not distinct")
        digests.add(digest)
        images.append(LoopImage(file_name=name, label=label))
    return images


def _variant(photo, kind: str, rng: random.Random):
    from PIL import Image

    if "crop" in kind:
        width, height = photo.size
        side_w, side_h = int(width * CROP_SIDE), int(height * CROP_SIDE)
        left, top = rng.randint(0, width - side_w), rng.randint(0, height - side_h)
        photo = photo.crop((left, top, left + side_w, top + side_h))
    if "flip" in kind:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return photo
