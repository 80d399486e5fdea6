"""Zero-shot pre-labels: the image backbone's own ImageNet classifier, restricted to a project's choices.

Before a control has a trained head, its choices may already be classes the backbone was trained on
("ants"/"bees" are ImageNet's "ant"/"bee"). `match_choices` maps every choice to ImageNet classes, by
name (case- and plural-insensitive, over the names the torchvision weights record carries) or through
an explicit list (`<Choice value="Car" predicted_values="jeep,cab"/>`, the convention of Label
Studio's YOLO backend); a choice that matches nothing means no zero-shot for that control, since a
classifier that can never predict some choices would mislead. `ZeroShotClassifiers` loads the
classifier layer lazily, from the same weights the backbone uses, and turns cached (L2-normalized)
features into probabilities over the choices: the softmax over the matched ImageNet classes only,
each choice's classes summed. `ImageNetClassifier.anchor` gives the same classifier as one linear head
on the cached features, which training starts from (`backend.core.recipes`, `zero_shot_anchored`).
"""

from __future__ import annotations

import difflib
import functools
import re
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from backend.common.errors import UnknownModelClass
from backend.core.backbones import BackboneSpec, get_spec, load_state_dict
from backend.core.recipes import linear

CLOSEST_NAMES = 3


@dataclass(frozen=True)
class ClassMatch:
    """For each choice (in the control's order), the ImageNet class indices it stands for."""

    choices: tuple[str, ...]
    indices: tuple[tuple[int, ...], ...]


def normalized(name: str) -> str:
    """Lower case, `_`/`-` as spaces, single spaces: "Great_White-Shark " → "great white shark"."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", name)).strip().lower()


def singular_forms(name: str) -> list[str]:
    """`name` (normalized) and what it may be the plural of: "bees" → bee, "daisies" → daisy, "boxes" → box."""
    forms = [name]
    if name.endswith("ies") and len(name) > 4:
        forms.append(name[:-3] + "y")
    if name.endswith(("ches", "shes", "sses", "xes", "zes")):
        forms.append(name[:-2])
    if name.endswith("s") and not name.endswith("ss") and len(name) > 2:
        forms.append(name[:-1])
    return forms


def categories(backbone: str) -> tuple[str, ...]:
    """The ImageNet class names the backbone's torchvision weights record carries, in logit order."""
    return tuple(get_spec(backbone).weights.meta["categories"])


@functools.lru_cache(maxsize=16)
def _index(backbone: str) -> dict[str, tuple[int, ...]]:
    """Every normalized class name and its singular forms → the classes with that name (case-insensitively
    "cardigan" is a dog breed and a sweater: a choice named so stands for both)."""
    by_name: dict[str, list[int]] = {}
    for position, name in enumerate(categories(backbone)):
        for form in dict.fromkeys(singular_forms(normalized(name))):
            by_name.setdefault(form, []).append(position)
    return {form: tuple(positions) for form, positions in by_name.items()}


def supports_zero_shot(backbone: str) -> bool:
    """Whether the backbone's classifier can be fed cached features (its feature norm was measured)."""
    return get_spec(backbone).feature_norm is not None


def match_choices(backbone: str, choices: Sequence[str],
                  predicted_values: Sequence[Sequence[str]] = ()) -> ClassMatch | None:
    """Map every choice to ImageNet classes of `backbone`, or None when some choice matches none (or two
    choices would share a class). `predicted_values[i]`, when not empty, names choice i's classes explicitly;
    a name there that the classifier does not have raises UnknownModelClass with the closest names."""
    index = _index(backbone)
    explicit = list(predicted_values) + [()] * (len(choices) - len(predicted_values))
    matched: list[tuple[int, ...]] = []
    for choice, names in zip(choices, explicit):
        if names:
            matched.append(tuple(dict.fromkeys(i for name in names for i in _explicit(backbone, choice, name))))
            continue
        found = next((index[form] for form in singular_forms(normalized(choice)) if form in index), None)
        if found is None:
            return None
        matched.append(found)
    every = [i for classes in matched for i in classes]
    if len(every) != len(set(every)):
        return None
    return ClassMatch(choices=tuple(choices), indices=tuple(matched))


def _explicit(backbone: str, choice: str, name: str) -> tuple[int, ...]:
    index = _index(backbone)
    for form in singular_forms(normalized(name)):
        if form in index:
            return index[form]
    closest = difflib.get_close_matches(name, categories(backbone), n=CLOSEST_NAMES, cutoff=0.5) or \
        difflib.get_close_matches(normalized(name), [normalized(c) for c in categories(backbone)],
                                  n=CLOSEST_NAMES, cutoff=0.0)
    raise UnknownModelClass(
        f'<Choice value="{choice}" predicted_values="..."> names {name!r}, which is not an ImageNet class of '
        f"backbone {backbone}. Closest: {', '.join(repr(c) for c in closest)}. Fix the name in the labeling "
        "config (comma-separated ImageNet class names), or remove predicted_values to match by the choice's name.")


@dataclass
class ImageNetClassifier:
    """The classifier layer of a backbone, fed L2-normalized features rescaled to the backbone's typical norm."""

    module: nn.Module
    feature_norm: float

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor, match: ClassMatch) -> torch.Tensor:
        """(n, len(match.choices)): the softmax over the matched classes only, each choice's classes summed."""
        logits = self.module(features.to(torch.float32) * self.feature_norm)
        columns = [i for classes in match.indices for i in classes]
        restricted = torch.softmax(logits[:, columns], dim=1)
        sums, start = [], 0
        for classes in match.indices:
            sums.append(restricted[:, start:start + len(classes)].sum(dim=1))
            start += len(classes)
        return torch.stack(sums, dim=1)

    @torch.no_grad()
    def anchor(self, match: ClassMatch) -> nn.Linear:
        """The restricted classifier as one linear head of raw logits on the L2-normalized features (the
        feature norm folded into the weights), one row per choice: the mean of its ImageNet classes' rows
        (for a choice of one class, exactly that class's logit; `probabilities` sums a choice's classes,
        which no linear head can, so a choice of several classes gets their average logit)."""
        layer = _last_linear(self.module)
        weight = torch.stack([layer.weight[list(classes)].mean(0) for classes in match.indices]) * self.feature_norm
        bias = torch.stack([layer.bias[list(classes)].mean(0) for classes in match.indices])
        return linear(weight, bias)


def _last_linear(module: nn.Module) -> nn.Linear:
    layers = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
    if not layers:
        raise ValueError(f"the classifier {type(module).__name__} has no linear layer to anchor a head on")
    return layers[-1]


def load_classifier(spec: BackboneSpec, weights_file: str = "") -> ImageNetClassifier:
    """Only the classifier layer: built on the meta device (no backbone is allocated), its tensors taken
    from the same state dict the backbone loads."""
    if spec.feature_norm is None:
        raise ValueError(f"backbone {spec.name} has no measured feature norm: zero-shot is not available for it")
    with torch.device("meta"):
        module = spec.builder(weights=None).get_submodule(spec.classifier)
    prefix = spec.classifier + "."
    state = {key[len(prefix):]: tensor for key, tensor in load_state_dict(spec, weights_file).items()
             if key.startswith(prefix)}
    module = module.to_empty(device="cpu")
    module.load_state_dict(state)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return ImageNetClassifier(module=module, feature_norm=spec.feature_norm)


def anchor_for(classifiers: "ZeroShotClassifiers | None", backbone: str, choices: Sequence[str], *,
               predicted_values: Sequence[Sequence[str]] = (), multi_label: bool = False,
               weights_file: str = "") -> nn.Linear | None:
    """The zero-shot head a single-choice control's training may start from (`zero_shot_anchored`), or None:
    zero-shot off (`classifiers` None), a backbone without a measured feature norm, multiple choice, fewer
    than two choices, or a choice matching no ImageNet class (the same conditions as serving zero-shot)."""
    if classifiers is None or multi_label or len(choices) < 2 or not supports_zero_shot(backbone):
        return None
    try:
        match = match_choices(backbone, choices, predicted_values)
    except UnknownModelClass:  # /setup refuses such a config; an older one trains without the anchor
        return None
    if match is None:
        return None
    return classifiers.get(backbone, weights_file).anchor(match)


class ZeroShotClassifiers:
    """Classifier layers loaded once per process, on first use, keyed by (backbone, weights file)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], ImageNetClassifier] = {}

    def get(self, backbone: str, weights_file: str = "") -> ImageNetClassifier:
        with self._lock:
            if (backbone, weights_file) not in self._loaded:
                self._loaded[(backbone, weights_file)] = load_classifier(get_spec(backbone), weights_file)
            return self._loaded[(backbone, weights_file)]

    @property
    def loaded(self) -> int:
        return len(self._loaded)
