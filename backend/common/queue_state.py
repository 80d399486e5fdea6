"""What the queues and workers look like right now, read without changing anything.

Shared by /metrics (gauges measured at scrape time, so every gunicorn worker reports the same)
and the admin views.
"""

from __future__ import annotations

from redis import Redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer
from rq.suspension import is_suspended

from backend.common.queues import QUEUE_NAMES, queue

WORKER_STATES = ("idle", "busy", "suspended", "started")


def registries(q: Queue) -> dict:
    return {"started": q.started_job_registry, "deferred": q.deferred_job_registry,
            "scheduled": q.scheduled_job_registry, "failed": q.failed_job_registry,
            "finished": q.finished_job_registry, "canceled": q.canceled_job_registry}


def queues(redis: Redis) -> list[dict]:
    """Each headstart queue with its depth and the size of each of RQ's registries."""
    views = []
    for name in QUEUE_NAMES:
        q = queue(name, redis)
        # cleanup=False: only workers clean registries (with the handler that re-runs abandoned jobs at once)
        counts = {"queued": q.count, **{state: registry.get_job_count(cleanup=False)
                                        for state, registry in registries(q).items()}}
        views.append({"name": name, "counts": counts, "workers": Worker.count(queue=q)})
    return views


def suspended(redis: Redis) -> bool:
    return bool(is_suspended(redis))


def scrape_gauges(redis: Redis) -> dict[str, float]:
    """Gauges for /metrics, measured at scrape time so every gunicorn worker reports the same."""
    gauges: dict[str, float] = {}
    for view in queues(redis):
        for state, count in view["counts"].items():
            gauges[f'headstart_queue_jobs{{queue="{view["name"]}",state="{state}"}}'] = count
    states = dict.fromkeys(WORKER_STATES, 0)
    for worker in Worker.all(connection=redis, serializer=JSONSerializer):
        state = worker.get_state()
        states[state] = states.get(state, 0) + 1
    gauges.update({f'headstart_workers{{state="{state}"}}': count for state, count in states.items()})
    gauges["headstart_queues_suspended"] = float(suspended(redis))
    return gauges
