"""Wires the long-lived objects of a process (backend or worker) from settings and a Redis connection."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from backend.core.store import ModelStore
from backend.loop.features import EmbedderPool, FeatureSource
from backend.labelstudio.client import MediaToken
from backend.labelstudio.media import MediaFetcher
from backend.common.metrics import Metrics
from backend.loop.predictor import Predictor
from backend.labelstudio.projects import ProjectRegistry
from backend.common.settings import Settings


@dataclass
class Services:
    settings: Settings
    redis: Redis
    store: ModelStore
    projects: ProjectRegistry
    embedders: EmbedderPool
    features: FeatureSource
    predictor: Predictor
    metrics: Metrics


def build_services(settings: Settings, redis: Redis, *, device: str = "cpu",
                   embedders: EmbedderPool | None = None) -> Services:
    """Everything a backend or worker process needs. Loads no model yet (backbones load on first use)."""
    store = ModelStore(redis)
    embedders = embedders or EmbedderPool(default_name=settings.backbone,
                                          weights_file=settings.backbone_weights_file, device=device)
    fetcher = MediaFetcher(settings, MediaToken(settings))
    features = FeatureSource(redis, fetcher, max_pixels=settings.media_max_pixels)
    predictor = Predictor(redis=redis, store=store, features=features, embedders=embedders,
                          multi_label_threshold=settings.multi_label_threshold)
    return Services(settings=settings, redis=redis, store=store, projects=ProjectRegistry(redis),
                    embedders=embedders, features=features, predictor=predictor, metrics=Metrics(redis))
