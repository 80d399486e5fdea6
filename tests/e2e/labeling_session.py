"""One Label Studio project labeled through the API as an annotator would, and what the flows
observe of it: Label Studio's record of the backend, the stored predictions, and headstart's
version metadata in Redis (`ModelStore`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePosixPath
from urllib.parse import parse_qs, urlparse

from redis import Redis
from rq import Queue
from rq.registry import FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from backend.core.store import ModelStore
from tests.e2e.backend_pair import HeadstartPair
from tests.e2e.dataset import Image
from tests.e2e.ls_api import LabelStudioApi
from tests.e2e.processes import wait_until
from backend.common.queues import TRAIN_JOB, TRAIN_QUEUE

CONTROL = "label"
OBJECT = "image"
TRAINING_TIMEOUT_S = 240  # embedding, fitting and cross-validating on two shared cores
PREDICTIONS_TIMEOUT_S = 240


@dataclass
class Scored:
    model_version: str
    accuracy: float
    scored: int


@dataclass
class LabelingSession:
    api: LabelStudioApi
    pair: HeadstartPair
    project: int
    backend_id: int
    images: dict[int, Image]  # task id → image with its true label
    annotations: dict[int, tuple[int, str]] = field(default_factory=dict)  # task → (annotation id, label)
    control: str = CONTROL  # the <Choices> name, and the object it labels
    object_name: str = OBJECT

    @cached_property
    def store(self) -> ModelStore:
        return ModelStore(Redis.from_url(self.pair.redis_url))

    # labeling

    def pool_tasks(self, label: str) -> list[int]:
        return sorted(task for task, image in self.images.items() if image.role == "pool" and image.label == label)

    def eval_tasks(self) -> list[int]:
        return sorted(task for task, image in self.images.items() if image.role == "eval")

    def unlabeled_tasks(self) -> list[int]:
        return sorted(task for task in self.images if task not in self.annotations)

    def annotate(self, task: int, label: str) -> float:
        """Submit one annotation; returns the round trip in seconds."""
        started = time.perf_counter()
        annotation = self.api.annotate(task, self.control, self.object_name, label)
        elapsed = time.perf_counter() - started
        self.annotations[task] = (annotation["id"], label)
        return elapsed

    def annotate_next(self, per_class: int) -> list[float]:
        """Annotate the next `per_class` unannotated pool images of each class, classes interleaved."""
        queues = {label: [t for t in self.pool_tasks(label) if t not in self.annotations]
                  for label in sorted({image.label for image in self.images.values()})}
        for label, queue in queues.items():
            if len(queue) < per_class:
                raise AssertionError(f"the labeling pool has only {len(queue)} {label} images left")
        return [self.annotate(queues[label][i], label) for i in range(per_class) for label in queues]

    def expected_training_set(self) -> dict[str, list[str]]:
        """What a version trained on every current annotation records as `trained_on`."""
        return {str(task): [label] for task, (_, label) in self.annotations.items()}

    # versions

    def versions(self) -> list[dict]:
        return self.store.versions(str(self.project), self.control)

    def last_version_number(self) -> int:
        versions = self.versions()
        return versions[-1]["version"] if versions else 0

    def wait_for_version(self, *, after: int, trained_on: dict[str, list[str]] | None = None,
                         timeout_s: float = TRAINING_TIMEOUT_S) -> dict:
        """The first version numbered above `after` whose training finished (promoted or rejected)
        and, when given, was trained on exactly `trained_on`."""
        def finished():  # a version older than the newest few may have lost its trained_on (VERSION_DETAIL_KEEP)
            for meta in self.versions():
                if meta["version"] > after and meta.get("status") in ("promoted", "rejected") and (
                        trained_on is None or meta.get("trained_on") == trained_on):
                    return meta
            return None
        return wait_until(finished, timeout_s=timeout_s, interval_s=0.5, processes=self.pair.processes,
                          what=f"a finished training of project {self.project} after version {after}"
                               + (f" on {len(trained_on)} labels" if trained_on is not None else ""))

    def trainings_since(self, moment: float) -> list[dict]:
        """The summaries of this project's trainings that started after `moment` (epoch seconds) and ran (not
        deferred behind another), oldest first, each with its `started_at`."""
        train = Queue(TRAIN_QUEUE, connection=self.store.redis, serializer=JSONSerializer)
        jobs = [train.fetch_job(job_id) for job_id in FinishedJobRegistry(queue=train).get_job_ids()]
        ran = [job for job in jobs if job is not None and job.func_name == TRAIN_JOB and job.args == [str(self.project)]
               and job.started_at and job.started_at.timestamp() > moment and (job.return_value() or {}).get("controls")]
        return [{**job.return_value(), "started_at": job.started_at.timestamp()}
                for job in sorted(ran, key=lambda job: job.started_at)]

    def wait_for_training(self, *, since: float, timeout_s: float = TRAINING_TIMEOUT_S) -> dict:
        """The first training of this project that started after `since` and ran, once it finished."""
        return wait_until(lambda: (self.trainings_since(since) or [None])[0], timeout_s=timeout_s, interval_s=0.5,
                          processes=self.pair.processes, what=f"a training of project {self.project}")

    def training_idle(self) -> bool:
        """No training queued, running or waiting for a retry (read from RQ's own registries)."""
        train = Queue(TRAIN_QUEUE, connection=self.store.redis)
        return train.count == 0 and StartedJobRegistry(queue=train).count == 0 \
            and ScheduledJobRegistry(queue=train).count == 0

    def wait_until_settled(self, trained_on: dict[str, list[str]],
                           timeout_s: float = TRAINING_TIMEOUT_S) -> dict:
        """Wait until training is idle and the newest version was trained on exactly `trained_on`;
        returns the served (current) version's metadata."""
        def settled():
            if not self.training_idle():
                return None
            finished = [meta for meta in self.versions() if meta.get("status") in ("promoted", "rejected")]
            if not finished or finished[-1].get("trained_on") != trained_on:
                return None
            return self.store.meta(str(self.project), self.control,
                                   self.store.current_number(str(self.project), self.control))
        return wait_until(settled, timeout_s=timeout_s, interval_s=0.5, processes=self.pair.processes,
                          what=f"idle training with a version of project {self.project} on {len(trained_on)} labels")

    def label_studio_model_version(self) -> str:
        return self.api.backend(self.backend_id)["model_version"]

    def wait_for_label_studio_version(self, expected: str, timeout_s: float = 60) -> str:
        """Poll Label Studio's backend record (each read runs /health and /setup) until it shows `expected`."""
        return wait_until(lambda: self.label_studio_model_version() == expected and expected,
                          timeout_s=timeout_s, interval_s=1.0, processes=self.pair.processes,
                          what=f"model_version {expected!r} in Label Studio's ML backend record")

    # predictions

    def predictions_of(self, model_version: str) -> dict[int, dict]:
        """Task id → a stored prediction of `model_version`."""
        return {prediction["task"]: prediction for prediction in self.api.predictions(self.project)
                if prediction["model_version"] == model_version}

    def retrieve_predictions(self, tasks: list[int]) -> float:
        """Run "Retrieve Predictions" on `tasks`; returns how long Label Studio took."""
        started = time.perf_counter()
        self.api.retrieve_predictions(self.project, tasks)
        return time.perf_counter() - started

    def score(self, model_version: str, tasks: list[int]) -> Scored:
        """Accuracy of the stored `model_version` predictions of `tasks` (all must have one)."""
        stored = self.predictions_of(model_version)
        missing = [task for task in tasks if task not in stored]
        if missing:
            raise AssertionError(f"{len(missing)} of {len(tasks)} tasks have no {model_version} prediction "
                                 f"(e.g. {missing[:5]})")
        correct = sum(_predicted_label(stored[task], self.control) == self.images[task].label for task in tasks)
        return Scored(model_version=model_version, accuracy=correct / len(tasks), scored=len(tasks))


def _predicted_label(prediction: dict, control: str = CONTROL) -> str | None:
    for region in prediction["result"]:
        if region.get("from_name") == control:
            choices = region["value"]["choices"]
            return choices[0] if len(choices) == 1 else None
    return None


def image_file_of(task: dict) -> str:
    """The file name behind a local-files or upload URL of a task."""
    url = task["data"][OBJECT]
    query = parse_qs(urlparse(url).query)
    return PurePosixPath(query["d"][0] if "d" in query else urlparse(url).path).name
