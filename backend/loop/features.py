"""Features for tasks: from the Redis cache when the input was seen before, else fetch → prepare → embed.

Used by `/predict` and by the worker's jobs, so both share one cache and one code path. The work is
streamed: a call keeps at most `FetchPlan.share` inputs in the process's fetch pool and embeds them
in batches of `STREAM_BATCH`, so neither a request nor a training ever holds all of its decoded
inputs at once, and one call cannot take the whole pool from the others. Each media URL is fetched
once per call however many tasks name it. A request also has a deadline and a cap on fetches
(`FetchPlan.for_request`); what they leave out is answered with a MediaError that says so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from redis import Redis
from redis.exceptions import RedisError

from backend.common.errors import MediaError
from backend.common.metrics import Metrics
from backend.common.settings import Settings
from backend.core.embedding_cache import EmbeddingCache, MediaDigests, content_digest
from backend.core.encoders import Encoder, InputLimits
from backend.labelstudio.media import MediaFetcher
from backend.loop.poison import PoisonLedger

log = logging.getLogger(__name__)

FETCH_THREADS = 16  # the process's fetch pool: four requests at their full share run side by side
REQUEST_SHARE = 4  # inputs one /predict keeps in the pool at once
STREAM_BATCH = 16  # inputs decoded and waiting for one embedding pass, at most


@dataclass(frozen=True)
class MediaItem:
    """One task input: a URL to fetch, or (`inline`, a <Text> without valueType="url") the text itself."""

    task_id: int | None
    url: str
    inline: bool = False

    @classmethod
    def of_task(cls, task_id: int, data: dict, key: str, *, inline: bool = False) -> "MediaItem":
        """The input `key` names in a task's `data` (a missing or non-text value: "", which fails as a bad input)."""
        value = data.get(key)
        return cls(task_id, value if isinstance(value, str) else "", inline)

    def inline_bytes(self) -> bytes:
        return self.url.encode("utf-8", "surrogatepass")  # a lone surrogate fails as "not UTF-8" in prepare


@dataclass(frozen=True)
class FetchPlan:
    """How much of the process one call may use: its share of the fetch pool, a deadline
    (`time.monotonic()`; None: none), and the most inputs it may fetch (None: all).

    `after_answer`: where the call leaves its cache writes and counters (callables) for its caller to run once
    the answer is sent (a /predict: Label Studio need not wait for them); None: they are done in the call."""

    share: int = FETCH_THREADS // 2
    deadline: float | None = None
    max_fetch: int | None = None
    after_answer: list[Callable[[], None]] | None = None

    @classmethod
    def for_request(cls, settings: Settings, *, after_answer: list[Callable[[], None]] | None = None) -> "FetchPlan":
        """A /predict's plan: REQUEST_SHARE of the pool, PREDICT_DEADLINE_S, PREDICT_MAX_FETCH inputs."""
        return cls(share=REQUEST_SHARE, deadline=time.monotonic() + settings.predict_deadline_s,
                   max_fetch=settings.predict_max_fetch, after_answer=after_answer)

    def later(self, work: Callable[[], None]) -> None:
        """`work` now, or once the answer is sent when the caller asked for that (`after_answer`)."""
        if self.after_answer is None:
            work()
        else:
            self.after_answer.append(work)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def _embedding_order(item: MediaItem) -> tuple[int, int]:
    """Fetched inputs first, in their order; then inline texts, shortest first. Batches are cut in
    stream order, so sorted texts share a batch with texts of about their length: the encoder pads
    each batch to its longest text, and arrival order cost a third of the throughput on mixed lengths."""
    return (1, len(item.url)) if item.inline else (0, 0)


class FeatureSource:
    def __init__(self, redis: Redis, fetcher: MediaFetcher, *, limits: InputLimits, metrics: Metrics,
                 poison: PoisonLedger | None = None):
        self.redis = redis
        self.fetcher = fetcher
        self.limits = limits
        self.metrics = metrics
        self.poison = poison or PoisonLedger(redis, kills_allowed=2)
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="headstart-fetch")
        self._job = threading.local()

    @contextlib.contextmanager
    def charging(self, job_id: str) -> Iterator[None]:
        """While the block runs in this thread, inputs in flight are marked as RQ job `job_id`'s, so a
        worker dying on one charges it a kill (`backend.loop.poison`). The worker wraps each job in it."""
        self._job.id = job_id
        try:
            yield
        finally:
            self._job.id = None

    def cached(self, project: str, items: list[MediaItem], encoder: Encoder) -> list[torch.Tensor | None]:
        """The cached feature vector of each item, or None where its input was never embedded. Fetches nothing."""
        return self._cached(project, items, encoder, with_kills=False)[0]

    def _cached(self, project: str, items: list[MediaItem], encoder: Encoder, *,
                with_kills: bool) -> tuple[list[torch.Tensor | None], dict[str, int]]:
        """`cached`, and with `with_kills` the kills charged to the items' URLs (`backend.loop.poison`), read in the
        same round trip as the URLs' content digests."""
        urls = [item.url for item in items if not item.inline]
        known, kills = self._cache(lambda: self._digests_and_kills(project, urls, with_kills), ({}, {}))
        digest_of = [content_digest(item.inline_bytes()) if item.inline else known.get(item.url, "")
                     for item in items]
        cache = EmbeddingCache(self.redis, encoder.key)
        cached = self._cache(lambda: cache.get_many(digest for digest in digest_of if digest), {})
        return [cached.get(digest) for digest in digest_of], kills

    def _digests_and_kills(self, project: str, urls: list[str], with_kills: bool) -> tuple[dict, dict]:
        urls = list(dict.fromkeys(urls))
        if not urls:
            return {}, {}
        pipe = self.redis.pipeline(transaction=False)
        parse_digests = MediaDigests(self.redis, project).queue_get_many(pipe, urls)
        parse_kills = self.poison.queue_kills(pipe, project, urls) if with_kills else None
        answers = pipe.execute()
        return parse_digests(answers[0]), parse_kills(answers[1]) if parse_kills else {}

    def features(self, project: str, items: list[MediaItem], encoder: Encoder, *,
                 plan: FetchPlan | None = None) -> list[torch.Tensor | MediaError]:
        """One feature vector (or the reason there is none) per item, in order."""
        plan = plan or FetchPlan()
        unique = list({item.url: item for item in reversed(items)}.values())[::-1]  # first item per URL
        vectors, kills = self._cached(project, unique, encoder, with_kills=True)
        by_url: dict[str, torch.Tensor | MediaError] = {
            item.url: vector for item, vector in zip(unique, vectors) if vector is not None}
        missing = [item for item in unique if item.url not in by_url]
        hits = len(by_url)
        if missing:
            by_url.update(self._fetch_and_embed(project, missing, encoder, plan, kills))
        fetched = sum(isinstance(by_url[item.url], torch.Tensor) for item in missing)
        counts = {"headstart_embedding_cache_hits_total": len(items) - len(unique) + hits,
                  "headstart_embedding_cache_misses_total": fetched}
        plan.later(lambda: self.metrics.add_many(counts))
        return [by_url[item.url] for item in items]

    def _fetch_and_embed(self, project: str, items: list[MediaItem], encoder: Encoder, plan: FetchPlan,
                         kills: dict[str, int]) -> dict[str, torch.Tensor | MediaError]:
        """Fetch, prepare and embed `items` (none cached); `kills`: those charged to their URLs."""
        results: dict[str, torch.Tensor | MediaError] = {}
        fetched = [item for item in items if not item.inline]  # an inline text is no fetch: never capped
        if plan.max_fetch is not None and len(fetched) > plan.max_fetch:
            skipped = fetched[plan.max_fetch:]
            left_out = {item.url for item in skipped}
            items = [item for item in items if item.inline or item.url not in left_out]
            log.warning("project %s: %d inputs not fetched in this request (PREDICT_MAX_FETCH=%d); the workers "
                        "embed them", project, len(skipped), plan.max_fetch)
            for item in skipped:
                results[item.url] = MediaError(f"Not fetched in this request: it asked for more than "
                                               f"PREDICT_MAX_FETCH={plan.max_fetch} new inputs.")
        # an inline text is its own input, never fetched: no URL to charge kills to (`kills` has none)
        healthy = sorted((item for item in items if not kills.get(item.url)), key=_embedding_order)
        suspects = [item for item in items if kills.get(item.url)]
        for item in suspects:
            if self.poison.is_poison(kills[item.url]):
                results[item.url] = self.poison.poison_error(kills[item.url])
                log.warning("project %s task %s: %s", project, item.task_id, results[item.url])
        suspects = [item for item in suspects if item.url not in results]
        results.update(self._stream(project, healthy, encoder, plan))
        for item in suspects:  # one at a time, so a worker dying now is charged to this input alone
            results.update(self._stream(project, [item], encoder,
                                        FetchPlan(1, plan.deadline, after_answer=plan.after_answer)))
        return results

    def _stream(self, project: str, items: list[MediaItem], encoder: Encoder,
                plan: FetchPlan) -> dict[str, torch.Tensor | MediaError]:
        """Fetch and prepare `items` with at most `plan.share` in the pool, embedding every STREAM_BATCH."""
        results: dict[str, torch.Tensor | MediaError] = {}
        pending: deque[MediaItem] = deque(items)
        running: deque[tuple[MediaItem, Future]] = deque()
        batch: list[tuple[MediaItem, str, object]] = []
        digests: dict[str, str] = {}
        job_id = getattr(self._job, "id", None)
        late = 0
        alone = len(items) == 1 and self._fits_in(plan)
        while pending or running:
            while pending and len(running) < max(1, plan.share):
                item = pending.popleft()
                if plan.expired:
                    late += 1
                    results[item.url] = self._late(plan)
                    continue
                if alone:  # nothing to overlap its fetch with: no hand-over to the pool and back
                    done: Future = Future()
                    done.set_result(self._load(project, item, encoder, job_id))
                    running.append((item, done))
                    continue
                running.append((item, self._pool.submit(self._load, project, item, encoder, job_id)))
            if not running:
                break
            item, future = running.popleft()
            try:
                outcome = future.result(timeout=plan.remaining())
            except FutureTimeout:
                late += 1
                outcome = self._late(plan)
            if isinstance(outcome, MediaError):
                results[item.url] = outcome
                continue
            digest, prepared = outcome
            if isinstance(prepared, torch.Tensor):  # its content was embedded before, under another URL
                results[item.url] = prepared
                if not item.inline:
                    digests[item.url] = digest
            else:
                batch.append((item, digest, prepared))
            if len(batch) >= STREAM_BATCH or (batch and not running and not pending):
                results.update(self._embed(project, batch, encoder, job_id, plan))
                batch = []
        if batch:
            results.update(self._embed(project, batch, encoder, job_id, plan))
        self._cache(lambda: MediaDigests(self.redis, project).put_many(digests), None)
        if late:
            log.warning("project %s: %d inputs not done within PREDICT_DEADLINE_S; answered empty", project, late)
        return results

    def _fits_in(self, plan: FetchPlan) -> bool:
        """Whether a fetch, bounded by MEDIA_TIMEOUT_S, ends before `plan`'s deadline even if it runs out its time."""
        remaining = plan.remaining()
        return remaining is None or remaining >= self.fetcher.settings.media_timeout_s

    @staticmethod
    def _late(plan: FetchPlan) -> MediaError:
        return MediaError("Not done within this request's deadline (PREDICT_DEADLINE_S); the workers embed it.")

    def _embed(self, project: str, batch: list[tuple[MediaItem, str, object]], encoder: Encoder,
               job_id: str | None, plan: FetchPlan) -> dict[str, torch.Tensor]:
        """Embed one batch of prepared inputs and cache the vectors, with the content digest of each URL, in one
        round trip (when `plan` says: after the answer); the inputs stay marked until embedded."""
        marks = {item.url: item.task_id for item, _, _ in batch if not item.inline}
        with self._marked(job_id, project, marks):
            vectors = encoder.embed([prepared for _, _, prepared in batch])
            fresh = {digest: vector for (_, digest, _), vector in zip(batch, vectors)}
            digests = {item.url: digest for item, digest, _ in batch if not item.inline}
            plan.later(lambda: self._cache(lambda: self._store(project, encoder, fresh, digests), None))
        return {item.url: vector for (item, _, _), vector in zip(batch, vectors)}

    def _store(self, project: str, encoder: Encoder, vectors: dict[str, torch.Tensor], digests: dict[str, str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        EmbeddingCache(self.redis, encoder.key).put_many(vectors, pipe=pipe)
        MediaDigests(self.redis, project).put_many(digests, pipe=pipe)
        pipe.execute()

    @staticmethod
    def _cache(call, default):
        """A cache read or write. While Redis is unreachable: a miss, or a skipped write (features still come)."""
        try:
            return call()
        except RedisError as exc:
            log.warning("embedding cache unavailable, working without it: %s", exc)
            return default

    @contextlib.contextmanager
    def _marked(self, job_id: str | None, project: str, marks: dict[str, int | None]) -> Iterator[None]:
        """`marks` in flight for `job_id` during the block; while Redis is unreachable, unmarked."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.poison.in_flight(job_id, project, marks))
            except RedisError as exc:
                log.warning("inputs in flight not marked (Redis unreachable): %s", exc)
            yield

    def _load(self, project: str, item: MediaItem, encoder: Encoder, job_id: str | None):
        """(digest, cached vector or prepared input), or the MediaError explaining the failure.

        Runs in the fetch pool. In a job, the input stays marked in flight from before its fetch until
        its batch is embedded, so a worker that dies on it (in the fetch, the decode or the embedding)
        charges it; `_embed` marks it again for the embedding."""
        try:
            if item.inline and not item.url:
                raise MediaError("The task has no text under the data key the labeling config's <Text> value names.")
            with self._marked(job_id, project, {} if item.inline else {item.url: item.task_id}):
                data = item.inline_bytes() if item.inline else self.fetcher.fetch(item.url, task_id=item.task_id)
                digest = content_digest(data)
                cached = self._cache(lambda: EmbeddingCache(self.redis, encoder.key).get_many([digest]), {})
                if digest in cached:
                    return digest, cached[digest]
                return digest, encoder.prepare(data, self.limits)
        except MediaError as exc:
            log.warning("task %s: %s", item.task_id, exc)
            return exc
