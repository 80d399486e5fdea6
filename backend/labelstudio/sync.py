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
- and, when START_TRAINING asked for it or the last one is `check_every` old, an **incremental
  read**: annotated tasks newest first, down to the watermark of the last full or incremental read
  (a webhook Label Studio gave up on, after its 1 s `WEBHOOK_TIMEOUT`, is not lost for longer). The totals on its first page are
  compared with the mirror; a disagreement (a change no webhook announced and no `updated_at`
  shows, such as a missed deletion) costs one full read.
An annotation a webhook announced as created or updated that Label Studio's answer does not show
(yet) is looked for again by the next training (`recheck` in the result asks for one), for at least
`EXPECT_ATTEMPTS` reads and `EXPECT_MIN_AGE_S` seconds since its webhook (at most `EXPECT_MAX_ATTEMPTS` reads):
the webhook can arrive before Label Studio's task list shows the annotation (seen under load in
`python -m bench loop`: first labels never trained on, then labels found only by the 30 s check). One still
missing after that was deleted since, or the webhook was not Label Studio's. (The cause found since: a
prediction import running while the annotation was saved wrote its task's annotation count back as 0, and
the reads filtered by that count. Reads by id no longer do, `LabelReader.tasks_by_id`, and a full read
confirms by id the labels the mirror holds that its filtered list left out, so it drops none of them; the
check's filtered list still misses a new label whose count was lost, until an import recounts its task.)
Nothing is written unless Label Studio answered: when it is slow or down the training raises
`LabelStudioUnavailable` (RQ retries it with backoff) and the hints stay pending.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from label_studio_sdk.client import LabelStudio

from backend.labelstudio.label_mirror import Expected, LabelStore, annotation_record
from backend.labelstudio.label_reads import RECENT_PAGE_SIZE, LabelReader, updated_at
from backend.labelstudio.labeling_config import parse_label_config
from backend.labelstudio.projects import ProjectRegistry

log = logging.getLogger(__name__)

# An incremental read goes this far behind the watermark: a change saved just before the last read
# may have been committed just after it.
WATERMARK_SLACK = timedelta(seconds=60)
# An announced annotation Label Studio's answers do not show counts as not in Label Studio after EXPECT_ATTEMPTS
# reads *and* EXPECT_MIN_AGE_S since its webhook, and at the latest after EXPECT_MAX_ATTEMPTS reads. Reads come
# once per training (TRAIN_MIN_INTERVAL_S apart): four of them took 3 s in `bench loop` at 5,000 tasks, less than
# Label Studio, busy importing predictions, took to show a label it had announced.
EXPECT_ATTEMPTS = 4
EXPECT_MIN_AGE_S = 15.0
EXPECT_MAX_ATTEMPTS = 20


def refresh_mirror(client: LabelStudio, labels: LabelStore, projects: ProjectRegistry, project: str, *,
                   recent_page_size: int = RECENT_PAGE_SIZE, slack: timedelta = WATERMARK_SLACK,
                   check_every: timedelta | None = None) -> dict:
    """Bring the mirror up to date with Label Studio; returns what was read: {reads, tasks_read, recheck,
    ls_requests}. `check_every`: look for unannounced changes when the last look is that old (None: only
    when START_TRAINING asked)."""
    reader = LabelReader(client, project)
    done = {"reads": [], "tasks_read": 0, "recheck": False}
    every_s = check_every.total_seconds() if check_every else 0.0
    config = None
    if labels.take_config_hint(project):  # a webhook named another config: Label Studio says which is true
        config = reader.label_config()
        if config and config != projects.label_config(project):
            projects.remember(project, config)
    if _needs_full_read(labels, projects, project):
        _full_read(reader, labels, projects, project, done, config=config)
        if every_s:
            labels.checked(project, every_s)
    else:
        hints = labels.take_hints(project)
        task_ids = set(hints.tasks) | labels.tasks_of(project, hints.annotations)
        records: dict[int, dict] = {}
        if task_ids:
            tasks = [task for task in reader.tasks_by_id(sorted(task_ids)) if task.get("id") in task_ids]
            records = _records(tasks)
            labels.replace_tasks(project, task_ids, records)
            _note(done, "hints", tasks)
        if hints.check or (every_s and labels.check_due(project, every_s)):
            _incremental_read(reader, labels, projects, project, done, page_size=recent_page_size, slack=slack)
            if every_s:
                labels.checked(project, every_s)
        _expect_again(labels, project, hints.expected, records, deleted=hints.annotations, done=done)
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
    listed = {task.get("id") for task in tasks}
    unlisted = sorted(labels.labeled_tasks(project) - listed)
    if unlisted:  # labels the list left out: deleted, or a task whose annotation count Label Studio lost
        tasks += reader.tasks_by_id(unlisted)
    if config:
        projects.remember(project, config)
    newest = max(filter(None, map(updated_at, tasks)), default=None)
    labels.replace_all(project, _records(tasks), started=started, config=config or None,
                       watermark=newest.isoformat() if newest else None)
    if totals is not None and totals.tasks != len(listed):
        # the list changed while it was read: let the next training check the result
        labels.add_hints(project, check=True)
    _note(done, "full", tasks)
    _expect_again(labels, project, started.hints.expected, _records(tasks), deleted=started.hints.annotations,
                  done=done)


def _expect_again(labels: LabelStore, project: str, expected: frozenset[Expected], records: dict[int, dict], *,
                  deleted: frozenset[int], done: dict) -> None:
    """Leave a hint for the next training for each announced annotation this read did not show (yet)."""
    again, now = [], time.time()
    for expectation in expected:
        if expectation.annotation in deleted or expectation.seen_in(records):
            continue
        reads = expectation.attempt + 1
        if reads < EXPECT_MAX_ATTEMPTS and (reads < EXPECT_ATTEMPTS or expectation.age_s(now) < EXPECT_MIN_AGE_S):
            again.append(Expected(expectation.annotation, expectation.task, reads, expectation.updated_at,
                                  expectation.announced_at))
        else:
            log.warning("project %s: annotation %d (task %d), announced by a webhook, is not in Label Studio after "
                        "%d reads in %.0f s: ignored (deleted since, or the webhook was not Label Studio's)", project,
                        expectation.annotation, expectation.task, reads, min(expectation.age_s(now), 1e9))
    if again:
        labels.add_hints(project, expected=again)
        done["recheck"] = True


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
