"""Simulated annotators for the `loop` benchmark: they label through Label Studio's API at a human pace.

Each annotator is a thread with its own API session and random pace (one action every 2-4 s). They
take the project's tasks in a shared, shuffled order and submit the true class, except for three
scripted actions that every real project sees: one mistaken label (the wrong class), its later
correction (a relabel: PATCH of that annotation to the true class) and one deleted annotation (its task
goes back to the unlabeled pool). Every action is recorded with the wall-clock time it was sent, so
it can be matched against the model versions headstart serves afterwards.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from bench.ls_api import LabelStudioApi, LabelStudioError

RETRIES = 3  # times an annotator repeats a submit Label Studio refused with a 500

CONTROL = "label"
OBJECT = "image"


@dataclass(frozen=True)
class Action:
    kind: str               # "create", "mistake" (a create with a wrong class), "relabel" or "delete"
    task: int
    label: str | None       # the class the task now carries in Label Studio (None after a delete)
    annotator: int
    sent_at: float          # time.time() when the request was sent
    seconds: float          # Label Studio's answer time (it sends the webhook inside the request)
    annotation: int


@dataclass(frozen=True)
class Script:
    """At which action (counted over all annotators, from 1) the scripted ones happen."""
    mistake_at: int
    relabel_at: int
    delete_at: int


@dataclass
class _Shared:
    queue: list[tuple[int, str]]                     # (task, true class), next first
    live: dict[int, tuple[int, str]] = field(default_factory=dict)  # task → (annotation, class)
    actions: list[Action] = field(default_factory=list)
    count: int = 0
    mistake: tuple[int, int, str] | None = None      # (task, annotation, true class) awaiting its correction
    lock: threading.Lock = field(default_factory=threading.Lock)


class Annotators:
    def __init__(self, api: Callable[[], LabelStudioApi], tasks: list[tuple[int, str]], classes: list[str], *,
                 count: int = 3, pace_s: tuple[float, float] = (2.0, 4.0), script: Script, seed: int = 0,
                 keep_unlabeled: int = 0, object_name: str = OBJECT):
        """`api` makes one client per annotator; `tasks` are (task id, true class) in labeling order;
        labeling stops early when only `keep_unlabeled` tasks are left; `object_name` is the object tag the
        choices are about (the config's `toName`)."""
        self.api = api
        self.classes = classes
        self.count = count
        self.pace_s = pace_s
        self.script = script
        self.seed = seed
        self.keep_unlabeled = keep_unlabeled
        self.object_name = object_name
        self.shared = _Shared(queue=list(tasks))
        self.errors: list[str] = []
        self.retries = 0  # submits repeated after a 500 (SQLite "database is locked")

    def run(self, seconds: float) -> list[Action]:
        """Label for `seconds` (each annotator finishes the action it is in); the actions, in sending order."""
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._annotator, args=(index, deadline), name=f"annotator-{index}")
                   for index in range(self.count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.errors:
            raise RuntimeError("an annotator failed: " + "; ".join(self.errors[:3]))
        return sorted(self.shared.actions, key=lambda action: action.sent_at)

    def labeled(self) -> dict[int, str]:
        """Task → class for every task that carries an annotation now."""
        with self.shared.lock:
            return {task: label for task, (_, label) in self.shared.live.items()}

    def take_task(self) -> tuple[int, str]:
        """The next task to label and its true class, for a label sent outside the annotators."""
        with self.shared.lock:
            return self.shared.queue.pop(0)

    def mark_labeled(self, task: int, label: str, annotation: int) -> None:
        with self.shared.lock:
            self.shared.live[task] = (annotation, label)

    def _annotator(self, index: int, deadline: float) -> None:
        rng = random.Random(f"{self.seed}-{index}")
        api = self.api()
        try:
            while True:
                pause = rng.uniform(*self.pace_s)
                if time.monotonic() + pause > deadline:
                    return
                time.sleep(pause)
                if not self._act(api, index, rng):
                    return
        except Exception as exc:  # recorded, raised by run(): a benchmark on a broken loop measures nothing
            self.errors.append(f"annotator {index}: {type(exc).__name__}: {exc}")
        finally:
            api.session.close()

    def _retrying(self, call):
        """A submit an annotator repeats, as in the UI, when Label Studio answers 500: its default SQLite
        database answers "database is locked" while another write (e.g. a bulk prediction import) holds it.
        Each retry is counted in `retries`."""
        for attempt in range(RETRIES + 1):
            try:
                return call()
            except LabelStudioError as exc:
                if "HTTP 500" not in str(exc) or attempt == RETRIES:
                    raise
                with self.shared.lock:
                    self.retries += 1
                time.sleep(1.0 + attempt)

    def _act(self, api: LabelStudioApi, index: int, rng: random.Random) -> bool:
        shared = self.shared
        with shared.lock:
            shared.count += 1
            number = shared.count
            deletable = [task for task in shared.live if shared.mistake is None or task != shared.mistake[0]]
            if number == self.script.relabel_at and shared.mistake is not None and shared.mistake[1] > 0:
                kind, (task, annotation, label) = "relabel", shared.mistake
                shared.mistake = None
            elif number == self.script.delete_at and deletable:
                task = min(deletable)
                kind, (annotation, _), label = "delete", shared.live.pop(task), None
            else:
                if len(shared.queue) <= self.keep_unlabeled:
                    return False
                task, truth = shared.queue.pop(0)
                kind = "mistake" if number == self.script.mistake_at else "create"
                label = rng.choice([name for name in self.classes if name != truth]) if kind == "mistake" else truth
                annotation = 0
                if kind == "mistake":
                    shared.mistake = (task, -1, truth)
        sent_at, started = time.time(), time.perf_counter()
        if kind in ("create", "mistake"):
            annotation = self._retrying(lambda: api.post(f"/api/tasks/{task}/annotations",
                                                         {"result": [choice(label, self.object_name)]}))["id"]
        elif kind == "relabel":
            self._retrying(lambda: api.patch(f"/api/annotations/{annotation}",
                                             {"result": [choice(label, self.object_name)]}))
        else:
            self._retrying(lambda: api.delete(f"/api/annotations/{annotation}"))
        seconds = time.perf_counter() - started
        with shared.lock:
            if kind == "mistake":
                shared.mistake = (task, annotation, shared.mistake[2]) if shared.mistake else None
            if label is not None:
                shared.live[task] = (annotation, label)
            shared.actions.append(Action(kind=kind, task=task, label=label, annotator=index, sent_at=sent_at,
                                         seconds=seconds, annotation=annotation))
        return True


def choice(label: str, object_name: str = OBJECT) -> dict:
    """An annotation result region choosing `label` for the object tag `object_name`."""
    return {"from_name": CONTROL, "to_name": object_name, "type": "choices", "value": {"choices": [label]}}
