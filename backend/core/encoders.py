"""The encoder registry: every frozen feature extractor a head can sit on, whatever input it takes.

An entry says what input it takes (`modality`: "image" for torchvision backbones, "text" for
sentence-transformers models), its feature size, and how to load it. A loaded encoder (the `Encoder` protocol) carries the rest of the
seam: its cache identity (`key`: architecture + weights), its preprocessing record (saved next to
every head), `prepare` (untrusted bytes → an input, within limits; raises MediaError) and `embed`
(inputs → L2-normalized float32 features). Inputs are identified in the embedding cache by
(`key`, sha256 of their bytes), so a changed file or text is a new input and an unchanged one is
never embedded twice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from backend.core import backbones
from backend.common.errors import ConfigurationError, UnknownBackbone
from backend.core.memory_budget import MemoryBudget


@dataclass(frozen=True)
class InputLimits:
    """Bounds on what one untrusted input may expand to when prepared (deployment settings).

    `budget` is the process's memory budget for prepared inputs: `prepare` holds its share while it
    expands an input, so concurrent preparations in one process stay within it together.
    """

    max_pixels: int = 40_000_000
    budget: MemoryBudget | None = field(default=None, compare=False)


class Encoder(Protocol):
    name: str
    modality: str
    key: str
    feature_dim: int
    parameter_count: int

    def preprocessing(self) -> dict: ...

    def prepare(self, data: bytes, limits: InputLimits) -> Any: ...

    def embed(self, inputs: Sequence[Any]) -> torch.Tensor: ...


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    modality: str
    feature_dim: int
    load: Callable[..., Encoder]  # (weights_file=, device=) -> Encoder
    key: Callable[[str], str]  # weights_file -> cache identity


def _image_entry(spec: backbones.BackboneSpec) -> EncoderEntry:
    def load(*, weights_file: str = "", device: str = "cpu") -> Encoder:
        from backend.core.image_encoder import load_image_encoder

        return load_image_encoder(spec.name, weights_file=weights_file, device=device)

    return EncoderEntry(name=spec.name, modality="image", feature_dim=spec.feature_dim, load=load,
                        key=lambda weights_file: backbones.backbone_key(spec.name, weights_file))


def _text_entry(name: str, feature_dim: int) -> EncoderEntry:
    def load(*, weights_file: str = "", device: str = "cpu") -> Encoder:
        from backend.core.text_encoder import load_text_encoder

        return load_text_encoder(name, device=device)

    def key(weights_file: str) -> str:
        from backend.core import text_encoder

        return text_encoder.local_model_key(name) if text_encoder.is_local_model(name) else \
            text_encoder.hub_model_key(name)

    return EncoderEntry(name=name, modality="text", feature_dim=feature_dim, load=load, key=key)


def registry() -> dict[str, EncoderEntry]:
    """Every encoder by name: image backbones (`backend.core.backbones`) and text models
    (`backend.core.text_encoder`, whose module imports no sentence-transformers)."""
    from backend.core.text_encoder import TEXT_MODELS

    entries = {name: _image_entry(spec) for name, spec in backbones.REGISTRY.items()}
    entries.update({name: _text_entry(name, spec.feature_dim) for name, spec in TEXT_MODELS.items()})
    return entries


def get_entry(name: str) -> EncoderEntry:
    """The named entry; a path (TEXT_ENCODER=/path/to/model) is a local sentence-transformers model."""
    from backend.core.text_encoder import is_local_model

    if is_local_model(name):
        return _text_entry(name, 0)  # its feature size is known once loaded
    entries = registry()
    try:
        return entries[name]
    except KeyError:
        raise UnknownBackbone(
            f"Unknown encoder {name!r}. Set BACKBONE (images) or TEXT_ENCODER (text) to one of: "
            f"{', '.join(sorted(entries))}."
        ) from None


def load_encoder(name: str, *, weights_file: str = "", device: str = "cpu") -> Encoder:
    """Load the named encoder, frozen and in eval mode, on `device`."""
    return get_entry(name).load(weights_file=weights_file, device=device)


class EncoderPool:
    """Encoders loaded once per process, on first use, keyed by (name, weights file).

    `default_name` is the image backbone (BACKBONE), `text_name` the text model (TEXT_ENCODER);
    `for_input` picks the one a labeling-config control's input needs.
    """

    def __init__(self, *, default_name: str, weights_file: str = "", device: str = "cpu",
                 text_name: str = "sentence-transformers/all-MiniLM-L6-v2"):
        self.default_name = default_name
        self.text_name = text_name
        self.weights_file = weights_file
        self.device = device
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], Encoder] = {}

    def get(self, name: str | None = None, weights_file: str | None = None) -> Encoder:
        name = name or self.default_name
        if weights_file is None:
            weights_file = self.weights_file if name == self.default_name else ""
        with self._lock:
            if (name, weights_file) not in self._loaded:
                self._loaded[(name, weights_file)] = load_encoder(
                    name, weights_file=weights_file, device=self.device)
            return self._loaded[(name, weights_file)]

    def for_input(self, modality: str, markup: str = "") -> Encoder:
        """The encoder new heads use for a control's input: "image", or "text" (markup "html": tags stripped)."""
        if modality == "text":
            encoder = self.get(self.text_name)
            return self._html(encoder) if markup == "html" else encoder
        return self.get()

    def _html(self, encoder: Encoder) -> Encoder:
        from backend.core.text_encoder import HtmlTextEncoder

        with self._lock:
            wrapped = self._loaded.get(("+html", encoder.key))
            if wrapped is None:
                wrapped = self._loaded[("+html", encoder.key)] = HtmlTextEncoder(encoder)
            return wrapped

    def for_key(self, name: str, key: str) -> Encoder:
        """The encoder whose identity is `key` (as saved with a head), if this process can load it."""
        if key.endswith("+html"):
            return self._html(self.for_key(name, key[:-len("+html")]))
        encoder = self.get(name)
        if encoder.key != key:
            encoder = self.get(name, "")
        if encoder.key != key:
            raise ConfigurationError(
                f"This head was trained on backbone {key}, which this process cannot load "
                f"(it has {encoder.key}). Set BACKBONE / BACKBONE_WEIGHTS_FILE (images) or TEXT_ENCODER (text) "
                "to match, or retrain."
            )
        return encoder
