"""A registry of frozen torchvision feature extractors.

Each entry names a torchvision builder, its pretrained weights record (which carries the exact
preprocessing) and how to cut the classifier off so the model returns pooled features.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import models

from backend.common.errors import ConfigurationError, UnknownBackbone


def _drop_attr(attr: str) -> Callable[[nn.Module], None]:
    def cut(model: nn.Module) -> None:
        setattr(model, attr, nn.Identity())

    return cut


def _drop_last_of(attr: str) -> Callable[[nn.Module], None]:
    def cut(model: nn.Module) -> None:
        getattr(model, attr)[-1] = nn.Identity()

    return cut


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]
    weights: models.WeightsEnum
    feature_dim: int
    cut_classifier: Callable[[nn.Module], None]
    classifier: str  # the dotted path of the ImageNet classifier `cut_classifier` removes (zero-shot loads it)
    # the median L2 norm of its pooled features on real photos: the embedding cache keeps L2-normalized
    # features, and the ImageNet classifier is fed them rescaled by this (None: not measured, no zero-shot)
    feature_norm: float | None = None


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # feature_norm: median pooled-feature norm on hymenoptera (27.5) and flowers12 (23.1) photos, both
        # splits (tests/test_zero_shot.py checks the rescaled classifier against torchvision's full model)
        BackboneSpec("mobilenet_v2", models.mobilenet_v2,
                     models.MobileNet_V2_Weights.IMAGENET1K_V1, 1280, _drop_attr("classifier"), "classifier",
                     feature_norm=25.0),
        BackboneSpec("mobilenet_v3_large", models.mobilenet_v3_large,
                     models.MobileNet_V3_Large_Weights.IMAGENET1K_V2, 960, _drop_attr("classifier"), "classifier"),
        BackboneSpec("resnet18", models.resnet18,
                     models.ResNet18_Weights.IMAGENET1K_V1, 512, _drop_attr("fc"), "fc"),
        BackboneSpec("resnet50", models.resnet50,
                     models.ResNet50_Weights.IMAGENET1K_V2, 2048, _drop_attr("fc"), "fc"),
        BackboneSpec("efficientnet_b0", models.efficientnet_b0,
                     models.EfficientNet_B0_Weights.IMAGENET1K_V1, 1280, _drop_attr("classifier"), "classifier"),
        BackboneSpec("convnext_tiny", models.convnext_tiny,
                     models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1, 768, _drop_last_of("classifier"), "classifier.2"),
        BackboneSpec("vgg16", models.vgg16,
                     models.VGG16_Weights.IMAGENET1K_V1, 4096, _drop_last_of("classifier"), "classifier.6"),
        BackboneSpec("vit_b_16", models.vit_b_16,
                     models.ViT_B_16_Weights.IMAGENET1K_V1, 768, _drop_attr("heads"), "heads"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownBackbone(
            f"Unknown backbone {name!r}. Set BACKBONE to one of: {', '.join(sorted(REGISTRY))}."
        ) from None


def backbone_key(name: str, weights_file: str = "") -> str:
    """A stable identity for (architecture, weights): embeddings are cached under it."""
    spec = get_spec(name)
    if not weights_file:
        return f"{spec.name}@{spec.weights.name}"
    return f"{spec.name}@file-{_file_digest(weights_file)[:12]}"


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ConfigurationError(
            f"BACKBONE_WEIGHTS_FILE {path!r} cannot be read ({exc.strerror}). "
            "Point it at a state dict saved with torch.save(model.state_dict(), path)."
        ) from None
    return digest.hexdigest()


def load_state_dict(spec: BackboneSpec, weights_file: str = "") -> dict[str, torch.Tensor]:
    """The full ImageNet state dict: from `weights_file`, or torchvision's weights (torch hub cache)."""
    if not weights_file:
        return spec.weights.get_state_dict(progress=False)
    if not os.path.isfile(weights_file):
        raise ConfigurationError(f"BACKBONE_WEIGHTS_FILE {weights_file!r} does not exist.")
    return torch.load(weights_file, map_location="cpu", weights_only=True)


def load_backbone(name: str, weights_file: str = "") -> nn.Module:
    """Build the frozen feature extractor, in eval mode, with the classifier removed.

    Weights come from torchvision's `weights=` path (the torch hub cache, downloaded on first
    use) or, when `weights_file` is given, from that local state dict.
    """
    spec = get_spec(name)
    if weights_file:
        model = spec.builder(weights=None)
        model.load_state_dict(load_state_dict(spec, weights_file))
    else:
        model = spec.builder(weights=spec.weights)
    spec.cut_classifier(model)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
