"""PROJECT_DELETED: a hint, confirmed with Label Studio (404) before a worker drops the project's data from Redis."""

from __future__ import annotations

from backend.cli import main
from backend.common import redis_keys
from backend.core.heads import build_head
from backend.labelstudio.projects import ProjectRegistry
from backend.loop import project_data
from backend.server.app import create_app
from tests.helpers import CONFIG_2
from tests.loop_helpers import run_burst_worker
from tests.test_repredict import PROJECT, _connected, _label, label_studio, ls_services  # noqa: F401

OTHER = "60"  # its keys share a prefix with project 6's: they must survive


def keys_of(redis, project) -> list[str]:
    names = [key.decode() for key in redis.scan_iter(match="headstart:*")]
    return sorted(name for name in names if f":{project}:" in name or name.endswith(f":{project}"))


def deleted(project) -> dict:
    return {"action": "PROJECT_DELETED", "project": {"id": project, "title": "gone"}}


def test_a_deleted_project_loses_its_data_only_once_label_studio_confirms_it(ls_services, redis, label_studio):
    client = _connected(ls_services, redis, label_studio)
    _label(client, label_studio, [1, 2, 9, 10])
    run_burst_worker(ls_services.settings, redis, ls_services)
    project = str(PROJECT)
    assert ls_services.store.current_number(project, "label") is not None
    digests = sorted({value.decode() for value in redis.hvals(redis_keys.media_digests(project))})
    ProjectRegistry(redis).remember(OTHER, CONFIG_2)  # another project with one of the same images
    redis.hset(redis_keys.media_digests(OTHER), "/data/upload/60/same.jpg", digests[0])
    redis.hset(redis_keys.labels(OTHER), "1", '{"task": 1, "data": {}, "result": []}')
    before, other_before = keys_of(redis, project), keys_of(redis, OTHER)
    embeddings = len(list(redis.scan_iter(match="headstart:emb:*")))
    assert len(before) > 10 and embeddings == len(digests) == len(label_studio.tasks)

    assert client.post("/webhook", json=deleted(PROJECT)).json["status"] == "queued"  # forged: it still exists
    assert client.post("/webhook", json=deleted(PROJECT)).json["status"] == "coalesced"
    run_burst_worker(ls_services.settings, redis, ls_services)
    assert set(before) <= set(keys_of(redis, project)) and project in ProjectRegistry(redis).all()
    assert project_data.hint_state(redis, project) == "refuted"

    label_studio.deleted_projects.add(PROJECT)  # deleted in Label Studio for real
    assert client.post("/webhook", json=deleted(PROJECT)).json["status"] == "queued"
    run_burst_worker(ls_services.settings, redis, ls_services)
    assert keys_of(redis, project) == [] and project not in ProjectRegistry(redis).all()
    assert keys_of(redis, OTHER) == other_before
    left = [key.decode().rsplit(":", 1)[1] for key in redis.scan_iter(match="headstart:emb:*")]
    assert left == [digests[0]]  # the other project's image keeps its embedding
    assert client.post("/webhook", json=deleted(PROJECT)).json["status"].startswith("ignored")  # unknown now


def test_without_label_studio_api_a_deletion_is_only_recorded_and_headstart_forget_drops_it(
        settings, services, redis, redis_url, monkeypatch, capsys):
    project = "8"
    ProjectRegistry(redis).remember(project, CONFIG_2)
    services.store.save(project, "label", build_head(8, 2), {"classes": ["ants", "bees"], "feature_dim": 8,
                                                              "multi_label": False}, promote=True)
    redis.hset(redis_keys.labels(project), "1", '{"task": 1, "data": {"image": "x"}, "result": []}')
    before = keys_of(redis, project)
    client = create_app(settings, services=services).test_client()
    answer = client.post("/webhook", json=deleted(8)).json
    assert answer["status"].startswith("recorded: nothing dropped") and "headstart forget 8" in answer["status"]
    assert set(before) <= set(keys_of(redis, project))
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert main(["status"]) == 0 and "PROJECT_DELETED received (unconfirmed)" in capsys.readouterr().out
    assert main(["forget", "8"]) == 2 and set(before) <= set(keys_of(redis, project))
    assert main(["forget", "8", "--yes"]) == 0
    assert keys_of(redis, project) == [] and "8" not in ProjectRegistry(redis).all()
