"""`loop`: the labeling loop at real project sizes, against a real Label Studio 1.23.2.

N tasks of distinct real images (bench.loop_images) are imported into a Label Studio project served
as local files (LOCAL_FILES_SERVING_ENABLED, LOCAL_FILES_DOCUMENT_ROOT: the end-to-end suite's
setup, bench.label_studio). With `--text`, N distinct bbc-news articles (bench.loop_texts) held in
the tasks themselves, a `<Text>` project served by all-MiniLM-L6-v2 (the offline copy, TEXT_ENCODER);
its results go to loop-text.json. headstart runs as `headstart up` runs it: `headstart serve` (gunicorn,
default settings) and UP_WORKERS (2) `headstart worker`s, on a redis-server of the benchmark's own. Both reach
Label Studio through a counting proxy (bench.ls_proxy), one port per process, so every API request
headstart makes is counted; Label Studio's webhooks and ML calls go to headstart directly.

Phases, in one run:
1. the first full embedding pass of the project (`headstart embed`'s job, enqueued through
   backend.admin.actions.embed) with one worker, then on a fresh Redis with two: the speedup;
2. the project connected to headstart as its ML backend; 3 simulated annotators (bench.annotators)
   label at a human pace, with one mistake, its relabel and a delete; each action is matched with the
   first served version trained on it (the store's version records: `trained_on`, `promoted_at`);
3. the queues drain; one more label; from its version's promotion until Label Studio holds that
   version's prediction for every unlabeled task (`/api/projects/ID/model-versions/` polled, then
   every task checked).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import redis as redis_lib

from backend.admin import actions as admin_actions
from backend.common.settings import Settings
from backend.core.store import ModelStore
from backend.labelstudio.projects import ProjectRegistry
from backend.loop.services import build_services
from bench import loop_measure as measure, loop_report as report, loop_texts
from bench.annotators import Action, Annotators, Script, choice
from bench.data import label_config
from bench.harness import REPO, RESULTS_DIR, load_average, machine, rounded
from bench.label_studio import LabelStudioServer, ensure_installed
from bench.loop_images import classes as image_classes, write_images
from bench.resources import offline_text_model
from bench.ls_api import LabelStudioApi
from bench.ls_proxy import CountingProxy
from bench.stack import Stack

CONTROL = "label"
IMAGES_DIR = "loop"
POLL_S = 0.5
FINAL_TRIES = 3
SLOW_ACTION_S = 15.0  # an action served later than this after its submit keeps the run's logs (`keep_logs_because`)


@dataclass(frozen=True)
class Params:
    tasks: int
    label_seconds: float        # how long the annotators label
    settle_timeout_s: float     # after labeling, the most the queues get to drain
    final_timeout_s: float      # the final label until its version is served, and until it is everywhere
    embed_timeout_s: float      # one full embedding pass


FULL = Params(tasks=5000, label_seconds=300, settle_timeout_s=600, final_timeout_s=600, embed_timeout_s=900)
QUICK = Params(tasks=1000, label_seconds=120, settle_timeout_s=240, final_timeout_s=300, embed_timeout_s=300)
ANNOTATORS = 3
PACE_S = (2.0, 4.0)


def params_for(*, quick: bool, tasks: int | None) -> Params:
    """QUICK (N = 1,000) or FULL (N = 5,000); `tasks` makes a smoke-sized run of either."""
    base = QUICK if quick else FULL
    if tasks is None:
        return base
    return replace(base, tasks=tasks, label_seconds=min(base.label_seconds, max(20.0, tasks / 3)),
                   settle_timeout_s=120, final_timeout_s=120)


class LoopStack(Stack):
    """`headstart serve` (optional) and `workers` × `headstart worker` on a redis-server of their own; the
    workers may get environment of their own (their own proxy port). Logs stay in `log_dir`."""

    def __init__(self, *, env: dict[str, str], workers: int, serve: bool, log_dir: Path,
                 worker_env: dict[str, str] | None = None):
        super().__init__(env=env, worker=workers > 0)
        self.workers = workers
        self.serve = serve
        self.log_dir = log_dir
        self.worker_env = worker_env or {}

    def start(self) -> None:
        self.redis_server.start()
        self.redis = redis_lib.Redis.from_url(self.redis_server.url)
        (self.workdir / "media").mkdir()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.serve:
            self._spawn_with("serve", ["serve", "--host", "127.0.0.1", "--port", str(self.port)], {})
        for number in range(1, self.workers + 1):
            self._spawn_with(f"worker-{number}", ["worker", "--name", f"bench-worker-{number}"], self.worker_env)
        if self.serve:
            self._wait_until(self._server_ready, "headstart serve did not answer /health")
        self._wait_until(self._workers_ready, f"{self.workers} headstart worker(s) did not register in Redis")

    def _spawn_with(self, name: str, args: list[str], extra: dict[str, str]) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "backend.cli", *args], cwd=REPO, env={**self.env(), **extra}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def _workers_ready(self) -> bool:
        return sum(1 for key in self.redis.keys("rq:worker:*")
                   if self.redis.type(key) == b"hash" and self.redis.hget(key, "headstart")) >= self.workers

    def worker_cpu_s(self) -> float | None:
        """CPU seconds the workers and their reaped work horses (RQ forks one per job) have used so far."""
        try:
            total = 0
            for name, process in self.processes.items():
                if name.startswith("worker"):
                    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
            return total / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None  # not Linux

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@dataclass
class Project:
    """The Label Studio side: the server, an admin client, the project and its tasks' true classes."""
    server: LabelStudioServer
    api: LabelStudioApi
    id: int
    config: str
    classes: list[str]
    truth: dict[int, str]           # task id → true class, in import order
    documents: Path
    object_name: str = "image"      # the object tag the choices are about: "image", or "text" (`--text`)

    def client(self) -> LabelStudioApi:
        return LabelStudioApi(self.server.url, self.server.credentials.legacy_token)

    def headstart_env(self, label_studio_url: str) -> dict[str, str]:
        """`headstart up`'s defaults, pointed at this Label Studio (through `label_studio_url`). Every version keeps
        its per-label detail: the measurement reads each served version's `trained_on` after the run."""
        env = {"LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": self.server.credentials.legacy_token,
               "LOCAL_FILES_DOCUMENT_ROOT": str(self.documents), "REPREDICT_UNLABELED": "true",
               "LOG_LEVEL": "INFO", "VERSION_DETAIL_KEEP": "1000000", "REJECTED_VERSIONS_KEEP": "1000000"}
        if self.object_name == "text":
            env.update({"TEXT_ENCODER": offline_text_model(), "HF_HUB_OFFLINE": "1"})
        return env


def keep_logs_because(details: dict) -> str:
    """Why this run's logs are worth keeping ("" when they are not): actions never served, or one served later
    than SLOW_ACTION_S after its submit (an outlier a p95 hides)."""
    if details["unserved_actions"]:
        return "actions never served"
    slowest = details.get("submit_to_version_max_s")
    if slowest is not None and slowest > SLOW_ACTION_S:
        return f"an action waited {slowest:g} s for its version (over SLOW_ACTION_S = {SLOW_ACTION_S:g} s)"
    return ""


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR, tasks: int | None = None,
        text: bool = False) -> dict:
    params = params_for(quick=quick, tasks=tasks)
    started, load_before = time.time(), load_average()
    root = Path(tempfile.mkdtemp(prefix="headstart-bench-loop-"))
    kind = "texts" if text else "images"
    print(f"loop: {params.tasks} tasks ({kind}), {params.label_seconds:g} s of labeling; work directory {root}",
          flush=True)
    try:
        with contextlib.ExitStack() as cleanup:
            project = (_text_project if text else _project)(root, params, cleanup)
            proxy = CountingProxy(project.server.url)
            cleanup.callback(proxy.stop)
            embed = {workers: _embed_pass(project, proxy, root, workers, params) for workers in (1, 2)}
            loop = _labeling(project, proxy, root, params)
        section = report.summarize(tasks=params.tasks, label_seconds=params.label_seconds,
                                   settle_timeout_s=params.settle_timeout_s, annotators=ANNOTATORS, pace_s=PACE_S,
                                   embed=embed, run=loop, media=kind)
    except BaseException:
        print(f"loop: failed; logs kept in {root / 'logs'}", file=sys.stderr, flush=True)
        raise
    section.update(code=_code(), machine=machine(), load_average_before=load_before, load_average_after=load_average(),
                   started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                   wall_s=round(time.time() - started, 1))
    name = report.TEXT_NAME if text else report.NAME
    record = report.write_record(section, quick=quick, results_dir=results_dir, name=name)
    report.plot(section, loop, results_dir / f"{name}-{params.tasks}.png")  # a measured run at either size
    report.print_summary(section)
    why = keep_logs_because(section["details"])
    if why:  # keep what tells why (the workers' and backend's logs)
        logs = results_dir / f"{name}-{params.tasks}-logs"
        shutil.rmtree(logs, ignore_errors=True)
        shutil.copytree(root / "logs", logs, dirs_exist_ok=True)
        print(f"loop: {why}; logs kept in {logs}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return record


# --- phases ---------------------------------------------------------------------------------------

def _project(root: Path, params: Params, cleanup: contextlib.ExitStack) -> Project:
    documents = root / "documents"
    began = time.perf_counter()
    images = write_images(documents / IMAGES_DIR, params.tasks)
    print(f"  {len(images)} images written in {time.perf_counter() - began:.0f} s; starting Label Studio", flush=True)
    server, api = _start_label_studio(root, documents, cleanup)
    classes = image_classes()
    config = label_config(classes)
    project = api.create_project("headstart bench loop", config)["id"]
    # a local-files storage over the images lets Label Studio serve them; the tasks are imported in one request
    api.post("/api/storages/localfiles", {"project": project, "path": str(documents / IMAGES_DIR),
                                          "use_blob_urls": True, "title": "bench images"})
    url_of = {image.file_name: f"/data/local-files/?d={IMAGES_DIR}/{image.file_name}" for image in images}
    api.post(f"/api/projects/{project}/import", [{"image": url} for url in url_of.values()])
    label_of = {url_of[image.file_name]: image.label for image in images}
    truth = {task["id"]: label_of[task["data"]["image"]]
             for task in sorted(api.tasks(project), key=lambda task: task["id"])}
    if len(truth) != len(images):
        raise RuntimeError(f"Label Studio made {len(truth)} tasks of {len(images)} images")
    print(f"  Label Studio {server.url}: project {project}, {len(truth)} tasks ({time.perf_counter() - began:.0f} s)",
          flush=True)
    return Project(server=server, api=api, id=project, config=config, classes=classes, truth=truth,
                   documents=documents)


def _start_label_studio(root: Path, documents: Path,
                        cleanup: contextlib.ExitStack) -> tuple[LabelStudioServer, LabelStudioApi]:
    """A fresh Label Studio in `root` (stopped by `cleanup`) serving `documents` as local files, and its admin client."""
    (root / "label-studio").mkdir()
    server = LabelStudioServer(ensure_installed(), data_dir=root / "label-studio", documents_root=documents,
                               log_path=root / "logs" / "label-studio.log")
    cleanup.callback(server.stop)
    server.start()
    return server, LabelStudioApi(server.url, server.credentials.legacy_token)


def _text_project(root: Path, params: Params, cleanup: contextlib.ExitStack) -> Project:
    """A `<Text>` project of `params.tasks` distinct articles, imported inline in one request."""
    documents = root / "documents"
    documents.mkdir(parents=True)
    began = time.perf_counter()
    texts = loop_texts.make_texts(params.tasks)
    server, api = _start_label_studio(root, documents, cleanup)
    classes = loop_texts.classes()
    config = label_config(classes, object_tag="Text", object_name="text")
    project = api.create_project("headstart bench loop (text)", config)["id"]
    api.post(f"/api/projects/{project}/import", [{"text": item.text} for item in texts])
    label_of = {item.text: item.label for item in texts}
    truth = {task["id"]: label_of[task["data"]["text"]]
             for task in sorted(api.tasks(project), key=lambda task: task["id"])}
    if len(truth) != len(texts):
        raise RuntimeError(f"Label Studio made {len(truth)} tasks of {len(texts)} texts")
    print(f"  Label Studio {server.url}: project {project}, {len(truth)} text tasks "
          f"({time.perf_counter() - began:.0f} s)", flush=True)
    return Project(server=server, api=api, id=project, config=config, classes=classes, truth=truth,
                   documents=documents, object_name="text")


def _embed_pass(project: Project, proxy: CountingProxy, root: Path, workers: int, params: Params) -> dict:
    """`headstart embed PROJECT`'s job on a fresh Redis with `workers` workers, until no job is pending and every
    task's embedding is cached."""
    url = proxy.listen(f"embed-{workers}")
    with LoopStack(env=project.headstart_env(url), workers=workers, serve=False,
                   log_dir=root / "logs" / f"embed-{workers}") as stack:
        ProjectRegistry(stack.redis).remember(str(project.id), project.config)  # what /setup records
        settings = Settings(redis_url=stack.redis_server.url, label_studio_url=url,
                            label_studio_api_key=project.server.credentials.legacy_token,
                            local_files_document_root=str(project.documents))
        services = build_services(settings, stack.redis)
        load_before, cpu_before = load_average(), stack.worker_cpu_s()
        job_id = admin_actions.embed(services, str(project.id))["job"]
        seconds = measure.wait_for_embedding(stack.redis, job_id, expected=len(project.truth),
                                             timeout_s=params.embed_timeout_s)
        cpu_after = stack.worker_cpu_s()
        jobs = measure.finished_jobs(stack.redis)
        embedded = measure.embedded_count(stack.redis)
        failed = [job for job in jobs if job.status != "finished"]
        if failed:
            raise RuntimeError(f"embedding with {workers} worker(s): {len(failed)} job(s) failed\n"
                               f"{stack.log_tail('worker-1')}")
    first = next((job for job in jobs if job.id == job_id), None)
    result = {"workers": workers, "seconds": rounded(seconds, 2), "embedded": embedded,
              f"{'texts' if project.object_name == 'text' else 'images'}_per_s":
              rounded(embedded / seconds, 1) if seconds else None, "jobs": len(jobs),
              "job_kinds": dict(Counter(job.kind for job in jobs)),
              "job_result": first.result if first is not None else None,
              "ls_requests": len(proxy.requests(tag=f"embed-{workers}")),
              "workers_cpu_s": rounded(cpu_after - cpu_before, 1) if cpu_before is not None else None,
              "load_average_before": load_before, "load_average_after": load_average()}
    print(f"  embedding pass, {workers} worker(s): {result['seconds']} s, {embedded} embeddings, {len(jobs)} job(s)",
          flush=True)
    return result


def _labeling(project: Project, proxy: CountingProxy, root: Path, params: Params) -> report.LabelingRun:
    """Connect headstart, label at a human pace, drain, then time one promotion until every task has it."""
    worker_url, backend_url = proxy.listen("worker"), proxy.listen("backend")
    with LoopStack(env=project.headstart_env(backend_url), worker_env={"LABEL_STUDIO_URL": worker_url},
                   workers=Settings().up_workers, serve=True, log_dir=root / "logs" / "loop") as stack:
        backend = project.api.post("/api/ml", {"url": f"http://127.0.0.1:{stack.port}", "project": project.id,
                                               "title": "headstart"})
        watcher = measure.ServedWatcher(stack.redis, str(project.id)).start()
        order = list(project.truth.items())
        expected = int(params.label_seconds * ANNOTATORS / sum(PACE_S) * 2)  # actions the run should see
        annotators = Annotators(project.client, order, project.classes, count=ANNOTATORS, pace_s=PACE_S,
                                script=Script(mistake_at=max(2, expected // 10), relabel_at=max(6, expected * 3 // 10),
                                              delete_at=max(9, expected // 2)),
                                keep_unlabeled=len(order) // 2, object_name=project.object_name)
        labeling_started = time.time()
        print(f"  labeling for {params.label_seconds:g} s ({ANNOTATORS} annotators)", flush=True)
        actions = annotators.run(params.label_seconds)
        labeling_ended = time.time()
        settle_s = measure.wait_until_idle(stack.redis, timeout_s=params.settle_timeout_s)
        print(f"  {len(actions)} actions; queues idle {rounded(settle_s, 1)} s after labeling ended", flush=True)
        embedded_before_final = measure.embedded_count(stack.redis)
        final = _final(project, stack, annotators, watcher, params, backend_url)
        observed_until = time.time()
        watcher.stop()
        served = watcher.served()
        jobs = measure.finished_jobs(stack.redis)
        served_by_setup = stack.client().post("/setup", {"project": f"{project.id}.0", "schema": project.config})
        backend_record = project.api.get(f"/api/ml/{backend['id']}")
    return report.LabelingRun(
        actions=actions, served=served, jobs=jobs, requests=proxy.requests(), final=final, settle_s=settle_s,
        labeling_started=labeling_started, labeling_ended=labeling_ended, observed_until=observed_until,
        embedded_before_final=embedded_before_final, setup_model_version=served_by_setup[1].get("model_version"),
        label_studio_model_version=backend_record.get("model_version"))


def _final(project: Project, stack: LoopStack, annotators: Annotators, watcher: measure.ServedWatcher,
           params: Params, label_studio_url: str) -> dict:
    """One more label once the queues are idle; its version's promotion → Label Studio holds that version's
    prediction for every unlabeled task. When the guard rejects the final label's version FINAL_TRIES times,
    the last one is promoted as an admin would (`headstart models promote`), which re-predicts the same way."""
    api = project.client()
    for attempt in range(1, FINAL_TRIES + 1):
        task, truth = annotators.take_task()
        sent_at = time.time()
        annotation = api.post(f"/api/tasks/{task}/annotations", {"result": [
            choice(truth, project.object_name)]})["id"]
        annotators.mark_labeled(task, truth, annotation)
        action = Action(kind="create", task=task, label=truth, annotator=-1, sent_at=sent_at,
                        seconds=time.time() - sent_at, annotation=annotation)
        version = _wait_for_version(stack, project, action, params.final_timeout_s)
        if version is None:
            return {"attempts": attempt, "outcome": f"no version trained on the final label within "
                                                    f"{params.final_timeout_s:g} s"}
        if version.get("status") == "promoted":
            promoted_by = "the guard"
            break
    else:
        settings = Settings(redis_url=stack.redis_server.url, label_studio_url=label_studio_url,
                            label_studio_api_key=project.server.credentials.legacy_token)
        admin_actions.promote(build_services(settings, stack.redis), str(project.id), version["version"])
        version = ModelStore(stack.redis).meta(str(project.id), CONTROL, version["version"])
        promoted_by = f"an admin (headstart models promote), the guard having rejected {FINAL_TRIES} final versions"
    promoted_at = version.get("promoted_at") or watcher.first_seen.get(version["version"]) or time.time()
    model_version = stack.client().post("/setup", {"project": f"{project.id}.0", "schema": project.config})[1][
        "model_version"]
    unlabeled = sorted(set(project.truth) - set(annotators.labeled()))
    progress, done_at = _wait_for_predictions(project, model_version, len(unlabeled), params.final_timeout_s)
    check = _check_predictions(project, model_version, unlabeled)
    return {"attempts": attempt, "outcome": "promoted", "promoted_by": promoted_by, "version": version["version"],
            "model_version": model_version, "submit_to_version_s": round(promoted_at - sent_at, 3),
            "unlabeled": len(unlabeled),
            "repredict_all_s": round(done_at - promoted_at, 2) if done_at is not None and check["missing"] == 0
            else None, "progress": [(round(at - promoted_at, 2), count) for at, count in progress], **check,
            "annotator_retries_after_500": annotators.retries}


def _wait_for_version(stack: LoopStack, project: Project, action: Action, timeout_s: float) -> dict | None:
    """The first settled version trained on `action` (rejected, or promoted and validated: a version served
    before its validation may still be rolled back, and its predictions would then never all arrive), or None
    after `timeout_s`."""
    store = ModelStore(stack.redis)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for meta in store.versions(str(project.id), CONTROL):
            settled = meta.get("status") == "rejected" or \
                (meta.get("status") == "promoted" and meta.get("validated", True) is not False)
            if meta.get("created_at", 0) > action.sent_at and settled and measure.reflects(meta, action):
                return meta
        time.sleep(0.1)
    return None


def _wait_for_predictions(project: Project, model_version: str, unlabeled: int,
                          timeout_s: float) -> tuple[list[tuple[float, int]], float | None]:
    """Poll Label Studio's per-version prediction counts until `model_version` has `unlabeled` of them."""
    progress = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        count = project.api.get(f"/api/projects/{project.id}/model-versions/").get(model_version, 0)
        now = time.time()
        progress.append((now, count))
        if count >= unlabeled:
            return progress, now
        time.sleep(POLL_S)
    return progress, None


def _check_predictions(project: Project, model_version: str, unlabeled: list[int]) -> dict:
    """Every unlabeled task's predictions of `model_version`, read back from Label Studio."""
    per_task = Counter(prediction["task"] for prediction in project.api.predictions(project.id)
                       if prediction["model_version"] == model_version)
    return {"missing": sum(1 for task in unlabeled if per_task[task] == 0),
            "duplicates": sum(count - 1 for count in per_task.values() if count > 1),
            "on_labeled_tasks": sum(1 for task in per_task if task not in set(unlabeled))}


def _code() -> dict | None:
    """The commit measured, and whether the working tree differed from it (None outside a git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "backend", "worker"))}
    except (OSError, subprocess.SubprocessError):
        return None
