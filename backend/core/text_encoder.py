"""The text encoder: a frozen sentence-transformers model that turns UTF-8 text into L2-normalized features.

It is the `text` entry type of the encoder registry (`backend.core.encoders`). `prepare` turns
untrusted bytes into a string (refusing empty, binary and non-UTF-8 input, and images), `embed`
runs the model. Long texts: the model's own truncation (all-MiniLM-L6-v2 keeps the first 256 word
pieces); before tokenizing, a text is cut to `max_seq_length` x CHARS_PER_TOKEN_BOUND characters,
far more than that many word pieces ever span, so a 10 MB text costs no more than a page.
`sentence_transformers` is imported when a text encoder is loaded, never before.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Sequence

import torch

from backend.common.errors import ConfigurationError, MediaError
from backend.core.encoders import InputLimits
from backend.core.torch_runtime import resolve_device

EMBED_BATCH_SIZE = 32  # texts are sorted by length before batching, so padding stays small on CPU too
CHARS_PER_TOKEN_BOUND = 64
CONTROL_SHARE_LIMIT = 0.1  # more control characters than this share of a text: binary, not text
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")  # not BMP's "BM": "BMW ..."
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class TextModelSpec:
    """A registry entry: a sentence-transformers model on the Hugging Face hub (downloaded on first use
    into the hub cache, HF_HOME)."""

    name: str
    repo_id: str
    feature_dim: int


TEXT_MODELS: dict[str, TextModelSpec] = {
    spec.name: spec
    for spec in (
        TextModelSpec("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", 384),
        TextModelSpec("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
                      "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2", 384),
        TextModelSpec("sentence-transformers/all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", 768),
    )
}


def is_local_model(name: str) -> bool:
    """A TEXT_ENCODER that names a directory (a sentence-transformers model saved locally), not an entry."""
    return name not in TEXT_MODELS and (name.startswith((os.sep, ".", "~")) or os.path.isdir(name))


def local_model_key(path: str) -> str:
    """Cache identity of a local model directory: its folder name and a digest of its weight files."""
    if not os.path.isdir(path):
        raise ConfigurationError(
            f"TEXT_ENCODER {path!r} is not a directory. Point it at a sentence-transformers model folder "
            "(with modules.json and model.safetensors), or name a registry entry: "
            f"{', '.join(sorted(TEXT_MODELS))}.")
    digest = hashlib.sha256()
    weights = sorted(name for name in os.listdir(path) if name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise ConfigurationError(f"TEXT_ENCODER {path!r} holds no model.safetensors (or .bin) weights.")
    for name in weights:
        with open(os.path.join(path, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"st:{os.path.basename(os.path.normpath(path))}@file-{digest.hexdigest()[:12]}"


def hub_model_key(name: str) -> str:
    return f"st:{TEXT_MODELS[name].repo_id}"


def decode_text(data: bytes, *, max_chars: int) -> str:
    """Untrusted bytes → the text to embed (cut to `max_chars`); raises MediaError with the reason."""
    if data.startswith(IMAGE_MAGIC) or data[8:12] == b"WEBP" or data[4:12] in (b"ftypavif", b"ftypheic"):
        raise MediaError("The input is an image, not text: point the <Text> value at text, or use an <Image> tag.")
    if b"\x00" in data[:65536]:
        raise MediaError("The input is binary data, not text (it contains NUL bytes).")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MediaError(f"The input is not UTF-8 text (invalid byte at offset {exc.start}); "
                         "save it as UTF-8.") from None
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise MediaError("The text is empty: nothing to classify.")
    text = text[:max_chars]
    controls = sum(1 for char in text if ord(char) < 32 and char not in "\t\n\r\f\v")
    if controls > CONTROL_SHARE_LIMIT * len(text):
        raise MediaError("The input is binary data, not text (mostly control characters).")
    return text


class _TextOfHtml(HTMLParser):
    SKIPPED = ("script", "style", "head", "template")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED:
            self.skipping += 1
        elif tag in ("br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED and self.skipping:
            self.skipping -= 1

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def strip_html(markup: str) -> str:
    """The visible text of an HTML fragment (what <HyperText> shows), whitespace collapsed."""
    parser = _TextOfHtml()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    return re.sub(r"[ \t\r\f\v]*\n\s*", "\n", re.sub(r"[ \t\r\f\v]+", " ", text)).strip()


@dataclass
class TextEncoder:
    """A loaded sentence-transformers model. Build with `load_text_encoder`."""

    name: str
    key: str
    model: Any  # sentence_transformers.SentenceTransformer
    device: torch.device
    source: str  # hub repo id or local directory

    modality = "text"

    @property
    def feature_dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def parameter_count(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def max_chars(self) -> int:
        return self.max_seq_length * CHARS_PER_TOKEN_BOUND

    def preprocessing(self) -> dict:
        """A JSON description of the preprocessing, saved next to every head."""
        return {"model": self.source, "max_seq_length": self.max_seq_length, "truncation": "first tokens",
                "max_chars": self.max_chars, "pooling": "model's own (modules.json)", "l2_normalize": True}

    def prepare(self, data: bytes, limits: InputLimits) -> str:
        """Decode one untrusted input (UTF-8 text bytes) into what `embed` takes; raises MediaError."""
        return decode_text(data, max_chars=self.max_chars)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Features for `texts`, shape (len(texts), feature_dim), float32 on CPU."""
        if not texts:
            return torch.empty(0, self.feature_dim)
        features = self.model.encode(list(texts), batch_size=EMBED_BATCH_SIZE, convert_to_tensor=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        return features.float().cpu().clone()  # encode() runs in inference mode; heads train on these


class HtmlTextEncoder:
    """A text encoder for <HyperText>: the markup's visible text is embedded (its own cache identity)."""

    def __init__(self, inner: TextEncoder):
        self.inner = inner
        self.name = inner.name
        self.key = inner.key + "+html"
        self.modality = inner.modality
        self.device = inner.device

    feature_dim = property(lambda self: self.inner.feature_dim)
    parameter_count = property(lambda self: self.inner.parameter_count)

    def preprocessing(self) -> dict:
        return {**self.inner.preprocessing(), "strip_html": True}

    def prepare(self, data: bytes, limits: InputLimits) -> str:
        markup = decode_text(data, max_chars=self.inner.max_chars * 4)
        text = strip_html(markup)
        if not text:
            raise MediaError("The HTML shows no text: nothing to classify.")
        return text[:self.inner.max_chars]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self.inner.embed(texts)


def load_text_encoder(name: str, *, device: str = "cpu") -> TextEncoder:
    """Load a registry entry (from the hub, or the hub cache) or a local model directory, frozen."""
    from sentence_transformers import SentenceTransformer  # heavy: only when a text project needs it

    target = resolve_device(device)
    if is_local_model(name):
        key, source = local_model_key(name), os.path.abspath(name)
    elif name in TEXT_MODELS:
        key, source = hub_model_key(name), TEXT_MODELS[name].repo_id
    else:
        raise ConfigurationError(f"Unknown text encoder {name!r}. Set TEXT_ENCODER to one of: "
                                 f"{', '.join(sorted(TEXT_MODELS))}, or to a local model directory.")
    try:
        model = SentenceTransformer(source, device=str(target))
    except OSError as exc:
        raise ConfigurationError(f"Text encoder {source!r} cannot be loaded ({exc}). Check the network (models "
                                 "download from the Hugging Face hub on first use) or set TEXT_ENCODER to a "
                                 "local model directory.") from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return TextEncoder(name=name, key=key, model=model, device=target, source=source)
