"""`headstart worker`: a standard RQ worker that keeps the backbone loaded between jobs.

It is an rq SimpleWorker (jobs run in the worker process, so the backbone loaded at start is
reused by every job and CUDA is never used across a fork), visible to `rq info` and rq-dashboard.
Its host, device and backbone are published in its Redis hash under `headstart`.

Surviving faults:
- A plain SimpleWorker sends no heartbeat while a job runs, so RQ would take JOB_TIMEOUT_S + 60 s
  to notice that a killed worker's job is abandoned. This worker beats every WORKER_HEARTBEAT_S
  during a job and lets the job's entry in RQ's StartedJobRegistry lapse after 3 missed beats; every
  worker runs RQ's registry maintenance each WORKER_HEARTBEAT_S, which hands an abandoned job to its
  RQ Retry. The handler below makes that retry immediate (the retry backoff is meant for jobs that
  raised, e.g. Label Studio being down; a dead worker says nothing about the job), still bounded by
  JOB_RETRIES. With no retries left the job lands in the failed registry as AbandonedJobError.
  The handler also charges a kill to each input the job had in flight (`backend.loop.poison`): an
  input that kills MEDIA_POISON_KILLS workers is skipped from then on instead of killing them all.
- A job popped off the queues by a worker killed before it marked the job started is in no queue and
  no registry (RQ pops with BLPOP when a worker listens on several queues). For trainings, every
  worker's maintenance queues the project's training again once its queued job has been missing
  for LOST_JOB_GRACE_S (`TrainingScheduler.requeue_if_lost`).
- Redis going away does not stop the worker: it waits for Redis and carries on; a job that lost
  Redis midway is detected as abandoned once Redis is back and re-run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

import torch
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import SimpleWorker
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from backend.core.torch_runtime import keep_forward_buffers, resolve_device, set_torch_threads
from backend.core.head_fitting import fit_head
from backend.common.errors import ConfigurationError, HeadstartError
from backend.core.encoders import get_entry
from backend.labelstudio.labeling_config import parse_label_config
from backend.common.queues import QUEUE_NAMES, TRAIN_JOB, queue
from backend.common.settings import Settings
from backend.loop.services import Services, build_services

log = logging.getLogger(__name__)


def device_description(device: torch.device) -> dict:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": properties.name, "memory_bytes": properties.total_memory}
    return {"type": device.type, "name": device.type, "memory_bytes": None}


def warm_up(feature_dim: int) -> None:
    """Run one tiny fit so the first real retrain does not pay torch's one-off start-up costs."""
    features = torch.nn.functional.normalize(torch.randn(4, feature_dim), dim=1)
    fit_head(features, torch.tensor([0, 1, 0, 1]), num_classes=2, multi_label=False)


REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
MISSED_BEATS = 3  # a running job's registry entry lapses after this many missed heartbeats
MAX_REDIS_WAIT_S = 10.0


class ServicesJob(Job):
    """A job whose function receives the worker process's `Services` as its first argument.

    The worker sets `services` on each job it dequeues, so a job reaches Redis, the stores and the
    loaded encoder through what the worker built at start, never through a global or the environment.
    """

    services: Services | None = None

    def _execute(self):
        if self.services is None:
            raise ConfigurationError(
                f"Job {self.id} ({self.func_name}) was run outside `headstart worker`, which passes the job its "
                "services: start workers with `headstart worker`, not `rq worker`.")
        with self.services.features.charging(self.id):  # a worker dying on an input charges that input
            return self.func(self.services, *self.args, **self.kwargs)


def abandoned_job_handler(services: Services):
    """RQ exception handler: an abandoned job's next retry starts now instead of after its backoff.

    RQ calls exception handlers while cleaning its StartedJobRegistry, before it applies the job's
    Retry, with the same job object; zeroing the interval of the retry about to be used makes RQ
    enqueue the job directly, without waiting for its scheduler.
    """
    def rerun_abandoned_at_once(job, exc_type, exc_value, traceback) -> bool:
        if exc_type is not AbandonedJobError:
            return True
        try:
            services.features.poison.charge(job.id)  # the inputs it was on when its worker died
        except Exception as exc:  # charging is bookkeeping: it must never keep the job from its retry
            log.warning("job %s: the inputs in flight were not charged: %s", job.id, exc)
        if job.retries_left and job.retry_intervals:
            index = max(len(job.retry_intervals) - job.retries_left, 0)
            job.retry_intervals = [0 if i == index else s for i, s in enumerate(job.retry_intervals)]
            log.warning("job %s (%s) was abandoned by its worker; re-running it now (%d retries left)",
                        job.id, job.description, job.retries_left - 1)
        elif job.func_name == TRAIN_JOB and job.args:
            # No retry left: release the project's training lock it still holds, and queue the
            # training that requests made while it "ran" were waiting for.
            services.scheduler.finish(str(job.args[0]), job.id)
        return True

    return rerun_abandoned_at_once


class HeadstartWorker(SimpleWorker):
    """Registers its host, device and backbone next to RQ's own worker fields; beats while a job
    runs; waits out Redis outages instead of exiting."""

    headstart_info: dict = {}
    services: Services | None = None
    max_connection_wait_time = MAX_REDIS_WAIT_S

    def register_birth(self):
        super().register_birth()
        self.connection.hset(self.key, "headstart", json.dumps(self.headstart_info))

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        """How long a running job stays in the StartedJobRegistry without a heartbeat."""
        return MISSED_BEATS * self.job_monitoring_interval

    def execute_job(self, job, queue):
        job.services = self.services
        try:
            execution = self.prepare_execution(job)
            with self._beating(job, execution):
                self.perform_job(job, queue, execution)
            self.set_state(WorkerStatus.IDLE)
        except REDIS_DOWN as exc:
            log.error("lost Redis while running job %s (%s); it is re-run once Redis is back", job.id, exc)
            self.executions.clear()
            self._wait_for_redis()

    @contextlib.contextmanager
    def _beating(self, job, execution):
        """Heartbeats for the worker, the job and its execution every job_monitoring_interval."""
        stop = threading.Event()

        def beat():
            while not stop.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception as exc:  # Redis away: the job is re-run if it lasts past the TTL
                    log.warning("heartbeat for job %s failed: %s", job.id, exc)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def heartbeat(self, timeout=None, pipeline=None):
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline=pipeline)
        try:
            return super().heartbeat(timeout)
        except REDIS_DOWN as exc:
            log.warning("worker heartbeat failed (Redis unreachable): %s", exc)

    def check_for_suspension(self, burst: bool):
        while True:
            try:
                return super().check_for_suspension(burst)
            except REDIS_DOWN:
                self._wait_for_redis()

    def run_maintenance_tasks(self):
        try:
            super().run_maintenance_tasks()
            self._requeue_lost_trainings()
        except REDIS_DOWN as exc:
            log.warning("registry maintenance skipped (Redis unreachable): %s", exc)

    def _requeue_lost_trainings(self) -> None:
        """A training popped by a worker that died before starting it is in no registry RQ cleans."""
        if self.services is None:
            return
        for project in self.services.projects.all():
            if self.services.scheduler.requeue_if_lost(project):
                log.warning("project %s: its queued training was lost by a worker killed as it took it; "
                            "queued it again", project)

    def _wait_for_redis(self) -> None:
        delay = 0.5
        while not self._stop_requested:
            try:
                self.connection.ping()
                log.info("Redis answers again; worker %s carries on", self.name)
                return
            except REDIS_DOWN:
                time.sleep(delay)
                delay = min(delay * 2, MAX_REDIS_WAIT_S)


def preload_encoders(services: Services) -> list:
    """The encoders of every project Redis knows (an image-only deployment never loads a text model, and
    a text-only one never loads an image backbone)."""
    wanted = set()
    for project in services.projects.all():
        try:
            wanted.update((spec.modality, spec.markup)
                          for spec in parse_label_config(services.projects.label_config(project) or ""))
        except HeadstartError:
            continue
    loaded = []
    for modality, markup in sorted(wanted):
        try:
            loaded.append(services.encoders.for_input(modality, markup))
        except HeadstartError as exc:  # the jobs that need it fail with the same message, in RQ's registry
            log.warning("cannot load the %s encoder: %s", modality, exc)
    return loaded


def build_worker(settings: Settings, redis: Redis, *, queues: tuple[str, ...] = QUEUE_NAMES,
                 name: str | None = None, services: Services | None = None) -> HeadstartWorker:
    """Build the process's services, load the encoders the known projects use (others load on first use)
    and return a worker ready to `work()`."""
    set_torch_threads(settings.torch_threads)
    keep_forward_buffers()
    device = resolve_device(settings.device)
    services = services or build_services(settings, redis, device=str(device))
    for loaded in preload_encoders(services):
        log.info("loaded %s for the known projects", loaded.key)
    backbone = get_entry(settings.backbone)
    warm_up(backbone.feature_dim)
    backbone_key = backbone.key(settings.backbone_weights_file)
    beat = max(1, settings.worker_heartbeat_s)
    worker = HeadstartWorker([queue(name_, redis) for name_ in queues], connection=redis,
                             serializer=JSONSerializer, name=name, job_class=ServicesJob,
                             exception_handlers=[abandoned_job_handler(services)],
                             job_monitoring_interval=beat, maintenance_interval=beat,
                             worker_ttl=beat + 15)  # RQ blocks worker_ttl - 15 s per dequeue: maintenance each beat
    worker.services = services
    worker.headstart_info = {"host": socket.gethostname(), "device": device_description(device),
                             "backbone": backbone_key, "text_encoder": settings.text_encoder,
                             "torch_threads": settings.torch_threads}
    log.info("worker %s ready on %s with %s (text: %s)", worker.name, device, backbone_key, settings.text_encoder)
    return worker
