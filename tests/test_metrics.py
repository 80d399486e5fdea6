"""/metrics: every family from the first scrape, valid Prometheus text, counts added up across processes in Redis."""

from __future__ import annotations

import math
import re

from prometheus_client.parser import text_string_to_metric_families

from backend.common.metrics import BUCKETS_S, HELP, KEY, LABELS, WEBHOOK_ACTIONS, Metrics
from backend.common.queue_state import scrape_gauges
from backend.server.webhook import OTHER_EVENTS, TRAINING_EVENTS
from tests.admin_support import admin_settings, client, labeled_images, services, train_rounds  # noqa: F401
from tests.helpers import CONFIG_2
from tests.loop_helpers import local_url

PROJECT = 7
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def families(text: str) -> dict:
    """The parsed exposition by family name as written in HELP/TYPE, after checking what the parser lets pass.

    prometheus_client's parser is lax: a sample outside its family becomes an untyped family of its own, and
    nothing checks buckets. So: one HELP then one TYPE per family, each family's samples together, and per
    label set, buckets in increasing `le` order ending at +Inf, cumulative, with +Inf equal to _count.
    """
    lines = text.splitlines()
    helps = [line.split()[2] for line in lines if line.startswith("# HELP ")]
    types = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert len(helps) == len(set(helps)) and helps == types, "duplicate or unpaired HELP/TYPE lines"
    for i, line in enumerate(lines):
        if line.startswith("# HELP "):
            assert lines[i + 1].startswith(f"# TYPE {line.split()[2]} "), f"HELP without its TYPE: {line}"

    parsed = {}
    for family in text_string_to_metric_families(text):
        assert family.type not in ("unknown", "untyped"), f"{family.samples[0].name} is outside every HELP/TYPE block"
        written = family.name + "_total" if family.type == "counter" else family.name  # the parser drops _total
        assert written not in parsed, f"{written} is split into several blocks"
        parsed[written] = family
    for name, family in parsed.items():
        if family.type == "histogram":
            check_histogram(name, family.samples)
    return parsed


def check_histogram(name: str, samples) -> None:
    by_labels: dict[tuple, dict] = {}
    for sample in samples:
        others = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        entry = by_labels.setdefault(others, {"buckets": [], "sum": None, "count": None})
        if sample.name == f"{name}_bucket":
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        else:
            entry[sample.name[len(name) + 1:]] = sample.value
    for labels, entry in by_labels.items():
        bounds = [bound for bound, _ in entry["buckets"]]
        counts = [count for _, count in entry["buckets"]]
        assert bounds == sorted(set(bounds)) and bounds[-1] == math.inf, f"{name}{labels}: buckets {bounds}"
        assert counts == sorted(counts), f"{name}{labels}: buckets are not cumulative: {counts}"
        assert counts[-1] == entry["count"] and entry["sum"] is not None, f"{name}{labels}: +Inf != _count"


def series_of(family) -> dict[str, float]:
    """{'name{label="value",...}': value}, labels sorted, `le` as written in the exposition."""
    return {sample.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}"
                           if sample.labels else ""): sample.value for sample in family.samples}


def test_names_follow_prometheus_conventions():
    for name, (kind, text) in HELP.items():
        assert NAME.match(name) and name.startswith("headstart_") and text, name
        assert kind in ("counter", "gauge", "histogram"), name
        assert name.endswith("_total") == (kind == "counter"), f"{name}: only counters, and all of them, end in _total"
        if kind == "histogram":
            assert name.endswith("_seconds") and list(BUCKETS_S[name]) == sorted(set(BUCKETS_S[name])), name
        assert "\\" not in text and "\n" not in text, f"{name}: HELP text would need escaping"
    assert set(BUCKETS_S) == {name for name, (kind, _) in HELP.items() if kind == "histogram"}
    assert set(LABELS) <= set(HELP) and all("le" not in labels for labels in LABELS.values())


def test_webhook_actions_are_the_labels_the_webhook_chooses_from():
    """The webhook labels an event by its action if it knows it, else "other": every one is exposed at 0."""
    assert sorted(WEBHOOK_ACTIONS) == sorted(TRAINING_EVENTS + OTHER_EVENTS + ("other",))
    assert len(set(WEBHOOK_ACTIONS)) == len(WEBHOOK_ACTIONS)


def test_a_fresh_server_exposes_every_family_at_zero_on_its_first_scrape(client, redis):
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    parsed = families(response.get_data(as_text=True))

    assert {name: family.type for name, family in parsed.items()} == {name: kind for name, (kind, _) in HELP.items()}
    for name, family in parsed.items():
        assert all(sample.value == 0 for sample in family.samples), f"{name} is not 0 on a fresh Redis"
        if HELP[name][0] == "counter":
            expected = LABELS.get(name, {})
            assert len(family.samples) == math.prod(len(values) for values in expected.values())
            for label, values in expected.items():
                assert {sample.labels[label] for sample in family.samples} == set(values), name
        if HELP[name][0] == "histogram":
            bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
            assert bounds == [*BUCKETS_S[name], math.inf]
            assert {s.name for s in family.samples} == {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert series_of(parsed["headstart_trainings_total"]) == {
        f'headstart_trainings_total{{outcome="{outcome}"}}': 0 for outcome in ("promoted", "rejected", "superseded", "failed")}
    assert redis.hlen(KEY) == 0  # zeros are filled in when rendering, not written


def test_webhook_events_are_counted_by_known_action_and_other(client, redis):
    for action in ("PROJECT_UPDATED", "PROJECT_UPDATED", "SOMETHING_NEW", "something_else"):
        assert client.post("/webhook", json={"action": action}).status_code == 200
    events = series_of(families(client.get("/metrics").get_data(as_text=True))["headstart_webhook_events_total"])
    assert events.pop('headstart_webhook_events_total{action="PROJECT_UPDATED"}') == 2
    assert events.pop('headstart_webhook_events_total{action="other"}') == 2
    assert len(events) == len(WEBHOOK_ACTIONS) - 2 and set(events.values()) == {0}


def test_histograms_are_cumulative_and_counts_exact_across_processes(redis):
    """Two Metrics on the same Redis stand for two processes (a gunicorn worker, an RQ worker on another host)."""
    backend, worker = Metrics(redis), Metrics(redis)
    for seconds in (0.01, 0.3, 1000):  # on a bound, between two, past the last
        backend.observe("headstart_predict_seconds", seconds)
    worker.observe("headstart_training_seconds", 42.5)
    worker.add("headstart_trainings_total", outcome="promoted")
    backend.add("headstart_predictions_total", 1234567)
    parsed = families(backend.render(scrape_gauges(redis)))

    predict = series_of(parsed["headstart_predict_seconds"])
    assert predict['headstart_predict_seconds_bucket{le="0.01"}'] == 1
    assert predict['headstart_predict_seconds_bucket{le="0.25"}'] == 1
    assert predict['headstart_predict_seconds_bucket{le="0.5"}'] == 2
    assert predict['headstart_predict_seconds_bucket{le="100"}'] == 2
    assert predict['headstart_predict_seconds_bucket{le="+Inf"}'] == predict["headstart_predict_seconds_count"] == 3
    assert math.isclose(predict["headstart_predict_seconds_sum"], 1000.31)
    assert series_of(parsed["headstart_training_seconds"])['headstart_training_seconds_bucket{le="60"}'] == 1
    assert series_of(parsed["headstart_trainings_total"])['headstart_trainings_total{outcome="promoted"}'] == 1
    assert "headstart_predictions_total 1234567\n" in backend.render()  # exact, not 1.23457e+06


def test_series_no_longer_described_are_left_out(redis):
    """What an older release left in the hash: a renamed counter, a bucket bound no longer used."""
    metrics = Metrics(redis)
    metrics.observe("headstart_predict_seconds", 0.3)
    redis.hset(KEY, mapping={"headstart_renamed_total": 5, 'headstart_predict_seconds_bucket{le="0.2"}': 9})
    text = metrics.render(scrape_gauges(redis))
    families(text)
    assert "headstart_renamed_total" not in text and 'le="0.2"' not in text


def sample(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match, f"{series} missing from /metrics"
    return float(match.group(1))


def test_metrics_count_predictions_latency_cache_hits_webhooks_trainings_and_gauges(
        client, admin_settings, redis, services):
    train_rounds(client, admin_settings, redis, services, PROJECT, [2])  # 4 webhooks, 1 promoted training
    tasks = [{"id": 100 + i, "data": {"image": local_url(path)}} for i, (path, _) in enumerate(labeled_images(3))]
    for _ in range(2):
        body = {"tasks": tasks, "project": f"{PROJECT}.1", "label_config": CONFIG_2}
        assert client.post("/predict", json=body).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    families(text)

    assert sample(text, "headstart_predictions_total") == 12
    assert sample(text, "headstart_predict_seconds_count") == 2
    assert sample(text, 'headstart_predict_seconds_bucket{le="+Inf"}') == 2
    assert "# TYPE headstart_predict_seconds histogram" in text
    # training embedded 4 images; the first /predict computed the 2 unseen ones, reused 4; the second reused all 6
    assert sample(text, "headstart_embedding_cache_misses_total") == 4 + 2
    assert sample(text, "headstart_embedding_cache_hits_total") == 4 + 6
    assert sample(text, 'headstart_webhook_events_total{action="ANNOTATION_CREATED"}') == 4
    assert sample(text, 'headstart_trainings_total{outcome="promoted"}') == 1
    assert sample(text, "headstart_training_seconds_count") == 1
    assert sample(text, 'headstart_queue_jobs{queue="headstart-train",state="finished"}') == 1
    assert sample(text, 'headstart_workers{state="idle"}') == 0
    assert sample(text, "headstart_queues_suspended") == 0
