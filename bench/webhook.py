"""`webhook`: 50 concurrent senders replay recorded webhook events for 30 s against `headstart serve`.

The bodies are the ones a real Label Studio 1.23 sent (../shared/ls-requests/webhook-*.json), with
the project, annotation and task ids varied, over several projects whose tasks are hymenoptera
photos (LOCAL_FILES_DOCUMENT_ROOT). `headstart worker` listens, so trainings really run and the
coalescing is exercised: a burst must give a handful of trainings per project, not one per event.

Senders are asyncio coroutines on keep-alive HTTP/1.1 connections (loopback only), each in a
bounded loop. Two phases on one server: a paced replay (each sender offers 5 events/s, 250/s in all,
far beyond any team of annotators; the goals apply to it; latency counts from each event's scheduled
send time), then a saturation phase (back to back) that shows the capacity.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from bench import data
from bench.harness import RESULTS_DIR, Run, goal, percentile, print_table, rounded
from bench.stack import Stack
from backend.common.queues import TRAIN_QUEUE, queue

NAME = "webhook"
MIX = (("ANNOTATION_CREATED", 60), ("ANNOTATION_UPDATED", 20), ("ANNOTATIONS_DELETED", 5),
       ("PROJECT_UPDATED", 8), ("TASKS_CREATED", 5), ("START_TRAINING", 2))
MAX_EVENTS_PER_SENDER = 100_000
REQUEST_TIMEOUT_S = 30
DRAIN_TIMEOUT_S = 90
WARM_UP_S = 1.0
WARM_UP_PROJECT = 900


@dataclass(frozen=True)
class Params:
    senders: int
    seconds: float             # the paced replay, which the goals apply to
    rate_per_sender: float     # events per second each sender offers in the paced replay
    saturation_seconds: float  # then back to back, as fast as the server answers (capacity)
    projects: int
    worker: bool = True


FULL = Params(senders=50, seconds=30, rate_per_sender=5, saturation_seconds=15, projects=5)
QUICK = Params(senders=4, seconds=2, rate_per_sender=5, saturation_seconds=1, projects=2, worker=False)


class EventSource:
    """Recorded webhook bodies with fresh ids: creates, updates and deletes stay consistent."""

    def __init__(self, projects: int, seed: int, *, first_project: int = 1):
        self.templates = {action: data.recorded_body(action) for action, _ in MIX}
        self.actions = [action for action, _ in MIX]
        self.weights = [weight for _, weight in MIX]
        self.images = data.images("hymenoptera", "train")
        self.config = data.label_config(data.classes_of(self.images))
        self.projects = list(range(first_project, first_project + projects))
        self.rng = random.Random(seed)
        self.created: dict[int, list[tuple[int, int]]] = {p: [] for p in self.projects}  # (annotation, image)
        self._last_annotation_id = 0

    def new_annotation_id(self) -> int:
        self._last_annotation_id += 1
        return self._last_annotation_id

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
    """What one replay phase saw."""

    def __init__(self, source: EventSource):
        self.source = source
        self.latencies_ms: list[float] = []
        self.errors: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.actions: Counter = Counter()

    def next_id(self) -> int:
        return self.source.new_annotation_id()


async def _sender(port: int, source: EventSource, tally: Tally, deadline: float, interval_s: float,
                  phase_s: float) -> None:
    """Send events until `deadline`: every `interval_s` (after `phase_s`), or back to back when 0.

    Paced latency counts from the scheduled send time, so a late answer that delays the next
    send is charged to that one too (no coordinated omission).
    """
    reader = writer = None
    first = time.perf_counter() + phase_s
    for index in range(MAX_EVENTS_PER_SENDER):
        scheduled = first + index * interval_s if interval_s else time.perf_counter()
        if scheduled >= deadline:
            break
        if scheduled > time.perf_counter():
            await asyncio.sleep(scheduled - time.perf_counter())
        action, body = source.next(tally.next_id)
        payload = json.dumps(body).encode()
        request = (f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n").encode() + payload
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            status, answer, keep = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
            tally.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
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


def _replay(port: int, source: EventSource, *, senders: int, seconds: float, rate_per_sender: float) -> dict:
    """One replay phase; its latencies, errors and outcomes."""
    tally = Tally(source)
    interval_s = 1.0 / rate_per_sender if rate_per_sender else 0.0
    phases = random.Random(1)

    async def replay() -> float:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(_sender(port, source, tally, deadline, interval_s, phases.uniform(0, interval_s))
                               for _ in range(senders)))
        return time.perf_counter() - started

    elapsed = asyncio.run(replay())
    events = len(tally.latencies_ms)
    return {
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
    }


def _set_up(port: int, source: EventSource) -> None:
    """The /setup Label Studio sends when the model is connected to each project."""
    for project in source.projects:
        body = json.dumps({"project": f"{project}.1", "schema": source.config})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/setup", data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    source = EventSource(params.projects, seed=0)
    with Stack(env={"LOCAL_FILES_DOCUMENT_ROOT": str(data.HYMENOPTERA)}, worker=params.worker,
               quick=quick) as stack:
        warm_up = EventSource(1, seed=1, first_project=WARM_UP_PROJECT)
        for events in (warm_up, source):  # connected in Label Studio: webhooks of projects never set up are refused
            _set_up(stack.port, events)
        # warm-up (not measured): every server thread opens its Redis connections, on a project of its own
        _replay(stack.port, warm_up, senders=params.senders, seconds=WARM_UP_S, rate_per_sender=0)
        paced = _replay(stack.port, source, senders=params.senders, seconds=params.seconds,
                        rate_per_sender=params.rate_per_sender)
        jobs = _jobs(stack, drain=params.worker)
        saturation = _replay(stack.port, source, senders=params.senders, seconds=params.saturation_seconds,
                             rate_per_sender=0)
    results = {
        **paced,
        "offered_events_per_s": params.senders * params.rate_per_sender,
        "senders": params.senders,
        "seconds": params.seconds,
        "projects": params.projects,
        **jobs,
        "saturation": {**saturation, "seconds": params.saturation_seconds},
    }
    goals = {"p99_ms": goal(results["p99_ms"], 50, at_least=False),
             "errors": goal(results["errors"], 0, at_least=False),
             "saturation_errors": goal(saturation["errors"], 0, at_least=False)}
    notes = [f"paced replay (the goals): {params.senders} senders each sending {params.rate_per_sender:g} events/s "
             f"for {params.seconds:g} s, latency from each event's scheduled send time",
             f"saturation: the same senders back to back for {params.saturation_seconds:g} s, to show capacity; with "
             "a closed loop its latency is senders / throughput (Little's law), not the handler's speed",
             "jobs_enqueued: webhook answers of the paced replay that enqueued a training; trainings_*: RQ "
             "registries once the queue drained after it (re-queues by a finishing training included)",
             "`headstart worker` ran trainings during the replay, on the same 2 cores" if params.worker
             else "no worker (quick mode): every training stays queued"]
    record = bench_run.finish(results, goals=goals, notes=notes)
    print_table(f"webhook ({params.senders} senders, {params.projects} projects)",
                ["phase", "events", "events/s", "p50 ms", "p99 ms", "errors", "jobs enqueued"],
                [[f"paced {params.seconds:g} s", paced["events"], paced["events_per_s"], paced["p50_ms"],
                  paced["p99_ms"], paced["errors"], paced["jobs_enqueued"]],
                 [f"saturation {params.saturation_seconds:g} s", saturation["events"], saturation["events_per_s"],
                  saturation["p50_ms"], saturation["p99_ms"], saturation["errors"], saturation["jobs_enqueued"]]])
    print(f"trainings per project after the paced replay: {results['trainings_per_project']}")
    return record


def _jobs(stack: Stack, *, drain: bool) -> dict:
    """Training jobs of the measured projects by outcome and project, once the queue has drained
    (or the wait ran out)."""
    train = queue(TRAIN_QUEUE, stack.redis)
    deadline = time.monotonic() + (DRAIN_TIMEOUT_S if drain else 0)
    while (train.count or StartedJobRegistry(queue=train).count) and time.monotonic() < deadline:
        time.sleep(0.2)

    def measured(job_ids: list[str]) -> list[Job]:
        jobs = Job.fetch_many(job_ids, connection=stack.redis, serializer=JSONSerializer)
        return [job for job in jobs if job is not None and job.meta.get("project") != str(WARM_UP_PROJECT)]

    finished = measured(FinishedJobRegistry(queue=train).get_job_ids())
    failed = measured(FailedJobRegistry(queue=train).get_job_ids())
    per_project = Counter(job.meta.get("project") for job in finished + failed)
    return {"trainings_finished": len(finished), "trainings_failed": len(failed),
            "trainings_left_queued": len(measured(train.get_job_ids())),
            "trainings_per_project": dict(sorted(per_project.items()))}
