"""The retrain pipeline: labels → features → fit → validate → decide → one write → promote.

Plain functions over one process's `Services`. The RQ job (`worker.jobs.train_project`) only takes
and releases the project's training lock around `retrain_project`; tests and benchmarks call the
same functions. Each control of the labeling config gets its own head, and each head version is
written exactly once, with the guard's decision in it.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from dataclasses import dataclass
from typing import Sequence

import torch

from backend.common.errors import HeadMismatch, HeadstartError, NotEnoughLabels
from backend.core.candidates import Candidate, fit_candidate
from backend.core.encoders import Encoder
from backend.core.head_fitting import HeadRecipe, Validation
from backend.core.promotion import decide
from backend.core.store import HeadVersion, ModelStore
from backend.labelstudio.label_mirror import Example
from backend.labelstudio.labeling_config import HeadSpec, parse_label_config
from backend.labelstudio.model_versions import used_in_label_studio
from backend.labelstudio.sync import refresh_mirror
from backend.loop.features import MediaItem
from backend.loop.predictor import check_head_matches
from backend.loop.services import Services

log = logging.getLogger(__name__)


def retrain_project(services: Services, project: str, *, job_id: str) -> dict:
    """Train every control of the project once; returns a summary (with `promoted`: the controls promoted)."""
    labels_read = refresh_labels(services, project)
    if labels_read.get("recheck"):  # an announced label was not visible yet: read it again right after this one
        services.scheduler.request(project, reason="announced labels not visible yet")
    config = services.projects.label_config(project)
    if config is None:
        raise NotEnoughLabels(f"Project {project} has no known labeling config yet: connect the backend "
                              "in Label Studio (Settings → Model) so /setup records it.")
    specs = parse_label_config(config)
    numbering_requests = continue_numbering(services, project, [spec.control for spec in specs])
    outcomes = {spec.control: retrain_control(services, project, spec, job_id=job_id) for spec in specs}
    promoted = [control for control, outcome in outcomes.items() if outcome["status"] == "promoted"]
    model_version = services.predictor.served(project, config).model_version
    return {"project": project, "model_version": model_version, "controls": outcomes, "promoted": promoted,
            "ls_requests": labels_read["ls_requests"] + numbering_requests, "labels_read": labels_read}


def refresh_labels(services: Services, project: str) -> dict:
    """Confirm what webhooks said changed (and, after START_TRAINING, look for what they missed) against
    Label Studio's API, or read every annotated task when the mirror cannot be trusted; returns what was
    read, with `ls_requests`. Without LABEL_STUDIO_URL/API_KEY the webhook payloads are the labels."""
    if services.can_reach_label_studio:
        check_every = timedelta(seconds=services.settings.label_check_s) if services.settings.label_check_s else None
        return refresh_mirror(services.label_studio(), services.labels, services.projects, project,
                              check_every=check_every)
    if services.labels.take_hints(project):
        services.labels.hints_confirmed(project)  # nothing to confirm them against
    if services.labels.needs_sync(project):
        log.warning("project %s: LABEL_STUDIO_URL/API_KEY not set; training on webhook data only", project)
    return {"reads": [], "tasks_read": 0, "recheck": False, "ls_requests": 0}


def continue_numbering(services: Services, project: str, controls: list[str]) -> int:
    """For controls without a version counter (first contact, or Redis lost its data), continue after the highest
    version Label Studio stores predictions of, so no `model_version` name is reused; returns the API requests made."""
    missing = [control for control in controls if not services.store.numbering_started(project, control)]
    if not missing or not services.can_reach_label_studio:
        return 0
    used = used_in_label_studio(services.label_studio(), project)
    for control in missing:
        services.store.continue_numbering(project, control, used.get(control, 0))
        if used.get(control):
            log.warning("project %s: no version counter for %r but Label Studio holds predictions up to %s-v%d: "
                        "numbering continues after it", project, control, control, used[control])
    return 1


def retrain_control(services: Services, project: str, spec: HeadSpec, *, job_id: str) -> dict:
    """Fit a candidate for one control, judge it against the served head, and save it once."""
    examples, unknown = services.labels.examples(project, spec)
    minimum = services.settings.min_labels_per_class
    shortage = label_shortage(examples, spec, minimum)
    if shortage:
        log.info("project %s: no training yet: %s", project, shortage)
        return {"status": "skipped", "reason": shortage, "labels": len(examples)}
    encoder = services.encoders.for_input(spec.modality, spec.markup)
    features, examples, media_errors = features_of(services, project, examples, encoder, inline=spec.inline)
    shortage = label_shortage(examples, spec, minimum)
    if shortage:
        log.info("project %s: no training yet: %s (media failed for %d tasks)", project, shortage, len(media_errors))
        return {"status": "skipped", "reason": f"{shortage} (media failed for {len(media_errors)} tasks)",
                "media_errors": media_errors}
    task_ids = [example.task_id for example in examples]
    labels = [example.choices for example in examples]
    served_number = services.store.current_number(project, spec.control)  # what the candidate is meant to replace
    candidate = fit_candidate(
        control=spec.control, classes=spec.classes, multi_label=spec.multi_label, features=features,
        labels=labels, task_ids=task_ids, encoder=encoder,
        extra_meta={"job_id": job_id, "unknown_labels": unknown, "media_errors": media_errors},
    )
    current = current_head(services, project, spec)
    current_features = features if current is None or current.backbone_key == encoder.key else \
        features_under(services, project, current, examples, inline=spec.inline)
    decision = decide(candidate.meta, current, task_ids=task_ids, labels=labels, current_features=current_features)
    status = "promoted" if decision.promote else "rejected"
    number = services.store.save(project, spec.control, candidate.head,
                                 {**candidate.meta, "promotion": decision.as_dict(), "status": status},
                                 promote=decision.promote, reason=decision.reason, replaces=served_number)
    status = services.store.meta(project, spec.control, number)["status"]  # "superseded" if a newer head won
    services.metrics.add("headstart_trainings_total", outcome=status)
    log.info("project %s %s-v%d: %s (%s)", project, spec.control, number, status, decision.reason)
    return {"status": status, "version": number, "reason": decision.reason, "labels": len(examples),
            "cv_accuracy": candidate.validation.accuracy, "train_seconds": candidate.meta["train_seconds"]}


def label_shortage(examples: list[Example], spec: HeadSpec, minimum: int) -> str | None:
    """Why these labels cannot train a head yet, or None when they can."""
    counts = {name: sum(name in example.choices for example in examples) for name in spec.classes}
    enough = [name for name, count in counts.items() if count >= minimum]
    needed = 1 if spec.multi_label else 2
    if len(enough) < needed or (spec.multi_label and all(count == len(examples) for count in counts.values())):
        return (f"control {spec.control!r} needs at least {minimum} labeled task(s) for "
                f"{'a class (and some tasks without it)' if spec.multi_label else 'two classes'}; has {counts}")
    return None


def features_of(services: Services, project: str, examples: list[Example], encoder: Encoder, *,
                inline: bool = False) -> tuple[torch.Tensor | None, list[Example], dict[str, str]]:
    """(features, the examples they belong to, task id → why its input failed) for `examples`."""
    vectors = services.features.features(project, [MediaItem(e.task_id, e.url, inline) for e in examples], encoder)
    usable = [i for i, vector in enumerate(vectors) if not isinstance(vector, HeadstartError)]
    media_errors = {str(example.task_id): str(vector) for example, vector in zip(examples, vectors)
                    if isinstance(vector, HeadstartError)}
    features = torch.stack([vectors[i] for i in usable]) if usable else None
    return features, [examples[i] for i in usable], media_errors


def current_head(services: Services, project: str, spec: HeadSpec) -> HeadVersion | None:
    """The served head of this control, if it is comparable with the config's classes."""
    number = services.store.current_number(project, spec.control)
    if number is None:
        return None
    head = services.store.load(project, spec.control, number)
    try:
        check_head_matches(spec, head)
    except HeadMismatch as exc:
        log.info("project %s: the current head is not comparable: %s", project, exc)
        return None
    return head


def features_under(services: Services, project: str, head: HeadVersion, examples: list[Example], *,
                   inline: bool = False):
    """Features of `examples` under `head`'s own encoder, or None if that encoder is unavailable."""
    try:
        encoder = services.encoders.for_key(head.meta["backbone"], head.backbone_key)
    except HeadstartError as exc:
        log.warning("cannot score the current version on its encoder: %s", exc)
        return None
    vectors = services.features.features(project, [MediaItem(e.task_id, e.url, inline) for e in examples], encoder)
    if any(isinstance(vector, HeadstartError) for vector in vectors):
        return None
    return torch.stack(vectors)


@dataclass(frozen=True)
class TrainedVersion:
    number: int
    meta: dict
    validation: Validation


def train_version(
    store: ModelStore, *, project: str, control: str, classes: Sequence[str], multi_label: bool,
    features: torch.Tensor, labels: Sequence[Sequence[str]], task_ids: Sequence[int], encoder: Encoder,
    recipe: HeadRecipe = HeadRecipe(), extra_meta: dict | None = None,
) -> TrainedVersion:
    """Fit a candidate and save it unserved, without the guard (for seeding versions in tests and benchmarks)."""
    candidate: Candidate = fit_candidate(control=control, classes=classes, multi_label=multi_label,
                                         features=features, labels=labels, task_ids=task_ids, encoder=encoder,
                                         recipe=recipe, extra_meta=extra_meta)
    number = store.save(project, control, candidate.head, candidate.meta)
    return TrainedVersion(number=number, meta=store.meta(project, control, number), validation=candidate.validation)
