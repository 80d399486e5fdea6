"""`headstart worker`: a standard RQ worker that keeps the backbone loaded between jobs.

It is an rq SimpleWorker (jobs run in the worker process, so the backbone loaded at start is
reused by every job and CUDA is never used across a fork), visible to `rq info` and rq-dashboard.
Its host, device and backbone are published in its Redis hash under `headstart`.
"""

from __future__ import annotations

import json
import logging
import socket

import torch
from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from backend.core.embedding import resolve_device, set_torch_threads
from backend.core.training import fit_head
from backend.services import Services, build_services
from backend.settings import Settings
from worker import context
from worker.queueing import QUEUE_NAMES, queue

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


class HeadstartWorker(SimpleWorker):
    """Registers its host, device and backbone next to RQ's own worker fields."""

    headstart_info: dict = {}

    def register_birth(self):
        super().register_birth()
        self.connection.hset(self.key, "headstart", json.dumps(self.headstart_info))


def build_worker(settings: Settings, redis: Redis, *, queues: tuple[str, ...] = QUEUE_NAMES,
                 name: str | None = None, services: Services | None = None) -> HeadstartWorker:
    """Load the backbone, install the job context and return a worker ready to `work()`."""
    set_torch_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    services = services or build_services(settings, redis, device=str(device))
    embedder = services.embedders.get()
    warm_up(embedder.feature_dim)
    context.install(services)
    worker = HeadstartWorker([queue(name_, redis) for name_ in queues], connection=redis,
                             serializer=JSONSerializer, name=name)
    worker.headstart_info = {"host": socket.gethostname(), "device": device_description(device),
                             "backbone": embedder.key, "torch_threads": settings.torch_threads}
    log.info("worker %s ready on %s with %s", worker.name, device, embedder.key)
    return worker
