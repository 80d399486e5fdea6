"""Label Studio's labeling queue in headstart's order: the next picks carry the only current predictions.

Label Studio's uncertainty sampling serves the unlabeled task with the lowest `score` among those
carrying a prediction of `project.model_version` (its bulk prediction import drops `cluster`, so
the cluster ordering cannot be fed at scale). headstart therefore expresses its order through
*which* tasks carry a current prediction: after every training (and once the first embedding pass
is done) it ranks the unlabeled tasks (`backend.core.active`), writes for the first of them a
prediction tagged `headstart-next-R` (an empty result and an honest score: the confidence of the
served head, or of the zero-shot classifier before any head; none without either) and renames the
project's ML backend to that tag, so Label Studio counts exactly those as current. The front starts
with headstart's first pick and holds `ACTIVE_FRONT` tasks that Label Studio serves after it (scoring
above it, or equal with a larger id), taken along headstart's order. The served version's own predictions
(`label-vN`, on every unlabeled task) are untouched: they are what annotators see and what Data
Manager filters by.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from backend.common import redis_keys
from backend.common.errors import HeadstartError
from backend.core.active import rank_unlabeled
from backend.labelstudio.labeling_config import parse_label_config
from backend.labelstudio.prediction_writes import write_predictions
from backend.labelstudio.sampling import (
    DEFAULT_SAMPLING, UNCERTAINTY_SAMPLING, make_current, point_project_at_backend, read_queue_settings,
    set_uncertainty_sampling,
)
from backend.loop.features import MediaItem
from backend.loop.services import Services

log = logging.getLogger(__name__)

TAG_PREFIX = "headstart-next-"
DIRECT = "project"  # no ML backend to rename: the project's model_version is set directly
SWITCH_LABELS_PER_CLASS = 3  # labels every class needs before the head's margin ranks instead of typicality


def ensure_sampling(services: Services, project: str) -> str:
    """On first contact: switch the project to Uncertainty sampling when it still has Label Studio's default.

    Returns what was done; a refusal is logged and recorded for /admin, never raised.
    """
    key = redis_keys.active(project)
    if not services.settings.active_learning:
        services.redis.hset(key, mapping={"sampling": "untouched (ACTIVE_LEARNING=false)", "note": ""})
        return "off"
    try:
        client = services.label_studio()
        current = read_queue_settings(client, project).sampling
        if current == DEFAULT_SAMPLING or not current:
            set_uncertainty_sampling(client, project)
            log.info("project %s: sampling set to %s (was %s; ACTIVE_LEARNING=false leaves it alone)",
                     project, UNCERTAINTY_SAMPLING, current or "unset")
            current, note = UNCERTAINTY_SAMPLING, f"set by headstart (was {current or 'unset'})"
        elif current == UNCERTAINTY_SAMPLING:
            note = ""
        else:
            note = f"left as chosen in Label Studio; headstart's order needs {UNCERTAINTY_SAMPLING}"
            log.info("project %s: sampling is %s, %s", project, current, note)
    except Exception as exc:
        note = (f"could not set {UNCERTAINTY_SAMPLING} ({type(exc).__name__}: {str(exc)[:200]}); set it in the "
                "project's Settings → Annotation, or give the token's user manager rights")
        log.warning("project %s: %s", project, note)
        services.redis.hset(key, mapping={"note": note})
        return "refused"
    services.redis.hset(key, mapping={"sampling": current, "note": note})
    return current


def ranking_enabled(services: Services) -> bool:
    """Whether headstart orders Label Studio's labeling queue: ACTIVE_LEARNING on and Label Studio's API configured."""
    return services.settings.active_learning and services.can_reach_label_studio


@dataclass(frozen=True)
class Front:
    """The tasks to make current in Label Studio: headstart's first pick (served first), then the rest of the front."""

    tasks: list[int]
    scores: dict[int, float]  # task → the guiding model's confidence (empty: no model yet)
    strategy: str  # "typicality" or "margin"
    guide: str  # whose probabilities ranked and scored: "label-vN", "zero-shot" or "none"


def refresh_queue(services: Services, project: str) -> dict:
    """Rank the unlabeled tasks and make the front (`next_front`) the current tasks in Label Studio."""
    if not ranking_enabled(services):
        return {"project": project, "status": "skipped: ACTIVE_LEARNING is off or Label Studio is not configured"}
    front = next_front(services, project)
    if isinstance(front, str):
        return {"project": project, "status": f"skipped: {front}"}
    return publish_front(services, project, front.tasks, front.scores, strategy=front.strategy, guide=front.guide)


def next_front(services: Services, project: str) -> Front | str:
    """headstart's next picks for the project (a Front), or why there are none yet (a str).

    The served head's probabilities rank and score the tasks; before any head, the zero-shot classifier's when the
    project's choices are ImageNet classes (the same confidence the `-v0` pre-label shows); otherwise none.
    """
    config = services.projects.label_config(project)
    if config is None:
        return "no labeling config known yet"
    spec = parse_label_config(config)[0]
    served = services.predictor.served(project, config)
    encoder = services.predictor.encoder_for(served, spec)
    data = services.tasks.data(project)
    task_ids = sorted(data)
    items = [MediaItem.of_task(task, data[task], spec.data_key, inline=spec.inline) for task in task_ids]
    vectors = services.features.cached(project, items, encoder)
    rows = [i for i, vector in enumerate(vectors) if isinstance(vector, torch.Tensor)]
    if not rows:
        return "no task embedded yet"
    ids = [task_ids[i] for i in rows]
    features = torch.stack([vectors[i] for i in rows])
    labeled_tasks = services.labels.labeled_tasks(project)
    labeled = [task in labeled_tasks for task in ids]
    examples, _ = services.labels.examples(project, spec)
    counts = [sum(name in example.choices for example in examples) for name in spec.classes]
    with torch.no_grad():
        scored = services.predictor.probabilities(served, spec, features, encoder.name)
    probabilities, guide = (scored.probabilities, scored.guide) if scored is not None else (None, "none")
    ranking = rank_unlabeled(features, labeled, batch=max(1, services.settings.active_front),
                             probabilities=probabilities, labels_per_class=counts,
                             switch_labels_per_class=SWITCH_LABELS_PER_CLASS, seed=int(project))
    scores = ({ids[i]: round(float(probabilities[i].max()), 6) for i in ranking.order}
              if probabilities is not None else None)
    order = [ids[i] for i in ranking.order]
    front = served_in_order(order, scores, max(1, services.settings.active_front))
    return Front(tasks=front, scores={task: scores[task] for task in front} if scores else {},
                 strategy=ranking.strategy, guide=guide)


def served_in_order(order: list[int], scores: dict[int, float] | None, size: int) -> list[int]:
    """The front: `order`'s first pick, which Label Studio must serve first, then (up to `size` in all) the next
    tasks along `order` that Label Studio serves after it.

    Label Studio serves the current task with the lowest score first; among equal (or no) scores the database
    returns them by task id (checked against 1.23.2 by tests/e2e/test_active_learning.py). A task that would come
    before the first pick is left for a later refresh, so the front stays full (it is the buffer for annotators
    labeling at once) with tasks from further down `order` when needed.
    """
    if not order:
        return []

    def place(task: int) -> tuple[float, int]:
        return (scores[task] if scores is not None else 0.0, task)
    first = place(order[0])
    return [order[0]] + [task for task in order[1:] if place(task) > first][:size - 1]


def publish_front(services: Services, project: str, front: list[int], scores: dict[int, float], *,
                  strategy: str, guide: str = "none") -> dict:
    """Write the front's predictions under a fresh tag and make that tag current (unless the front is unchanged)."""
    key = redis_keys.active(project)
    previous = services.redis.hmget(key, ["front", "tag"])
    if previous[0] is not None and json.loads(previous[0]) == front and previous[1] is not None:
        return {"project": project, "status": "unchanged", "front": front, "strategy": strategy}
    try:
        client = services.label_studio()
        target = _target(services, client, project)
        if target is None:
            return {"project": project, "status": "skipped: " + services.redis.hget(key, "note").decode()}
        looked_up = services.redis.hget(key, "looked_up") is not None
        services.redis.hdel(key, "looked_up")
        tag = f"{TAG_PREFIX}{services.redis.hincrby(key, 'round', 1)}"
        payload = [{"task": task, "result": [], "score": scores.get(task), "model_version": tag} for task in front]
        writes = write_predictions(client, int(project), payload, project_tasks=services.tasks.count(project))
        settings = services.settings
        make_current(client, project, None if target == DIRECT else json.loads(target), tag,
                     basic_auth=(settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None)
    except HeadstartError:
        raise
    except Exception as exc:
        note = f"could not update Label Studio's queue ({type(exc).__name__}: {str(exc)[:200]})"
        services.redis.hset(key, mapping={"note": note})
        services.redis.hdel(key, "target")  # look the backend up again next time
        log.warning("project %s: %s", project, note)
        return {"project": project, "status": "failed: " + note}
    services.redis.hset(key, mapping={"front": json.dumps(front), "tag": tag, "strategy": strategy, "guide": guide,
                                      "scored": int(bool(scores)), "refreshed_at": time.time(), "note": ""})
    log.info("project %s: next %d task(s) by %s (%s) under %s", project, len(front), strategy, guide, tag)
    return {"project": project, "status": "published", "tag": tag, "front": front, "strategy": strategy,
            "ls_requests": writes + 1 + (3 if looked_up else 0)}


def _target(services: Services, client, project: str) -> str | None:
    """The ML backend id to rename (or DIRECT: set the project's model_version), remembered and looked up again
    when the last look is LABEL_CHECK_S old; None (with a note) when the project's model_version belongs to
    someone else.

    Looking again is what repairs a project Label Studio changed without telling: deleting any prediction set
    (Settings → Predictions, `DELETE /api/projects/{id}/model-versions/`) clears the project's model_version
    while it names an ML backend (1.23.2 `Project.delete_predictions`), and renaming the backend no longer
    carries it along, so the queue would stop following headstart until the look points it back."""
    key = redis_keys.active(project)
    cached, looked_at = services.redis.hmget(key, ["target", "target_looked_at"])
    if cached is not None and not _look_again(services.settings.label_check_s, looked_at):
        return cached.decode()
    settings = read_queue_settings(client, project)
    if settings.backend_id is None and settings.model_version and not settings.model_version.startswith(TAG_PREFIX):
        note = (f"the project's model version is {settings.model_version!r}, not headstart's ML backend: choose the "
                "backend under Settings → Annotation → Predictions so Label Studio's queue follows headstart")
        services.redis.hset(key, mapping={"note": note})
        log.warning("project %s: %s", project, note)
        return None
    point_project_at_backend(client, project, settings)
    services.redis.hset(key, "looked_up", 1)  # this refresh also read the project and its backends
    target = (json.dumps({"id": settings.backend_id, "url": settings.backend_url}) if settings.backend_id is not None
              else DIRECT)
    services.redis.hset(key, mapping={"target": target, "target_looked_at": time.time()})
    return target


def _look_again(check_every_s: float, looked_at: bytes | None) -> bool:
    """Whether the remembered target is old enough to be looked up again (LABEL_CHECK_S 0: never)."""
    if not check_every_s:
        return False
    return looked_at is None or time.time() - float(looked_at) >= check_every_s


def queue_status(services: Services, project: str) -> dict:
    """labeled / unlabeled tasks, unlabeled tasks carrying a current prediction, sampling mode, strategy (and the model
    guiding it), note."""
    raw = {k.decode(): v.decode() for k, v in services.redis.hgetall(redis_keys.active(project)).items()}
    indexed = set(services.tasks.data(project))
    labeled = services.labels.labeled_tasks(project) & indexed
    front = [task for task in json.loads(raw.get("front", "[]")) if task not in labeled]
    return {"labeled": len(labeled), "unlabeled": len(indexed) - len(labeled), "current": len(front),
            "sampling": raw.get("sampling", "unknown"), "strategy": raw.get("strategy", ""),
            "guide": raw.get("guide", ""),
            "tag": raw.get("tag", ""), "note": raw.get("note", "")}
