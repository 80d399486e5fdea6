"""Doors: the SSRF guard, local-files confinement, basic auth, the admin token, secrets kept out
of logs, no pickles anywhere, JSON job payloads, request size limits and hostile labeling configs."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
import shutil
import socket
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from backend.server.app import create_app
from backend.common import redis_keys
from backend.common.errors import MediaError
from backend.loop.features import MediaItem
from backend.labelstudio.media import MediaFetcher
from backend.loop.services import build_services
from backend.labelstudio.ssrf import HostPolicy, is_public_address
from tests.helpers import HYMENOPTERA, REPO, dataset_images
from tests.hostile_servers import HostileServer
from tests.reliability_helpers import CONFIG_AB, promote_real_head
from backend.common.queues import QUEUE_NAMES, TRAIN_QUEUE, TrainingScheduler, queue

pytestmark = pytest.mark.security

SOURCE_DIRS = ("backend", "worker")
RQ_REGISTRIES = {"StartedJobRegistry", "FinishedJobRegistry", "FailedJobRegistry", "DeferredJobRegistry",
                 "ScheduledJobRegistry", "CanceledJobRegistry"}
NOT_PUBLIC = ["127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.0.10",
              "169.254.169.254", "100.100.100.200", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
              "::1", "::", "fe80::1", "fd00:ec2::254", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
              "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "ff02::1"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.fixture
def servers():
    good = dataset_images(HYMENOPTERA, "val")[0][0]
    label_studio, canary = HostileServer(good).start(), HostileServer(good).start()
    yield label_studio, canary
    label_studio.stop()
    canary.stop()


def fetcher(settings, label_studio: HostileServer, **changes) -> MediaFetcher:
    return MediaFetcher(settings.replace(label_studio_url=label_studio.url, label_studio_api_key="0" * 40,
                                         media_timeout_s=3.0, **changes))


def attack_urls(label_studio: HostileServer, canary: HostileServer) -> list[str]:
    """URLs that must never be fetched: every one aims at the canary (loopback) or an internal range."""
    port = canary.port
    direct = [f"http://127.0.0.1:{port}/ok.jpg", f"http://localhost:{port}/ok.jpg", f"http://[::1]:{port}/ok.jpg",
              f"http://2130706433:{port}/ok.jpg", f"http://0x7f000001:{port}/ok.jpg", f"http://127.1:{port}/ok.jpg",
              f"http://0.0.0.0:{port}/ok.jpg", f"http://[::ffff:127.0.0.1]:{port}/ok.jpg",
              f"http://user:pass@127.0.0.1:{port}/ok.jpg", f"http://127.0.0.1.:{port}/ok.jpg",
              "http://169.254.169.254/latest/meta-data/iam/", "http://[fd00:ec2::254]/latest/meta-data/",
              "http://100.100.100.200/latest/meta-data/", "http://10.0.0.1/", "http://192.168.1.1/",
              "http://172.16.0.1/", "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/",
              f"https://127.0.0.1:{port}/ok.jpg",
              "file:///etc/passwd", "file://localhost/etc/passwd", f"ftp://127.0.0.1:{port}/", f"gopher://127.0.0.1:{port}/_x",
              f"dict://127.0.0.1:{port}/", "data:image/png;base64,iVBORw0KGgo=", "jar:http://x/!/", "//127.0.0.1/ok.jpg",
              f"/data/local-files/?d=http://127.0.0.1:{port}/ok.jpg"]
    redirected = []
    for index, target in enumerate([f"http://127.0.0.1:{port}/ok.jpg", f"http://localhost:{port}/ok.jpg",
                                    "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd",
                                    f"http://[::1]:{port}/ok.jpg", "http://10.0.0.1/"]):
        label_studio.redirect_to[f"/r{index}"] = target
        redirected.append(f"{label_studio.url}/r{index}")
    label_studio.redirect_to["/hop"] = f"{label_studio.url}/r0"  # two hops on the trusted host, then out
    redirected.append(f"{label_studio.url}/hop")
    return direct + redirected


def test_media_urls_aimed_at_internal_addresses_are_refused(settings, servers):
    label_studio, canary = servers
    media = fetcher(settings, label_studio)
    attacks = attack_urls(label_studio, canary)
    reasons = {}
    for url in attacks:
        with pytest.raises(MediaError) as refused:
            media.fetch(url, task_id=1)
        reasons[url] = str(refused.value)
    assert canary.total_hits() == 0, canary.hits
    refused_by_policy = [url for url, reason in reasons.items() if "Refused" in reason or "escapes" in reason]
    others = {url: reason for url, reason in reasons.items() if url not in refused_by_policy}
    print(f"\nSSRF: {len(attacks)} attack URLs refused, {len(refused_by_policy)} of them by the scheme/host/address "
          f"policy and {len(others)} as malformed or not found; the canary on 127.0.0.1 got 0 requests")
    assert all(re.search(r"MissingSchema|HTTP 404", reason) for reason in others.values()), others


def test_label_studio_and_allowed_hosts_stay_reachable_on_loopback(settings, servers):
    label_studio, canary = servers
    assert fetcher(settings, label_studio).fetch(f"{label_studio.url}/ok.jpg")[:2] == b"\xff\xd8"
    allowed_port = fetcher(settings, label_studio, media_allowed_hosts=(f"localhost:{canary.port}",))
    assert allowed_port.fetch(f"http://localhost:{canary.port}/ok.jpg")[:2] == b"\xff\xd8"
    with pytest.raises(MediaError, match="non-public"):
        allowed_port.fetch(f"http://127.0.0.1:{canary.port}/ok.jpg")  # another spelling is another host
    any_port = fetcher(settings, label_studio, media_allowed_hosts=("127.0.0.1",))
    assert any_port.fetch(f"http://127.0.0.1:{canary.port}/ok.jpg")[:2] == b"\xff\xd8"
    with pytest.raises(MediaError, match="non-public"):
        fetcher(settings, label_studio).fetch(f"http://127.0.0.1:{canary.port}/ok.jpg")


def test_public_hosts_are_allowed_only_by_their_addresses_and_only_when_enabled(settings):
    assert [address for address in NOT_PUBLIC if is_public_address(address)] == []
    assert [address for address in PUBLIC if not is_public_address(address)] == []
    open_policy = HostPolicy.from_settings(settings.replace(label_studio_url="http://ls.internal:8080"))
    assert open_policy.addresses("93.184.216.34", 80) == ["93.184.216.34"]
    assert open_policy.addresses("ls.internal", 8080) == ["ls.internal"]  # trusted: never resolved by us
    with pytest.raises(MediaError, match="non-public"):
        open_policy.addresses("10.0.0.5", 8080)
    closed = HostPolicy.from_settings(settings.replace(label_studio_url="http://ls.internal:8080",
                                                       media_public_hosts=False))
    with pytest.raises(MediaError, match="MEDIA_PUBLIC_HOSTS is off"):
        closed.addresses("93.184.216.34", 80)


def test_a_dns_answer_that_changes_after_the_check_is_refused_at_connect_time(settings, servers, monkeypatch):
    label_studio, canary = servers
    real = socket.getaddrinfo
    answers = iter(["93.184.216.34", "127.0.0.1"])  # public when checked, loopback when dialled

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(MediaError, match="non-public address 127.0.0.1"):
        fetcher(settings, label_studio).fetch(f"http://rebind.example:{canary.port}/ok.jpg")
    assert canary.total_hits() == 0


def test_local_files_paths_cannot_escape_their_root(settings, tmp_path):
    root = tmp_path / "root" / "media"
    root.mkdir(parents=True)
    secret = tmp_path / "root" / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 secret bytes outside the root")
    shutil.copyfile(dataset_images(HYMENOPTERA, "val")[0][0], root / "ok.jpg")
    media = MediaFetcher(settings.replace(local_files_document_root=str(root)))
    assert media.fetch("/data/local-files/?d=ok.jpg")[:2] == b"\xff\xd8"
    escapes = ["../secret.jpg", "../../root/secret.jpg", "sub/../../secret.jpg", "%2e%2e/secret.jpg",
               "..%2fsecret.jpg", f"{secret}", "/../secret.jpg", "./../secret.jpg", "ok.jpg/../../secret.jpg",
               "..\\secret.jpg", "ok.jpg%00.png", "....//secret.jpg", "/etc/passwd", "../../../../etc/passwd"]
    for escape in escapes:
        with pytest.raises(MediaError):
            media.fetch(f"/data/local-files/?d={escape}")
    print(f"\nlocal files: {len(escapes)} escape attempts refused")


def test_a_symbolic_link_inside_the_local_files_root_cannot_reach_outside_it(settings, tmp_path):
    root = tmp_path / "root" / "media"
    root.mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    shutil.copyfile(dataset_images(HYMENOPTERA, "val")[0][0], secret)
    (root / "link.jpg").symlink_to(secret)
    (root / "inside").mkdir()
    shutil.copyfile(dataset_images(HYMENOPTERA, "val")[1][0], root / "inside" / "real.jpg")
    (root / "alias.jpg").symlink_to(root / "inside" / "real.jpg")  # a link that stays inside is fine
    media = MediaFetcher(settings.replace(local_files_document_root=str(root)))
    with pytest.raises(MediaError, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        media.fetch("/data/local-files/?d=link.jpg")
    assert media.fetch("/data/local-files/?d=alias.jpg")[:2] == b"\xff\xd8"


def route_calls(app, prefix: str = "", exclude_prefix: str | None = None):
    """(method, path) for every rule of the app, path arguments filled in."""
    calls = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or not rule.rule.startswith(prefix):
            continue
        if exclude_prefix and rule.rule.startswith(exclude_prefix):
            continue
        path = re.sub(r"<(?:[^:>]+:)?[^>]+>", "1", rule.rule)
        calls += [(method, path, rule.endpoint) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return calls


def test_basic_auth_guards_every_label_studio_route_but_health(settings, services):
    from backend.server import basic_auth as auth

    assert "hmac.compare_digest" in Path(auth.__file__).read_text()  # constant-time comparison
    app = create_app(settings.replace(basic_auth_user="ls-user", basic_auth_pass="pw-123"), services=services)
    client = app.test_client()
    calls = [call for call in route_calls(app, exclude_prefix="/admin") if call[1] != "/health"]
    assert len(calls) >= 5
    for method, path, _ in calls:
        for auth_ in (None, ("ls-user", "wrong"), ("wrong", "pw-123"), ("ls-user", "")):
            response = client.open(path, method=method, auth=auth_, json={})
            assert response.status_code == 401, (method, path, auth_)
            assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert client.open(path, method=method, auth=("ls-user", "pw-123"), json={}).status_code != 401
    assert client.get("/health").status_code == 200


def test_every_admin_route_refuses_requests_without_the_token(settings, redis, encoders):
    from backend.server import admin_routes as web

    token = "admin-token-for-the-test-0123456789"
    configured = settings.replace(admin_token=token)
    app = create_app(configured, services=build_services(configured, redis, encoders=encoders))
    client = app.test_client()
    calls = route_calls(app, prefix="/admin")
    assert calls, "no /admin route is registered"
    open_endpoints = set(web.OPEN_ENDPOINTS)
    assert open_endpoints <= {"admin.login_form", "admin.login", "admin.static"}  # sign-in and public code only
    guarded = [call for call in calls if call[2] not in open_endpoints]
    assert len(guarded) >= 5
    for method, path, _ in guarded:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {token}"},
                        {"Cookie": "headstart_admin=forged"}):
            response = client.open(path, method=method, headers=headers)
            refused = response.status_code in (401, 403, 429) or (
                response.status_code in (302, 303) and response.headers["Location"].endswith("/admin/login"))
            assert refused, (method, path, headers, response.status_code)
            assert token not in response.get_data(as_text=True)
    redis.delete(*redis.keys("headstart:admin-failures:*") or ["-"])  # wrong tokens above are rate limited (429)
    ok = client.get("/admin/api/status", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200, ok.get_data(as_text=True)[:300]  # with the token it gets through
    disabled = create_app(settings, services=build_services(settings, redis, encoders=encoders)).test_client()
    for method, path, _ in calls:
        assert disabled.open(path, method=method, headers={"Authorization": "Bearer "}).status_code >= 400
    print(f"\nadmin: {len(guarded)} guarded /admin routes refuse requests without ADMIN_TOKEN")


def test_secrets_never_reach_logs_or_answers(settings, redis, encoders, servers, caplog):
    from tests.loop_helpers import run_burst_worker

    label_studio, _ = servers
    secrets = {"api_key": "f00dcafe" * 5, "basic": "basic-pass-9f8e7d", "admin": "admin-token-5a4b3c2d1e0f"}
    configured = settings.replace(label_studio_url=label_studio.url, label_studio_api_key=secrets["api_key"],
                                  basic_auth_user="ls", basic_auth_pass=secrets["basic"], admin_token=secrets["admin"],
                                  job_retries=0)
    services = build_services(configured, redis, encoders=encoders)
    client = create_app(configured, services=services).test_client()
    caplog.set_level(logging.DEBUG)
    answers = []
    task = {"id": 5, "data": {"image": "/data/upload/3/missing.jpg"}}
    for auth_ in (("ls", secrets["basic"]), ("ls", secrets["basic"] + "x"), None):
        answers.append(client.post("/setup", json={"project": "3.1", "schema": CONFIG_AB}, auth=auth_))
        answers.append(client.post("/predict", json={"tasks": [task], "project": "3.1", "label_config": CONFIG_AB},
                                   auth=auth_))
    promote_real_head(services, "3")
    answers.append(client.post("/predict", json={"tasks": [task], "project": "3.1", "label_config": CONFIG_AB},
                               auth=("ls", secrets["basic"])))  # media from Label Studio, with the token: 404
    answers.append(client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}},
                               auth=("ls", secrets["basic"])))
    for token in (secrets["admin"], secrets["admin"][:-1]):
        answers.append(client.get("/admin/api/status", headers={"Authorization": f"Bearer {token}"}))
    run_burst_worker(configured, redis, services)  # the resync fails against the fake server: logged, recorded
    failed = queue(TRAIN_QUEUE, redis).failed_job_registry
    records = [queue(TRAIN_QUEUE, redis).fetch_job(job_id).latest_result().exc_string
               for job_id in failed.get_job_ids()]
    assert records, "the training job should have failed and recorded why"
    texts = [caplog.text] + [answer.get_data(as_text=True) for answer in answers] + records
    assert any(str(label_studio.port) in text for text in texts)  # the logs did capture this activity
    for name, secret in secrets.items():
        assert not any(secret in text for text in texts), f"the {name} secret leaked"
    print(f"\nsecrets: {len(secrets)} secrets absent from {len(caplog.records)} log records, {len(answers)} answers "
          f"and {len(records)} failed-job records")


def _source_trees():
    for directory in SOURCE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{func.value.id}.{func.attr}" if isinstance(func.value, ast.Name) else f"?.{func.attr}"
    return ""


def test_nothing_is_unpickled_and_every_rq_object_uses_the_json_serializer():
    unsafe_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
    needs_serializer = {"Queue", "Worker", "SimpleWorker", "HeadstartWorker", "Job.fetch", "Job.fetch_many",
                        "Job.create", "Worker.all", "SimpleWorker.all", "HeadstartWorker.all"}
    problems, seen = [], {"serializer": 0, "torch.load": 0}
    for path, tree in _source_trees():
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{where}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in unsafe_modules]
            if not isinstance(node, ast.Call):
                continue
            name, keywords = _call_name(node), {kw.arg: kw.value for kw in node.keywords}
            if name == "torch.load" or name.endswith(".load") and name.split(".")[0] in ("np", "numpy"):
                seen["torch.load"] += name == "torch.load"
                safe = keywords.get("weights_only")
                if name == "torch.load" and not (isinstance(safe, ast.Constant) and safe.value is True):
                    problems.append(f"{where}:{node.lineno} torch.load without weights_only=True")
                if "allow_pickle" in keywords:
                    problems.append(f"{where}:{node.lineno} numpy load with allow_pickle")
            if name in needs_serializer or name in RQ_REGISTRIES:
                if "serializer" in keywords or (name in RQ_REGISTRIES and "queue" in keywords):
                    seen["serializer"] += 1
                else:
                    problems.append(f"{where}:{node.lineno} {name}(...) without serializer=JSONSerializer")
    assert problems == []
    assert seen["serializer"] >= 3 and seen["torch.load"] >= 1  # the scan did find what it checks


def test_heads_are_safetensors_and_json_and_jobs_are_json(settings, redis, encoders):
    services = build_services(settings.replace(local_files_document_root=str(HYMENOPTERA)), redis, encoders=encoders)
    number = promote_real_head(services, "4")
    items = [MediaItem(task_id=1, url=f"/data/local-files/?d={path.relative_to(HYMENOPTERA)}")
             for path, _ in dataset_images(HYMENOPTERA, "val")[:2]]
    assert all(isinstance(v, torch.Tensor) for v in services.features.features("4", items, encoders.get()))
    blob = redis.hgetall(redis_keys.head_version("4", "label", number))
    # tensors as safetensors; the metadata as JSON, and a few of its fields repeated as plain text for cheap reads
    assert set(blob) == {b"tensors", b"meta", b"status", b"promoted_at", b"label_snapshot"}
    assert all(blob[field].decode("ascii").isprintable() for field in set(blob) - {b"tensors", b"meta"})
    meta = json.loads(blob[b"meta"])
    tensors = load_tensors(blob[b"tensors"])
    assert set(tensors) == {"weight", "bias"} and tensors["weight"].shape == (2, meta["feature_dim"])
    vectors = [redis.get(key) for key in redis.scan_iter("headstart:emb:*")]
    assert vectors and all(len(v) == 4 * meta["feature_dim"] for v in vectors)  # raw float32, nothing else
    assert torch.isfinite(torch.frombuffer(bytearray(vectors[0]), dtype=torch.float32)).all()

    from rq.serializers import JSONSerializer

    assert all(queue(name, redis).serializer is JSONSerializer for name in QUEUE_NAMES)
    TrainingScheduler(redis, settings).request("4", reason="test")
    (job_id,) = queue(TRAIN_QUEUE, redis).job_ids
    payload = json.loads(zlib.decompress(redis.hget(f"rq:job:{job_id}", "data")))
    assert payload[0] == "worker.jobs.train_project" and payload[2] == ["4"]


def test_request_bodies_above_the_limit_get_413(settings, services):
    client = create_app(settings.replace(max_request_bytes=4096), services=services).test_client()
    big = {"tasks": [{"id": i, "data": {"image": "x" * 100}} for i in range(100)], "project": "1.1",
           "label_config": CONFIG_AB}
    for path in ("/predict", "/setup", "/webhook"):
        response = client.post(path, data=json.dumps(big), content_type="application/json")
        assert response.status_code == 413 and response.json["error"]
    small = client.post("/predict", json={"tasks": [], "project": "1.1", "label_config": CONFIG_AB})
    assert small.status_code == 200


def test_xml_bombs_and_external_entities_in_labeling_configs_are_refused(client, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    choices = '<Image name="image" value="$image"/><Choices name="label" toName="image">'
    xxe = (f'<?xml version="1.0"?><!DOCTYPE View [<!ENTITY x SYSTEM "file://{secret}">]>'
           f'<View>{choices}<Choice value="&x;"/><Choice value="b"/></Choices></View>')
    laughs = "".join(f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10 if i else "lol"}">' for i in range(10))
    bomb = f'<?xml version="1.0"?><!DOCTYPE View [{laughs}]><View>{choices}<Choice value="&l9;"/><Choice value="b"/></Choices></View>'
    for config in (xxe, bomb):
        started = time.monotonic()
        response = client.post("/setup", json={"project": "1.1", "schema": config})
        assert response.status_code == 400
        assert "TOP-SECRET" not in response.get_data(as_text=True) and "lollollol" not in response.get_data(as_text=True)
        assert time.monotonic() - started < 2


def test_the_label_studio_token_goes_only_to_its_media_routes(settings, servers):
    """Task URLs on Label Studio's host that are not media (its API, admin, a path climbing out of
    /data/upload/) are fetched without the token; uploads, storage resolve routes and local files get it."""
    label_studio, _ = servers
    media_fetcher = fetcher(settings, label_studio)
    base = label_studio.url
    with_token = [f"{base}/data/upload/1/ok.jpg", "/data/upload/1/b.jpg", f"{base}/tasks/5/resolve/?fileuri=czM6Ly9h",
                  f"{base}/projects/5/presign/?fileuri=czM6Ly9h", "/data/local-files/?d=a/c.jpg"]
    without = [f"{base}/api/projects/1/export?exportType=JSON", "/api/current-user/whoami", f"{base}/admin/",
               f"{base}/data/upload/../../api/tasks/1", f"{base}/data/upload/%2e%2e/%2e%2e/api/tasks/2",
               f"{base}/tasks/5/resolve/../../api/tasks/3", f"{base}/api/tasks/4?next=/data/upload/x.jpg"]
    for url in with_token + without:
        with contextlib.suppress(MediaError):
            media_fetcher.fetch(url, task_id=5)
    sent = {target: header for target, header in label_studio.authorization.items()}
    leaked = [target for target, header in sent.items() if header and not any(
        target.startswith(prefix) for prefix in ("/data/upload/1/", "/storage-data/uploaded/?filepath=upload/1/",
                                                 "/tasks/5/resolve/", "/projects/5/presign/", "/data/local-files/"))]
    assert len(sent) >= len(with_token) + len(without) - 2  # some climbing paths are normalized by the client
    assert leaked == [], f"the token went to {leaked}"
    assert all(sent.get(target) for target in ("/data/upload/1/ok.jpg", "/storage-data/uploaded/?filepath=upload/1/b.jpg"))
    assert any(target.startswith("/tasks/5/resolve/") and header for target, header in sent.items())
