"""Fixtures: a real Redis (a flushed database), real weights, real images, apps built by the factory."""

from __future__ import annotations

import os
import random

import pytest
import redis as redis_lib
import torch
from flask import Flask
from flask.testing import FlaskClient

from backend.server.app import create_app
from backend.core.encoders import EncoderPool
from backend.loop.services import build_services
from backend.common.settings import Settings
from tests.helpers import HYMENOPTERA, RedisServer, install_offline_weights, offline_text_model

TEST_DB = int(os.environ.get("HEADSTART_TEST_REDIS_DB", "13"))


class ServerLikeClient(FlaskClient):
    """Flask's test client, closing each response once it is read as a WSGI server does after sending it, so
    what a route leaves to `call_on_close` (the /predict metrics) is done before the test looks."""

    def open(self, *args, buffered: bool = True, **kwargs):
        return super().open(*args, buffered=buffered, **kwargs)


@pytest.fixture(scope="session", autouse=True)
def server_like_test_clients():
    Flask.test_client_class = ServerLikeClient
    yield
    Flask.test_client_class = None


@pytest.fixture(scope="session", autouse=True)
def offline_weights():
    return install_offline_weights()


@pytest.fixture(scope="session")
def text_model() -> str:
    """TEXT_ENCODER for tests: the offline all-MiniLM-L6-v2 folder (the hub is switched off)."""
    return offline_text_model()


@pytest.fixture(scope="session")
def redis_url():
    """HEADSTART_TEST_REDIS_URL, else the local Redis on 6379, else a redis-server we start."""
    explicit = os.environ.get("HEADSTART_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    local = f"redis://127.0.0.1:6379/{TEST_DB}"
    try:
        redis_lib.Redis.from_url(local, socket_connect_timeout=1).ping()
        yield local
        return
    except redis_lib.exceptions.ConnectionError:
        pass
    server = RedisServer(appendonly=False).start()
    yield server.url.rsplit("/", 1)[0] + f"/{TEST_DB}"
    server.cleanup()


@pytest.fixture
def redis(redis_url):
    connection = redis_lib.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture(autouse=True)
def fixed_seeds():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def settings(redis_url, tmp_path, text_model):
    """Test settings. ZERO_SHOT is off: the ants/bees configs most tests use would otherwise be pre-labeled
    before any training; tests/test_zero_shot_serving.py turns it on."""
    return Settings(redis_url=redis_url, model_dir=str(tmp_path), job_retries=0, repredict_unlabeled=False,
                    text_encoder=text_model, active_learning=False, zero_shot=False)


@pytest.fixture(scope="session")
def encoders(text_model):
    """One MobileNetV2 (and, when a test needs it, one MiniLM) per test session (loading is the slow part)."""
    return EncoderPool(default_name="mobilenet_v2", text_name=text_model)


@pytest.fixture
def services(settings, redis, encoders):
    return build_services(settings, redis, encoders=encoders)


@pytest.fixture
def app(settings, redis, services):
    return create_app(settings, services=services)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def hymenoptera_features(encoders):
    """Real MobileNetV2 features of 20 ants and 20 bees (train split) and their labels."""
    from backend.core.images import decode_image
    from tests.helpers import HYMENOPTERA, dataset_images

    train = dataset_images(HYMENOPTERA, "train")
    picked = [item for cls in ("ants", "bees") for item in [i for i in train if i[1] == cls][:20]]
    encoder = encoders.get()
    images = [decode_image(path.read_bytes(), max_pixels=10**9, min_side=encoder.resize_size) for path, _ in picked]
    return encoder.embed(images), [cls for _, cls in picked]


@pytest.fixture(scope="session")
def flowers12_features(encoders):
    """Real MobileNetV2 features of flowers12: the first 5 train photos of each of the 12 classes, and all of
    val (20 a class), as ((train features, class indices), (val features, class indices), classes)."""
    from backend.core.images import decode_image
    from tests.helpers import FLOWERS, dataset_images

    encoder = encoders.get()
    train, val = dataset_images(FLOWERS, "train"), dataset_images(FLOWERS, "val")
    classes = sorted({cls for _, cls in train})
    picked = [item for cls in classes for item in [i for i in train if i[1] == cls][:5]]

    def embedded(items):
        images = [decode_image(path.read_bytes(), max_pixels=10**9, min_side=encoder.resize_size) for path, _ in items]
        vectors = torch.cat([encoder.embed(images[start:start + 64]) for start in range(0, len(images), 64)])
        return vectors, torch.tensor([classes.index(cls) for _, cls in items])

    return embedded(picked), embedded(val), classes


@pytest.fixture
def loop_settings(settings):
    """Settings whose local-files root is the hymenoptera set: task URLs are /data/local-files/?d=train/..."""
    return settings.replace(local_files_document_root=str(HYMENOPTERA))


@pytest.fixture
def loop_services(loop_settings, redis, encoders):
    return build_services(loop_settings, redis, encoders=encoders)
