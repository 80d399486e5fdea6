"""Rebuild a project's label mirror (and its labeling config) from Label Studio's API."""

from __future__ import annotations

import logging

from label_studio_sdk.client import LabelStudio

from backend.common.errors import LabelStudioUnavailable
from backend.labelstudio.label_mirror import LabelStore, annotation_record
from backend.labelstudio.projects import ProjectRegistry

log = logging.getLogger(__name__)

PAGE_SIZE = 500


def _plain(value):
    return value.model_dump() if hasattr(value, "model_dump") else value


def _all_tasks(client: LabelStudio, project: str, *, only_annotated: bool) -> list[dict]:
    """Every task page by page, stopping at the reported total (past it Label Studio may answer 404)."""
    tasks: list[dict] = []
    page = 1
    while True:
        pager = client.tasks.list(project=int(project), fields="all", only_annotated=only_annotated or None,
                                  page=page, page_size=PAGE_SIZE)
        batch = [_plain(task) for task in pager.items or []]
        tasks += batch
        total = getattr(pager.response, "total", None)
        if not batch or (total is not None and len(tasks) >= total):
            return tasks
        page += 1


def sync_project(client: LabelStudio, labels: LabelStore, projects: ProjectRegistry, project: str) -> int:
    """Replace the mirror with every annotation Label Studio has; returns how many were read."""
    changes_before = labels.change_count(project)
    try:
        config = client.projects.get(id=int(project)).label_config
        records = {}
        for task in _all_tasks(client, project, only_annotated=True):
            for annotation in task.get("annotations") or []:
                annotation = _plain(annotation)
                if isinstance(annotation, dict) and isinstance(annotation.get("id"), int):
                    records[annotation["id"]] = annotation_record({**annotation, "task": task["id"]}, task)
    except Exception as exc:
        raise LabelStudioUnavailable(
            f"Could not read project {project} from Label Studio ({type(exc).__name__}: {exc}). "
            "Check LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and that the user can see the project."
        ) from None
    if config:
        projects.remember(project, config)
    labels.replace_all(project, records, changes_before=changes_before)
    log.info("project %s: synced %d annotations from Label Studio", project, len(records))
    return len(records)


def project_tasks(client: LabelStudio, project: str) -> list[dict]:
    """Every task of the project, as plain dicts."""
    try:
        return _all_tasks(client, project, only_annotated=False)
    except Exception as exc:
        raise LabelStudioUnavailable(
            f"Could not list tasks of project {project} ({type(exc).__name__}: {exc})."
        ) from None


def unlabeled_tasks(client: LabelStudio, project: str) -> list[dict]:
    """Every task of the project without an annotation, as plain dicts."""
    return [task for task in project_tasks(client, project)
            if not task.get("annotations") and not task.get("total_annotations")]
