"""Every registered backbone: builds, cuts to pooled features of the declared size, and carries its preprocessing."""

from __future__ import annotations

import pytest
import torch

from backend.core.backbones import REGISTRY, backbone_key, get_spec, load_backbone
from backend.core.image_encoder import load_image_encoder
from backend.common.errors import ConfigurationError, UnknownBackbone

REQUIRED = {"mobilenet_v2", "mobilenet_v3_large", "resnet18", "resnet50", "efficientnet_b0",
            "convnext_tiny", "vgg16", "vit_b_16"}


def test_the_registry_has_every_required_backbone():
    assert REQUIRED <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_backbone_yields_features_of_its_declared_size(name):
    # Architecture only (weights=None): downloading every checkpoint is impossible offline, and
    # the feature size does not depend on the weights. mobilenet_v2 is loaded with real weights below.
    spec = get_spec(name)
    model = spec.builder(weights=None)
    spec.cut_classifier(model)
    model.eval()
    crop = spec.weights.transforms().crop_size[0]
    with torch.no_grad():
        features = model(torch.rand(2, 3, crop, crop))
    assert features.shape == (2, spec.feature_dim)
    assert spec.weights.transforms().mean and spec.weights.transforms().std


def test_mobilenet_v2_loads_its_imagenet_weights_through_the_torchvision_path():
    encoder = load_image_encoder("mobilenet_v2")
    assert encoder.key == "mobilenet_v2@IMAGENET1K_V1"
    assert encoder.parameter_count == 2_223_872
    assert all(not p.requires_grad for p in encoder.model.parameters())
    assert encoder.preprocessing()["crop_size"] == [224] and encoder.preprocessing()["resize_size"] == [256]


def test_a_local_weights_file_gives_its_own_identity(tmp_path, offline_weights):
    copy = tmp_path / "weights.pth"
    copy.write_bytes(offline_weights.read_bytes())
    key = backbone_key("mobilenet_v2", str(copy))
    assert key.startswith("mobilenet_v2@file-") and key != backbone_key("mobilenet_v2")
    reference = load_backbone("mobilenet_v2")
    from_file = load_backbone("mobilenet_v2", str(copy))
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(reference(image), from_file(image))


def test_unknown_names_and_missing_files_say_how_to_fix_them(tmp_path):
    with pytest.raises(UnknownBackbone, match="Set BACKBONE to one of"):
        get_spec("alexnet-9000")
    with pytest.raises(ConfigurationError, match="BACKBONE_WEIGHTS_FILE"):
        backbone_key("mobilenet_v2", str(tmp_path / "missing.pth"))
