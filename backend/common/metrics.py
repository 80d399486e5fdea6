"""Prometheus counters and histograms kept in Redis, so every gunicorn and RQ worker adds to the same numbers.

Metrics never break the work they measure: a Redis error while counting is logged and dropped.
Every family in HELP is exposed from the first scrape: counters at 0 for each of their known label
values (LABELS), histograms with every bucket (BUCKETS_S), _sum and _count at 0. Prometheus'
rate() and increase() miss the first increment of a series that did not exist before it.

Why Redis and not prometheus_client: trainings are counted and timed by RQ workers, which may run
on other hosts (GPU workers) that Prometheus does not scrape; only the backend's /metrics is.
prometheus_client's multiprocess mode adds up only the processes that share one directory on one
host, so it would lose whatever was recorded elsewhere. A Redis hash, which every process already
reaches, adds up all of them, whatever the host.
"""

from __future__ import annotations

import itertools
import logging
import math
import re

from redis import Redis
from redis.exceptions import RedisError

from backend.common import redis_keys

log = logging.getLogger(__name__)

KEY = redis_keys.METRICS

HELP = {
    "headstart_predictions_total": ("counter", "Tasks predicted by /predict."),
    "headstart_predict_requests_total": ("counter", "/predict requests answered."),
    "headstart_predict_seconds": ("histogram", "Time spent answering one /predict request."),
    "headstart_embedding_cache_hits_total": ("counter", "Features served from the Redis cache."),
    "headstart_embedding_cache_misses_total": ("counter", "Features computed by a backbone."),
    "headstart_webhook_events_total": ("counter", "Webhook events received, by action."),
    "headstart_webhook_refused_total": ("counter", "Webhook calls refused, by reason (unauthenticated: no or "
                                                   "wrong basic auth; unknown_project: never set up)."),
    "headstart_trainings_total": ("counter", "Heads trained, by outcome (promoted, rejected), and failed jobs."),
    "headstart_training_seconds": ("histogram", "Duration of one training job."),
    "headstart_queue_jobs": ("gauge", "Jobs per queue and state, measured at scrape time."),
    "headstart_queues_suspended": ("gauge", "1 while `headstart queues suspend` holds every worker."),
    "headstart_workers": ("gauge", "RQ workers by state, measured at scrape time."),
}

# Every value a label can take, for the families that have labels: each series is exposed at 0 from the first
# scrape. WEBHOOK_ACTIONS is backend.server.webhook's TRAINING_EVENTS + OTHER_EVENTS, and "other" for any other
# action; backend.common may not import backend.server, so tests/test_metrics.py checks that they agree.
WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING",
                   "ANNOTATIONS_CREATED", "TASKS_CREATED", "TASKS_DELETED", "PROJECT_CREATED", "PROJECT_UPDATED",
                   "PROJECT_DELETED", "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "other")
LABELS = {
    "headstart_webhook_events_total": {"action": WEBHOOK_ACTIONS},
    "headstart_webhook_refused_total": {"reason": ("unauthenticated", "unknown_project")},
    # failed: the job raised; superseded: a newer head was promoted while this one was judged
    "headstart_trainings_total": {"outcome": ("promoted", "rejected", "superseded", "failed")},
}

# Upper bounds (seconds) of histogram buckets: /predict answers in ms..s, trainings in s..minutes.
BUCKETS_S = {
    "headstart_predict_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100),
    "headstart_training_seconds": (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _series(name: str, labels: dict[str, str] | None) -> str:
    if not labels:
        return name
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _bounds(histogram: str) -> tuple[float, ...]:
    return (*BUCKETS_S[histogram], math.inf)


def _le(bound: float) -> str:
    """A bucket's `le` label: 0.25, 10, +Inf."""
    return "+Inf" if bound == math.inf else f"{bound:g}"


class Metrics:
    def __init__(self, redis: Redis):
        self.redis = redis

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        try:
            self.redis.hincrbyfloat(KEY, _series(name, labels), value)
        except RedisError as exc:
            log.debug("metric %s dropped: %s", name, exc)

    def add_many(self, values: dict[str, float]) -> None:
        """Add to several unlabeled counters in one round trip."""
        self.record(values, {})

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """Add one observation to histogram `name` (buckets from BUCKETS_S), in one round trip."""
        self.record({}, {name: seconds}, **labels)

    def record(self, counters: dict[str, float], observations: dict[str, float], **labels: str) -> None:
        """Add to counters and observe histograms (all with the same `labels`) in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for name, value in counters.items():
            pipe.hincrbyfloat(KEY, _series(name, labels), value)
        for name, seconds in observations.items():
            for bound in _bounds(name):  # cumulative: each bucket counts every observation up to its bound
                pipe.hincrbyfloat(KEY, _series(f"{name}_bucket", {**labels, "le": _le(bound)}),
                                  int(seconds <= bound))
            pipe.hincrbyfloat(KEY, _series(f"{name}_sum", labels), seconds)
            pipe.hincrbyfloat(KEY, _series(f"{name}_count", labels), 1)
        try:
            pipe.execute()
        except RedisError as exc:
            log.debug("metrics %s dropped: %s", ", ".join([*counters, *observations]), exc)

    def render(self, gauges: dict[str, float] | None = None) -> str:
        """The Prometheus text exposition of every counter and histogram, plus `gauges` measured just now.

        Series that HELP and BUCKETS_S no longer describe (left in Redis by an older release) are left out:
        an unknown family would get a made-up type, a bucket no longer observed would break cumulativity.
        """
        values = dict.fromkeys(_zero_series(), 0.0)
        values.update({key.decode(): float(value) for key, value in self.redis.hgetall(KEY).items()})
        values.update(gauges or {})
        lines, described = [], set()
        for series in sorted(filter(_described, values), key=_order):
            family = _family(series.split("{", 1)[0])
            if family not in described:
                kind, text = HELP[family]
                lines += [f"# HELP {family} {text}", f"# TYPE {family} {kind}"]
                described.add(family)
            lines.append(f"{series} {_number(values[series])}")
        return "\n".join(lines) + "\n"


def _zero_series() -> list[str]:
    """Every counter and histogram series there can be, for each combination of known label values."""
    series = []
    for family, (kind, _) in HELP.items():
        known = LABELS.get(family, {})
        for values in itertools.product(*known.values()):  # one empty combination for a family without labels
            labels = dict(zip(known, values))
            if kind == "counter":
                series.append(_series(family, labels))
            elif kind == "histogram":
                series += [_series(f"{family}_bucket", {**labels, "le": _le(bound)}) for bound in _bounds(family)]
                series += [_series(f"{family}_sum", labels), _series(f"{family}_count", labels)]
    return series


def _described(series: str) -> bool:
    name, _, labels = series.partition("{")
    family = _family(name)
    if name == f"{family}_bucket":
        bound = _LE.search(labels)
        return bound is not None and bound.group(1) in {_le(b) for b in _bounds(family)}
    return family in HELP


def _number(value: float) -> str:
    """Exact text for a sample: counts as integers (`:g` would round 1234567 to 1.23457e+06)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _family(name: str) -> str:
    """The metric a series belongs to: histogram series drop their _bucket/_sum/_count suffix."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and HELP.get(name[:-len(suffix)], ("",))[0] == "histogram":
            return name[:-len(suffix)]
    return name


def _order(series: str):
    """Families together; within a histogram, per label set: buckets by increasing `le` (+Inf last), sum, count."""
    name, _, labels = series.partition("{")
    family = _family(name)
    bound = _LE.search(labels)
    others = _LE.sub("", labels).strip(",}")
    suffix = HISTOGRAM_SUFFIXES.index(name[len(family):]) if name != family else 0
    return family, others, suffix, float(bound.group(1)) if bound else 0.0  # float("+Inf") is inf


_LE = re.compile(r'(?:^|,)le="([^"]*)"')
