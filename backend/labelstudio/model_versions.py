"""The model versions Label Studio already stores predictions of, so version numbers are never reused.

Version numbers are a counter in Redis (`backend.core.store`). If Redis loses its data, the counter
would start again at 1 and a new head would be called `label-v1` while Label Studio still holds the
old `label-v1`'s predictions: "Retrieve Predictions" skips tasks that already have a prediction of
the current `model_version` (`ml/models.py` `predict_tasks`), so the old model's answers would pass
for the new one's. Before a project's first training with no counter, headstart reads
`GET /api/projects/{id}/model-versions` (model_version → number of predictions, from Label Studio's
`Project.get_model_versions`) and continues after the highest number each control has used.
"""

from __future__ import annotations

import re

from label_studio_sdk.client import LabelStudio

from backend.common.errors import LabelStudioUnavailable

PART = re.compile(r"^(?P<control>.+)-v(?P<number>\d+)$")


def highest_numbers(model_versions: list[str]) -> dict[str, int]:
    """control → the highest N among `<control>-vN` parts of these model_versions (joined by `+`)."""
    highest: dict[str, int] = {}
    for version in model_versions:
        for part in str(version).split("+"):
            match = PART.match(part)
            if match:
                highest[match["control"]] = max(highest.get(match["control"], 0), int(match["number"]))
    return highest


def used_in_label_studio(client: LabelStudio, project: str) -> dict[str, int]:
    """control → the highest version number Label Studio holds predictions of, for `project`."""
    try:
        response = client._client_wrapper.httpx_client.request(
            f"api/projects/{int(project)}/model-versions/", method="GET")
        response.raise_for_status()
        versions = response.json()
    except Exception as exc:
        raise LabelStudioUnavailable(
            f"Could not read the model versions of project {project} from Label Studio ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Check LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and that the user can see the "
            "project.") from None
    return highest_numbers(list(versions) if isinstance(versions, (dict, list)) else [])
