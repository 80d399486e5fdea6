"""Property-based fuzzing of /predict, /setup and /webhook with malformed and odd requests.

Hypothesis generates over 10,000 requests (Flask test client, a real Redis, a real served head).
Every answer must be JSON without a traceback and never a 500: 4xx for what is wrong with the
request, 200 for what can be served. Afterwards the server must still answer correctly.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backend.server.app import create_app
from backend.loop.services import build_services
from backend.common.settings import Settings
from backend.server.webhook import OTHER_EVENTS, TRAINING_EVENTS
from tests.helpers import CONFIG_2, HYMENOPTERA, dataset_images
from tests.reliability_helpers import CONFIG_AB, promote_real_head

pytestmark = pytest.mark.security

FUZZ = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck), "print_blob": True}
EXAMPLES = {"predict": 3000, "setup": 2000, "webhook": 3500, "raw": 2000}
SENT: Counter = Counter()
STATUSES: dict[str, Counter] = {name: Counter() for name in EXAMPLES}

# ---- strategies -------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
projects = st.one_of(st.sampled_from(["1.1717000000", "1", 1, "2.5", "²", "٣", "007", "-1", "1e3", " 1 ", "1.2.3", "",
                                      "9" * 30, "1\x00", True]),
                     st.integers(), st.from_regex(r"\A\d{1,22}(\.\d{0,12})?\Z"), st.text(max_size=20), json_values)
configs = st.one_of(
    st.sampled_from([
        CONFIG_AB, CONFIG_2,
        CONFIG_AB.replace('<Choice value="B"/>', '<Choice value="B"/><Choice value="C"/>'),
        CONFIG_AB.replace('<Choice value="B"/>', ''),
        CONFIG_AB.replace('toName="image">', 'toName="image" choice="multiple">'),
        CONFIG_AB.replace('$image', '$img'), CONFIG_AB.replace('$image', 'image'), CONFIG_AB.replace("Image", "Text"),
        "<View/>", "<View>", "", "not xml at all", '<View><Choices name="x" toName="nothing"/></View>',
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><View>&e;</View>',
    ]),
    st.text(max_size=120),
    st.builds(lambda name, to, value, labels: (
        f'<View><Image name="{to}" value="${value}"/><Choices name="{name}" toName="{to}">'
        + "".join(f'<Choice value="{label}"/>' for label in labels) + "</Choices></View>"),
        st.text("abcxyz_-.:", min_size=0, max_size=6), st.text("abcxyz_", min_size=0, max_size=6),
        st.text("abcxyz_", min_size=0, max_size=6), st.lists(st.text("ABC ", max_size=3), max_size=4)),
    json_values,
)
media_urls = st.one_of(
    st.sampled_from(["/data/local-files/?d=ok.jpg", "/data/local-files/?d=../secret", "/data/local-files/?d=",
                     "/data/upload/1/a.jpg", "upload/1/a.jpg", "s3://bucket/a.jpg", "gs://b/a.jpg",
                     "azure-blob://c/a.jpg", "http://127.0.0.1:9/a.jpg", "file:///etc/passwd",
                     "http://169.254.169.254/latest/", "http://example.com/a.jpg", "", " ", "\x00"]),
    st.builds(lambda path: f"/data/local-files/?d={path}", st.text(max_size=30)),
    st.text(max_size=60), json_values)
regions = st.fixed_dictionaries({}, optional={
    "from_name": st.sampled_from(["label", "x", ""]) | st.text(max_size=8) | json_values,
    "to_name": st.sampled_from(["image"]) | json_values, "type": st.sampled_from(["choices", "labels"]) | json_values,
    "value": st.fixed_dictionaries({}, optional={"choices": st.lists(st.sampled_from(["A", "B", "C", "ants"])
                                                                      | st.text(max_size=5) | json_values,
                                                                      max_size=3) | json_values}) | json_values,
})
tasks = st.fixed_dictionaries({}, optional={
    "id": st.integers() | json_values, "project": projects,
    "data": st.dictionaries(st.sampled_from(["image", "img", ""]), media_urls, max_size=2) | json_values,
    "annotations": json_values, "predictions": json_values,
})
valid_projects = st.sampled_from(["1.1717000000", "1", 1, "2.1717000000", 3])
valid_configs = st.sampled_from([CONFIG_AB, CONFIG_2, CONFIG_AB.replace('toName="image">',
                                                                        'toName="image" choice="multiple">')])
# half of the bodies are shaped like Label Studio's, with odd values inside, so the deep paths run too
predict_bodies = st.fixed_dictionaries({}, optional={
    "tasks": st.lists(tasks | json_values, max_size=4) | json_values, "project": projects, "label_config": configs,
    "params": json_values,
}) | st.fixed_dictionaries({"tasks": st.lists(tasks, max_size=4), "project": valid_projects,
                            "label_config": valid_configs})
setup_bodies = st.fixed_dictionaries({}, optional={
    "project": projects, "schema": configs, "hostname": st.text(max_size=30) | json_values,
    "access_token": st.text(max_size=30) | json_values, "extra_params": json_values,
}) | st.fixed_dictionaries({"project": valid_projects, "schema": configs | valid_configs})
annotations = st.fixed_dictionaries({}, optional={
    "id": st.integers() | json_values, "task": st.integers() | tasks | json_values, "project": projects,
    "result": st.lists(regions | json_values, max_size=3) | json_values, "was_cancelled": json_values,
    "ground_truth": json_values, "updated_at": st.text(max_size=25) | json_values,
})
webhook_bodies = st.fixed_dictionaries({}, optional={
    "action": st.sampled_from(TRAINING_EVENTS + OTHER_EVENTS) | st.text(max_size=20) | json_values,
    "project": st.fixed_dictionaries({}, optional={"id": projects, "label_config": configs}) | projects,
    "annotation": annotations | json_values, "task": tasks | json_values,
    "annotations": st.lists(st.fixed_dictionaries({}, optional={"id": st.integers() | json_values}) | json_values,
                            max_size=4) | json_values,
}) | st.fixed_dictionaries({
    "action": st.sampled_from(TRAINING_EVENTS),
    "project": st.fixed_dictionaries({"id": valid_projects, "label_config": valid_configs}),
    "annotation": st.fixed_dictionaries({"id": st.integers(0, 50), "task": st.integers(0, 50),
                                         "result": st.lists(regions, max_size=3)}, optional={
        "was_cancelled": json_values, "ground_truth": json_values, "updated_at": st.text(max_size=25)}),
    "task": tasks, "annotations": st.lists(st.fixed_dictionaries({"id": st.integers(0, 50)}), max_size=3),
})
raw_bodies = st.one_of(
    st.binary(max_size=200), st.text(max_size=200).map(str.encode),
    st.sampled_from([b"[" * 100_000, b'{"a":' * 100_000, b"{}", b"null", b"[]", b'"text"', b"1e999999", b"-" * 5000,
                     b"9" * 5000, b'{"tasks": [' + b"{}," * 3000 + b"{}]}", b"\xff\xfe{\x00}", b'{"project": NaN}']),
    json_values.map(lambda value: json.dumps(value).encode()),
)
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "",
                                 "application/json; charset=latin-1", "multipart/form-data; boundary=x"])
routes = st.sampled_from(["/predict", "/setup", "/webhook", "/versions", "/health", "/metrics", "/", "/nothing"])
methods = st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH"])


# ---- the app under fuzz ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_client(redis_url, encoders, tmp_path_factory):
    connection = redis_lib.Redis.from_url(redis_url)
    connection.flushdb()
    root = tmp_path_factory.mktemp("fuzz-media")
    shutil.copyfile(dataset_images(HYMENOPTERA, "val")[0][0], root / "ok.jpg")
    configured = Settings(redis_url=redis_url, model_dir=str(tmp_path_factory.mktemp("fuzz-scratch")),
                          local_files_document_root=str(root), label_studio_url="http://127.0.0.1:9",
                          label_studio_api_key="0" * 40, media_public_hosts=False, media_timeout_s=2,
                          job_retries=0, repredict_unlabeled=False)
    services = build_services(configured, connection, encoders=encoders)
    promote_real_head(services, "1")  # project 1 serves a real head for CONFIG_AB
    yield create_app(configured, services=services).test_client()
    connection.flushdb()
    connection.close()


def check(kind: str, response) -> None:
    SENT[kind] += 1
    STATUSES[kind][response.status_code] += 1
    text = response.get_data(as_text=True)
    assert response.status_code < 500, text[:500]
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    if response.status_code != 200 or response.mimetype == "application/json":
        json.loads(text)  # every error is a JSON answer


def assert_healthy(client) -> None:
    assert client.get("/health").json["health"] == "ok"
    tasks = [{"id": 1, "data": {"image": "/data/local-files/?d=ok.jpg"}}]
    result = client.post("/predict", json={"tasks": tasks, "project": "1.1", "label_config": CONFIG_AB}).json
    assert result["results"][0]["model_version"] == "label-v1" and result["results"][0]["result"]
    assert client.get("/versions").status_code == 200 and client.get("/metrics").status_code == 200


def report(kind: str, started: float) -> None:
    print(f"\nfuzz {kind}: {SENT[kind]} requests in {time.monotonic() - started:.0f}s, statuses "
          f"{dict(sorted(STATUSES[kind].items()))}; all kinds so far: {sum(SENT.values())}")
    assert SENT[kind] >= EXAMPLES[kind]


UNHASHABLE_ID = {  # a 500 hypothesis found: one task answered, another whose id is a list (the ledger's lookup)
    "tasks": [{"id": 0, "data": {"image": "/data/local-files/?d=ok.jpg"}},
              {"id": [], "data": {"image": "/data/local-files/?d=ok.jpg"}}],
    "project": "1.1717000000",
    "label_config": '<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
                    '<Choice value="A"/><Choice value="B"/></Choices></View>'}


def test_fuzz_predict(fuzz_client):
    @given(body=predict_bodies)
    @example(body=UNHASHABLE_ID)
    @settings(max_examples=EXAMPLES["predict"], **FUZZ)
    def run(body):
        check("predict", fuzz_client.post("/predict", json=body))

    started = time.monotonic()
    run()
    assert_healthy(fuzz_client)
    report(started=started, kind="predict")


def test_fuzz_setup(fuzz_client):
    @given(body=setup_bodies)
    @settings(max_examples=EXAMPLES["setup"], **FUZZ)
    def run(body):
        check("setup", fuzz_client.post("/setup", json=body))

    started = time.monotonic()
    run()
    assert_healthy(fuzz_client)
    report(started=started, kind="setup")


def test_fuzz_webhook(fuzz_client):
    @given(body=webhook_bodies)
    @settings(max_examples=EXAMPLES["webhook"], **FUZZ)
    def run(body):
        check("webhook", fuzz_client.post("/webhook", json=body))

    started = time.monotonic()
    run()
    assert_healthy(fuzz_client)
    report(started=started, kind="webhook")


def test_fuzz_raw_bodies_methods_and_content_types(fuzz_client):
    @given(route=routes, method=methods, body=raw_bodies, content_type=content_types)
    @settings(max_examples=EXAMPLES["raw"], **FUZZ)
    def run(route, method, body, content_type):
        check("raw", fuzz_client.open(route, method=method, data=body, content_type=content_type or None))

    started = time.monotonic()
    run()
    assert_healthy(fuzz_client)
    report(started=started, kind="raw")
