"""Reading labels from Label Studio's API: what each training reads, hints confirmed by id, pre-labels pushed
back, and personal access tokens.

Label Studio's API is a local stand-in here (tests/fake_label_studio.py) answering the Data Manager
queries the way a real 1.23.2 does; tests/e2e/test_sync_reads.py proves the same queries against a
real Label Studio.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from label_studio_sdk.client import LabelStudio
from rq.registry import FinishedJobRegistry

from backend.common.errors import LabelStudioUnavailable
from backend.common.queues import EMBED_QUEUE, TRAIN_QUEUE, queue
from backend.core.store import ModelStore
from backend.labelstudio.label_mirror import Expected, LabelStore, annotation_record
from backend.labelstudio.labeling_config import parse_label_config
from backend.labelstudio.projects import ProjectRegistry
from backend.labelstudio.sync import EXPECT_ATTEMPTS, EXPECT_MAX_ATTEMPTS, refresh_mirror
from backend.loop.services import build_services
from backend.server.app import create_app
from tests.fake_label_studio import FakeLabelStudio, now
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images
from tests.loop_helpers import annotation_event, deleted_event, run_burst_worker, set_up

PROJECT = 5
SPEC = parse_label_config(CONFIG_2)[0]
UNLABELED_FILLER = 600  # tasks nobody labeled: no read of a training may grow with them
CONFIG_3 = CONFIG_2.replace('<Choice value="bees"/>', '<Choice value="bees"/><Choice value="wasps"/>')


def task(task_id: int, filepath: str, choice: str | None, *, cloud: bool = False) -> dict:
    annotations = [] if choice is None else [{
        "id": 100 + task_id, "task": task_id, "was_cancelled": False, "ground_truth": False,
        "updated_at": "2026-11-27T12:00:00Z",
        "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]}]
    url = f"s3://upload/{PROJECT}/{filepath}" if cloud else f"/data/upload/{PROJECT}/{filepath}"
    return {"id": task_id, "data": {"image": url}, "annotations": annotations,
            "predictions": [], "total_annotations": len(annotations), "project": PROJECT}


def fake_project(*, filler: int = 0) -> FakeLabelStudio:
    """12 tasks with real images (8 labeled, every third in cloud storage) and `filler` unlabeled ones."""
    train = dataset_images(HYMENOPTERA, "train")
    picked = [item for cls in ("ants", "bees") for item in [i for i in train if i[1] == cls][:6]]
    fake = FakeLabelStudio(label_config=CONFIG_2)
    for index, (path, cls) in enumerate(picked, start=1):
        name = f"{index}-{path.name}"
        fake.files[f"upload/{PROJECT}/{name}"] = path.read_bytes()
        fake.tasks.append(task(index, name, cls if index % 6 < 4 else None, cloud=index % 3 == 0))
    fake.tasks += [task(1000 + i, f"filler-{i}.jpg", None) for i in range(filler)]
    fake.classes = {index: cls for index, (_, cls) in enumerate(picked, start=1)}
    return fake.start()


@pytest.fixture(params=["personal access token", "legacy token"])
def label_studio(request):
    fake = fake_project()
    fake.auth_kind = request.param
    yield fake
    fake.stop()


@pytest.fixture
def ls_settings(settings, label_studio):
    key = label_studio.pat if label_studio.auth_kind == "personal access token" else label_studio.legacy_token
    return settings.replace(label_studio_url=label_studio.url, label_studio_api_key=key, repredict_unlabeled=True)


def test_start_training_resyncs_trains_and_writes_pre_labels_back(ls_settings, redis, encoders, label_studio):
    services = build_services(ls_settings, redis, encoders=encoders)
    client = create_app(ls_settings, services=services).test_client()
    set_up(redis, PROJECT)
    LabelStore(redis).put(str(PROJECT), {"id": 999, "task": 999, "result": []}, {"id": 999})  # stale junk
    response = client.post("/webhook", json={"action": "START_TRAINING",
                                             "project": {"id": PROJECT, "label_config": CONFIG_2}})
    assert response.status_code == 200
    run_burst_worker(ls_settings, redis, services)

    store = ModelStore(redis)
    meta = store.meta(str(PROJECT), "label", store.current_number(str(PROJECT), "label"))
    assert meta["label_count"] == 8 and "999" not in meta["trained_on"]
    assert queue(EMBED_QUEUE, redis).count == 0  # the follow-up re-prediction ran on the embedding queue
    pushed = label_studio.imported_predictions
    assert sorted(p["task"] for p in pushed) == [t["id"] for t in label_studio.tasks if not t["annotations"]]
    assert {p["model_version"] for p in pushed} == {f"label-v{meta['version']}"}
    assert all(0.5 <= p["score"] <= 1 and p["result"][0]["value"]["choices"][0] in ("ants", "bees") for p in pushed)
    if label_studio.auth_kind == "personal access token":
        assert label_studio.refreshes >= 1 and set(label_studio.media_auth) == {"Bearer"}
    else:
        assert set(label_studio.media_auth) == {"Token"}


# ---- what a training reads --------------------------------------------------------------------------

@pytest.fixture
def big_project():
    fake = fake_project(filler=UNLABELED_FILLER)
    yield fake
    fake.stop()


@pytest.fixture
def pipeline(settings, redis, encoders, big_project):
    """The production app and burst workers against the fake Label Studio, re-prediction off."""
    loop = settings.replace(label_studio_url=big_project.url, label_studio_api_key=big_project.legacy_token,
                            train_min_interval_s=0, repredict_unlabeled=False)
    services = build_services(loop, redis, encoders=encoders)
    set_up(redis, PROJECT)
    return loop, services, create_app(loop, services=services).test_client()


def created(fake: FakeLabelStudio, annotation: dict, *, config: str = CONFIG_2) -> dict:
    """The ANNOTATION_CREATED webhook Label Studio sends for `annotation` (as the fake holds it)."""
    task_ = fake.task(annotation["task"])
    choice = annotation["result"][0]["value"]["choices"][0] if annotation["result"] else "ants"
    return annotation_event(project=PROJECT, task_id=task_["id"], annotation_id=annotation["id"],
                            url=task_["data"]["image"], choice=choice, config=config,
                            updated_at=annotation["updated_at"])


def train(pipeline, body: dict, *, follow_ups: bool = False) -> tuple[dict, dict | None]:
    """Deliver one webhook, run the queued training (if any); (the webhook's answer, the training's summary).
    With `follow_ups`, the trainings it asked for itself run too (the first one's summary is returned)."""
    loop, services, client = pipeline
    response = client.post("/webhook", json=body)
    assert response.status_code == 200, response.json
    finished = FinishedJobRegistry(queue=queue(TRAIN_QUEUE, services.redis))
    before = set(finished.get_job_ids())
    run_burst_worker(loop, services.redis, services)
    new = [queue(TRAIN_QUEUE, services.redis).fetch_job(i) for i in finished.get_job_ids() if i not in before]
    new.sort(key=lambda job: job.enqueued_at)
    assert follow_ups or len(new) <= 1
    return response.json, new[0].return_value() if new else None


def test_each_training_reads_what_changed_not_the_whole_project(pipeline, big_project, redis):
    fake, labels = big_project, LabelStore(redis)
    requests_before = len(fake.api_requests)

    # (a) first contact: the project and one page of annotated tasks, not 12 + 600 tasks; and once, the model
    # versions Label Studio holds predictions of (version numbers continue after them)
    _, summary = train(pipeline, created(fake, fake.task(1)["annotations"][0]))
    assert summary["labels_read"] == {"reads": ["full"], "tasks_read": 8, "recheck": False, "ls_requests": 2}
    assert summary["ls_requests"] == len(fake.api_requests) - requests_before == 3
    assert [e.task_id for e in labels.examples(str(PROJECT), SPEC)[0]] == [1, 2, 3, 6, 7, 8, 9, 12]

    # (b) one new annotation: its task, by id, in one request
    fresh = fake.annotate(4, 401, fake.classes[4])
    _, summary = train(pipeline, created(fake, fresh))
    assert summary["labels_read"] == {"reads": ["hints"], "tasks_read": 1, "recheck": False, "ls_requests": 1}
    assert 4 in {e.task_id for e in labels.examples(str(PROJECT), SPEC)[0]}

    # a second delivery of the same event: nothing read, nothing trained
    answer, summary = train(pipeline, created(fake, fresh))
    assert answer["status"] == "unchanged" and summary is None

    # (c) START_TRAINING with nothing changed: one page of the most recently updated annotated tasks
    requests_before = len(fake.api_requests)
    _, summary = train(pipeline, {"action": "START_TRAINING", "project": {"id": PROJECT, "label_config": CONFIG_2}})
    assert summary["labels_read"]["reads"] == ["check"] and summary["ls_requests"] == 1
    assert summary["labels_read"]["tasks_read"] <= 9 and len(fake.api_requests) - requests_before == 1

    # (d) a changed labeling config: the config (from Label Studio, not the body) and one full read again
    fake.label_config = CONFIG_3
    _, summary = train(pipeline, {"action": "START_TRAINING", "project": {"id": PROJECT, "label_config": CONFIG_3}})
    assert summary["labels_read"] == {"reads": ["full"], "tasks_read": 9, "recheck": False, "ls_requests": 2}
    assert pipeline[1].projects.label_config(str(PROJECT)) == CONFIG_3
    print(f"\nLabel Studio API requests per training, 9 labeled of {12 + UNLABELED_FILLER} tasks: first contact 2 (+1), "
          "one new annotation 1, START_TRAINING with nothing changed 1, labeling config changed 2")


def test_labels_come_from_label_studio_not_from_the_webhook_body(pipeline, big_project, redis):
    fake, labels = big_project, LabelStore(redis)
    train(pipeline, created(fake, fake.task(1)["annotations"][0]))  # first contact
    truth = fake.task(2)["annotations"][0]
    forged = created(fake, truth) | {"action": "ANNOTATION_UPDATED"}
    forged["annotation"]["result"][0]["value"]["choices"] = ["bees" if fake.classes[2] == "ants" else "ants"]
    forged["annotation"]["updated_at"] = "2026-12-01T00:00:00.000000Z"
    train(pipeline, forged, follow_ups=True)  # announced as newer than Label Studio has it: looked for again, in vain
    train(pipeline, deleted_event(project=PROJECT, annotation_ids=[truth["id"]]))  # forged: it still exists
    ghost = created(fake, truth)
    ghost["annotation"].update(id=77_777, task=424_242)
    ghost["task"]["id"] = 424_242
    _, summary = train(pipeline, ghost, follow_ups=True)  # a task Label Studio does not have
    assert summary["labels_read"]["reads"] == ["hints"] and summary["labels_read"]["tasks_read"] == 0
    examples = {e.task_id: e.choices for e in labels.examples(str(PROJECT), SPEC)[0]}
    assert examples[2] == [fake.classes[2]] and 424_242 not in examples


def test_changes_between_hint_and_confirmation_and_missed_webhooks(pipeline, big_project, redis):
    fake, labels = big_project, LabelStore(redis)
    _, summary = train(pipeline, created(fake, fake.task(1)["annotations"][0]))
    assert summary["labels_read"]["reads"] == ["full"]

    # hinted, then the task deleted in Label Studio before the training confirms it: dropped cleanly
    hinted = created(fake, fake.task(2)["annotations"][0]) | {"action": "ANNOTATION_UPDATED"}
    hinted["annotation"]["updated_at"] = "2026-12-01T00:00:00.000000Z"
    loop, services, client = pipeline
    assert client.post("/webhook", json=hinted).status_code == 200
    fake.delete_task(2)
    fake.change(fake.task(3)["annotations"][0]["id"], "bees")  # and a change announced meanwhile
    assert client.post("/webhook", json=created(fake, fake.task(3)["annotations"][0])).status_code == 200
    run_burst_worker(loop, redis, services)
    examples = {e.task_id: e.choices for e in labels.examples(str(PROJECT), SPEC)[0]}
    assert 2 not in examples and examples[3] == ["bees"]

    # missed webhooks: a change shows in the incremental read; a deletion in its totals (→ one full read)
    fake.change(fake.task(7)["annotations"][0]["id"], "ants")
    _, summary = train(pipeline, {"action": "START_TRAINING", "project": {"id": PROJECT}})
    assert summary["labels_read"]["reads"] == ["check"] and summary["ls_requests"] == 1
    assert {e.task_id: e.choices for e in labels.examples(str(PROJECT), SPEC)[0]}[7] == ["ants"]
    fake.delete_annotation(fake.task(8)["annotations"][0]["id"])
    _, summary = train(pipeline, {"action": "START_TRAINING", "project": {"id": PROJECT}})
    # + the deleted label confirmed by id: the full list left it out (`sync._full_read`)
    assert summary["labels_read"]["reads"] == ["check", "full"] and summary["ls_requests"] == 4
    assert 8 not in {e.task_id for e in labels.examples(str(PROJECT), SPEC)[0]}
    assert labels.counts(str(PROJECT)) == (6, 6)


def test_a_label_announced_before_label_studio_shows_it_is_read_again_not_lost(pipeline, big_project, redis):
    """The webhook can arrive before Label Studio's task list shows the annotation (seen under load): the
    training it starts reads the task without it. The next training looks again."""
    fake, labels = big_project, LabelStore(redis)
    train(pipeline, created(fake, fake.task(1)["annotations"][0]))  # first contact
    announced = {"id": 401, "task": 4, "updated_at": now(),
                 "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                             "value": {"choices": [fake.classes[4]]}}]}
    fake.commit_after_reads.append((1, lambda: fake.annotate(4, 401, fake.classes[4])))
    _, first = train(pipeline, created(fake, announced), follow_ups=True)
    assert first["labels_read"] == {"reads": ["hints"], "tasks_read": 0, "recheck": True, "ls_requests": 1}
    assert {e.task_id: e.choices for e in labels.examples(str(PROJECT), SPEC)[0]}[4] == [fake.classes[4]]
    assert not labels.hints_pending(str(PROJECT))


def test_an_announced_label_label_studio_never_shows_costs_a_bounded_number_of_reads(big_project, redis):
    fake, labels, projects = big_project, LabelStore(redis), ProjectRegistry(redis)
    client = LabelStudio(base_url=fake.url, api_key=fake.legacy_token)
    refresh_mirror(client, labels, projects, str(PROJECT))
    before = sorted(map(json.dumps, labels.records(str(PROJECT))))
    labels.add_hints(str(PROJECT), expected=[Expected(annotation=9_999, task=4, updated_at=now())])
    reads = []
    while labels.hints_pending(str(PROJECT)):
        reads.append(refresh_mirror(client, labels, projects, str(PROJECT)))
        assert len(reads) <= EXPECT_ATTEMPTS
    assert [read["recheck"] for read in reads] == [True] * (EXPECT_ATTEMPTS - 1) + [False]
    assert all(read["ls_requests"] == 1 for read in reads)
    assert sorted(map(json.dumps, labels.records(str(PROJECT)))) == before


def test_a_label_announced_moments_ago_is_looked_for_longer_than_a_few_quick_reads(big_project, redis):
    """Back-to-back trainings read four times within ~3 s; in `bench loop` at 5,000 tasks Label Studio, busy with an
    import, showed an announced label later than that, and the label waited for the 30 s check. A fresh announcement
    is looked for until EXPECT_MIN_AGE_S has passed (at most EXPECT_MAX_ATTEMPTS reads), an old one as before."""
    fake, labels, projects = big_project, LabelStore(redis), ProjectRegistry(redis)
    client = LabelStudio(base_url=fake.url, api_key=fake.legacy_token)
    refresh_mirror(client, labels, projects, str(PROJECT))
    fake.commit_after_reads.append((EXPECT_ATTEMPTS + 2, lambda: fake.annotate(4, 402, fake.classes[4])))
    labels.add_hints(str(PROJECT), expected=[Expected(annotation=402, task=4, updated_at=now(),
                                                      announced_at=time.time())])
    reads = []
    while labels.hints_pending(str(PROJECT)):
        reads.append(refresh_mirror(client, labels, projects, str(PROJECT)))
        assert len(reads) <= EXPECT_MAX_ATTEMPTS
    assert EXPECT_ATTEMPTS < len(reads) < EXPECT_MAX_ATTEMPTS and reads[-1]["recheck"] is False
    assert {e.task_id: e.choices for e in labels.examples(str(PROJECT), SPEC)[0]}[4] == [fake.classes[4]]

    labels.add_hints(str(PROJECT), expected=[Expected(annotation=9_998, task=5, updated_at=now(),
                                                      announced_at=time.time())])
    reads = []
    while labels.hints_pending(str(PROJECT)):
        reads.append(refresh_mirror(client, labels, projects, str(PROJECT)))
    assert len(reads) == EXPECT_MAX_ATTEMPTS  # never shown: still bounded (these reads take well under 15 s)


def test_a_change_whose_webhook_never_arrived_is_found_by_the_next_training_after_check_every(big_project, redis):
    """Label Studio gives a webhook up after its 1 s WEBHOOK_TIMEOUT and never resends it."""
    fake, labels, projects = big_project, LabelStore(redis), ProjectRegistry(redis)
    client = LabelStudio(base_url=fake.url, api_key=fake.legacy_token)
    every = timedelta(seconds=0.3)
    assert refresh_mirror(client, labels, projects, str(PROJECT), check_every=every)["reads"] == ["full"]
    fake.annotate(4, 401, "ants")  # its webhook was lost
    fake.annotate(5, 501, "bees")
    labels.add_hints(str(PROJECT), tasks=[5])
    assert refresh_mirror(client, labels, projects, str(PROJECT), check_every=every)["reads"] == ["hints"]
    assert 4 not in {e.task_id for e in labels.examples(str(PROJECT), SPEC)[0]}
    time.sleep(every.total_seconds())  # the time that has to pass is what is tested
    fake.annotate(10, 1001, "bees")
    labels.add_hints(str(PROJECT), tasks=[10])
    read = refresh_mirror(client, labels, projects, str(PROJECT), check_every=every)
    assert read["reads"] == ["hints", "check"] and read["ls_requests"] == 2
    assert {4, 5, 10} <= {e.task_id for e in labels.examples(str(PROJECT), SPEC)[0]}


def test_label_studio_down_during_confirmation_guesses_nothing_and_keeps_the_hints(big_project, redis):
    fake, labels, projects = big_project, LabelStore(redis), ProjectRegistry(redis)
    client = LabelStudio(base_url=fake.url, api_key=fake.legacy_token)
    refresh_mirror(client, labels, projects, str(PROJECT))
    before = sorted(map(json.dumps, labels.records(str(PROJECT))))
    fresh = fake.annotate(4, 401, "ants")
    labels.add_hints(str(PROJECT), tasks=[4], check=True)

    fake.fail_api_with = 503
    with pytest.raises(LabelStudioUnavailable, match=f"Could not read project {PROJECT} from Label Studio"):
        refresh_mirror(client, labels, projects, str(PROJECT))
    assert sorted(map(json.dumps, labels.records(str(PROJECT)))) == before and labels.hints_pending(str(PROJECT))

    fake.fail_api_with = None
    read = refresh_mirror(client, labels, projects, str(PROJECT))
    assert read["reads"] == ["hints", "check"] and not labels.hints_pending(str(PROJECT))
    assert labels.is_confirmed(str(PROJECT), 401, annotation_record(fresh, fake.task(4)))


def test_an_incremental_read_stops_at_the_watermark(big_project, redis):
    fake, labels, projects = big_project, LabelStore(redis), ProjectRegistry(redis)
    client = LabelStudio(base_url=fake.url, api_key=fake.legacy_token)
    assert refresh_mirror(client, labels, projects, str(PROJECT))["ls_requests"] == 2
    fake.annotate(4, 401, "ants")
    labels.add_hints(str(PROJECT), check=True)
    read = refresh_mirror(client, labels, projects, str(PROJECT), recent_page_size=2, slack=timedelta(0))
    assert read == {"reads": ["check"], "tasks_read": 2, "recheck": False, "ls_requests": 1}  # the new one, and one older
    assert 4 in {e.task_id for e in labels.examples(str(PROJECT), SPEC)[0]}


def test_annotations_created_in_bulk_are_confirmed_like_single_ones(pipeline, big_project, redis):
    fake, labels = big_project, LabelStore(redis)
    train(pipeline, created(fake, fake.task(1)["annotations"][0]))  # first contact
    bulk = [fake.annotate(task_id, 500 + task_id, fake.classes[task_id]) for task_id in (4, 5)]
    body = {"action": "ANNOTATIONS_CREATED", "annotation": bulk, "task": [fake.task(4), fake.task(5)],
            "project": {"id": PROJECT}}
    _, summary = train(pipeline, body)
    assert summary["labels_read"] == {"reads": ["hints"], "tasks_read": 2, "recheck": False, "ls_requests": 1}
    assert {4, 5} <= {e.task_id for e in labels.examples(str(PROJECT), SPEC)[0]}


def test_without_the_api_webhook_bodies_are_the_labels(client, redis):
    set_up(redis, PROJECT)
    body = {"action": "ANNOTATIONS_CREATED", "project": {"id": PROJECT, "label_config": CONFIG_2},
            "annotation": [created_body(1, "ants")["annotation"], created_body(2, "bees")["annotation"]],
            "task": [created_body(1, "ants")["task"], created_body(2, "bees")["task"]]}
    assert client.post("/webhook", json=body).json["status"] != "unchanged"
    repeated = client.post("/webhook", json=created_body(1, "ants"))
    assert repeated.json["status"] == "unchanged"  # the same event again: nothing to do
    assert [(e.task_id, e.choices) for e in LabelStore(redis).examples(str(PROJECT), SPEC)[0]] == [
        (1, ["ants"]), (2, ["bees"])]


def created_body(task_id: int, choice: str) -> dict:
    return annotation_event(project=PROJECT, task_id=task_id, annotation_id=100 + task_id,
                            url=f"/data/upload/{PROJECT}/{task_id}.jpg", choice=choice)
