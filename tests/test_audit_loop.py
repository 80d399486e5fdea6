"""The audit job after a training, through the production worker (backend/loop/audit.py, audit_report.py,
backend/cli/audit.py): a wrong label becomes a suspect with a marker in Label Studio, `headstart suspects` lists
it, `headstart export` writes human and machine labels, and fixing the label clears it all at the next training.

Label Studio's API is the local stand-in (tests/fake_label_studio.py); tests/e2e/test_label_audit.py drives the
real one.
"""

from __future__ import annotations

import json

import pytest

from backend.cli import main
from backend.common import redis_keys
from backend.loop.audit import SUSPECT_MODEL_VERSION, latest
from backend.loop.services import build_services
from backend.server.app import create_app
from tests.admin_support import TOKEN
from tests.fake_label_studio import FakeLabelStudio
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images
from tests.loop_helpers import annotation_event, run_burst_worker

PROJECT = 8
PER_CLASS = 20
UNLABELED = 3  # per class, from val
WRONG = "132478121_2a430adea2.jpg"  # an ant, labeled "bees"


@pytest.fixture
def label_studio():
    fake = FakeLabelStudio(label_config=CONFIG_2)
    picked = [(item, "train") for cls in ("ants", "bees")
              for item in [i for i in dataset_images(HYMENOPTERA, "train") if i[1] == cls][:PER_CLASS]]
    picked += [(item, "val") for cls in ("ants", "bees")
               for item in [i for i in dataset_images(HYMENOPTERA, "val") if i[1] == cls][:UNLABELED]]
    for task_id, ((path, cls), split) in enumerate(picked, start=1):
        name = f"upload/{PROJECT}/{task_id}-{path.name}"
        fake.files[name] = path.read_bytes()
        fake.tasks.append({"id": task_id, "data": {"image": f"/data/{name}"}, "annotations": [], "predictions": [],
                           "total_annotations": 0, "project": PROJECT, "class": cls, "split": split,
                           "file": path.name})
    yield fake.start()
    fake.stop()


@pytest.fixture
def ls_services(settings, redis, encoders, label_studio):
    configured = settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
                                  repredict_unlabeled=False, train_min_interval_s=0)
    return build_services(configured, redis, encoders=encoders)


def _submit(client, label_studio, task: dict, choice: str, *, action: str = "ANNOTATION_CREATED") -> None:
    annotation_id = 1000 + task["id"]
    if action == "ANNOTATION_CREATED":
        label_studio.annotate(task["id"], annotation_id, choice)
        task["total_annotations"] = 1
    else:
        label_studio.change(annotation_id, choice)
    event = annotation_event(project=PROJECT, task_id=task["id"], annotation_id=annotation_id,
                             url=task["data"]["image"], choice=choice, action=action,
                             updated_at=task["annotations"][0]["updated_at"])
    assert client.post("/webhook", json=event).status_code == 200


def _cli(monkeypatch, settings, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("LABEL_STUDIO_URL", settings.label_studio_url)
    capsys.readouterr()  # what the worker printed before
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_wrong_label_is_flagged_marked_listed_exported_and_cleared_once_fixed(
        ls_services, redis, label_studio, monkeypatch, capsys, tmp_path):
    client = create_app(ls_services.settings, services=ls_services).test_client()
    assert client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2}).status_code == 200
    run_burst_worker(ls_services.settings, redis, ls_services)  # first contact: every task indexed and embedded
    wrong = next(task for task in label_studio.tasks if task["file"] == WRONG)
    for task in label_studio.tasks:
        if task["split"] == "train":
            _submit(client, label_studio, task, "bees" if task is wrong else task["class"])
    run_burst_worker(ls_services.settings, redis, ls_services)  # train, then the audit it queues

    record = latest(ls_services, str(PROJECT), "label")
    assert record["judged"] and record["model_version"] == "label-v1", record["reason"]
    suspects = {s["task"]: s for s in record["suspects"]}
    assert wrong["id"] in suspects and suspects[wrong["id"]]["suggested"] == ["ants"]
    assert len(suspects) <= 3
    assert record["suspects"][0]["given_probability"] <= record["suspects"][-1]["given_probability"]
    markers = {p["task"]: p for p in label_studio.predictions.values()}
    assert set(markers) == set(suspects)
    assert markers[wrong["id"]]["model_version"] == SUSPECT_MODEL_VERSION
    assert markers[wrong["id"]]["result"][0]["value"]["choices"] == ["ants"]
    coverage = record["auto_accept"]
    assert coverage["remaining"] == 2 * UNLABELED and coverage["embedded"] == 2 * UNLABELED
    served = ls_services.store.load(str(PROJECT), "label", 1)
    # the thresholds (and the export's) come from the served head's own recipe out of fold
    assert record["out_of_fold"]["recipe"] == served.meta["recipe"]
    assert len(record["out_of_fold"]["probabilities"]) == 2 * PER_CLASS
    assert 0 <= coverage["would_label"] <= coverage["remaining"]

    code, out, _ = _cli(monkeypatch, ls_services.settings, capsys, "suspects", str(PROJECT))
    assert code == 0 and f"{label_studio.url}/projects/{PROJECT}/data?task={wrong['id']}" in out
    admin_settings = ls_services.settings.replace(admin_token=TOKEN)
    admin = create_app(admin_settings, services=build_services(admin_settings, redis, encoders=ls_services.encoders)
                       ).test_client()
    assert admin.post("/admin/login", data={"token": TOKEN}, headers={"Origin": "http://localhost"}).status_code == 303
    page = admin.get("/admin").get_data(as_text=True)
    assert "Label audit" in page and f'<tr data-task="{wrong["id"]}">' in page
    assert f"would label {coverage['would_label']} of {2 * UNLABELED} remaining tasks" in page
    code, out, _ = _cli(monkeypatch, ls_services.settings, capsys, "status")
    assert code == 0 and f"would label {coverage['would_label']} of {2 * UNLABELED} remaining tasks" in out

    exported = tmp_path / "labels.jsonl"
    code, _, err = _cli(monkeypatch, ls_services.settings, capsys, "export", str(PROJECT), "--min-precision", "0.9",
                        "-o", str(exported))
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    human = [line for line in lines if line["label_source"] == "human"]
    machine = [line for line in lines if line["label_source"] == "machine"]
    assert code == 0 and len(human) == 2 * PER_CLASS and f"{len(machine)} machine-labeled" in err
    assert all(line["annotations"] and not line["predictions"] for line in human)
    unlabeled = {task["id"]: task for task in label_studio.tasks if task["split"] == "val"}
    assert {line["id"] for line in machine} <= set(unlabeled)
    for line in machine:
        prediction = line["predictions"][0]
        assert prediction["machine_label"] and not line["annotations"] and prediction["score"] >= 0.5
        assert prediction["result"][0]["value"]["choices"] == [unlabeled[line["id"]]["class"]]
    assert len(ls_services.labels.records(str(PROJECT))) == 2 * PER_CLASS  # machine labels never become labels

    _submit(client, label_studio, wrong, "ants", action="ANNOTATION_UPDATED")
    run_burst_worker(ls_services.settings, redis, ls_services)
    record = latest(ls_services, str(PROJECT), "label")
    assert record["model_version"] == "label-v2"
    assert wrong["id"] not in {s["task"] for s in record["suspects"]}
    assert wrong["id"] not in {p["task"] for p in label_studio.predictions.values()}
    assert {p["task"] for p in label_studio.predictions.values()} == {s["task"] for s in record["suspects"]}
    code, out, _ = _cli(monkeypatch, ls_services.settings, capsys, "suspects", str(PROJECT), "--json")
    assert wrong["id"] not in {s["task"] for s in json.loads(out)["controls"][0]["suspects"]}


def test_export_without_a_head_says_so_and_fails(ls_services, redis, monkeypatch, capsys, tmp_path):
    client = create_app(ls_services.settings, services=ls_services).test_client()
    assert client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2}).status_code == 200
    code, out, err = _cli(monkeypatch, ls_services.settings, capsys, "export", str(PROJECT), "--min-precision", "0.98",
                          "-o", str(tmp_path / "none.jsonl"))
    assert code == 1 and "has no head yet" in err and not (tmp_path / "none.jsonl").exists()
    code, out, err = _cli(monkeypatch, ls_services.settings, capsys, "suspects", str(PROJECT))
    assert code == 0 and "no audit yet" in out
    assert redis.get(redis_keys.audit(str(PROJECT), "label")) is None
