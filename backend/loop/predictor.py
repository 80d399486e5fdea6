"""Pre-labels for Label Studio tasks from the current head versions (the `predict` hook).

A control without a usable trained head is served zero-shot (`backend.core.zero_shot`) when ZERO_SHOT is on,
it is a single-choice control on an <Image>, and every choice matches one of the image backbone's ImageNet
classes: as version `<control>-v0`, until its first head is promoted.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
from redis import Redis
from redis.exceptions import RedisError

from backend.core.heads import choose_classes, head_probabilities
from backend.core.store import HeadVersion, ModelStore
from backend.common.errors import BadRequest, HeadMismatch, MediaError, UnknownBackbone, UnknownModelClass
from backend.core.encoders import Encoder, EncoderPool
from backend.core.zero_shot import ClassMatch, ZeroShotClassifiers, match_choices, supports_zero_shot
from backend.loop.features import FeatureSource, FetchPlan, MediaItem
from backend.labelstudio.labeling_config import HeadSpec, parse_label_config

log = logging.getLogger(__name__)

UNTRAINED_VERSION = "untrained"
ZERO_SHOT_NUMBER = 0  # `<control>-v0`: trained heads are numbered from 1
MAX_PROJECT_DIGITS = 18


def project_id(project: object) -> str:
    """Label Studio sends `project` as "<id>.<timestamp>" (or an int); the id is what we key on."""
    if isinstance(project, bool) or not isinstance(project, (str, int)):
        raise BadRequest(f"'project' must look like \"7.1717000000\" or 7, got a {type(project).__name__}.")
    text = str(project).strip()
    identifier = text.split(".", 1)[0]
    if not (identifier.isascii() and identifier.isdigit() and len(identifier) <= MAX_PROJECT_DIGITS):
        raise BadRequest(f"'project' must look like \"7.1717000000\" or 7, got {text[:40]!r}.")
    return str(int(identifier))


def model_version_of(specs: list[HeadSpec], heads: dict[str, HeadVersion],
                     zero_shot: dict[str, ClassMatch] | None = None) -> str:
    """The `model_version` Label Studio records: changes whenever any served head changes (zero-shot: v0)."""
    zero_shot = zero_shot or {}
    served = [f"{spec.control}-v{heads[spec.control].number}" if spec.control in heads
              else f"{spec.control}-v{ZERO_SHOT_NUMBER}" for spec in specs
              if spec.control in heads or spec.control in zero_shot]
    return "+".join(served) if served else UNTRAINED_VERSION


def check_head_matches(spec: HeadSpec, head: HeadVersion) -> None:
    if set(head.classes) != set(spec.classes) or head.multi_label != spec.multi_label:
        raise HeadMismatch(
            f"Head {spec.control}-v{head.number} was trained for classes {head.classes} "
            f"({'multiple' if head.multi_label else 'single'} choice) but the labeling config now has "
            f"{list(spec.classes)} ({'multiple' if spec.multi_label else 'single'} choice). It is not "
            "used; a new head trains once the labels allow (press Start Training in Label Studio)."
        )


@dataclass
class Served:
    """The heads a request is answered with, and the model_version they add up to."""

    specs: list[HeadSpec]
    heads: dict[str, HeadVersion]
    zero_shot: dict[str, ClassMatch] = field(default_factory=dict)  # controls served zero-shot (no usable head)

    @property
    def model_version(self) -> str:
        return model_version_of(self.specs, self.heads, self.zero_shot)

    @property
    def anything(self) -> bool:
        """Whether any control gets a prediction (a trained head or zero-shot)."""
        return bool(self.heads or self.zero_shot)


@dataclass(frozen=True)
class ControlProbabilities:
    """One control's class probabilities for a batch of features, and what produced them."""

    probabilities: torch.Tensor  # (n, classes)
    classes: list[str]
    multi_label: bool
    guide: str  # "<control>-v<number>" for a trained head, "zero-shot" before one


class Predictor:
    def __init__(self, *, redis: Redis, store: ModelStore, features: FeatureSource,
                 encoders: EncoderPool, multi_label_threshold: float,
                 zero_shot: ZeroShotClassifiers | None = None):
        self.redis = redis
        self.zero_shot = zero_shot  # None: ZERO_SHOT is off
        self.store = store
        self.features = features
        self.encoders = encoders
        self.threshold = multi_label_threshold
        self._lock = threading.Lock()
        self._heads: dict[tuple[str, str, int], HeadVersion] = {}
        self._last_current: dict[tuple[str, str], int | None] = {}

    def served(self, project: str, label_config: str) -> Served:
        """The usable current head of each servable control (a mismatching head is skipped)."""
        specs = parse_label_config(label_config)
        current = self._current_numbers(project, specs)
        heads = {}
        for spec in specs:
            number = current.get(spec.control)
            if number is None:
                continue
            head = self._head(project, spec.control, number)
            try:
                check_head_matches(spec, head)
            except HeadMismatch as exc:
                log.warning("project %s: %s", project, exc)
                continue
            heads[spec.control] = head
        return Served(specs=specs, heads=heads, zero_shot=self._zero_shot_matches(
            [spec for spec in specs if spec.control not in heads], project=project))

    def check_zero_shot(self, label_config: str) -> None:
        """Refuse a config whose `predicted_values` name a class the image backbone lacks (raises
        UnknownModelClass, with the closest names); `/setup` calls it so Label Studio shows the fix."""
        self._zero_shot_matches(parse_label_config(label_config), strict=True)

    def _zero_shot_matches(self, specs: list[HeadSpec], *, project: str = "",
                           strict: bool = False) -> dict[str, ClassMatch]:
        """The zero-shot match of each of `specs` that can be served so (see the module's docstring)."""
        backbone = self.encoders.default_name
        try:
            if self.zero_shot is None or not supports_zero_shot(backbone):
                return {}
        except UnknownBackbone:  # BACKBONE is wrong: the workers say so when they load it
            return {}
        matches = {}
        for spec in specs:
            if spec.modality != "image":
                continue
            try:
                match = match_choices(backbone, spec.classes, spec.predicted_values)
            except UnknownModelClass as exc:
                if strict:
                    raise
                log.warning("project %s: no zero-shot pre-labels for %s: %s", project, spec.control, exc)
                continue
            if match is not None and not spec.multi_label and len(spec.classes) > 1:  # one class: always 1.0
                matches[spec.control] = match
        return matches

    def predict(self, tasks: list[dict], *, project: str, label_config: str,
                plan: FetchPlan | None = None) -> list[dict]:
        """One prediction per task, in order. Tasks whose media fails, or is left out by `plan` (a request's
        deadline and cap on fetches), get an empty result."""
        return self._predict(tasks, project=project, label_config=label_config, cached_only=False, plan=plan)[0]

    def predict_cached(self, tasks: list[dict], *, project: str, label_config: str) -> tuple[list[dict], list[int]]:
        """Predictions from cached features only (nothing fetched or embedded), and the indices of the tasks
        that could not be predicted because an input of theirs was never embedded."""
        return self._predict(tasks, project=project, label_config=label_config, cached_only=True)

    def _predict(self, tasks: list[dict], *, project: str, label_config: str,
                 cached_only: bool, plan: FetchPlan | None = None) -> tuple[list[dict], list[int]]:
        served = self.served(project, label_config)
        version = served.model_version
        predictions = [{"model_version": version, "score": 0.0, "result": []} for _ in tasks]
        if not served.anything:
            return predictions, []
        per_task_scores: list[list[float]] = [[] for _ in tasks]
        not_embedded: set[int] = set()
        for spec in served.specs:
            head = served.heads.get(spec.control)
            match = served.zero_shot.get(spec.control)
            if head is None and match is None:
                continue
            encoder = self.encoder_for(served, spec)
            items = [MediaItem(task_id=_task_id(task), url=_media_url(task, spec), inline=spec.inline)
                     for task in tasks]
            if cached_only:
                features = self.features.cached(project, items, encoder)
                not_embedded.update(index for index, vector in enumerate(features) if vector is None)
            else:
                features = self.features.features(project, items, encoder, plan=plan)
            usable = [index for index, vector in enumerate(features) if isinstance(vector, torch.Tensor)]
            _log_failures(project, [(items[index].task_id, vector) for index, vector in enumerate(features)
                                    if isinstance(vector, MediaError)])
            if not usable:
                continue
            scored = self.probabilities(served, spec, torch.stack([features[i] for i in usable]), encoder.name)
            if scored is None:
                continue
            for index, (choices, score) in zip(usable, choose_classes(
                    scored.probabilities, scored.classes, multi_label=scored.multi_label, threshold=self.threshold)):
                predictions[index]["result"].append(spec.result(choices))
                per_task_scores[index].append(score)
        for index in not_embedded:  # a partial prediction (some controls only) waits for the rest
            predictions[index]["result"], per_task_scores[index] = [], []
        for prediction, scores in zip(predictions, per_task_scores):
            prediction["score"] = round(min(scores), 6) if scores else 0.0
        return predictions, sorted(not_embedded)

    def encoder_for(self, served: Served, spec: HeadSpec) -> Encoder:
        """The encoder whose features `served` answers `spec`'s control from: the trained head's own (by its
        cache identity, whatever the deployment's default is now), or before one the default for the input."""
        head = served.heads.get(spec.control)
        if head is not None:
            return self.encoders.for_key(head.meta["backbone"], head.backbone_key)
        return self.encoders.for_input(spec.modality, spec.markup)

    def probabilities(self, served: Served, spec: HeadSpec, features: torch.Tensor,
                      backbone: str) -> ControlProbabilities | None:
        """What `served` answers for `spec`'s control on these features (of `backbone`): the trained head's
        probabilities, or before one the zero-shot classifier's restricted to the choices; None when neither."""
        head = served.heads.get(spec.control)
        if head is not None:
            return ControlProbabilities(head_probabilities(head.head, features, multi_label=head.multi_label),
                                        list(head.classes), head.multi_label, f"{spec.control}-v{head.number}")
        match = served.zero_shot.get(spec.control)
        if match is None or self.zero_shot is None:
            return None
        classifier = self.zero_shot.get(backbone, self.encoders.weights_file)
        return ControlProbabilities(classifier.probabilities(features, match), list(match.choices), False, "zero-shot")

    def _current_numbers(self, project: str, specs: list[HeadSpec]) -> dict[str, int | None]:
        """Current pointers from Redis; while Redis is away, the last ones this process saw."""
        controls = [spec.control for spec in specs]
        try:
            current = self.store.current_numbers(project, controls)
        except RedisError:
            known = {c: self._last_current.get((project, c)) for c in controls}
            if not any(number is not None for number in known.values()):
                raise
            log.warning("Redis unreachable; serving the last known versions of project %s", project)
            return known
        for control, number in current.items():
            self._last_current[(project, control)] = number
        return current

    def _head(self, project: str, control: str, number: int) -> HeadVersion:
        key = (project, control, number)
        with self._lock:
            cached = self._heads.get(key)
        if cached is None:
            cached = self.store.load(project, control, number)
            with self._lock:
                self._heads[key] = cached
        return cached


LOGGED_FAILURES = 5  # per request and control: a request of thousands of failing tasks logs a count, not a flood


def _log_failures(project: str, failures: list[tuple[int | None, MediaError]]) -> None:
    for task_id, error in failures[:LOGGED_FAILURES]:
        log.warning("project %s task %s: no prediction: %s", project, task_id, error)
    if len(failures) > LOGGED_FAILURES:
        log.warning("project %s: %d more tasks of this request without prediction", project,
                    len(failures) - LOGGED_FAILURES)


def _task_id(task: dict) -> int | None:
    identifier = task.get("id") if isinstance(task, dict) else None
    return identifier if isinstance(identifier, int) else None


def _media_url(task: dict, spec: HeadSpec) -> str:
    data = task.get("data") if isinstance(task, dict) else None
    value = data.get(spec.data_key) if isinstance(data, dict) else None
    return value if isinstance(value, str) else ""
