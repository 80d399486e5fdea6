"""`webhook`: 50 concurrent senders replay recorded webhook events for 30 s against `headstart serve`.

The bodies are the ones a real Label Studio 1.23 sent (../shared/ls-requests/webhook-*.json), with
the project, annotation and task ids varied, over several projects whose tasks are hymenoptera
photos (LOCAL_FILES_DOCUMENT_ROOT). `headstart worker` listens, so trainings really run and the
coalescing is exercised: a burst must give a handful of trainings per project, not one per event.

Senders are asyncio coroutines on keep-alive HTTP/1.1 connections (loopback only), each in a
bounded loop; latency is measured per request from the first byte sent to the last byte read.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from bench import data
from bench.harness import RESULTS_DIR, Run, goal, percentile, print_table, rounded
from bench.stack import Stack
from worker.queueing import TRAIN_QUEUE, queue

NAME = "webhook"
MIX = (("ANNOTATION_CREATED", 60), ("ANNOTATION_UPDATED", 20), ("ANNOTATIONS_DELETED", 5),
       ("PROJECT_UPDATED", 8), ("TASKS_CREATED", 5), ("START_TRAINING", 2))
MAX_EVENTS_PER_SENDER = 100_000
REQUEST_TIMEOUT_S = 30
DRAIN_TIMEOUT_S = 90


@dataclass(frozen=True)
class Params:
    senders: int
    seconds: float
    projects: int
    worker: bool = True


FULL = Params(senders=50, seconds=30, projects=5)
QUICK = Params(senders=4, seconds=2, projects=2, worker=False)


class EventSource:
    """Recorded webhook bodies with fresh ids: creates, updates and deletes stay consistent."""

    def __init__(self, projects: int, seed: int):
        self.templates = {action: data.recorded_body(action) for action, _ in MIX}
        self.actions = [action for action, _ in MIX]
        self.weights = [weight for _, weight in MIX]
        self.images = data.images("hymenoptera", "train")
        self.config = data.label_config(data.classes_of(self.images))
        self.projects = list(range(1, projects + 1))
        self.rng = random.Random(seed)
        self.created: dict[int, list[tuple[int, int]]] = {p: [] for p in self.projects}  # (annotation, image)

    def next(self, next_id) -> tuple[str, dict]:
        action = self.rng.choices(self.actions, self.weights)[0]
        project = self.rng.choice(self.projects)
        known = self.created[project]
        if action in ("ANNOTATION_UPDATED", "ANNOTATIONS_DELETED") and not known:
            action = "ANNOTATION_CREATED"
        template = self.templates[action]
        if action == "ANNOTATION_CREATED":
            annotation_id, image = next_id(), self.rng.randrange(len(self.images))
            known.append((annotation_id, image))
            return action, self._annotated(template, project, annotation_id, image)
        if action == "ANNOTATION_UPDATED":
            annotation_id, image = self.rng.choice(known)
            return action, self._annotated(template, project, annotation_id, image)
        if action == "ANNOTATIONS_DELETED":
            annotation_id, _ = known.pop(self.rng.randrange(len(known)))
            return action, {**data.webhook_event(template, project=project, config=self.config),
                            "annotations": [{"id": annotation_id}]}
        return action, data.webhook_event(template, project=project, config=self.config)

    def _annotated(self, template: dict, project: int, annotation_id: int, image: int) -> dict:
        path, cls = self.images[image]
        task_id = image + 1
        return data.webhook_event(template, project=project, config=self.config,
                                  annotation_=data.annotation(annotation_id, task_id, cls),
                                  task_=data.task(task_id, data.local_url(data.HYMENOPTERA, path)))


class Tally:
    def __init__(self):
        self.latencies_ms: list[float] = []
        self.errors: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.actions: Counter = Counter()
        self._last_id = 0

    def next_id(self) -> int:
        self._last_id += 1
        return self._last_id


async def _sender(port: int, source: EventSource, tally: Tally, deadline: float) -> None:
    reader = writer = None
    for _ in range(MAX_EVENTS_PER_SENDER):
        if time.monotonic() >= deadline:
            break
        action, body = source.next(tally.next_id)
        payload = json.dumps(body).encode()
        request = (f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n").encode() + payload
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.perf_counter()
            writer.write(request)
            status, answer, keep = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            tally.errors[type(exc).__name__] += 1
            writer = _close(writer)
            continue
        tally.actions[action] += 1
        if status != 200:
            tally.errors[f"HTTP {status}"] += 1
        else:
            tally.outcomes[answer.get("status", "?")] += 1
        if not keep:
            writer = _close(writer)
    _close(writer)


def _close(writer):
    if writer is not None:
        writer.close()
    return None


async def _read_response(reader) -> tuple[int, dict, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in
               (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, json.loads(body) if body else {}, headers.get("connection", "").lower() != "close"


async def _replay(port: int, params: Params, tally: Tally) -> float:
    source = EventSource(params.projects, seed=0)
    started = time.monotonic()
    deadline = started + params.seconds
    await asyncio.gather(*(_sender(port, source, tally, deadline) for _ in range(params.senders)))
    return time.monotonic() - started


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    tally = Tally()
    with Stack(env={"LOCAL_FILES_DOCUMENT_ROOT": str(data.HYMENOPTERA)}, worker=params.worker,
               quick=quick) as stack:
        elapsed = asyncio.run(_replay(stack.port, params, tally))
        jobs = _jobs(stack, drain=params.worker)
    events = len(tally.latencies_ms)
    results = {
        "events": events,
        "events_per_s": rounded(events / elapsed, 1),
        "p50_ms": rounded(percentile(tally.latencies_ms, 50), 2) if events else None,
        "p99_ms": rounded(percentile(tally.latencies_ms, 99), 2) if events else None,
        "max_ms": rounded(max(tally.latencies_ms), 1) if events else None,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "jobs_enqueued": tally.outcomes.get("queued", 0),
        "outcomes": dict(tally.outcomes),
        "actions": dict(tally.actions),
        "senders": params.senders,
        "seconds": params.seconds,
        "projects": params.projects,
        **jobs,
    }
    goals = {"p99_ms": goal(results["p99_ms"], 50, at_least=False),
             "errors": goal(results["errors"], 0, at_least=False)}
    notes = ["jobs_enqueued: webhook answers that enqueued a training; trainings_*: RQ registries once the "
             "queue drained (re-queues by a finishing training included)",
             "`headstart worker` ran trainings during the replay, on the same 2 cores" if params.worker
             else "no worker (quick mode): every training stays queued"]
    record = bench_run.finish(results, goals=goals, notes=notes)
    print_table(f"webhook ({params.senders} senders, {params.seconds:.0f} s, {params.projects} projects)",
                ["events", "events/s", "p50 ms", "p99 ms", "errors", "jobs enqueued", "trainings/project"],
                [[events, results["events_per_s"], results["p50_ms"], results["p99_ms"], results["errors"],
                  results["jobs_enqueued"], results["trainings_per_project"]]])
    return record


def _jobs(stack: Stack, *, drain: bool) -> dict:
    """Training jobs by outcome and project, once the queue has drained (or the wait ran out)."""
    train = queue(TRAIN_QUEUE, stack.redis)
    deadline = time.monotonic() + (DRAIN_TIMEOUT_S if drain else 0)
    while (train.count or StartedJobRegistry(queue=train).count) and time.monotonic() < deadline:
        time.sleep(0.2)
    finished = FinishedJobRegistry(queue=train).get_job_ids()
    failed = FailedJobRegistry(queue=train).get_job_ids()
    per_project = Counter(job.meta.get("project") for job in
                          Job.fetch_many(finished + failed, connection=stack.redis, serializer=JSONSerializer)
                          if job is not None)
    return {"trainings_finished": len(finished), "trainings_failed": len(failed),
            "trainings_left_queued": train.count, "trainings_per_project": dict(sorted(per_project.items()))}
