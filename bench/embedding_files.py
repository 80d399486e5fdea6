"""Embeddings kept on disk between benchmark runs, keyed by (encoder, sha256 of the exact input bytes).

A benchmark that needs features of a whole dataset (not their speed) embeds each input once through
the product, then reuses the vectors on later runs. One safetensors file per encoder identity: the
encoder's cache key (for a local model, its folder name and a digest of its weights) plus the torch,
transformers and sentence-transformers versions, since those can move the last bits of a vector.
Inside, one tensor per input, named by the sha256 of its bytes, the same digest the product's Redis
cache uses, so a vector read here is the one the product would have cached for that input.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Iterable

import torch

LIBRARIES = ("torch", "transformers", "sentence-transformers")


def identity(encoder_key: str) -> str:
    """A file-name-safe identity: the encoder's key and the versions of the libraries that run it."""
    versions = []
    for library in LIBRARIES:
        try:
            versions.append(f"{library}-{metadata.version(library)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{library}-none")
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "__".join([encoder_key, *versions]))


class EmbeddingFiles:
    """The vectors one encoder produced, by input digest, in `directory`/<identity>.safetensors."""

    def __init__(self, directory: Path, encoder_key: str):
        self.path = Path(directory) / f"{identity(encoder_key)}.safetensors"
        self._vectors: dict[str, torch.Tensor] | None = None

    def _loaded(self) -> dict[str, torch.Tensor]:
        if self._vectors is None:
            from safetensors.torch import load_file

            self._vectors = load_file(self.path) if self.path.is_file() else {}
        return self._vectors

    def get_many(self, digests: Iterable[str]) -> dict[str, torch.Tensor]:
        """The stored vector of each digest that has one."""
        vectors = self._loaded()
        return {digest: vectors[digest] for digest in digests if digest in vectors}

    def put_many(self, vectors: dict[str, torch.Tensor]) -> None:
        """Add `vectors` and rewrite the file (written beside it, then renamed: a crash leaves the old one)."""
        from safetensors.torch import save_file

        stored = self._loaded()
        stored.update({digest: vector.detach().to(torch.float32).contiguous().clone()
                       for digest, vector in vectors.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        save_file(stored, str(partial))
        partial.replace(self.path)
