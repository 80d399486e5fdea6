"""Keep a project's label mirror equal to Label Studio's annotations, reading only what changed.

A training calls `refresh_mirror` first (with Label Studio's API configured). It reads, through the
counted queries of `backend.labelstudio.label_reads`:
- a **full read** of every annotated task (never the unlabeled ones) on first contact or when Redis
  lost the mirror, when the labeling config changed since the last full read, and when something
  may have been missed (webhooks Redis could not record, or a check below that disagrees);
- otherwise the tasks the webhooks' **hints** name, by id, in batches: what Label Studio has for
  them replaces what the mirror had, so annotations or tasks deleted there are dropped;
- when a webhook named another labeling config (a `config` hint), the project's config, once: a
  config is never taken from a webhook body;
- and, when START_TRAINING asked for it, an **incremental read**: annotated tasks newest first, down
  to the watermark of the last full or incremental read. The totals on its first page are
  compared with the mirror; a disagreement (a change no webhook announced and no `updated_at`
  shows, such as a missed deletion) costs one full read.
Nothing is written unless Label Studio answered: when it is slow or down the training raises
`LabelStudioUnavailable` (RQ retries it with backoff) and the hints stay pending.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from label_studio_sdk.client import LabelStudio

from backend.labelstudio.label_mirror import LabelStore, annotation_record
from backend.labelstudio.label_reads import RECENT_PAGE_SIZE, LabelReader, updated_at
from backend.labelstudio.labeling_config import parse_label_config
from backend.labelstudio.projects import ProjectRegistry

log = logging.getLogger(__name__)

# An incremental read goes this far behind the watermark: a change saved just before the last read
# may have been committed just after it.
WATERMARK_SLACK = timedelta(seconds=60)


def refresh_mirror(client: LabelStudio, labels: LabelStore, projects: ProjectRegistry, project: str, *,
                   recent_page_size: int = RECENT_PAGE_SIZE, slack: timedelta = WATERMARK_SLACK) -> dict:
    """Bring the mirror up to date with Label Studio; returns what was read: {reads, tasks_read, ls_requests}."""
    reader = LabelReader(client, project)
    done = {"reads": [], "tasks_read": 0}
    config = None
    if labels.take_config_hint(project):  # a webhook named another config: Label Studio says which is true
        config = reader.label_config()
        if config and config != projects.label_config(project):
            projects.remember(project, config)
    if _needs_full_read(labels, projects, project):
        _full_read(reader, labels, projects, project, done, config=config)
    else:
        hints = labels.take_hints(project)
        task_ids = set(hints.tasks) | labels.tasks_of(project, hints.annotations)
        if task_ids:
            tasks = [task for task in reader.tasks_by_id(sorted(task_ids)) if task.get("id") in task_ids]
            labels.replace_tasks(project, task_ids, _records(tasks))
            _note(done, "hints", tasks)
        if hints.check:
            _incremental_read(reader, labels, projects, project, done, page_size=recent_page_size, slack=slack)
        labels.hints_confirmed(project)
    log.info("project %s: labels read from Label Studio: %s (%d tasks, %d requests)", project,
             "+".join(done["reads"]) or "nothing", done["tasks_read"], reader.requests)
    return {**done, "ls_requests": reader.requests}


def _needs_full_read(labels: LabelStore, projects: ProjectRegistry, project: str) -> bool:
    if labels.needs_sync(project):
        return True
    read_under, known = labels.read_config(project), projects.label_config(project)
    return read_under is not None and known is not None and not _same_config(read_under, known)


def _same_config(a: str, b: str) -> bool:
    """Whether two labeling configs define the same heads (whitespace or unrelated tags do not count)."""
    if a == b:
        return True
    try:
        return parse_label_config(a) == parse_label_config(b)
    except Exception:
        return False


def _full_read(reader: LabelReader, labels: LabelStore, projects: ProjectRegistry, project: str, done: dict,
               *, config: str | None = None) -> None:
    started = labels.begin_full_read(project)
    config = config or reader.label_config()
    tasks, totals = reader.annotated_tasks()
    if config:
        projects.remember(project, config)
    newest = max(filter(None, map(updated_at, tasks)), default=None)
    labels.replace_all(project, _records(tasks), started=started, config=config or None,
                       watermark=newest.isoformat() if newest else None)
    if totals is not None and totals.tasks != len({task.get("id") for task in tasks}):
        # the list changed while it was read: let the next training check the result
        labels.add_hints(project, check=True)
    _note(done, "full", tasks)


def _incremental_read(reader: LabelReader, labels: LabelStore, projects: ProjectRegistry, project: str,
                      done: dict, *, page_size: int, slack: timedelta) -> None:
    watermark = _parse(labels.watermark(project))
    tasks, totals = reader.recently_updated(watermark - slack if watermark else None, page_size=page_size)
    labels.replace_tasks(project, {task["id"] for task in tasks}, _records(tasks))
    newest = max(filter(None, map(updated_at, tasks)), default=None)
    if newest is not None and (watermark is None or newest > watermark):
        labels.set_watermark(project, newest.isoformat())
    _note(done, "check", tasks)
    mirror = labels.counts(project)
    if totals is not None and mirror != (totals.tasks, totals.annotations):
        log.warning("project %s: the label mirror holds %d tasks / %d annotations, Label Studio %d / %d: "
                    "reading every annotated task again", project, *mirror, totals.tasks, totals.annotations)
        _full_read(reader, labels, projects, project, done)


def _records(tasks: list[dict]) -> dict[int, dict]:
    records = {}
    for task in tasks:
        for annotation in task.get("annotations") or []:
            annotation = annotation.model_dump() if hasattr(annotation, "model_dump") else annotation
            if isinstance(annotation, dict) and isinstance(annotation.get("id"), int):
                records[annotation["id"]] = annotation_record({**annotation, "task": task["id"]}, task)
    return records


def _note(done: dict, read: str, tasks: list[dict]) -> None:
    done["reads"].append(read)
    done["tasks_read"] += len(tasks)


def _parse(watermark: str | None) -> datetime | None:
    return updated_at({"updated_at": watermark}) if watermark else None
