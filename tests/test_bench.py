"""The benchmarks still run: each one in --quick mode (tiny sizes), into a temporary results directory.

No timing is asserted here (targets live in bench/results, measured by `python -m bench all`);
these tests check that every benchmark drives the real processes end to end and writes the keys
its table reads, and that the README table is regenerated between its markers.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest

from bench import table
from bench.__main__ import BENCHMARKS

KEYS = {
    "retrain": ("labels", "headstart_s", "naive_s", "floor_s", "speedup_vs_naive", "ratio_to_floor"),
    "predict": ("uncached_p50_ms", "raw_p50_ms", "uncached_ratio", "cached_p50_ms", "batch_img_per_s",
                "raw_batch_img_per_s", "batch_ratio"),
    "accuracy": ("sets", "worst_gap", "zero_shot", "zero_shot_mean_score", "zero_shot_matches"),
    "webhook": ("events", "p50_ms", "p99_ms", "errors", "jobs_enqueued"),
    "gpu": ("run",),
    "text": ("worst_gap", "worst_gap_stderrs", "embed_ratio", "retrain_s", "predict_uncached_p50_ms",
             "predict_cached_p50_ms"),
}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-results")


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_in_quick_mode(name, results_dir):
    if name == "accuracy":
        pytest.importorskip("sklearn", reason="the accuracy benchmark needs the bench extra: "
                                              "pip install -e '.[bench]'")
        pytest.importorskip("matplotlib", reason="the accuracy benchmark needs the bench extra")
    record = importlib.import_module(f"bench.{name}").run(quick=True, results_dir=results_dir)
    written = json.loads((results_dir / f"{name}.json").read_text())
    assert written == json.loads(json.dumps(record))
    assert written["quick"] is True and written["machine"]["cores"] >= 1
    for key in KEYS[name]:
        assert key in written, f"{name} result lacks {key}"
    if name == "retrain":
        assert all(_positive_number(written[key]) for key in KEYS[name])
        assert written["runs"][0]["outcome"] == "promoted"
    elif name == "predict":
        assert all(_positive_number(written[key]) for key in KEYS[name])
    elif name == "accuracy":
        for cells in written["sets"].values():
            for cell in cells.values():
                assert all(0 <= cell[method] <= 100 for method in ("headstart", "ref_logreg", "ref_linear"))
        assert (results_dir / "accuracy-quick.png").stat().st_size > 0
        assert 0 <= written["zero_shot"]["hymenoptera"] <= 100 and written["zero_shot"]["flowers12"] is None
    elif name == "webhook":
        assert written["events"] > 0 and written["errors"] == 0 and written["jobs_enqueued"] >= 1
    elif name == "text":
        assert all(_positive_number(written[key]) for key in KEYS[name][2:])
        assert all(run["status"] == "promoted" for run in written["retrain_runs"])
    else:
        assert written["run"] is True or "cuda" in written["reason"].lower()


def test_accuracy_zero_shot_alone_merges_k0_into_the_results_keeping_the_rest(tmp_path):
    """`python -m bench accuracy --zero-shot`: only k=0, written beside what the last full run measured."""
    accuracy = importlib.import_module("bench.accuracy")
    earlier = {"benchmark": "accuracy", "sets": {"hymenoptera": {}}, "worst_gap": -0.5, "quick": True,
               "worst_gap_cell": "hymenoptera k=1", "notes": ["earlier"],
               "goals": {"worst_gap": {"target": 0, "direction": ">=", "met": False}}}
    (tmp_path / "accuracy.json").write_text(json.dumps(earlier))
    accuracy.run(quick=True, results_dir=tmp_path, zero_shot_only=True)
    written = json.loads((tmp_path / "accuracy.json").read_text())
    assert {key: written[key] for key in ("sets", "worst_gap", "quick")} == {"sets": {"hymenoptera": {}},
                                                                          "worst_gap": -0.5, "quick": True}
    assert written["goals"]["worst_gap"] == earlier["goals"]["worst_gap"]
    assert "zero_shot_hymenoptera" in written["goals"]
    assert 0 <= written["zero_shot"]["hymenoptera"] <= 100 and written["zero_shot"]["flowers12"] is None
    scores = written["zero_shot_mean_score"]
    assert 50 <= scores["hymenoptera"] <= 100 and scores["flowers12"] is None
    assert written["zero_shot_matches"]["flowers12"]["daisy"] == ["daisy"]
    assert written["zero_shot_matches"]["flowers12"]["sunflower"] is None
    assert written["notes"][0] == "earlier" and written["notes"][-1].startswith("zero_shot:")
    rows = "\n".join(table._accuracy_rows(written))
    assert "hymenoptera, k=0" in rows and "flowers12, k=0" in rows and "none served" in rows


def test_table_replaces_only_the_text_between_the_markers(results_dir, tmp_path):
    if not (results_dir / "gpu.json").exists():  # this test alone: at least one result to tabulate
        importlib.import_module("bench.gpu").run(quick=True, results_dir=results_dir)
    readme = tmp_path / "README.md"
    readme.write_text(f"# headstart\n\n## Performance\n{table.START}\nold table\n{table.END}\n\n## License\n")
    message = table.update_readme(readme, results_dir)
    text = readme.read_text()
    assert "updated" in message and "old table" not in text
    assert text.startswith("# headstart\n\n## Performance\n") and text.endswith(f"{table.END}\n\n## License\n")
    body = text.split(table.START)[1].split(table.END)[0]
    assert table.HEADER in body and (results_dir / "TABLE.md").read_text() == body.lstrip("\n")
    assert "cores" in body


def test_table_without_markers_leaves_the_readme_alone(results_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# headstart\n")
    assert "no <!-- performance:start -->" in table.update_readme(readme, results_dir)
    assert readme.read_text() == "# headstart\n"


def test_trust_runs_in_quick_mode(results_dir, tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the trust benchmark's baseline needs the bench extra: "
                                          "pip install -e '.[bench]'")
    monkeypatch.setenv("HEADSTART_BENCH_FEATURES", str(tmp_path / "none.pt"))  # embed the quick subset itself
    record = importlib.import_module("bench.trust").run(quick=True, results_dir=results_dir)
    assert json.loads((results_dir / "trust.json").read_text()) == record and record["complete"]
    for name in ("hymenoptera", "flowers12"):
        for key in ("topn_precision", "baseline_topn_precision", "cut_precision", "cut_recall",
                    "autoaccept_precision_gap"):
            assert key in record[name]
        assert 0 <= record[name]["topn_precision"] <= 1 and 0 <= record[name]["baseline_topn_precision"] <= 1


def test_guard_runs_in_quick_mode(results_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_BENCH_FEATURES", str(tmp_path / "none.pt"))  # embed the quick subset itself
    record = importlib.import_module("bench.guard").run(quick=True, results_dir=results_dir)
    assert json.loads((results_dir / "guard.json").read_text()) == record
    for name in ("flowers12", "hymenoptera"):
        for arm in ("stable", "reshuffled"):
            cell = record["sets"][name][arm]
            classes = 12 if name == "flowers12" else 2
            assert cell["trainings"] == 7 and cell["per_seed"][0]["labels_at_end"] == 3 * classes + 6
            assert 0 <= cell["rejected"] < cell["trainings"] and 0 < cell["val_accuracy"] <= 100
        assert record["audit"][name]["stable"]["audits"] == 5 and record["audit"][name]["reshuffled"]["churn"] >= 0
    assert "| guard |" in table.markdown(results_dir)


def test_retention_runs_in_quick_mode(results_dir, monkeypatch, redis_url, redis):
    monkeypatch.setenv("HEADSTART_BENCH_REDIS_URL", redis_url)  # the test database (flushed around each test)
    record = importlib.import_module("bench.retention").run(quick=True, results_dir=results_dir)
    assert json.loads((results_dir / "retention.json").read_text()) == record
    versions = record["versions"]
    assert 0 < versions["after_bytes"] < versions["before_bytes"]  # version k holds k labels: retention pays
    assert versions["versions_with_detail_after"] <= 4 and versions["versions_kept"] == record["labels"]
    assert all(_positive_number(value) for value in record["per_1000_images"].values())


def test_the_text_loop_project_holds_every_article_once_then_distinct_variants_with_their_topics():
    from bench.loop_texts import make_texts, originals

    articles = originals()
    texts = make_texts(len(articles) + 300)
    assert len({item.text for item in texts}) == len(texts)  # N different inputs for the embedding cache
    assert [(item.text, item.label) for item in texts[:len(articles)]] == articles
    for item, (text, label) in zip(texts[len(articles):], articles):
        assert item.label == label and item.text.split("\n\n")[0] == text.split("\n\n")[0]  # same title and topic
        assert sorted(item.text.split("\n\n")[:-1]) == sorted(text.split("\n\n"))  # the same paragraphs


def test_text_gap_is_judged_in_standard_errors_over_articles_for_a_single_draw():
    """k=all has one draw: its gap's spread comes from the per-article paired differences (each article scored
    0 or 100), and a cell below the reference with no spread to judge by fails the goal outright."""
    from bench.accuracy import gap_stderr
    from bench.text import worst_gap_in_stderrs

    per_article = {"headstart": [100.0, 0.0, 100.0, 100.0], "ref_logreg": [0.0, 100.0, 100.0, 100.0],
                   "ref_linear": [0.0, 0.0, 100.0, 100.0]}
    assert gap_stderr(per_article) == 40.82  # differences +1, -1, 0, 0 against logreg: sd sqrt(2/3) / sqrt(4)
    cells = {"1": {"headstart": 80.0, "ref_logreg": 70.0, "ref_linear": 75.0, "gap_stderr": 2.0},
             "all": {"headstart": 97.3, "ref_logreg": 97.07, "ref_linear": 97.52, "gap_stderr": 0.44}}
    assert worst_gap_in_stderrs(cells) == -0.5
    cells["all"]["gap_stderr"] = 0.0
    assert worst_gap_in_stderrs(cells) == float("-inf")
