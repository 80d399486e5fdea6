"""Broken and hostile media: each task's media is refused with its reason, inside limits on bytes,
pixels and time, while the other tasks of the same request are still predicted.

The media comes from small misbehaving HTTP servers on 127.0.0.1 (tests/hostile_servers.py).
"""

from __future__ import annotations

import re
import shutil
import time

import pytest
import torch

from backend.server.app import create_app
from backend.common.errors import MediaError
from backend.loop.features import MediaItem
from backend.loop.services import build_services
from tests.helpers import HYMENOPTERA, dataset_images
from tests.hostile_servers import HostileServer
from tests.reliability_helpers import CONFIG_AB, promote_real_head

pytestmark = pytest.mark.security

MAX_BYTES = 2_000_000
TIMEOUT_S = 1.5
PROJECT = "21"

# (what the task's media is, URL path on the hostile server or local-files URL, the reason expected)
HOSTILE = [
    ("truncated JPEG", "/truncated.jpg", "broken or truncated"),
    ("zero bytes", "/empty.jpg", r"empty \(0 bytes\)"),
    ("text, not an image", "/text.jpg", "Not a decodable image"),
    ("SVG", "/image.svg", "Not a decodable image"),
    ("decompression bomb (1x1 PNG claiming 65535x65535)", "/bomb.png", "MEDIA_MAX_PIXELS"),
    ("declares 1 TB", "/huge-declared", "above MEDIA_MAX_BYTES"),
    ("endless body", "/endless", "larger than MEDIA_MAX_BYTES"),
    ("trickles its body", "/trickle", "longer than MEDIA_TIMEOUT_S"),
    ("trickles its headers", "/trickle-headers", "longer than MEDIA_TIMEOUT_S"),
    ("redirect loop", "/loop", "more than 3 redirects"),
    ("server error", "/error", "HTTP 500"),
    ("redirect to file://", "/to-file", "scheme 'file'"),
    ("redirect to another loopback port", "/to-canary", "non-public address 127.0.0.1"),
    ("redirect to cloud metadata", "/to-meta", "non-public address 169.254.169.254"),
    ("local file above MEDIA_MAX_BYTES", "local:big.jpg", "above MEDIA_MAX_BYTES"),
    ("local file outside the root", "local:../outside.jpg", "escapes LOCAL_FILES_DOCUMENT_ROOT"),
    ("missing local file", "local:missing.jpg", "not available"),
    ("no media URL", "", "no media URL"),
]
GOOD = ["/ok.jpg", "/endless-redirect", "local:ok.jpg"]  # the redirect's endless body is never read


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "documents"
    root.mkdir()
    good = dataset_images(HYMENOPTERA, "val")[0][0]
    shutil.copyfile(good, root / "ok.jpg")
    shutil.copyfile(good, tmp_path / "outside.jpg")
    (root / "big.jpg").write_bytes(good.read_bytes() + b"\0" * MAX_BYTES)
    return root


@pytest.fixture
def servers():
    good = dataset_images(HYMENOPTERA, "val")[1][0]
    main, canary = HostileServer(good).start(), HostileServer(good).start()
    main.redirect_to.update({"/to-file": "file:///etc/passwd", "/to-canary": canary.url + "/ok.jpg",
                             "/to-meta": "http://169.254.169.254/latest/meta-data/"})
    yield main, canary
    main.stop()
    canary.stop()


@pytest.fixture
def media_services(settings, redis, encoders, servers, media_root):
    main, _ = servers
    limited = settings.replace(label_studio_url=main.url, label_studio_api_key="0" * 40, media_max_bytes=MAX_BYTES,
                               media_timeout_s=TIMEOUT_S, local_files_document_root=str(media_root))
    return build_services(limited, redis, encoders=encoders)


def url_of(spec: str, server: HostileServer) -> str:
    if spec.startswith("local:"):
        return f"/data/local-files/?d={spec[len('local:'):]}"
    return server.url + spec if spec else ""


def test_each_broken_or_hostile_file_is_refused_with_its_reason_within_the_limits(media_services, servers):
    main, canary = servers
    specs = GOOD + [spec for _, spec, _ in HOSTILE]
    items = [MediaItem(task_id=index + 1, url=url_of(spec, main)) for index, spec in enumerate(specs)]
    started = time.monotonic()
    outcomes = media_services.features.features(PROJECT, items, media_services.encoders.get())
    elapsed = time.monotonic() - started

    assert all(isinstance(outcome, torch.Tensor) for outcome in outcomes[:len(GOOD)])
    for (what, _, reason), outcome in zip(HOSTILE, outcomes[len(GOOD):]):
        assert isinstance(outcome, MediaError), f"{what} was accepted"
        assert re.search(reason, str(outcome)), f"{what}: {outcome}"
    assert canary.total_hits() == 0
    print(f"\nmedia: {len(HOSTILE)} broken or hostile files refused with their reason, {len(GOOD)} good ones "
          f"embedded, in {elapsed:.2f}s (MEDIA_TIMEOUT_S={TIMEOUT_S}, MEDIA_MAX_BYTES={MAX_BYTES})")
    assert elapsed < 2 * TIMEOUT_S + 5, "the time limit did not bound the fetches"


def test_a_request_full_of_hostile_media_still_predicts_its_good_tasks(media_services, servers):
    main, _ = servers
    promote_real_head(media_services, PROJECT)
    client = create_app(media_services.settings, services=media_services).test_client()
    specs = [GOOD[0]] + [spec for _, spec, _ in HOSTILE] + [GOOD[-1]]
    tasks = [{"id": index + 1, "data": {"image": url_of(spec, main)}} for index, spec in enumerate(specs)]
    started = time.monotonic()
    response = client.post("/predict", json={"tasks": tasks, "project": f"{PROJECT}.1", "label_config": CONFIG_AB})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == len(tasks)
    assert [bool(result["result"]) for result in results] == [True] + [False] * len(HOSTILE) + [True]
    assert {result["model_version"] for result in results} == {"label-v1"}
    print(f"\n/predict with {len(HOSTILE)} hostile and 2 good tasks answered in {elapsed:.2f}s")
    assert elapsed < 2 * TIMEOUT_S + 10


def test_a_local_storage_file_is_read_in_place_without_scratch_space(settings, media_root, tmp_path):
    """`/data/local-files/?d=` media is read where it lies: no scratch folder (the SDK's path copies every file
    into one first), so it works with an unwritable scratch root, and its limits still hold."""
    from backend.labelstudio.media import MediaFetcher

    unwritable = tmp_path / "no-such-folder" / "scratch"  # mkdtemp under it fails
    fetcher = MediaFetcher(settings.replace(local_files_document_root=str(media_root), model_dir=str(unwritable),
                                            media_max_bytes=MAX_BYTES))
    assert fetcher.fetch("/data/local-files/?d=ok.jpg") == (media_root / "ok.jpg").read_bytes()
    for path, reason in (("big.jpg", "above MEDIA_MAX_BYTES"), ("../outside.jpg", "escapes"),
                         ("missing.jpg", "not available"), ("", "no file path")):
        with pytest.raises(MediaError, match=reason):
            fetcher.fetch(f"/data/local-files/?d={path}")
    with pytest.raises(MediaError, match="make MODEL_DIR a writable folder"):  # other URLs need scratch space
        fetcher.fetch("http://example.invalid/ok.jpg")
