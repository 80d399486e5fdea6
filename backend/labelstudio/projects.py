"""What headstart knows about each Label Studio project: its labeling config and where it lives."""

from __future__ import annotations

import time

from label_studio_sdk.client import LabelStudio
from redis import Redis

from backend.common import redis_keys
from backend.common.errors import LabelStudioUnavailable


class ProjectRegistry:
    def __init__(self, redis: Redis):
        self.redis = redis

    def _key(self, project: str) -> str:
        return redis_keys.project(project)

    def remember(self, project: str, label_config: str) -> bool:
        """Record the project's labeling config; True when it differs from the one known before."""
        key = self._key(project)
        previous = self.redis.hget(key, "label_config")
        self.redis.hset(key, mapping={"label_config": label_config, "seen_at": time.time()})
        self.redis.sadd(redis_keys.PROJECTS, project)
        return previous is None or previous.decode() != label_config

    def label_config(self, project: str) -> str | None:
        raw = self.redis.hget(self._key(project), "label_config")
        return raw.decode() if raw is not None else None

    def all(self) -> list[str]:
        return sorted((member.decode() for member in self.redis.smembers(redis_keys.PROJECTS)), key=int)


def project_exists(client: LabelStudio, project: str) -> bool:
    """Whether Label Studio still has the project: False only on its 404; any other failure raises
    LabelStudioUnavailable (a job retries), so a Label Studio that is down never counts as a deletion."""
    try:
        client.projects.get(id=int(project))
        return True
    except Exception as exc:
        if getattr(exc, "status_code", None) == 404:
            return False
        raise LabelStudioUnavailable(
            f"Could not ask Label Studio whether project {project} still exists ({type(exc).__name__}: {exc}). "
            "Check LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and that the user can see the project.") from None
