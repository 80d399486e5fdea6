"""Writing predictions into Label Studio by the cheaper of its two APIs.

Label Studio 1.23.2's bulk import (`POST /api/projects/P/import/predictions`, data_import/api.py
`ImportPredictionsAPI`) recounts the counters of every task of the project after each request: about
2.3 s at 5,000 tasks, whatever the number of predictions. `POST /api/predictions/` updates the counter of
its own task only (tasks/models.py `save_predictions_to_project`): ~30–200 ms each on a 2-core machine,
whatever the project's size. So a handful of predictions (a labeling queue's front, an embedding chunk's
catch-up) go one by one, and a pass over the project goes in bulk.
"""

from __future__ import annotations

SINGLE_WRITE_MAX = 50  # never more one-by-one requests than this
TASKS_PER_SINGLE_WRITE = 250  # one bulk request costs about as much as one single write per this many project tasks


def single_writes_cheaper(count: int, project_tasks: int) -> bool:
    """Whether `count` one-by-one creates cost less than one bulk import into a project of `project_tasks`."""
    return count <= min(SINGLE_WRITE_MAX, project_tasks // TASKS_PER_SINGLE_WRITE)


def write_predictions(client, project: int, predictions: list[dict], *, project_tasks: int) -> int:
    """Create `predictions` ({task, result, score, model_version}) in `project`; returns the API requests made."""
    if not predictions:
        return 0
    if not single_writes_cheaper(len(predictions), project_tasks):
        client.projects.import_predictions(id=project, request=predictions)
        return 1
    for prediction in predictions:
        score = prediction.get("score")
        extra = {"score": score} if score is not None else {}
        client.predictions.create(task=prediction["task"], result=prediction["result"],
                                  model_version=prediction["model_version"], **extra)
    return len(predictions)
