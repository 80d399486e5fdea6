"""The label mirror: which annotation wins, deletions, unknown labels, resync replacement."""

from __future__ import annotations

from backend.labelstudio.label_mirror import LabelStore
from backend.labelstudio.labeling_config import parse_label_config
from tests.helpers import CONFIG_2

SPEC = parse_label_config(CONFIG_2)[0]


def annotation(id_, task, choice, *, updated="2026-01-01T00:00:00Z", ground_truth=False, cancelled=False):
    return ({"id": id_, "task": task, "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                                  "value": {"choices": [choice]}}],
             "updated_at": updated, "ground_truth": ground_truth, "was_cancelled": cancelled},
            {"id": task, "data": {"image": f"/data/upload/1/{task}.jpg"}})


def test_ground_truth_beats_a_newer_annotation_and_newer_beats_older(redis):
    labels = LabelStore(redis)
    labels.put("1", *annotation(1, 10, "ants", updated="2026-01-01T00:00:00Z"))
    labels.put("1", *annotation(2, 10, "bees", updated="2026-01-02T00:00:00Z"))
    labels.put("1", *annotation(3, 11, "ants", updated="2026-01-01T00:00:00Z", ground_truth=True))
    labels.put("1", *annotation(4, 11, "bees", updated="2026-01-05T00:00:00Z"))
    examples, unknown = labels.examples("1", SPEC)
    assert [(e.task_id, e.choices) for e in examples] == [(10, ["bees"]), (11, ["ants"])]
    assert examples[0].url == "/data/upload/1/10.jpg" and unknown == 0


def test_cancelled_annotations_and_unknown_labels_do_not_count(redis):
    labels = LabelStore(redis)
    labels.put("1", *annotation(1, 10, "ants", cancelled=True))
    labels.put("1", *annotation(2, 11, "wasps"))
    labels.put("1", *annotation(3, 12, "bees"))
    examples, unknown = labels.examples("1", SPEC)
    assert [(e.task_id, e.choices) for e in examples] == [(12, ["bees"])]
    assert unknown == 1


def test_deleting_a_known_id_is_exact_and_an_unknown_id_marks_the_mirror_stale(redis):
    labels = LabelStore(redis)
    labels.replace_all("1", {})
    labels.put("1", *annotation(1, 10, "ants"))
    assert not labels.needs_sync("1")
    assert labels.delete("1", [1]) is True
    assert labels.examples("1", SPEC)[0] == [] and not labels.needs_sync("1")
    assert labels.delete("1", [777]) is False
    assert labels.needs_sync("1")


def test_a_resync_replaces_everything_at_once(redis):
    labels = LabelStore(redis)
    labels.put("1", *annotation(1, 10, "ants"))
    assert labels.needs_sync("1")  # first contact: never synced
    record = {"task": 20, "data": {"image": "x"}, "result": annotation(9, 20, "bees")[0]["result"],
              "ground_truth": False, "cancelled": False, "updated_at": ""}
    labels.replace_all("1", {9: record})
    assert [(e.task_id, e.choices) for e in labels.examples("1", SPEC)[0]] == [(20, ["bees"])]
    assert not labels.needs_sync("1")
