"""The retrain pipeline: labels → features → fit → validate → decide → write → promote.

When only labels changed since the served version, the order is fit → promote → validate → keep, roll
back or replace (`promote_then_validate`): a new label is served after one warm-started fit, and the
guard's decision is the same, taken a moment later.

Plain functions over one process's `Services`. The RQ job (`worker.jobs.train_project`) only takes
and releases the project's training lock around `retrain_project`; tests and benchmarks call the
same functions. Each control of the labeling config gets its own head, and each head version is
written once (its validation added once, when it was served first), with the guard's decision in it.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from dataclasses import dataclass
from typing import Sequence

import torch

from backend.common.errors import HeadMismatch, HeadstartError, NotEnoughLabels
from backend.core.candidates import Candidate, fit_candidate, fit_provisional, is_refit_enough, validate_provisional
from backend.core.encoders import Encoder
from backend.core.head_fitting import Validation
from backend.core.recipe_choice import Choice, NoUsableRecipe
from backend.core.promotion import decide
from backend.core.store import HeadVersion, ModelStore
from backend.core.zero_shot import anchor_for
from backend.labelstudio.label_mirror import Example
from backend.labelstudio.labeling_config import HeadSpec, parse_label_config
from backend.labelstudio.model_versions import used_in_label_studio
from backend.labelstudio.sync import refresh_mirror
from backend.loop.features import MediaItem
from backend.loop.predictor import check_head_matches
from backend.loop.services import Services

log = logging.getLogger(__name__)

# at most this many unlabeled tasks' features are given to a training (`unlabeled_pool`), spread evenly over the
# project's task ids: enough for the recipes that use them (`recipes.POOLED`), and a bounded cost per fit
POOL_CAP = 2000


def retrain_project(services: Services, project: str, *, job_id: str) -> dict:
    """Train every control of the project once; returns a summary (with `promoted`: the controls promoted).

    Its versions record the label snapshot it read (`label_snapshot`): a run that read the labels before the
    served version's training did (a job re-run after lost heartbeats while the first run still goes on, or a
    retry that starts late) is saved as superseded, never promoted over it (`ModelStore.save`)."""
    snapshot = services.labels.begin_snapshot(project)
    labels_read = refresh_labels(services, project)
    if labels_read.get("recheck"):  # an announced label was not visible yet: read it again right after this one
        services.scheduler.request(project, reason="announced labels not visible yet")
    config = services.projects.label_config(project)
    if config is None:
        raise NotEnoughLabels(f"Project {project} has no known labeling config yet: connect the backend "
                              "in Label Studio (Settings → Model) so /setup records it.")
    specs = parse_label_config(config)
    numbering_requests = continue_numbering(services, project, [spec.control for spec in specs])
    outcomes = {spec.control: retrain_control(services, project, spec, job_id=job_id, snapshot=snapshot)
                for spec in specs}
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


def retrain_control(services: Services, project: str, spec: HeadSpec, *, job_id: str,
                    snapshot: int | None = None) -> dict:
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
    current = current_head(services, project, spec)
    if trained_on_the_same(current, encoder, task_ids, labels):
        # e.g. START_TRAINING with nothing new, or a relabel undone: a new version would be the same head, and
        # would cost a re-prediction of every unlabeled task
        return {"status": "unchanged", "version": served_number, "labels": len(examples),
                "reason": "the served version was trained on exactly these labels"}
    extra = {"job_id": job_id, "unknown_labels": unknown, "media_errors": media_errors, "label_snapshot": snapshot}
    anchor = zero_shot_anchor(services, spec, encoder)
    pool = unlabeled_pool(services, project, spec, encoder) \
        if uses_pool(current, encoder, len(labels), anchored=anchor is not None) else None
    if can_promote_first(current, encoder, len(labels), anchored=anchor is not None, pooled=pool is not None):
        return promote_then_validate(services, project, spec, current, features=features, labels=labels,
                                     task_ids=task_ids, encoder=encoder, extra_meta=extra, anchor=anchor, pool=pool)
    candidate = fit_candidate(
        control=spec.control, classes=spec.classes, multi_label=spec.multi_label, features=features,
        labels=labels, task_ids=task_ids, encoder=encoder, extra_meta=extra, anchor=anchor, pool=pool,
    )
    current_features = features if current is None or current.backbone_key == encoder.key else \
        features_under(services, project, current, examples, inline=spec.inline)
    decision = decide(candidate.meta, current, task_ids=task_ids, labels=labels, current_features=current_features)
    number, status = _save(services, project, spec, candidate, decision, replaces=served_number)
    return {"status": status, "version": number, "reason": decision.reason, "labels": len(examples),
            "cv_accuracy": candidate.validation.accuracy, "train_seconds": candidate.meta["train_seconds"]}


def trained_on_the_same(current: HeadVersion | None, encoder: Encoder, task_ids: list[int],
                        labels: list[list[str]]) -> bool:
    """True when the served version was trained, under this encoder, on exactly these labels."""
    if current is None or current.backbone_key != encoder.key:
        return False
    trained_on = current.meta.get("trained_on")
    return isinstance(trained_on, dict) and trained_on == {str(task): list(names)
                                                            for task, names in zip(task_ids, labels)}


def zero_shot_anchor(services: Services, spec: HeadSpec, encoder: Encoder) -> torch.nn.Linear | None:
    """The control's zero-shot head for the `zero_shot_anchored` recipe, where the same conditions as zero-shot
    serving hold (ZERO_SHOT on, an image control on a backbone with a classifier, every choice matched)."""
    if spec.modality != "image" or encoder.modality != "image":
        return None
    return anchor_for(services.predictor.zero_shot, encoder.name, spec.classes, predicted_values=spec.predicted_values,
                      multi_label=spec.multi_label, weights_file=services.encoders.weights_file)


def unlabeled_pool(services: Services, project: str, spec: HeadSpec, encoder: Encoder) -> torch.Tensor | None:
    """Cached features (under `encoder`) of the project's tasks no one has labeled, at most `POOL_CAP` of them evenly
    spread over the task ids, for the recipes that use them (`recipes.POOLED`); None for multiple choice, or when
    none is cached yet. Only what the embedding chunks have already cached: a training never embeds unlabeled tasks
    itself."""
    if spec.multi_label:
        return None
    data = services.tasks.data(project)
    labeled = services.labels.labeled_tasks(project)
    unlabeled = sorted(task for task in data if task not in labeled)
    if len(unlabeled) > POOL_CAP:
        step = len(unlabeled) / POOL_CAP
        unlabeled = [unlabeled[int(i * step)] for i in range(POOL_CAP)]
    items = [MediaItem.of_task(task, data[task], spec.data_key, inline=spec.inline) for task in unlabeled]
    vectors = [vector for vector in services.features.cached(project, items, encoder)
               if isinstance(vector, torch.Tensor)]
    return torch.stack(vectors) if vectors else None


def uses_pool(current: HeadVersion | None, encoder: Encoder, label_count: int, *, anchored: bool) -> bool:
    """Whether this training reads the unlabeled tasks: it chooses a recipe anew, or refits a served choice that
    uses them (`prototype_refined`, `logreg_std_selftrained`; a refit of any other recipe does not, and saves the
    read)."""
    if not can_promote_first(current, encoder, label_count, anchored=anchored, pooled=True):
        return True
    return Choice.from_dict(current.meta["selection"]).needs_pool


def can_promote_first(current: HeadVersion | None, encoder: Encoder, label_count: int, *,
                      anchored: bool = False, pooled: bool = False) -> bool:
    """Only the labels changed since the served version (same encoder, a validated recipe choice that
    still holds): its recipe can be refitted and served at once, and validated right after."""
    return (current is not None and current.backbone_key == encoder.key and current.meta.get("validated", True)
            and is_refit_enough(current.meta, label_count, anchored=anchored, pooled=pooled))


def promote_then_validate(services: Services, project: str, spec: HeadSpec, current: HeadVersion, *,
                          features: torch.Tensor, labels: list, task_ids: list[int], encoder: Encoder,
                          extra_meta: dict, anchor: torch.nn.Linear | None = None,
                          pool: torch.Tensor | None = None) -> dict:
    """Serve the served recipe refitted on the new labels at once (one warm-started fit), then run
    the guard's validation in the same job: roll back to `current` if the new version validates worse."""
    provisional = fit_provisional(control=spec.control, classes=spec.classes, multi_label=spec.multi_label,
                                  features=features, labels=labels, task_ids=task_ids, encoder=encoder,
                                  served=current.head, served_meta=current.meta, extra_meta=extra_meta,
                                  anchor=anchor, pool=pool)
    pending = {"promote": True, "reason": "promoted before validation: only labels changed; validating",
               "candidate_score": None, "current_score": None}
    number = services.store.save(project, spec.control, provisional.head,
                                 {**provisional.meta, "promotion": pending, "status": "promoted"},
                                 promote=True, reason=pending["reason"], replaces=current.number)
    saved = services.store.meta(project, spec.control, number)
    if saved["status"] != "promoted":  # a newer head won meanwhile
        services.metrics.add("headstart_trainings_total", outcome="superseded")
        log.info("project %s %s-v%d: %s", project, spec.control, number, saved.get("status_reason"))
        return {"status": "superseded", "version": number, "reason": saved.get("status_reason"), "labels": len(labels)}
    log.info("project %s %s-v%d: promoted before validation", project, spec.control, number)
    return settle_provisional(services, project, spec, current, provisional, number, features=features,
                              labels=labels, task_ids=task_ids, anchor=anchor, pool=pool)


def settle_provisional(services: Services, project: str, spec: HeadSpec, current: HeadVersion,
                       provisional: Candidate, number: int, *, features: torch.Tensor, labels: list,
                       task_ids: list[int], anchor: torch.nn.Linear | None = None,
                       pool: torch.Tensor | None = None) -> dict:
    """Validate version `number` (served before validation) against `current`, the version it replaced:
    keep it, or roll back to `current`."""
    try:
        updates = validate_provisional(provisional, classes=spec.classes, multi_label=spec.multi_label,
                                       features=features, labels=labels, task_ids=task_ids, anchor=anchor,
                                       pool=pool)
    except NoUsableRecipe as exc:
        services.store.withdraw(project, spec.control, number, back_to=current.number, updates={"validated": False},
                                reason=f"rolled back: validation failed: {exc}")
        services.metrics.add("headstart_trainings_total", outcome="rejected")
        log.warning("project %s %s-v%d rolled back: %s", project, spec.control, number, exc)
        return {"status": "rejected", "version": number, "reason": str(exc), "labels": len(labels)}
    decision = decide({**provisional.meta, **updates}, current, task_ids=task_ids, labels=labels,
                      current_features=features)
    if not decision.promote:
        reason = f"rolled back after validation: {decision.reason}"
        services.store.withdraw(project, spec.control, number, back_to=current.number,
                                updates={**updates, "promotion": {**decision.as_dict(), "reason": reason}},
                                reason=reason)
        services.metrics.add("headstart_trainings_total", outcome="rejected")
        log.info("project %s %s-v%d: %s", project, spec.control, number, reason)
        return {"status": "rejected", "version": number, "reason": reason, "labels": len(labels),
                "cv_accuracy": updates["metrics"]["cv_accuracy"]}
    services.store.amend(project, spec.control, number, {**updates, "promotion": decision.as_dict()})
    services.metrics.add("headstart_trainings_total", outcome="promoted")
    log.info("project %s %s-v%d: validated (%s)", project, spec.control, number, decision.reason)
    return {"status": "promoted", "version": number, "reason": decision.reason, "labels": len(labels),
            "cv_accuracy": updates["metrics"]["cv_accuracy"], "train_seconds": provisional.meta["train_seconds"]}


def _save(services: Services, project: str, spec: HeadSpec, candidate: Candidate, decision, *, replaces):
    status = "promoted" if decision.promote else "rejected"
    number = services.store.save(project, spec.control, candidate.head,
                                 {**candidate.meta, "promotion": decision.as_dict(), "status": status},
                                 promote=decision.promote, reason=decision.reason, replaces=replaces)
    status = services.store.meta(project, spec.control, number)["status"]  # "superseded" if a newer head won
    services.metrics.add("headstart_trainings_total", outcome=status)
    log.info("project %s %s-v%d: %s (%s)", project, spec.control, number, status, decision.reason)
    return number, status


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
    extra_meta: dict | None = None, pool: torch.Tensor | None = None,
) -> TrainedVersion:
    """Fit a candidate and save it unserved, without the guard (for seeding versions in tests and benchmarks);
    `pool`: unlabeled tasks' features, as `unlabeled_pool` gives the training job."""
    candidate: Candidate = fit_candidate(control=control, classes=classes, multi_label=multi_label,
                                         features=features, labels=labels, task_ids=task_ids, encoder=encoder,
                                         extra_meta=extra_meta, pool=pool)
    number = store.save(project, control, candidate.head, candidate.meta)
    return TrainedVersion(number=number, meta=store.meta(project, control, number), validation=candidate.validation)
