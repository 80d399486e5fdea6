"""Prometheus counters kept in Redis, so every gunicorn worker and RQ worker adds to the same numbers.

Metrics never break the work they measure: a Redis error while counting is logged and dropped.
"""

from __future__ import annotations

import logging

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

KEY = "headstart:metrics"

HELP = {
    "headstart_predictions_total": ("counter", "Tasks predicted by /predict."),
    "headstart_predict_requests_total": ("counter", "/predict requests answered."),
    "headstart_predict_seconds_sum": ("counter", "Total time spent answering /predict."),
    "headstart_embedding_cache_hits_total": ("counter", "Features served from the Redis cache."),
    "headstart_embedding_cache_misses_total": ("counter", "Features computed by a backbone."),
    "headstart_webhook_events_total": ("counter", "Webhook events received, by action."),
    "headstart_trainings_total": ("counter", "Training jobs finished, by outcome."),
    "headstart_training_seconds_sum": ("counter", "Total time spent in training jobs."),
}


def _series(name: str, labels: dict[str, str] | None) -> str:
    if not labels:
        return name
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, redis: Redis):
        self.redis = redis

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        try:
            self.redis.hincrbyfloat(KEY, _series(name, labels), value)
        except RedisError as exc:
            log.debug("metric %s dropped: %s", name, exc)

    def render(self, gauges: dict[str, float] | None = None) -> str:
        """The Prometheus text exposition of every counter, plus `gauges` measured just now."""
        values = {key.decode(): float(value) for key, value in self.redis.hgetall(KEY).items()}
        values.update(gauges or {})
        lines, described = [], set()
        for series in sorted(values, key=lambda series: (series.split("{", 1)[0], series)):
            name = series.split("{", 1)[0]
            if name not in described:
                kind, text = HELP.get(name, ("gauge", name.replace("_", " ")))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                described.add(name)
            lines.append(f"{series} {values[series]:g}")
        return "\n".join(lines) + "\n"
