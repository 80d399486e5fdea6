"""A project's task sampling in Label Studio, and which predictions its uncertainty sampling counts as current.

Label Studio 1.23's "Uncertainty sampling" (`projects/functions/next_task.py`) serves, among the
unlabeled tasks that carry a prediction whose `model_version` equals `project.model_version`, the
one with the lowest score (after the least-solved `cluster`), and random tasks when none does.
When an ML backend is connected, `project.model_version` holds the backend's *title* (set on
connect), not the `model_version` its predictions carry; renaming the backend renames it too
(`ml/models.py`, `MLBackend.save`), and keeping the two equal keeps the backend "live" (opening a
task shows the served version's prediction, asking the backend when it has none).
"""

from __future__ import annotations

from dataclasses import dataclass

from label_studio_sdk.client import LabelStudio

DEFAULT_SAMPLING = "Sequential sampling"
UNCERTAINTY_SAMPLING = "Uncertainty sampling"


@dataclass(frozen=True)
class QueueSettings:
    sampling: str
    model_version: str
    backend_id: int | None  # the ML backend whose title is the project's model_version (or the only one)
    backend_title: str
    backend_url: str


def read_queue_settings(client: LabelStudio, project: str) -> QueueSettings:
    """The project's sampling and model_version, and the ML backend that model_version names."""
    details = client.projects.get(id=int(project))
    sampling = str(getattr(details, "sampling", "") or "")
    model_version = str(getattr(details, "model_version", "") or "")
    backends = client.ml.list(project=int(project))
    chosen = next((b for b in backends if (b.title or "") == model_version), None)
    if chosen is None and len(backends) == 1 and not model_version:
        chosen = backends[0]
    return QueueSettings(sampling=sampling, model_version=model_version,
                         backend_id=chosen.id if chosen is not None else None,
                         backend_title=(chosen.title or "") if chosen is not None else "",
                         backend_url=(chosen.url or "") if chosen is not None else "")


def set_uncertainty_sampling(client: LabelStudio, project: str) -> None:
    client.projects.update(id=int(project), sampling=UNCERTAINTY_SAMPLING)


def point_project_at_backend(client: LabelStudio, project: str, settings: QueueSettings) -> None:
    """When the project's model_version names no backend (empty), point it at its only backend, as Label Studio
    does when a backend is connected to a project that shows predictions."""
    if settings.backend_id is not None and settings.model_version != settings.backend_title:
        client.projects.update(id=int(project), model_version=settings.backend_title)


def make_current(client: LabelStudio, project: str, backend: dict | None, tag: str, *,
                 basic_auth: tuple[str, str] | None) -> None:
    """Make predictions whose model_version is `tag` the ones uncertainty sampling counts as current: rename the
    project's ML backend to `tag` (Label Studio moves the project's model_version along and the backend stays
    live), or set the project's model_version when no backend is connected.

    Label Studio 1.23.2 re-validates a backend on every PATCH (health and setup calls with the given fields) and
    answers 500 when `url` is missing, so the update carries url, project and, with basic auth, the credentials.
    """
    if backend is not None:
        auth = ({"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}
                if basic_auth else {})
        client.ml.update(id=backend["id"], title=tag, url=backend["url"], project=int(project), **auth)
    else:
        client.projects.update(id=int(project), model_version=tag)
