"""Re-prediction from cached features: the task index, embedding chunks, one prediction per task and version,
yielding to trainings, and superseded versions (backend/loop/repredict.py, worker/jobs.py).

Label Studio's API is the local stand-in (tests/fake_label_studio.py); tests/e2e drives the real one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend.common import redis_keys
from backend.common.queues import EMBED_QUEUE, TRAIN_QUEUE, enqueue_index, queue
from backend.loop import repredict as repredict_module
from backend.loop.repredict import PredictionLedger, repredict, unlabeled_task_ids
from backend.loop.services import build_services
from backend.server.app import create_app
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images
from tests.loop_helpers import annotation_event, run_burst_worker, uploaded_hymenoptera_project, uploaded_task
from worker import jobs

PROJECT = 6


@pytest.fixture
def label_studio():
    fake = uploaded_hymenoptera_project(PROJECT, "val", 8)
    yield fake.start()
    fake.stop()


@pytest.fixture
def ls_services(settings, redis, encoders, label_studio):
    configured = settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
                                  repredict_unlabeled=True, train_min_interval_s=0)
    return build_services(configured, redis, encoders=encoders)


def _label(client, label_studio, task_ids: list[int]) -> None:
    """Annotate tasks through webhooks (and in the stand-in, so a resync agrees)."""
    for task in label_studio.tasks:
        if task["id"] in task_ids:
            annotation = {"id": 1000 + task["id"], "task": task["id"], "was_cancelled": False, "ground_truth": False,
                          "updated_at": "2026-12-01T12:00:00Z",
                          "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                      "value": {"choices": [task["class"]]}}]}
            task["annotations"], task["total_annotations"] = [annotation], 1
            event = annotation_event(project=PROJECT, task_id=task["id"], annotation_id=1000 + task["id"],
                                     url=task["data"]["image"], choice=task["class"])
            assert client.post("/webhook", json=event).status_code == 200


def _connected(ls_services, redis, label_studio):
    """/setup as Label Studio calls it on connecting: the project's tasks are indexed and embedded in chunks."""
    client = create_app(ls_services.settings, services=ls_services).test_client()
    assert client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG_2}).status_code == 200
    assert queue(EMBED_QUEUE, redis).count == 1  # the index job, queued at first contact
    run_burst_worker(ls_services.settings, redis, ls_services)
    assert ls_services.tasks.count(str(PROJECT)) == len(label_studio.tasks)
    return client


def test_first_contact_indexes_and_embeds_every_task_before_any_label(ls_services, redis, label_studio):
    _connected(ls_services, redis, label_studio)
    encoder = ls_services.encoders.get()
    items = [jobs.MediaItem(task["id"], task["data"]["image"]) for task in label_studio.tasks]
    assert all(vector is not None for vector in ls_services.features.cached(str(PROJECT), items, encoder))
    assert label_studio.imported_predictions == []  # nothing is served yet


def test_after_a_promotion_every_unlabeled_task_gets_exactly_one_prediction_of_the_version(
        ls_services, redis, label_studio):
    client = _connected(ls_services, redis, label_studio)
    labeled = [1, 2, 9, 10]  # two ants, two bees
    _label(client, label_studio, labeled)
    run_burst_worker(ls_services.settings, redis, ls_services)
    served = ls_services.predictor.served(str(PROJECT), CONFIG_2).model_version
    pushed = label_studio.imported_predictions
    unlabeled = [task["id"] for task in label_studio.tasks if task["id"] not in labeled]
    assert sorted(p["task"] for p in pushed) == unlabeled
    assert {p["model_version"] for p in pushed} == {served}
    # a second pass for the same version (a duplicate job, a retry) writes nothing more
    assert repredict(ls_services, str(PROJECT), served)["predictions"] == 0
    assert len(label_studio.imported_predictions) == len(unlabeled)


def test_two_passes_at_once_write_each_task_once_and_a_failed_write_is_retried(ls_services, redis, label_studio):
    """Two workers re-predicting the same version (the promotion's job and an embedding chunk's pass, or a
    retried job) claim tasks from the ledger: each task goes to one of them."""
    client = _connected(ls_services, redis, label_studio)
    _label(client, label_studio, [1, 2, 9, 10])
    jobs.train_project(ls_services, str(PROJECT))
    queue(EMBED_QUEUE, redis).empty()
    served = ls_services.predictor.served(str(PROJECT), CONFIG_2).model_version
    unlabeled = unlabeled_task_ids(ls_services, str(PROJECT))
    label_studio.fail_api_with = 503  # the first pass claims everything, then cannot write
    with pytest.raises(Exception):
        repredict(ls_services, str(PROJECT), served)
    label_studio.fail_api_with = None
    assert PredictionLedger(redis).unwritten(str(PROJECT), served, unlabeled) == unlabeled  # released
    with ThreadPoolExecutor(2) as pool:
        passes = list(pool.map(lambda _: repredict(ls_services, str(PROJECT), served), range(2)))
    assert sum(p["predictions"] for p in passes) == len(unlabeled)
    assert sorted(p["task"] for p in label_studio.imported_predictions) == unlabeled


def test_predict_leaves_a_task_to_the_pass_that_is_writing_it(ls_services, redis, label_studio, monkeypatch):
    """Label Studio's "Retrieve Predictions" asks for tasks it saw without the version's prediction; if a
    re-prediction pass is writing that prediction at that moment, or has just written it, /predict answers none
    for the task (an empty list: Label Studio saves nothing) instead of a second one."""
    client = _connected(ls_services, redis, label_studio)
    _label(client, label_studio, [1, 2, 9, 10])
    jobs.train_project(ls_services, str(PROJECT))
    served = ls_services.predictor.served(str(PROJECT), CONFIG_2).model_version
    ledger = PredictionLedger(redis)
    assert ledger.claim(str(PROJECT), served, [3]) == [3]  # a pass took task 3 and has not written it yet

    def ask():
        return client.post("/predict", json={"project": f"{PROJECT}.1", "label_config": CONFIG_2,
                                             "tasks": [label_studio.tasks[2], label_studio.tasks[3]]}).get_json()
    held, other = ask()["results"]
    assert held == [] and other["result"] and other["model_version"] == served
    ledger.written(str(PROJECT), served, [3])
    # just written: Label Studio may have chosen to ask before it saw the write, so still none (a second would stay)
    assert ask()["results"][0] == []
    monkeypatch.setattr(repredict_module, "JUST_WRITTEN_HOLD_S", 0.5)
    time.sleep(0.6)
    assert ask()["results"][0]["result"]  # long written: Label Studio asking again (it lost it) gets it


def test_a_task_answered_by_predict_is_not_written_again_for_that_version(ls_services, redis, label_studio):
    client = _connected(ls_services, redis, label_studio)
    _label(client, label_studio, [1, 2, 9, 10])
    jobs_before = queue(TRAIN_QUEUE, redis).count
    assert jobs_before == 1
    # train only (the re-prediction job it queues is dropped), then answer /predict for task 3 the way
    # Label Studio does before it saves the answer as a prediction
    jobs.train_project(ls_services, str(PROJECT))
    queue(EMBED_QUEUE, redis).empty()
    queue(TRAIN_QUEUE, redis).empty()
    answer = client.post("/predict", json={"project": f"{PROJECT}.1", "label_config": CONFIG_2,
                                           "tasks": [label_studio.tasks[2]]}).get_json()["results"][0]
    assert answer["result"]
    repredict(ls_services, str(PROJECT), answer["model_version"])
    assert 3 not in {p["task"] for p in label_studio.imported_predictions}
    assert len(label_studio.imported_predictions) == len(label_studio.tasks) - 4 - 1


def test_re_prediction_yields_to_a_waiting_training_and_a_newer_version_supersedes_it(
        ls_services, redis, label_studio, monkeypatch):
    from backend.loop import repredict as module

    client = _connected(ls_services, redis, label_studio)
    _label(client, label_studio, [1, 2, 9, 10])
    jobs.train_project(ls_services, str(PROJECT))
    queue(EMBED_QUEUE, redis).empty()
    version = ls_services.predictor.served(str(PROJECT), CONFIG_2).model_version
    monkeypatch.setattr(module, "WRITE_BATCH", 3)
    summary = repredict(ls_services, str(PROJECT), version, should_yield=lambda: True)
    assert summary["predictions"] == 3 and len(summary["remaining"]) == len(unlabeled_task_ids(
        ls_services, str(PROJECT))) - 3
    # a newer promotion makes the rest of the older pass a no-op
    _label(client, label_studio, [3, 11])
    jobs.train_project(ls_services, str(PROJECT))
    assert ls_services.predictor.served(str(PROJECT), CONFIG_2).model_version != version
    assert repredict(ls_services, str(PROJECT), version, summary["remaining"])["status"].startswith("skipped")


def test_new_tasks_are_read_back_by_id_embedded_and_predicted(ls_services, redis, label_studio):
    client = _connected(ls_services, redis, label_studio)
    _label(client, label_studio, [1, 2, 9, 10])
    run_burst_worker(ls_services.settings, redis, ls_services)
    before = len(label_studio.imported_predictions)
    source = label_studio.tasks[4]
    name = source["data"]["image"].rsplit("/", 1)[1]
    label_studio.tasks.append({**uploaded_task(PROJECT, 99, name), "class": source["class"]})
    enqueue_index(redis, ls_services.settings, str(PROJECT), [99])
    run_burst_worker(ls_services.settings, redis, ls_services)
    assert ls_services.tasks.count(str(PROJECT)) == len(label_studio.tasks)
    new = [p for p in label_studio.imported_predictions[before:]]
    assert [p["task"] for p in new] == [99]
    assert PredictionLedger(redis).unwritten(str(PROJECT), new[0]["model_version"], [99]) == []


def test_tasks_created_and_deleted_webhooks_keep_the_index_current_without_trusting_the_body(
        ls_services, redis, label_studio):
    client = _connected(ls_services, redis, label_studio)
    source = label_studio.tasks[5]
    name = source["data"]["image"].rsplit("/", 1)[1]
    label_studio.tasks.append({**uploaded_task(PROJECT, 77, name), "class": source["class"]})
    forged = {"id": 78, "data": {"image": "http://169.254.169.254/latest/meta-data"}, "project": PROJECT}
    body = {"action": "TASKS_CREATED", "project": {"id": PROJECT}, "tasks": [{"id": 77, "data": {}}, forged]}
    assert client.post("/webhook", json=body).get_json()["status"] == "queued"
    run_burst_worker(ls_services.settings, redis, ls_services)
    indexed = ls_services.tasks.data(str(PROJECT))
    assert 77 in indexed and indexed[77] == source["data"]  # what Label Studio has, not what the body said
    assert 78 not in indexed  # Label Studio has no task 78: nothing of the forged body is kept
    body = {"action": "TASKS_DELETED", "project": {"id": PROJECT}, "tasks": [{"id": 77}, {"id": 3}]}
    assert client.post("/webhook", json=body).get_json()["status"] == "queued"  # forged: both still exist
    run_burst_worker(ls_services.settings, redis, ls_services)
    assert {3, 77} <= set(ls_services.tasks.data(str(PROJECT)))  # a hint, confirmed against Label Studio: kept
    label_studio.delete_task(77)
    assert client.post("/webhook", json=body).get_json()["status"] == "queued"
    run_burst_worker(ls_services.settings, redis, ls_services)
    indexed = ls_services.tasks.data(str(PROJECT))
    assert 77 not in indexed and 3 in indexed
    unknown = {"action": "TASKS_CREATED", "project": {"id": 999}, "tasks": [{"id": 1}]}
    assert client.post("/webhook", json=unknown).get_json()["status"].startswith("ignored")


def test_embedding_chunks_write_their_predictions_together_not_one_request_each(
        ls_services, redis, label_studio, monkeypatch):
    """Label Studio's import recounts every task of the project per request, so chunks do not each send theirs:
    a chunk writes what the chunks since the last pass embedded only once REPREDICT_MIN_INTERVAL_S has passed since
    that pass started (here it has not: the promotion's pass just ran), and the last chunk writes the rest."""
    services = build_services(ls_services.settings.replace(repredict_min_interval_s=60), redis,
                              encoders=ls_services.encoders)
    client = _connected(services, redis, label_studio)
    _label(client, label_studio, [1, 2, 9, 10])
    run_burst_worker(services.settings, redis, services)  # trains, and pre-labels the 12 unlabeled tasks at once
    version = services.predictor.served(str(PROJECT), CONFIG_2).model_version
    assert len(label_studio.imported_predictions) == 12
    new_ids = list(range(101, 113))
    unseen = dataset_images(HYMENOPTERA, "train")[:len(new_ids)]  # never embedded: the fixture's are from val
    for task_id, (path, cls) in zip(new_ids, unseen):
        label_studio.files[f"upload/{PROJECT}/{task_id}-{path.name}"] = path.read_bytes()
        label_studio.tasks.append({**uploaded_task(PROJECT, task_id, f"{task_id}-{path.name}"), "class": cls})
    monkeypatch.setattr(jobs, "EMBED_CHUNK", 2)  # 6 chunks
    label_studio.api_requests.clear()
    enqueue_index(redis, services.settings, str(PROJECT), new_ids)
    run_burst_worker(services.settings, redis, services)
    imports = [call for call in label_studio.api_requests if call.endswith("/import/predictions")]
    written = [p["task"] for p in label_studio.imported_predictions[12:]]
    assert sorted(written) == new_ids and all(
        p["model_version"] == version for p in label_studio.imported_predictions[12:])
    assert len(imports) == 1  # the last chunk's: the project's embedding is done


def test_promotions_in_quick_succession_share_one_prediction_pass_with_the_newest_version(
        ls_services, redis, label_studio):
    """While annotators label, versions come every few seconds; each pass imports every unlabeled task's prediction.
    A pass runs at most every REPREDICT_MIN_INTERVAL_S; promotions in between wait for one scheduled pass, which
    writes the version served when it starts."""
    from rq.registry import ScheduledJobRegistry

    from worker.process import build_worker

    services = build_services(ls_services.settings.replace(repredict_min_interval_s=2), redis,
                              encoders=ls_services.encoders)
    client = _connected(services, redis, label_studio)
    _label(client, label_studio, [1, 2, 9, 10])
    run_burst_worker(services.settings, redis, services)  # the first promotion: its pass runs at once
    first = services.predictor.served(str(PROJECT), CONFIG_2).model_version
    assert {p["model_version"] for p in label_studio.imported_predictions} == {first}
    scheduled = ScheduledJobRegistry(queue=queue(EMBED_QUEUE, redis))
    versions = []
    for task in (3, 11):  # two more promotions within the interval
        _label(client, label_studio, [task])
        jobs.train_project(services, str(PROJECT))
        versions.append(services.predictor.served(str(PROJECT), CONFIG_2).model_version)
    assert len(set(versions)) == 2 and first not in versions
    waiting = [job.func_name for job in queue(EMBED_QUEUE, redis).jobs]  # the audit of the labels, say
    assert scheduled.count == 1 and "worker.jobs.predict_unlabeled" not in waiting  # one pass, waiting its turn
    before = len(label_studio.imported_predictions)
    time.sleep(2.2)
    build_worker(services.settings, redis, services=services).work(burst=True, with_scheduler=True)
    newest = label_studio.imported_predictions[before:]
    assert {p["model_version"] for p in newest} == {versions[-1]}  # the newest version, not the one in between
    assert sorted(p["task"] for p in newest) == unlabeled_task_ids(services, str(PROJECT))


def test_an_embedding_chunk_leaves_the_rest_of_its_tasks_to_a_new_chunk_when_a_training_waits(
        ls_services, redis, label_studio, monkeypatch):
    """A training never waits behind a whole chunk: between every EMBED_YIELD_TASKS tasks the chunk looks at the
    training queue, and when a training waits it queues the rest as a new chunk and ends."""
    _connected(ls_services, redis, label_studio)
    new_ids = list(range(201, 213))
    unseen = dataset_images(HYMENOPTERA, "train")[:len(new_ids)]  # never embedded: the fixture's are from val
    for task_id, (path, cls) in zip(new_ids, unseen):
        label_studio.files[f"upload/{PROJECT}/{task_id}-{path.name}"] = path.read_bytes()
        label_studio.tasks.append({**uploaded_task(PROJECT, task_id, f"{task_id}-{path.name}"), "class": cls})
    ls_services.tasks.put_many(str(PROJECT), [task for task in label_studio.tasks if task["id"] in new_ids])
    monkeypatch.setattr(jobs, "EMBED_YIELD_TASKS", 4)
    encoder = ls_services.encoders.get()
    items = [jobs.MediaItem(task["id"], task["data"]["image"]) for task in label_studio.tasks if task["id"] in new_ids]

    ls_services.scheduler.request(str(PROJECT), reason="a submit")  # a training waits in the queue
    outcome = jobs.embed_chunk(ls_services, str(PROJECT), new_ids)
    assert (outcome["tasks"], outcome["deferred"]) == (4, 8)
    cached = ls_services.features.cached(str(PROJECT), items, encoder)
    assert [vector is not None for vector in cached] == [True] * 4 + [False] * 8
    (rest,) = queue(EMBED_QUEUE, redis).jobs
    assert rest.func_name == "worker.jobs.embed_chunk" and list(rest.args) == [str(PROJECT), new_ids[4:]]
    queue(TRAIN_QUEUE, redis).empty()  # the training has run: the rest of the chunk goes on
    redis.delete(f"headstart:train:{PROJECT}:queued")
    run_burst_worker(ls_services.settings, redis, ls_services)
    assert all(vector is not None for vector in ls_services.features.cached(str(PROJECT), items, encoder))
    assert queue(EMBED_QUEUE, redis).count == 0


def test_a_claim_marks_its_tasks_as_being_written_in_the_same_step(redis):
    """`claim` adds each task to the version's ledger and, for those it took, to the being-written set in one
    atomic script: a `/predict` between the two (it used to be two round trips) would have answered a task the
    pass was about to write, leaving Label Studio with two predictions of the version."""
    ledger = PredictionLedger(redis)
    assert ledger.claim("7", "label-v3", [5, 6]) == [5, 6]
    assert ledger.claim("7", "label-v3", [6, 8]) == [8]  # 6 is the first pass's
    assert {int(task) for task in redis.smembers(redis_keys.predicting("7", "label-v3"))} == {5, 6, 8}
    assert ledger.answer("7", "label-v3", [5, 6, 8, 9]) == {5, 6, 8}  # being written: held back; 9 is /predict's
    assert 0 < redis.ttl(redis_keys.predicting("7", "label-v3")) <= repredict_module.WRITING_TTL_S
    ledger.written("7", "label-v3", [5])
    ledger.release("7", "label-v3", [6])
    assert ledger.unwritten("7", "label-v3", [5, 6, 8, 9]) == [6]
