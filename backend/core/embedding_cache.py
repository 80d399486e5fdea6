"""Embeddings cached in Redis, keyed by (backbone identity, sha256 of the image bytes).

A second map remembers which content a media URL had, so a retrain or a repeated prediction
does not even download the image again.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import torch
from redis import Redis
from redis.client import Pipeline

from backend.common import redis_keys


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    def __init__(self, redis: Redis, backbone_key: str):
        self.redis = redis
        self.backbone_key = backbone_key

    def _key(self, digest: str) -> str:
        return redis_keys.embedding(self.backbone_key, digest)

    def get_many(self, digests: Iterable[str]) -> dict[str, torch.Tensor]:
        digests = list(dict.fromkeys(digests))
        if not digests:
            return {}
        blobs = self.redis.mget([self._key(digest) for digest in digests])
        return {
            digest: torch.frombuffer(bytearray(blob), dtype=torch.float32)
            for digest, blob in zip(digests, blobs)
            if blob is not None
        }

    def put_many(self, features: dict[str, torch.Tensor], *, pipe: Pipeline | None = None) -> None:
        """Store `features`; queued on `pipe` when given (the caller executes it), else at once."""
        if features:
            (pipe or self.redis).mset({
                self._key(digest): vector.detach().to(torch.float32).contiguous().numpy().tobytes()
                for digest, vector in features.items()
            })


class MediaDigests:
    """Which content digest each media URL of a project had when last fetched."""

    def __init__(self, redis: Redis, project: str):
        self.redis = redis
        self.key = redis_keys.media_digests(project)

    def get_many(self, urls: Iterable[str]) -> dict[str, str]:
        """URL → digest for the `urls` known."""
        urls = list(dict.fromkeys(urls))
        return self._parse(urls, self.redis.hmget(self.key, urls)) if urls else {}

    def queue_get_many(self, pipe: Pipeline, urls: list[str]) -> Callable[[list], dict[str, str]]:
        """`get_many` of the (non-empty, distinct) `urls` queued on `pipe`; returns what turns the pipeline's
        answer to it into the same dict."""
        pipe.hmget(self.key, urls)
        return lambda digests: self._parse(urls, digests)

    @staticmethod
    def _parse(urls: list[str], digests: list) -> dict[str, str]:
        return {url: digest.decode() for url, digest in zip(urls, digests) if digest is not None}

    def put_many(self, digests: dict[str, str], *, pipe: Pipeline | None = None) -> None:
        """Remember `digests` (URL → content digest); queued on `pipe` when given, else at once."""
        if digests:
            (pipe or self.redis).hset(self.key, mapping=digests)
