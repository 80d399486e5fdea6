"""Zero-shot matching and the backbone's own ImageNet classifier (backend/core/zero_shot.py), on real weights and
real photos: the rescaled classifier over cached (L2-normalized) features must agree with torchvision's full model."""

from __future__ import annotations

import pytest
import torch
from torchvision import models

from backend.common.errors import UnknownModelClass
from backend.core.backbones import REGISTRY, get_spec
from backend.core.encoders import InputLimits
from backend.core.zero_shot import (ZeroShotClassifiers, categories, load_classifier, match_choices, normalized,
                                    singular_forms)
from tests.helpers import FLOWERS, HYMENOPTERA, dataset_images

ANT, BEE, DAISY = 310, 309, 985  # positions in torchvision's ImageNet categories


def test_choices_match_imagenet_names_whatever_their_case_and_number():
    assert categories("mobilenet_v2")[ANT] == "ant" and categories("mobilenet_v2")[DAISY] == "daisy"
    assert match_choices("mobilenet_v2", ["ants", "bees"]).indices == ((ANT,), (BEE,))
    assert match_choices("mobilenet_v2", ["Ant", "BEES", "Daisies"]).indices == ((ANT,), (BEE,), (DAISY,))
    assert match_choices("mobilenet_v2", ["Great_White-Shark", "goldfish"]).indices == ((2,), (1,))
    assert normalized("  Great_White-Shark ") == "great white shark"
    assert "box" in singular_forms("boxes") and "daisy" in singular_forms("daisies")
    assert singular_forms("glass") == ["glass"]  # no "glas"


def test_a_choice_without_an_imagenet_class_means_no_zero_shot():
    flowers = sorted(path.name for path in (FLOWERS / "train").iterdir())
    assert match_choices("mobilenet_v2", flowers) is None  # only daisy is an ImageNet class
    assert match_choices("mobilenet_v2", ["ants", "wasps"]) is None
    assert match_choices("mobilenet_v2", ["ant", "ants"]) is None  # two choices, one class: ambiguous


def test_predicted_values_name_the_classes_and_a_wrong_name_is_refused_with_the_closest():
    match = match_choices("mobilenet_v2", ["Formicidae", "Apis"], [("ant",), ("bee", "honeycomb")])
    honeycomb = categories("mobilenet_v2").index("honeycomb")
    assert match.choices == ("Formicidae", "Apis") and match.indices == ((ANT,), (BEE, honeycomb))
    assert match_choices("mobilenet_v2", ["Formicidae", "bees"], [("ant",), ()]).indices == ((ANT,), (BEE,))
    with pytest.raises(UnknownModelClass) as refused:
        match_choices("mobilenet_v2", ["Insect", "bees"], [("beee",), ()])
    message = str(refused.value)
    assert "'beee'" in message and "'bee'" in message and "predicted_values" in message
    assert refused.value.http_status == 400


def _real_images():
    val = dataset_images(HYMENOPTERA, "val")
    daisies = [item for item in dataset_images(FLOWERS, "val") if item[1] == "daisy"][:4]
    return [item for cls in ("ants", "bees") for item in [i for i in val if i[1] == cls][:6]] + daisies


def test_the_rescaled_classifier_agrees_with_torchvisions_full_model_on_real_photos(encoders):
    """The cache keeps L2-normalized features; the classifier gets them times the backbone's typical norm. Over
    ant, bee and daisy it must pick what the full model picks, with probabilities a few points apart at most."""
    encoder = encoders.get()
    images = [encoder.prepare(path.read_bytes(), InputLimits()) for path, _ in _real_images()]
    features = encoder.embed(images)
    assert torch.allclose(features.norm(dim=1), torch.ones(len(images)), atol=1e-4)  # what the cache holds
    match = match_choices("mobilenet_v2", ["ant", "bee", "daisy"])
    ours = ZeroShotClassifiers().get("mobilenet_v2").probabilities(features, match)

    full = models.mobilenet_v2(weights=models.MobileNet_V2_Weights.IMAGENET1K_V1).eval()
    with torch.no_grad():
        logits = full(torch.stack([encoder.transforms(image) for image in images]))
    theirs = torch.softmax(logits[:, [ANT, BEE, DAISY]], dim=1)

    assert torch.equal(ours.argmax(dim=1), theirs.argmax(dim=1))
    assert (ours - theirs).abs().max().item() < 0.06
    truth = torch.tensor([("ants", "bees", "daisy").index(cls) for _, cls in _real_images()])
    assert (ours.argmax(dim=1) == truth).float().mean().item() >= 0.85
    assert torch.allclose(ours.sum(dim=1), torch.ones(len(images)), atol=1e-5)


def test_the_classifier_loads_from_the_backbones_weights_file_too(offline_weights):
    """BACKBONE_WEIGHTS_FILE: the same state dict the backbone loads gives the same classifier layer."""
    spec = get_spec("mobilenet_v2")
    from_hub = load_classifier(spec).module.state_dict()
    from_file = load_classifier(spec, str(offline_weights)).module.state_dict()
    assert from_hub.keys() == from_file.keys() and all(torch.equal(from_hub[k], from_file[k]) for k in from_hub)
    assert from_hub["1.weight"].shape == (1000, 1280)


def test_backbones_without_a_measured_feature_norm_offer_no_zero_shot():
    spec = get_spec("resnet18")
    assert spec.feature_norm is None
    with pytest.raises(ValueError, match="feature norm"):
        load_classifier(spec)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_backbone_names_the_imagenet_classifier_it_cuts_off(name):
    """`classifier` is the part `cut_classifier` removes: it takes the pooled features and gives 1,000 logits, one
    per name of the weights record (checked on the meta device: nothing is allocated or downloaded)."""
    spec = REGISTRY[name]
    with torch.device("meta"):
        model = spec.builder(weights=None)
        classifier = model.get_submodule(spec.classifier)
        assert classifier(torch.empty(2, spec.feature_dim)).shape == (2, 1000)
        spec.cut_classifier(model)
    assert isinstance(model.get_submodule(spec.classifier), torch.nn.Identity)
    assert len(categories(name)) == 1000
