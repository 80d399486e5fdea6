"""The label mirror: which annotation wins, deletions, unknown labels, full-read replacement, hints to confirm."""

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


def record(task, choice, *, cancelled=False, updated="2026-01-01T00:00:00Z"):
    annotation_, task_ = annotation(0, task, choice, cancelled=cancelled, updated=updated)
    return {"task": task, "data": task_["data"], "result": annotation_["result"], "ground_truth": False,
            "cancelled": cancelled, "updated_at": updated}


def test_hints_are_taken_for_confirmation_and_kept_until_it_is_written(redis):
    labels = LabelStore(redis)
    labels.add_hints("1", tasks=[10], annotations=[7])
    taken = labels.take_hints("1")
    assert (taken.tasks, taken.annotations, taken.check) == ({10}, {7}, False)
    labels.add_hints("1", tasks=[11], check=True)  # arrives while the first confirmation fails
    retried = labels.take_hints("1")  # the retry takes the old hints again, with the new ones
    assert (retried.tasks, retried.annotations, retried.check) == ({10, 11}, {7}, True)
    labels.add_hints("1", tasks=[12])
    labels.hints_confirmed("1")
    assert labels.hints_pending("1") and labels.take_hints("1").tasks == {12}  # only what was taken is forgotten
    labels.hints_confirmed("1")
    assert not labels.hints_pending("1") and not labels.take_hints("1")


def test_confirmed_tasks_hold_exactly_what_label_studio_has(redis):
    labels = LabelStore(redis)
    labels.replace_all("1", {1: record(10, "ants"), 2: record(10, "bees", cancelled=True), 3: record(11, "bees"),
                             4: record(12, "ants")})
    assert labels.counts("1") == (3, 3)
    assert labels.tasks_of("1", [1, 3, 99]) == {10, 11}
    # task 10 now has one annotation (id 5), task 11 is gone from Label Studio, task 12 was not asked about
    labels.replace_tasks("1", [10, 11], {5: record(10, "bees", updated="2026-01-03T00:00:00Z")})
    assert [(e.task_id, e.choices) for e in labels.examples("1", SPEC)[0]] == [(10, ["bees"]), (12, ["ants"])]
    assert labels.counts("1") == (2, 2)
    confirmed = record(10, "bees", updated="2026-01-03T00:00:00Z")
    assert labels.is_confirmed("1", 5, confirmed)
    assert not labels.is_confirmed("1", 5, {**confirmed, "updated_at": "2026-01-04T00:00:00Z"})
    assert not labels.is_confirmed("1", 5, record(10, "ants", updated="2026-01-03T00:00:00Z"))
    assert labels.knows_any("1", [99, 4]) and not labels.knows_any("1", [99])


def test_a_full_read_that_overlaps_a_loss_keeps_the_mirror_stale(redis):
    labels = LabelStore(redis)
    labels.add_hints("1", tasks=[10])
    started = labels.begin_full_read("1")  # takes the hints the read will cover
    assert started.hints.tasks == {10}
    labels.add_hints("1", tasks=[11])  # arrives during the read: not covered
    labels.mark_stale("1")  # e.g. webhooks Redis could not record, noted during the read
    labels.replace_all("1", {1: record(10, "ants")}, started=started, watermark="2026-01-01T00:00:00+00:00",
                       config="<View/>")
    assert labels.needs_sync("1") and labels.take_hints("1").tasks == {11}
    assert labels.watermark("1") == "2026-01-01T00:00:00+00:00" and labels.read_config("1") == "<View/>"
    labels.hints_confirmed("1")
    again = labels.begin_full_read("1")
    labels.replace_all("1", {1: record(10, "ants")}, started=again)
    assert not labels.needs_sync("1") and not labels.hints_pending("1")
