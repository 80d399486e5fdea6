"""The reads of Label Studio's API that keep the label mirror current, each one counted.

Every read is one page of Label Studio 1.23.2's task list, `GET /api/tasks` (the Data Manager's
`TaskListAPI`, label_studio/data_manager/api.py), narrowed by a Data Manager `query`:
- `filters` on `total_annotations` > 0 (label_studio/data_manager/managers.py, `apply_filters`: a
  plain `Task.total_annotations__gt` lookup; the count excludes cancelled annotations). The
  `only_annotated=true` parameter is **not** honoured by 1.23.2: it pages through every task.
- `selectedItems: {"all": false, "included": [ids]}` (`TaskQuerySet.prepared`: `id__in`, always
  within the project) to read tasks by id, without the filter (`tasks_by_id` says why). An empty
  `included` list would select every task, so it is never sent.
- `ordering: ["-tasks:updated_at"]` (`apply_ordering`): the most recently changed tasks first. A
  task's `updated_at` moves whenever one of its annotations is saved or deleted
  (label_studio/tasks/models.py, `Annotation.update_task`).
Each page also reports `total` (tasks matched) and `total_annotations` (their non-cancelled
annotations), which lets an incremental read check the whole mirror for losses at no extra cost.
`resolve_uri=false` keeps task data as stored (cloud URIs are presigned later, through the task).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from label_studio_sdk.client import LabelStudio

from backend.common.errors import LabelStudioUnavailable

PAGE_SIZE = 500  # tasks per page of a full read
IDS_PER_REQUEST = 200  # tasks confirmed by id in one request (the ids travel in the URL)
RECENT_PAGE_SIZE = 100  # tasks per page of an incremental read, newest first

ANNOTATED = {"conjunction": "and", "items": [
    {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]}
NEWEST_FIRST = ["-tasks:updated_at"]


@dataclass(frozen=True)
class Totals:
    """What Label Studio reported for every task a query matched (not only the page read)."""
    tasks: int
    annotations: int


class LabelReader:
    """Reads one project's labeling config and annotated tasks; `requests` counts the API calls made."""

    def __init__(self, client: LabelStudio, project: str):
        self.client = client
        self.project = project
        self.requests = 0

    def label_config(self) -> str:
        return self._call(lambda: self.client.projects.get(id=int(self.project)).label_config) or ""

    def annotated_tasks(self) -> tuple[list[dict], Totals | None]:
        """Every task with a non-cancelled annotation, with its annotations; and the totals of the last page."""
        tasks: list[dict] = []
        totals = None
        page = 1
        while True:
            batch, totals = self._page({"filters": ANNOTATED}, page=page, page_size=PAGE_SIZE)
            tasks += batch
            if len(batch) < PAGE_SIZE or totals is None or len(tasks) >= totals.tasks:
                return tasks, totals
            page += 1

    def tasks_by_id(self, task_ids: list[int]) -> list[dict]:
        """These tasks of the project, with their annotations; tasks Label Studio no longer has (or that have
        no non-cancelled annotation left) are absent from the answer.

        Whether a task is annotated is read from its annotations, not from the `total_annotations` counter
        that ANNOTATED filters on: Label Studio 1.23.2's prediction import recounts the counters from a read
        made before it writes them back (`tasks/functions.py`, `update_tasks_counters`), so an annotation
        saved meanwhile is counted 0 until the next import recounts its task. Filtered by the counter, the
        task a webhook just announced stayed invisible (`bench loop --text`: 49 s for one label)."""
        tasks: list[dict] = []
        for start in range(0, len(task_ids), IDS_PER_REQUEST):
            chunk = task_ids[start:start + IDS_PER_REQUEST]
            query = {"selectedItems": {"all": False, "included": chunk}}
            tasks += [task for task in self._page(query, page=1, page_size=len(chunk))[0] if _annotated(task)]
        return tasks

    def recently_updated(self, since: datetime | None, *, page_size: int = RECENT_PAGE_SIZE
                         ) -> tuple[list[dict], Totals | None]:
        """Annotated tasks, newest `updated_at` first, until one at or before `since` (all of them when None);
        and the totals of every annotated task, from the first page."""
        tasks: list[dict] = []
        totals = None
        page = 1
        while True:
            batch, page_totals = self._page({"filters": ANNOTATED, "ordering": NEWEST_FIRST}, page=page,
                                            page_size=page_size)
            totals = totals or page_totals
            tasks += batch
            oldest = updated_at(batch[-1]) if batch else None
            if len(batch) < page_size or (since is not None and oldest is not None and oldest <= since):
                return tasks, totals
            page += 1

    def _page(self, query: dict, *, page: int, page_size: int) -> tuple[list[dict], Totals | None]:
        def read():
            return self.client.tasks.list(project=int(self.project), fields="all", query=json.dumps(query),
                                          page=page, page_size=page_size, resolve_uri=False)
        pager = self._call(read, past_the_end=page > 1)
        if pager is None:  # past the last page: the list shrank while being read
            return [], None
        batch = [_plain(task) for task in pager.items or []]
        total, annotations = (getattr(pager.response, name, None) for name in ("total", "total_annotations"))
        totals = Totals(tasks=total, annotations=annotations) if isinstance(total, int) and isinstance(
            annotations, int) else None
        return batch, totals

    def _call(self, read, *, past_the_end: bool = False):
        self.requests += 1
        try:
            return read()
        except Exception as exc:
            if past_the_end and getattr(exc, "status_code", None) == 404:
                return None
            raise LabelStudioUnavailable(
                f"Could not read project {self.project} from Label Studio ({type(exc).__name__}: {exc}). "
                "Check LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and that the user can see the project."
            ) from None


def updated_at(task: dict) -> datetime | None:
    """A task's `updated_at` as an aware datetime (the SDK hands some back parsed, some as strings)."""
    value = task.get("updated_at")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    return value if isinstance(value, datetime) and value.tzinfo is not None else None


def _annotated(task: dict) -> bool:
    """Whether the task holds an annotation that is not cancelled (what `total_annotations` counts)."""
    return any(not _plain(annotation).get("was_cancelled") for annotation in task.get("annotations") or [])


def _plain(value):
    return value.model_dump() if hasattr(value, "model_dump") else value
