"""The HTTP contract, replaying requests a real Label Studio 1.23.2 sent (../shared/ls-requests)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from backend.core.heads import build_head
from backend.core.store import ModelStore
from backend.server.app import create_app
from backend.loop.retrain import train_version
from backend.loop.services import build_services
from tests.helpers import HYMENOPTERA, LS_REQUESTS, dataset_images


def recorded(name: str) -> dict:
    return json.loads((LS_REQUESTS / f"{name}.json").read_text())


@pytest.fixture
def media_root(tmp_path):
    """Real photos under the file names the recorded tasks reference (local-files storage)."""
    root = tmp_path / "documents"
    images = dataset_images(HYMENOPTERA, "val")
    for relative, (path, _) in zip(["chelsea.jpg", "coffee.jpg", "ds1/astronaut.jpg"], images[::60]):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / relative)
    return root


@pytest.fixture
def services(settings, redis, encoders, media_root):
    return build_services(settings.replace(local_files_document_root=str(media_root)), redis, encoders=encoders)


@pytest.fixture
def local_client(services):
    return create_app(services.settings, services=services).test_client()


def train_ab_head(services, project: str) -> int:
    """A real head for the recorded config (classes A/B) on real hymenoptera features."""
    encoder = services.encoders.get()
    from backend.core.images import decode_image

    pairs = dataset_images(HYMENOPTERA, "train")[:3] + dataset_images(HYMENOPTERA, "train")[-3:]
    images = [decode_image(path.read_bytes(), max_pixels=10**8) for path, _ in pairs]
    labels = [["A"] if cls == "ants" else ["B"] for _, cls in pairs]
    trained = train_version(services.store, project=project, control="label", classes=["A", "B"],
                            multi_label=False, features=encoder.embed(images), labels=labels,
                            task_ids=list(range(len(pairs))), encoder=encoder)
    services.store.promote(project, "label", trained.number)
    return trained.number


def test_health_answers_what_label_studio_expects(client):
    request = recorded("health")
    response = client.get(request["path"])
    assert response.status_code == 200
    assert response.json["status"] == "UP" and response.json["model_class"] == "headstart"


def test_setup_before_any_head_reports_untrained(client):
    response = client.post("/setup", json=recorded("setup")["body"])
    assert response.status_code == 200
    assert response.json == {"model_version": "untrained"}


def test_predict_before_any_head_returns_one_empty_result_per_task(local_client):
    body = recorded("predict-retrieve-3-tasks")["body"]
    response = local_client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == len(body["tasks"])
    assert all(result["result"] == [] for result in results)


def test_predict_with_a_head_labels_every_task_in_order(local_client, services):
    number = train_ab_head(services, "1")
    setup = local_client.post("/setup", json=recorded("setup")["body"]).json
    assert setup["model_version"] == f"label-v{number}"

    body = recorded("predict-open-1-task")["body"]
    results = local_client.post("/predict", json=body).json["results"]
    assert len(results) == 1
    prediction = results[0]
    assert prediction["model_version"] == f"label-v{number}"
    assert 0.5 <= prediction["score"] <= 1.0
    (region,) = prediction["result"]
    assert region["from_name"] == "label" and region["to_name"] == "image" and region["type"] == "choices"
    assert region["value"]["choices"][0] in ("A", "B")


def test_a_broken_image_and_a_dead_url_empty_only_their_task(local_client, services, media_root):
    train_ab_head(services, "1")
    (media_root / "broken.jpg").write_bytes((media_root / "chelsea.jpg").read_bytes()[:300])
    body = recorded("predict-retrieve-3-tasks")["body"]
    body["tasks"][1]["data"]["image"] = "/data/local-files/?d=broken.jpg"
    body["tasks"][2]["data"]["image"] = "http://127.0.0.1:9/nothing-listens-here.jpg"
    response = local_client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.json["results"]
    assert [bool(result["result"]) for result in results] == [True, False, False]


@pytest.mark.parametrize("payload, content_type", [
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b'{"tasks": "nope", "project": "1.1", "label_config": "<View/>"}', "application/json"),
    (b'{"tasks": [], "project": "x", "label_config": "<View/>"}', "application/json"),
])
def test_malformed_predict_requests_get_a_clear_400(client, payload, content_type):
    response = client.post("/predict", data=payload, content_type=content_type)
    assert response.status_code == 400
    assert response.json["message"] and "Traceback" not in response.get_data(as_text=True)


def test_a_config_without_image_or_text_choices_is_refused_with_the_fix(client):
    body = recorded("setup")["body"]
    body["schema"] = '<View><Audio name="audio" value="$audio"/><Choices name="s" toName="audio"><Choice value="x"/></Choices></View>'
    response = client.post("/setup", json=body)
    assert response.status_code == 400
    assert "<Choices> control whose toName is an <Image>, a <Text> or a <HyperText>" in response.json["message"]
    body["schema"] = '<View><Text name="text" value="$text"/><Choices name="s" toName="text"><Choice value="x"/></Choices></View>'
    assert client.post("/setup", json=body).status_code == 200  # text classification is served


def test_a_head_for_other_classes_is_not_used(local_client, services):
    train_ab_head(services, "1")
    body = recorded("predict-open-1-task")["body"]
    body["label_config"] = body["label_config"].replace('"B"', '"C"')
    results = local_client.post("/predict", json=body).json["results"]
    assert results[0]["result"] == [] and results[0]["model_version"] == "untrained"


def test_versions_lists_promoted_versions(client, services):
    client.post("/setup", json=recorded("setup")["body"])
    number = train_ab_head(services, "1")
    assert client.get("/versions").json == {"versions": [f"label-v{number}"], "next": None}


def test_versions_are_paged_newest_first_without_reading_every_version(client, services, monkeypatch):
    client.post("/setup", json=recorded("setup")["body"])
    meta = {"classes": ["A", "B"], "feature_dim": 8, "multi_label": False}
    for number in range(1, 8):  # two controls; the even versions of "label" were rejected
        promote = number % 2 == 1 or number > 5
        services.store.save("1", "label", build_head(8, 2), {**meta, "status": "promoted" if promote else "rejected"},
                            promote=promote)
        services.store.save("1", "other", build_head(8, 2), meta, promote=True)
    monkeypatch.setattr(ModelStore, "versions", lambda *args: pytest.fail("/versions read every version"))
    pages, before = [], ""
    while before is not None:
        answer = client.get(f"/versions?project=1&limit=3&before={before}").json
        pages.append(answer["versions"])
        before = answer["next"]
    assert pages[0] == ["label-v7", "other-v7", "label-v6", "other-v6"]  # never splits one number's versions
    names = [name for page in pages for name in page]
    assert names == [f"{c}-v{n}" for n in range(7, 0, -1) for c in ("label", "other")
                     if c == "other" or n % 2 == 1 or n > 5]
    assert client.get("/versions?limit=0").status_code == 400


def test_metrics_are_prometheus_text(local_client):
    answer = local_client.post("/predict", json=recorded("predict-open-1-task")["body"], buffered=False)
    assert "headstart_predictions_total 1" not in local_client.get("/metrics").get_data(as_text=True)
    answer.close()  # as a WSGI server does once the answer is sent: the metrics are written after it
    text = local_client.get("/metrics").get_data(as_text=True)
    assert "# TYPE headstart_predictions_total counter" in text
    assert "headstart_predictions_total 1" in text


def test_basic_auth_guards_every_route_but_health(settings, services):
    app = create_app(settings.replace(basic_auth_user="ls", basic_auth_pass="s3cret"), services=services)
    client = app.test_client()
    assert client.get("/health").status_code == 200
    assert client.post("/setup", json=recorded("setup")["body"]).status_code == 401
    assert client.post("/setup", json=recorded("setup")["body"],
                       auth=("ls", "wrong")).status_code == 401
    assert client.post("/setup", json=recorded("setup")["body"],
                       auth=("ls", "s3cret")).status_code == 200
