"""The image encoder: a frozen torchvision backbone that turns image bytes into L2-normalized features.

It is the `image` entry type of the encoder registry (`backend.core.encoders`): the weights record
carries the exact preprocessing, `prepare` decodes untrusted bytes within the pixel limit, and
`embed` runs the backbone.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from backend.core.backbones import BackboneSpec, backbone_key, count_parameters, get_spec, load_backbone
from backend.core.images import decode_image
from backend.core.encoders import InputLimits
from backend.core.torch_runtime import resolve_device

EMBED_BATCH_SIZE = 32
# On CPU the cost per image grows with the batch (a batch's activations overflow the caches): on a
# 2-core EPYC with one torch thread MobileNetV2 took 17-19 ms per image one at a time, 18-23 ms in
# batches of 2, 21-28 in batches of 4 and 63-85 in batches of 32 (bench/README.md, Findings).
CPU_EMBED_BATCH_SIZE = 1


@dataclass
class ImageEncoder:
    """A loaded backbone plus the preprocessing its weights prescribe. Build with `load_image_encoder`."""

    spec: BackboneSpec
    key: str
    model: nn.Module
    device: torch.device

    modality = "image"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def parameter_count(self) -> int:
        return count_parameters(self.model)

    @property
    def resize_size(self) -> int:
        """The shorter side the preprocessing resizes to (used by the JPEG fast path)."""
        return int(self.transforms.resize_size[0])

    @functools.cached_property
    def transforms(self):
        """The weights' preprocessing, built once (building it costs more than applying it to a small image)."""
        return self.spec.weights.transforms()

    def preprocessing(self) -> dict:
        """A JSON description of the preprocessing, saved next to every head."""
        transforms = self.transforms
        return {
            "resize_size": list(transforms.resize_size),
            "crop_size": list(transforms.crop_size),
            "mean": list(transforms.mean),
            "std": list(transforms.std),
            "interpolation": transforms.interpolation.value,
            "l2_normalize": True,
        }

    def prepare(self, data: bytes, limits: InputLimits) -> Image.Image:
        """Decode one untrusted input (image bytes) into what `embed` takes; raises MediaError."""
        return decode_image(data, max_pixels=limits.max_pixels, min_side=self.resize_size, budget=limits.budget)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Features for `images`, shape (len(images), feature_dim), float32 on CPU."""
        if not images:
            return torch.empty(0, self.feature_dim)
        transforms = self.transforms
        size = EMBED_BATCH_SIZE if self.device.type == "cuda" else CPU_EMBED_BATCH_SIZE
        outputs = []
        for start in range(0, len(images), size):
            batch = torch.stack([transforms(image) for image in images[start:start + size]])
            batch = batch.to(self.device, non_blocking=True)
            with self._precision():
                features = self.model(batch)
            outputs.append(features.float().cpu())
        return nn.functional.normalize(torch.cat(outputs), dim=1)

    def _precision(self):
        """Mixed precision on a GPU; on the CPU full precision, without entering an autocast context at all."""
        if self.device.type == "cuda":
            return torch.autocast("cuda")
        return contextlib.nullcontext()


def load_image_encoder(name: str, *, weights_file: str = "", device: str = "cpu") -> ImageEncoder:
    spec = get_spec(name)
    target = resolve_device(device)
    model = load_backbone(name, weights_file).to(target)
    return ImageEncoder(spec=spec, key=backbone_key(name, weights_file), model=model, device=target)
