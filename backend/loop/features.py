"""Features for tasks: from the Redis cache when the image was seen before, else fetch → decode → embed.

Used by `/predict` and by the worker's jobs, so both share one cache and one code path.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from redis import Redis
from redis.exceptions import RedisError

from backend.core.embedding import Embedder, load_embedder
from backend.core.embedding_cache import EmbeddingCache, MediaDigests, content_digest
from backend.core.images import decode_image
from backend.common.errors import HeadstartError, MediaError
from backend.labelstudio.media import MediaFetcher
from backend.common.metrics import Metrics

log = logging.getLogger(__name__)

FETCH_THREADS = 8


@dataclass(frozen=True)
class MediaItem:
    task_id: int | None
    url: str


class EmbedderPool:
    """Backbones loaded once per process, on first use, keyed by their identity."""

    def __init__(self, *, default_name: str, weights_file: str = "", device: str = "cpu"):
        self.default_name = default_name
        self.weights_file = weights_file
        self.device = device
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], Embedder] = {}

    def get(self, name: str | None = None, weights_file: str | None = None) -> Embedder:
        name = name or self.default_name
        if weights_file is None:
            weights_file = self.weights_file if name == self.default_name else ""
        with self._lock:
            if (name, weights_file) not in self._loaded:
                self._loaded[(name, weights_file)] = load_embedder(name, weights_file=weights_file, device=self.device)
            return self._loaded[(name, weights_file)]

    def for_key(self, name: str, key: str) -> Embedder:
        """The embedder whose identity is `key` (as saved with a head), if this process can load it."""
        embedder = self.get(name)
        if embedder.key != key:
            embedder = self.get(name, "")
        if embedder.key != key:
            raise HeadstartError(
                f"This head was trained on backbone {key}, which this process cannot load "
                f"(it has {embedder.key}). Set BACKBONE / BACKBONE_WEIGHTS_FILE to match, or retrain."
            )
        return embedder


class FeatureSource:
    def __init__(self, redis: Redis, fetcher: MediaFetcher, *, max_pixels: int):
        self.redis = redis
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="headstart-fetch")

    def features(
        self, project: str, items: list[MediaItem], embedder: Embedder
    ) -> list[torch.Tensor | MediaError]:
        """One feature vector (or the reason there is none) per item, in order."""
        digests = MediaDigests(self.redis, project)
        cache = EmbeddingCache(self.redis, embedder.key)
        known = self._cache(lambda: digests.get_many(item.url for item in items), {})
        cached = self._cache(lambda: cache.get_many(known.values()), {})
        results: list[torch.Tensor | MediaError | None] = [
            cached.get(known.get(item.url, ""), None) for item in items
        ]
        missing = [index for index, result in enumerate(results) if result is None]
        metrics = Metrics(self.redis)
        if not missing:
            metrics.add("headstart_embedding_cache_hits_total", len(items))
            return results

        loaded = list(self._pool.map(lambda index: self._load(items[index], embedder), missing))
        new_digests, images, image_slots = {}, [], []
        for index, outcome in zip(missing, loaded):
            if isinstance(outcome, MediaError):
                results[index] = outcome
                continue
            digest, image = outcome
            new_digests[items[index].url] = digest
            if isinstance(image, torch.Tensor):
                results[index] = image
            else:
                images.append(image)
                image_slots.append((index, digest))
        vectors = embedder.embed(images)
        for (index, _), vector in zip(image_slots, vectors):
            results[index] = vector
        fresh = {digest: vector for (_, digest), vector in zip(image_slots, vectors)}
        self._cache(lambda: cache.put_many(fresh), None)
        self._cache(lambda: digests.put_many(new_digests), None)
        failed = sum(isinstance(outcome, MediaError) for outcome in loaded)
        metrics.add("headstart_embedding_cache_hits_total", len(items) - len(images) - failed)
        metrics.add("headstart_embedding_cache_misses_total", len(images))
        return results

    @staticmethod
    def _cache(call, default):
        """A cache read or write. While Redis is unreachable: a miss, or a skipped write (features still come)."""
        try:
            return call()
        except RedisError as exc:
            log.warning("embedding cache unavailable, working without it: %s", exc)
            return default

    def _load(self, item: MediaItem, embedder: Embedder):
        """(digest, cached vector or decoded image), or the MediaError explaining the failure."""
        try:
            data = self.fetcher.fetch(item.url, task_id=item.task_id)
            digest = content_digest(data)
            cached = self._cache(lambda: EmbeddingCache(self.redis, embedder.key).get_many([digest]), {})
            if digest in cached:
                return digest, cached[digest]
            return digest, decode_image(data, max_pixels=self.max_pixels, min_side=embedder.resize_size)
        except MediaError as exc:
            log.warning("task %s: %s", item.task_id, exc)
            return exc
