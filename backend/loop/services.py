"""Every long-lived collaborator of one process (backend or worker), built once at its edge.

The app factory, the worker start and the CLI each call `build_services` once with the frozen
settings and a Redis connection, and pass the result on explicitly: nothing below reaches for
the environment or a module global.
"""

from __future__ import annotations

from dataclasses import dataclass

from label_studio_sdk.client import LabelStudio
from redis import Redis

from backend.common.metrics import Metrics
from backend.common.queues import TrainingScheduler
from backend.common.settings import Settings
from backend.core.encoders import EncoderPool, InputLimits
from backend.core.memory_budget import MemoryBudget
from backend.core.retention import Retention
from backend.core.store import ModelStore
from backend.core.zero_shot import ZeroShotClassifiers
from backend.labelstudio.client import MediaToken, make_client
from backend.labelstudio.label_mirror import LabelStore
from backend.labelstudio.media import MediaFetcher
from backend.labelstudio.projects import ProjectRegistry
from backend.labelstudio.task_index import TaskIndex
from backend.loop.features import FeatureSource
from backend.loop.poison import PoisonLedger
from backend.loop.predictor import Predictor


@dataclass
class Services:
    settings: Settings
    redis: Redis
    store: ModelStore  # head versions
    labels: LabelStore  # the mirror of Label Studio's annotations
    projects: ProjectRegistry  # labeling configs
    tasks: TaskIndex  # every task's id and data, listed from Label Studio
    scheduler: TrainingScheduler  # coalesced training requests
    encoders: EncoderPool  # frozen encoders, loaded on first use
    features: FeatureSource  # cached features of task inputs
    predictor: Predictor
    metrics: Metrics

    def label_studio(self) -> LabelStudio:
        """A Label Studio API client (raises ConfigurationError when LABEL_STUDIO_URL/API_KEY are unset)."""
        return make_client(self.settings)

    @property
    def can_reach_label_studio(self) -> bool:
        return bool(self.settings.label_studio_url and self.settings.label_studio_api_key)


def build_services(settings: Settings, redis: Redis, *, device: str = "cpu",
                   encoders: EncoderPool | None = None) -> Services:
    """Everything a backend or worker process needs. Loads no model yet (encoders load on first use)."""
    store = ModelStore(redis, Retention(detail_keep=settings.version_detail_keep,
                                        rejected_keep=settings.rejected_versions_keep))
    metrics = Metrics(redis)
    encoders = encoders or EncoderPool(default_name=settings.backbone,
                                       weights_file=settings.backbone_weights_file, device=device,
                                       text_name=settings.text_encoder)
    fetcher = MediaFetcher(settings, MediaToken(settings))
    limits = InputLimits(max_pixels=settings.media_max_pixels,
                         budget=MemoryBudget(settings.media_decode_budget_bytes))
    features = FeatureSource(redis, fetcher, limits=limits, metrics=metrics,
                             poison=PoisonLedger(redis, kills_allowed=settings.media_poison_kills))
    predictor = Predictor(redis=redis, store=store, features=features, encoders=encoders,
                          multi_label_threshold=settings.multi_label_threshold,
                          zero_shot=ZeroShotClassifiers() if settings.zero_shot else None)
    return Services(settings=settings, redis=redis, store=store, labels=LabelStore(redis),
                    projects=ProjectRegistry(redis), tasks=TaskIndex(redis), scheduler=TrainingScheduler(redis, settings),
                    encoders=encoders, features=features, predictor=predictor, metrics=metrics)
