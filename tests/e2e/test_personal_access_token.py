"""headstart with Label Studio 1.23's default security: legacy tokens off, a personal access token.

A second backend + worker pair (on its own Redis database) is configured with the admin's
personal access token. The project's images are uploaded to Label Studio, so every image the
backend and worker see must be downloaded from /data/upload/ with the token exchanged at
/api/token/refresh/. Labels are read, and predictions written, through the API with that token.
"""

from __future__ import annotations

import pytest
import requests
from redis import Redis
from rq import Queue
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from tests.e2e.conftest import start_pair
from tests.e2e.dataset import CLASSES, Image, upload_set
from tests.e2e.labeling_session import LabelingSession, image_file_of
from tests.e2e.ls_api import LabelStudioApi
from tests.e2e.processes import wait_until
from tests.helpers import CONFIG_2
from backend.common.queues import EMBED_CHUNK_JOB, EMBED_QUEUE, INDEX_JOB, REPREDICT_JOB

PREDICTION_WRITERS = (REPREDICT_JOB, EMBED_CHUNK_JOB, INDEX_JOB)

pytestmark = pytest.mark.e2e

UPLOADED_PER_CLASS = 4
LABELED_PER_CLASS = 2


@pytest.fixture(scope="module")
def token_api(ls_api, label_studio):
    """A client on the admin's personal access token, with legacy tokens turned off meanwhile."""
    token = ls_api.post("/api/token/", {})["token"]
    ls_api.post("/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": False})
    api = LabelStudioApi(label_studio.url, token)
    try:
        yield api
    finally:
        api.post("/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})


@pytest.fixture(scope="module")
def token_pair(token_api, label_studio, e2e_redis, documents_root, e2e_root, pytestconfig):
    pair = start_pair(pytestconfig, "token", redis_url=f"redis://127.0.0.1:{e2e_redis.port}/1",
                      label_studio_url=label_studio.url, api_key=token_api.token,
                      documents_root=documents_root, log_dir=e2e_root / "logs")
    try:
        yield pair
    finally:
        pair.stop()


def prediction_writes(pair) -> list[dict]:
    """Return values of the worker's finished jobs that write predictions into Label Studio (re-prediction after
    a promotion, and the embedding chunks and index passes that predict what they embed)."""
    redis = Redis.from_url(pair.redis_url)
    try:
        queue = Queue(EMBED_QUEUE, connection=redis, serializer=JSONSerializer)
        jobs = [queue.fetch_job(job_id) for job_id in FinishedJobRegistry(queue=queue).get_job_ids()]
        return [job.return_value() for job in jobs if job is not None and job.func_name in PREDICTION_WRITERS]
    finally:
        redis.close()


def test_uploaded_media_and_api_work_with_a_personal_access_token(ls_api, label_studio, token_api, token_pair):
    assert token_api.is_personal_access_token
    refused = ls_api.request("GET", "/api/projects", expect=(200, 401))
    assert refused.status_code == 401, "legacy tokens still work: this flow would prove nothing"

    project = token_api.create_project("headstart e2e token", CONFIG_2)["id"]
    uploads = upload_set(UPLOADED_PER_CLASS)
    token_api.import_files(project, [path for path, _ in uploads])
    labels = {path.name: label for path, label in uploads}
    images: dict[int, Image] = {}
    for task in sorted(token_api.tasks(project), key=lambda task: task["id"]):
        assert task["data"]["image"].startswith(f"/data/upload/{project}/"), task["data"]
        uploaded_name = image_file_of(task)  # Label Studio prefixes a random id: "<id>-<name>"
        label = labels[next(name for name in labels if uploaded_name.endswith(f"-{name}"))]
        already = sum(image.label == label for image in images.values())
        images[task["id"]] = Image(file_name=uploaded_name, label=label,
                                   role="pool" if already < LABELED_PER_CLASS else "eval")
    assert len(images) == len(uploads)
    media = token_api.base_url + token_api.tasks(project)[0]["data"]["image"]
    for credentials in ({}, {"Authorization": f"Token {label_studio.credentials.legacy_token}"}):
        status = requests.get(media, headers=credentials, timeout=10).status_code
        assert status in (401, 403), f"{media} is served without a valid token ({status})"

    backend = token_api.connect_backend(project, token_pair.url)
    session = LabelingSession(api=token_api, pair=token_pair, project=project, backend_id=backend["id"],
                              images=images)
    assert session.api.backend(session.backend_id)["state"] == "CO"

    session.annotate_next(per_class=LABELED_PER_CLASS)
    version = session.wait_until_settled(session.expected_training_set())
    assert version["media_errors"] == {}, version["media_errors"]  # every uploaded image was downloaded
    model_version = session.wait_for_label_studio_version(f"label-v{version['version']}")

    remaining = session.unlabeled_tasks()
    session.retrieve_predictions(remaining)
    stored = session.predictions_of(model_version)
    for task in remaining:
        prediction = stored.get(task)
        assert prediction is not None, f"task {task} has no {model_version} prediction"
        assert prediction["result"] and prediction["result"][0]["value"]["choices"][0] in CLASSES, prediction
        assert 0.0 < prediction["score"] <= 1.0

    # the worker writes through the API with the token: from the first promotion on, before any retrieval
    pushed = wait_until(lambda: sum(r.get("predictions") or 0 for r in prediction_writes(token_pair) if r),
                        timeout_s=120, what="predictions written by the worker with the token",
                        processes=token_pair.processes)
    # whichever wrote them (the worker, or Label Studio saving /predict's answers), one per task and version
    per_task = [p["task"] for p in session.api.predictions(project) if p["model_version"] == model_version]
    assert sorted(per_task) == sorted(set(per_task)) and set(remaining) <= set(per_task)
    scored = session.score(model_version, remaining)
    print(f"\npersonal access token: {len(images)} uploaded images, {model_version} trained on "
          f"{version['label_count']} labels, predictions for {len(remaining)} tasks (accuracy "
          f"{scored.accuracy:.2f}); worker wrote {pushed} predictions through the API")
