"""Inputs that kill workers: charged when a worker dies on them, skipped once they have killed enough.

A job marks the inputs it is fetching, decoding or embedding (`in_flight`) and clears them when they
are done. A worker killed meanwhile (out of memory, SIGKILL, host lost) leaves its marks behind; RQ's
abandoned-job handler (`worker.process`) calls `charge` with the job's id, which adds one kill to
each input it left. An input with kills is a suspect, processed alone so a later kill is charged to
it only; one with MEDIA_POISON_KILLS kills is poison: skipped as a media error, never fetched again
until its kills are cleared (`clear`), and reported by `headstart status` and /admin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Callable, Iterable, Iterator

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from backend.common import redis_keys
from backend.common.errors import MediaError

log = logging.getLogger(__name__)

IN_FLIGHT_TTL_S = 7 * 24 * 3600  # marks of a job nobody charged (its worker died, RQ forgot it) expire


class PoisonLedger:
    def __init__(self, redis: Redis, *, kills_allowed: int):
        self.redis = redis
        self.kills_allowed = max(1, kills_allowed)

    def kills(self, project: str, urls: Iterable[str]) -> dict[str, int]:
        """Kills charged to each of `urls` that has any."""
        urls = list(dict.fromkeys(urls))
        return self._parse(urls, self.redis.hmget(redis_keys.input_kills(project), urls)) if urls else {}

    def queue_kills(self, pipe: Pipeline, project: str, urls: list[str]) -> Callable[[list], dict[str, int]]:
        """`kills` of the (non-empty, distinct) `urls` queued on `pipe`; returns what turns the pipeline's answer
        to it into the same dict."""
        pipe.hmget(redis_keys.input_kills(project), urls)
        return lambda found: self._parse(urls, found)

    @staticmethod
    def _parse(urls: list[str], found: list) -> dict[str, int]:
        return {url: json.loads(raw)["kills"] for url, raw in zip(urls, found) if raw is not None}

    def poison_error(self, kills: int) -> MediaError:
        return MediaError(f"This input was being fetched or embedded when a worker died {kills} times "
                          f"(MEDIA_POISON_KILLS={self.kills_allowed}); it is skipped from now on. Replace the file "
                          "(under a new URL) or delete the task; `headstart status` lists such inputs.")

    def is_poison(self, kills: int) -> bool:
        return kills >= self.kills_allowed

    @contextlib.contextmanager
    def in_flight(self, job_id: str | None, project: str, items: dict[str, int | None]) -> Iterator[None]:
        """Mark `items` (URL → task id) as in the hands of RQ job `job_id` for the block (no job: no mark).

        The mark is cleared however the block ends, except by the process dying: that is the point.
        """
        if not job_id or not items:
            yield
            return
        key = redis_keys.inputs_in_flight(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={url: json.dumps({"project": project, "task_id": task})
                                for url, task in items.items()})
        pipe.expire(key, IN_FLIGHT_TTL_S)
        pipe.execute()
        try:
            yield
        finally:
            try:
                self.redis.hdel(key, *items)
            except RedisError as exc:  # the mark outlives the input: charged only if this job is abandoned
                log.warning("inputs of job %s not unmarked (Redis unreachable): %s", job_id, exc)

    def charge(self, job_id: str) -> list[dict]:
        """Add a kill to every input RQ job `job_id` left in flight (its worker died); returns them."""
        key = redis_keys.inputs_in_flight(job_id)
        left = self.redis.hgetall(key)
        charged = []
        for raw_url, raw in left.items():
            url, mark = raw_url.decode(), json.loads(raw)
            kills_key = redis_keys.input_kills(mark["project"])
            previous = self.redis.hget(kills_key, url)
            kills = (json.loads(previous)["kills"] if previous else 0) + 1
            entry = {"task_id": mark["task_id"], "kills": kills, "at": time.time()}
            self.redis.hset(kills_key, url, json.dumps(entry))
            charged.append({"project": mark["project"], "url": url, **entry})
            log.warning("project %s task %s: worker died while job %s held input %s (kill %d of %d allowed)",
                        mark["project"], mark["task_id"], job_id, url[:200], kills, self.kills_allowed)
        self.redis.delete(key)
        return charged

    def report(self, project: str) -> list[dict]:
        """Every input of `project` with kills, most kills first, with `poison` set where it is skipped."""
        entries = [{"url": url.decode(), **json.loads(raw)}
                   for url, raw in self.redis.hgetall(redis_keys.input_kills(project)).items()]
        for entry in entries:
            entry["poison"] = self.is_poison(entry["kills"])
        return sorted(entries, key=lambda entry: (-entry["kills"], entry["url"]))

    def clear(self, project: str, urls: Iterable[str] | None = None) -> int:
        """Forget the kills of `urls` (all of the project's when None), e.g. after the file was fixed."""
        key = redis_keys.input_kills(project)
        if urls is None:
            return int(self.redis.delete(key))
        urls = list(urls)
        return int(self.redis.hdel(key, *urls)) if urls else 0
