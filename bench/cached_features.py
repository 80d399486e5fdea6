"""The shared image sets' MobileNetV2 features, embedded once and cached across benchmark runs, and what the
product's training functions need besides them when called directly (no Redis, no encoder loaded).

Features are cached in HEADSTART_BENCH_FEATURES (default ~/.cache/headstart/bench-features.pt), per (set, split).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from backend.core.image_encoder import load_image_encoder
from backend.core.zero_shot import ZeroShotClassifiers, anchor_for
from bench import data
from bench.accuracy import _embed


def image_features(sets: tuple[str, ...], per_class_cap: int | None = None) -> dict:
    """Per set: (train features, targets), (val features, targets), classes. With `per_class_cap` (quick runs), at
    most that many images per class and split, embedded now and not cached."""
    cache = Path(os.environ.get("HEADSTART_BENCH_FEATURES", Path.home() / ".cache" / "headstart" / "bench-features.pt"))
    stored = torch.load(cache, weights_only=False) if cache.exists() else {}
    encoder, out = None, {}
    for name in sets:
        classes = data.classes_of(data.images(name, "train"))
        splits = []
        for split in ("train", "val"):
            items = data.images(name, split)
            if (name, split) in stored and len(stored[(name, split)][0]) == len(items):
                splits.append(_capped(*stored[(name, split)], per_class_cap))
                continue
            if per_class_cap is not None:
                items = [item for cls in classes for item in [i for i in items if i[1] == cls][:per_class_cap]]
            encoder = encoder or load_image_encoder("mobilenet_v2")
            embedded = (_embed(encoder, items), torch.tensor([classes.index(cls) for _, cls in items]))
            if per_class_cap is None:
                stored[(name, split)] = embedded
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(stored, cache)
            splits.append(embedded)
        out[name] = (splits[0], splits[1], classes)
    return out


def zero_shot_anchor(classes):
    """The zero-shot head the training and audit jobs pass for these classes (ZERO_SHOT on), or None."""
    return _anchor_of(tuple(classes))


@functools.lru_cache(maxsize=4)
def _anchor_of(classes: tuple[str, ...]):
    return anchor_for(ZeroShotClassifiers(), "mobilenet_v2", classes)


class EncoderRecord:
    """What `fit_candidate` records about the encoder (the features are already embedded)."""

    name = key = "mobilenet_v2"
    modality = "image"
    feature_dim = 1280
    parameter_count = 0

    @staticmethod
    def preprocessing() -> dict:
        return {}


def _capped(x: torch.Tensor, y: torch.Tensor, cap: int | None):
    if cap is None:
        return x, y
    keep = [i for c in sorted(set(y.tolist())) for i in (y == c).nonzero().flatten().tolist()[:cap]]
    return x[keep], y[keep]
