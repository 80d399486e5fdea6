"""What headstart reads from a real Label Studio 1.23.2, and how little.

1. `only_annotated=true` is ignored by 1.23.2's task list; the Data Manager queries headstart uses
   (`backend/labelstudio/label_reads.py`) really filter: annotated tasks only, tasks by id, newest
   `updated_at` first, with totals of every annotated task.
2. What a training reads, in Label Studio API requests, measured against the real Label Studio:
   first contact, one new annotation, START_TRAINING with nothing changed, missed webhooks, a
   deleted task, a changed labeling config; the project's unlabeled tasks never count.
3. The same through the running backend and worker: the `ls_requests` of real trainings' summaries.
"""

from __future__ import annotations

import json
import shutil
from urllib.parse import quote

import pytest
from label_studio_sdk.client import LabelStudio
from redis import Redis
from rq import Queue
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from backend.common.queues import EMBED_QUEUE, QUEUE_REFRESH_JOB, TRAIN_JOB, TRAIN_QUEUE
from backend.labelstudio.label_mirror import LabelStore, annotation_record
from backend.labelstudio.label_reads import LabelReader, updated_at
from backend.labelstudio.labeling_config import parse_label_config
from backend.labelstudio.projects import ProjectRegistry
from backend.labelstudio.sync import refresh_mirror
from tests.e2e.processes import wait_until
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images

pytestmark = pytest.mark.e2e

UNLABELED = 60  # tasks nobody labels; no read may grow with them
SPEC = parse_label_config(CONFIG_2)[0]
CONFIG_3 = CONFIG_2.replace('<Choice value="bees"/>', '<Choice value="bees"/><Choice value="wasps"/>')
MIRROR_DB = 5  # the in-process mirror's Redis database (the backend pairs use 0 and 1)


def choice(annotation: dict) -> list[str]:
    return annotation["result"][0]["value"]["choices"] if annotation["result"] else []


@pytest.fixture(scope="module")
def project(ls_api) -> dict:
    """A project of UNLABELED + 6 tasks (no media needed: nothing is embedded here); 4 annotated, 1 only skipped."""
    project = ls_api.create_project("headstart e2e sync reads", CONFIG_2)["id"]
    ls_api.post(f"/api/projects/{project}/import",
                [{"image": f"/data/local-files/?d=none/{i}.jpg"} for i in range(UNLABELED + 6)])
    tasks = sorted(task["id"] for task in ls_api.tasks(project))
    assert len(tasks) == UNLABELED + 6
    annotations = {task: ls_api.annotate(task, "label", "image", label)["id"]
                   for task, label in zip(tasks[:4], ("ants", "bees", "ants", "bees"))}
    ls_api.post(f"/api/tasks/{tasks[4]}/annotations", {"result": [], "was_cancelled": True})  # skipped
    return {"id": project, "tasks": tasks, "annotations": annotations}


@pytest.fixture(scope="module")
def sdk(label_studio) -> LabelStudio:
    return LabelStudio(base_url=label_studio.url, api_key=label_studio.credentials.legacy_token)


def test_only_annotated_is_ignored_and_the_data_manager_filters_are_not(ls_api, sdk, project):
    p, tasks, annotations = project["id"], project["tasks"], project["annotations"]
    ignored = ls_api.get(f"/api/tasks?project={p}&only_annotated=true&page_size=1")
    assert ignored["total"] == UNLABELED + 6, "only_annotated filters now: update label_reads.py's docstring"

    reader = LabelReader(sdk, str(p))
    annotated, totals = reader.annotated_tasks()
    assert sorted(task["id"] for task in annotated) == sorted(annotations)  # not the skipped one, no unlabeled
    assert (totals.tasks, totals.annotations) == (4, 4) and reader.requests == 1
    assert all(task["data"]["image"].startswith("/data/local-files/?d=none/") for task in annotated)
    listed = {a["id"]: a for task in annotated for a in task["annotations"]}
    assert set(listed) == set(annotations.values())
    created = ls_api.get(f"/api/annotations/{annotations[tasks[0]]}")  # the serializer webhooks use too
    assert listed[created["id"]]["updated_at"] == created["updated_at"]  # a repeated webhook is recognised

    by_id = reader.tasks_by_id([tasks[1], tasks[4], tasks[10], 999_999])
    assert [task["id"] for task in by_id] == [tasks[1]] and reader.requests == 2  # annotated, in the project
    selected = ls_api.get(f"/api/tasks?project={p}&page_size=50&query=" + _query(
        {"selectedItems": {"all": False, "included": [tasks[10], tasks[11]]}}))
    assert sorted(task["id"] for task in selected["tasks"]) == [tasks[10], tasks[11]]

    ls_api.change_annotation(annotations[tasks[2]], "label", "image", "bees")
    newest, _ = reader.recently_updated(None, page_size=2)
    assert newest[0]["id"] == tasks[2] and updated_at(newest[0]) >= updated_at(newest[1])
    ls_api.change_annotation(annotations[tasks[2]], "label", "image", "ants")


def test_what_each_training_reads_from_a_real_label_studio(ls_api, sdk, project, e2e_redis):
    p, tasks = project["id"], project["tasks"]
    redis = Redis.from_url(f"redis://127.0.0.1:{e2e_redis.port}/{MIRROR_DB}")
    redis.flushdb()
    labels, projects, key = LabelStore(redis), ProjectRegistry(redis), str(p)

    def examples() -> dict[int, list[str]]:
        return {e.task_id: e.choices for e in labels.examples(key, SPEC)[0]}

    measured = {}
    read = measured["first contact"] = refresh_mirror(sdk, labels, projects, key)
    assert (read["reads"], read["tasks_read"], read["ls_requests"]) == (["full"], 4, 2)
    assert examples() == {tasks[0]: ["ants"], tasks[1]: ["bees"], tasks[2]: ["ants"], tasks[3]: ["bees"]}

    fresh = ls_api.annotate(tasks[5], "label", "image", "ants")
    labels.add_hints(key, tasks=[tasks[5]])  # what its ANNOTATION_CREATED leaves
    read = measured["one new annotation"] = refresh_mirror(sdk, labels, projects, key)
    assert (read["reads"], read["tasks_read"], read["ls_requests"]) == (["hints"], 1, 1)
    assert labels.is_confirmed(key, fresh["id"], annotation_record(fresh, {})) and examples()[tasks[5]] == ["ants"]

    labels.add_hints(key, check=True)  # START_TRAINING
    read = measured["START_TRAINING, nothing changed"] = refresh_mirror(sdk, labels, projects, key)
    assert (read["reads"], read["ls_requests"]) == (["check"], 1) and read["tasks_read"] <= 5

    ls_api.change_annotation(project["annotations"][tasks[1]], "label", "image", "ants")  # no webhook
    labels.add_hints(key, check=True)
    read = measured["START_TRAINING after a missed update"] = refresh_mirror(sdk, labels, projects, key)
    assert (read["reads"], read["ls_requests"]) == (["check"], 1) and examples()[tasks[1]] == ["ants"]

    ls_api.delete_annotation(project["annotations"][tasks[3]])  # no webhook either
    labels.add_hints(key, check=True)
    read = measured["START_TRAINING after a missed deletion"] = refresh_mirror(sdk, labels, projects, key)
    # the full read confirms by id the label its list left out (deleted here)
    assert (read["reads"], read["ls_requests"]) == (["check", "full"], 4) and tasks[3] not in examples()

    labels.add_hints(key, tasks=[tasks[0]])  # hinted, then deleted before the training confirms it
    ls_api.delete(f"/api/tasks/{tasks[0]}/")
    read = measured["a hinted task deleted meanwhile"] = refresh_mirror(sdk, labels, projects, key)
    assert (read["reads"], read["tasks_read"], read["ls_requests"]) == (["hints"], 0, 1)
    assert tasks[0] not in examples() and labels.counts(key) == (3, 3)

    ls_api.patch(f"/api/projects/{p}", {"label_config": CONFIG_3})
    projects.remember(key, CONFIG_3)  # what the next /setup or webhook records
    read = measured["labeling config changed"] = refresh_mirror(sdk, labels, projects, key)
    assert (read["reads"], read["ls_requests"]) == (["full"], 2)
    redis.close()
    print(f"\nLabel Studio API requests per training ({len(tasks)} tasks, {labels.counts(key)[0]} labeled): "
          + "; ".join(f"{what} {read['ls_requests']} ({'+'.join(read['reads'])}, {read['tasks_read']} tasks)"
                      for what, read in measured.items()))


def test_a_label_whose_count_label_studio_lost_is_read_when_announced(ls_api, sdk, label_studio, project,
                                                                       e2e_redis):
    """Label Studio 1.23.2's prediction import writes back task counters it read before an annotation saved meanwhile
    (`tasks/functions.py`, `update_tasks_counters`): the task then counts 0 annotations while it holds one, until
    an import recounts it. Against this Label Studio with 5,000 tasks, 1 of 10 annotations saved during imports
    came out so (`bench loop --text`: that label waited 49 s). The race is timing; this test makes its outcome
    directly in Label Studio's database and reads the task as a training does after the label's webhook."""
    p, tasks = project["id"], project["tasks"]
    redis = Redis.from_url(f"redis://127.0.0.1:{e2e_redis.port}/{MIRROR_DB}")
    redis.flushdb()
    labels, projects, key = LabelStore(redis), ProjectRegistry(redis), str(p)
    refresh_mirror(sdk, labels, projects, key)  # first contact
    task = tasks[6]
    fresh = ls_api.annotate(task, "label", "image", "bees")
    label_studio.run_in_django("from tasks.models import Task\n"
                               "Task.objects.filter(id=int(sys.argv[1])).update(total_annotations=0)\n", str(task))
    reader = LabelReader(sdk, str(p))
    assert task not in {t["id"] for t in reader.annotated_tasks()[0]}  # the counter's filter misses it
    assert [t["id"] for t in reader.tasks_by_id([task, tasks[4], tasks[10]])] == [task]  # not skipped, unlabeled

    labels.add_hints(key, tasks=[task])  # what its ANNOTATION_CREATED leaves
    read = refresh_mirror(sdk, labels, projects, key)
    assert read["reads"] == ["hints"] and read["tasks_read"] == 1
    assert labels.is_confirmed(key, fresh["id"], annotation_record(fresh, {}))
    assert {e.task_id: e.choices for e in labels.examples(key, SPEC)[0]}[task] == ["bees"]

    labels.mark_stale(key)  # a full read while the count is still lost (Redis lost hints, a disagreeing check)
    read = refresh_mirror(sdk, labels, projects, key)
    assert read["reads"] == ["full"] and read["ls_requests"] == 3  # config, the list, the unlisted label by id
    assert {e.task_id: e.choices for e in labels.examples(key, SPEC)[0]}[task] == ["bees"]
    redis.close()


def test_real_trainings_report_their_label_studio_requests(ls_api, headstart, documents_root):
    """Through `headstart serve` + `headstart worker`: each training's summary counts its API requests."""
    folder = documents_root / "sync-reads"
    folder.mkdir(exist_ok=True)
    picked = [item for cls in ("ants", "bees") for item in
              [i for i in dataset_images(HYMENOPTERA, "train") if i[1] == cls][-3:]]  # not in the loop's pool
    for path, _ in picked:
        shutil.copyfile(path, folder / path.name)
    project = ls_api.create_project("headstart e2e sync reads (trainings)", CONFIG_2)["id"]
    ls_api.add_local_storage(project, folder)
    ls_api.post(f"/api/projects/{project}/import",
                [{"image": f"/data/local-files/?d=none/{i}.jpg"} for i in range(UNLABELED)])
    labels = {path.name: label for path, label in picked}
    images = {task["id"]: labels[task["data"]["image"].rsplit("/", 1)[-1]] for task in ls_api.tasks(project)
              if task["data"]["image"].startswith("/data/local-files/?d=sync-reads/")}
    backend = ls_api.connect_backend(project, headstart.url)
    todo = sorted(images)

    def trainings() -> list[dict]:
        redis = Redis.from_url(headstart.redis_url)
        try:
            queue = Queue(TRAIN_QUEUE, connection=redis, serializer=JSONSerializer)
            jobs = [queue.fetch_job(i) for i in FinishedJobRegistry(queue=queue).get_job_ids()]
            done = [job for job in jobs if job is not None and job.func_name == TRAIN_JOB and job.args == [str(project)]]
            return [job.return_value() for job in sorted(done, key=lambda job: job.ended_at)
                    if (job.return_value() or {}).get("labels_read")]
        finally:
            redis.close()

    def re_rankings() -> list[dict]:
        redis = Redis.from_url(headstart.redis_url)
        try:
            queue = Queue(EMBED_QUEUE, connection=redis, serializer=JSONSerializer)
            jobs = [queue.fetch_job(i) for i in FinishedJobRegistry(queue=queue).get_job_ids()]
            return [job.return_value() or {} for job in jobs
                    if job is not None and job.func_name == QUEUE_REFRESH_JOB and job.args == [str(project)]]
        finally:
            redis.close()

    def next_training(count: int) -> dict:
        return wait_until(lambda: len(trainings()) > count and trainings()[-1], timeout_s=180,
                          what=f"training {count + 1} of project {project}", processes=headstart.processes)

    ls_api.annotate(todo[0], "label", "image", images[todo[0]])
    first = next_training(0)
    ls_api.annotate(todo[1], "label", "image", images[todo[1]])
    hinted = next_training(1)
    ls_api.start_training(backend["id"])
    checked = next_training(2)
    refreshes = wait_until(re_rankings, timeout_s=120, what=f"a re-ranking of project {project}'s queue",
                           processes=headstart.processes)  # active learning re-ranks in its own jobs
    print(f"\ntrainings through the backend and worker ({len(images) + UNLABELED} tasks): first contact "
          f"{first['ls_requests']} requests ({first['labels_read']['reads']}), one new annotation "
          f"{hinted['ls_requests']} ({hinted['labels_read']['reads']}), Start Training {checked['ls_requests']} "
          f"({checked['labels_read']['reads']}); re-rankings of the queue meanwhile: "
          f"{[r.get('ls_requests') for r in refreshes]} requests")
    assert first["labels_read"]["reads"] == ["full"] and first["ls_requests"] == 3  # + model versions, once
    assert hinted["labels_read"]["reads"] == ["hints"] and hinted["ls_requests"] == 1
    assert checked["labels_read"]["reads"] == ["check"] and checked["ls_requests"] == 1
    assert refreshes and all(r.get("ls_requests", 0) <= 5 for r in refreshes)  # not growing with N


def _query(query: dict) -> str:
    return quote(json.dumps(query))
