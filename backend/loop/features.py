"""Features for tasks: from the Redis cache when the input was seen before, else fetch → prepare → embed.

Used by `/predict` and by the worker's jobs, so both share one cache and one code path.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from redis import Redis
from redis.exceptions import RedisError

from backend.common.errors import MediaError
from backend.common.metrics import Metrics
from backend.core.embedding_cache import EmbeddingCache, MediaDigests, content_digest
from backend.core.encoders import Encoder, InputLimits
from backend.labelstudio.media import MediaFetcher

log = logging.getLogger(__name__)

FETCH_THREADS = 8


@dataclass(frozen=True)
class MediaItem:
    """One task input: a URL to fetch, or (`inline`, a <Text> without valueType="url") the text itself."""

    task_id: int | None
    url: str
    inline: bool = False

    def inline_bytes(self) -> bytes:
        return self.url.encode("utf-8", "surrogatepass")  # a lone surrogate fails as "not UTF-8" in prepare


class FeatureSource:
    def __init__(self, redis: Redis, fetcher: MediaFetcher, *, limits: InputLimits, metrics: Metrics):
        self.redis = redis
        self.fetcher = fetcher
        self.limits = limits
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="headstart-fetch")

    def cached(self, project: str, items: list[MediaItem], encoder: Encoder) -> list[torch.Tensor | None]:
        """The cached feature vector of each item, or None where its input was never embedded. Fetches nothing."""
        digests = MediaDigests(self.redis, project)
        cache = EmbeddingCache(self.redis, encoder.key)
        known = self._cache(lambda: digests.get_many(item.url for item in items if not item.inline), {})
        digest_of = [content_digest(item.inline_bytes()) if item.inline else known.get(item.url, "")
                     for item in items]
        cached = self._cache(lambda: cache.get_many(digest for digest in digest_of if digest), {})
        return [cached.get(digest) for digest in digest_of]

    def features(
        self, project: str, items: list[MediaItem], encoder: Encoder
    ) -> list[torch.Tensor | MediaError]:
        """One feature vector (or the reason there is none) per item, in order."""
        cache = EmbeddingCache(self.redis, encoder.key)
        digests = MediaDigests(self.redis, project)
        results: list[torch.Tensor | MediaError | None] = list(self.cached(project, items, encoder))
        missing = [index for index, result in enumerate(results) if result is None]
        metrics = self.metrics
        if not missing:
            metrics.add("headstart_embedding_cache_hits_total", len(items))
            return results

        loaded = list(self._pool.map(lambda index: self._load(items[index], encoder), missing))
        new_digests, images, image_slots = {}, [], []
        for index, outcome in zip(missing, loaded):
            if isinstance(outcome, MediaError):
                results[index] = outcome
                continue
            digest, image = outcome
            if not items[index].inline:
                new_digests[items[index].url] = digest
            if isinstance(image, torch.Tensor):
                results[index] = image
            else:
                images.append(image)
                image_slots.append((index, digest))
        vectors = encoder.embed(images)
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

    def _load(self, item: MediaItem, encoder: Encoder):
        """(digest, cached vector or decoded image), or the MediaError explaining the failure."""
        try:
            if item.inline and not item.url:
                raise MediaError("The task has no text under the data key the labeling config's <Text> value names.")
            data = item.inline_bytes() if item.inline else self.fetcher.fetch(item.url, task_id=item.task_id)
            digest = content_digest(data)
            cached = self._cache(lambda: EmbeddingCache(self.redis, encoder.key).get_many([digest]), {})
            if digest in cached:
                return digest, cached[digest]
            return digest, encoder.prepare(data, self.limits)
        except MediaError as exc:
            log.warning("task %s: %s", item.task_id, exc)
            return exc
