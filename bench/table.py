"""`python -m bench table`: the results as a markdown table, put between docs/performance.md's markers.

The table is regenerated from bench/results/*.json only (it never measures anything), written to
bench/results/TABLE.md, and replaces the text between `<!-- performance:start -->` and
`<!-- performance:end -->` in docs/performance.md when those markers are there.
"""

from __future__ import annotations

from pathlib import Path

from bench.harness import REPO, RESULTS_DIR, cpu_model, read_result

START = "<!-- performance:start -->"
END = "<!-- performance:end -->"
HEADER = ("| benchmark | measure | headstart | baseline | result | goal | |\n"
          "|---|---|---|---|---|---|---|")


def _status(record: dict, key: str) -> str:
    met = record.get("goals", {}).get(key, {}).get("met")
    return {True: "met", False: "**missed**"}.get(met, "n/a")


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.3g} ms"


def _times(value: float) -> str:
    return f"{value:.0f}×" if value >= 100 else f"{value:.3g}×"


def _retrain_rows(r: dict) -> list[str]:
    if r["headstart_s"] is None:
        return ["| retrain | one more annotation → new version served | every run rejected by the guard | | | | "
                "**missed** |"]
    sizes = " and ".join(str(n["labels"]) for n in r["naive_measured"])
    largest = r["naive_measured"][-1]
    return [
        f"| retrain | one more annotation → new version served ({r['labels']} labels) | {r['headstart_s']:.2f} s "
        f"| naive recipe: {r['naive_s']:.0f} s, extrapolated from runs at {sizes} labels "
        f"({largest['seconds']:.0f} s at {largest['labels']}) | {_times(r['speedup_vs_naive'])} faster "
        f"(≥ {_times(r['speedup_vs_naive_measured_lower_bound'])} against the measured {largest['labels']}-label "
        f"run) | ≥ 100× | {_status(r, 'speedup_vs_naive')} |",
        f"| retrain | same, against the floor (embed 1 image + fit head, called directly) | {r['headstart_s']:.2f} s "
        f"| floor: {r['floor_s']:.2f} s; floor + the guard's cross-validation: {r['core_s']:.2f} s "
        f"| {_times(r['ratio_to_floor'])} the floor ({_times(r['ratio_to_core'])} floor + validation) | ≤ 1.5× "
        f"| {_status(r, 'ratio_to_floor')} |",
        f"| retrain | runs whose new version the promotion guard rejected (never served) "
        f"| {r['rejected_runs']} of {len(r['runs'])} | | | none set: every run should serve "
        f"| {'ok' if r['rejected_runs'] == 0 else '**finding**'} |",
    ]


def _predict_rows(r: dict) -> list[str]:
    return [
        f"| predict | 1 uncached image, p50 (p95) | {_ms(r['uncached_p50_ms'])} ({_ms(r['uncached_p95_ms'])}) "
        f"| raw torch: {_ms(r['raw_p50_ms'])} ({_ms(r['raw_p95_ms'])}); headstart in process, no HTTP: "
        f"{_ms(r['in_process_p50_ms'])} | {_times(r['uncached_ratio'])} raw | ≤ 1.2× "
        f"| {_status(r, 'uncached_ratio')} |",
        f"| predict | 1 cached image, p50 | {_ms(r['cached_p50_ms'])} | | | ≤ 10 ms | {_status(r, 'cached_p50_ms')} |",
        f"| predict | {r['batch_tasks']} uncached tasks in one request | {r['batch_img_per_s']:g} images/s "
        f"| raw torch: {r['raw_batch_img_per_s']:g} images/s | {_times(r['batch_ratio'])} raw | ≥ 0.9× "
        f"| {_status(r, 'batch_ratio')} |",
    ]


def _accuracy_rows(r: dict) -> list[str]:
    rows = []
    for name, cells in r["sets"].items():
        curve = ", ".join(f"{k}: {cell['headstart']:.1f}" for k, cell in cells.items())
        best = ", ".join(f"{k}: {max(cell['ref_logreg'], cell['ref_linear']):.1f}" for k, cell in cells.items())
        rows.append(f"| accuracy | {name}, % on val by labels per class | {curve} | best reference: {best} "
                    f"| | | |")
    name, _, k = r["worst_gap_cell"].partition(" k=")
    stderr = _stderr(r["sets"].get(name, {}).get(k, {}))
    rows.append(f"| accuracy | worst gap to the best reference (all sets, all k) | | | "
                f"{r['worst_gap']:+g}{stderr} points ({r['worst_gap_cell']}) | ≥ 0 | {_status(r, 'worst_gap')} |")
    for name, accuracy in (r.get("zero_shot") or {}).items():
        matched = [cls for cls, found in (r.get("zero_shot_matches") or {}).get(name, {}).items() if found]
        target = (r.get("goals", {}).get(f"zero_shot_{name}") or {}).get("target")
        score = (r.get("zero_shot_mean_score") or {}).get(name)
        value = "none served" if accuracy is None else f"{accuracy:.1f}%" + (
            "" if score is None else f" (mean score {score:.1f}%)")
        rows.append(f"| accuracy | {name}, k=0 (no label): zero-shot `label-v0` pre-labels, % on val | {value} "
                    f"| ImageNet classes among its choices: {', '.join(matched) or 'none'} | "
                    f"| {'' if target is None else f'≥ {target:g}%'} "
                    f"| {_status(r, f'zero_shot_{name}') if target is not None else ''} |")
    return rows


def _webhook_rows(r: dict) -> list[str]:
    saturation = r["saturation"]
    return [
        f"| webhook | {r['senders']} senders × {r['offered_events_per_s'] / r['senders']:g} events/s for "
        f"{r['seconds']:g} s ({r['events']} events), latency p50 (p99) | {_ms(r['p50_ms'])} ({_ms(r['p99_ms'])}) "
        f"| | | p99 ≤ 50 ms | {_status(r, 'p99_ms')} |",
        f"| webhook | errors; trainings per project | {r['errors']}; "
        f"{', '.join(str(n) for n in r.get('trainings_per_project', {}).values()) or 'none'} | | "
        f"| 0 errors, a handful each | {_status(r, 'errors')} |",
        f"| webhook | capacity: the same senders back to back for {saturation['seconds']:g} s "
        f"| {saturation['events_per_s']:.0f} events/s, p50 {_ms(saturation['p50_ms'])}, "
        f"{saturation['errors']} errors | | | 0 errors | {_status(r, 'saturation_errors')} |",
    ]


def _gpu_rows(r: dict) -> list[str]:
    if not r.get("run"):
        return [f"| gpu | not run | | | {r.get('reason', '')} | | |"]
    return [f"| gpu | {r['device']}: embedding; retrain ({r['retrain_labels']} labels) "
            f"| {r['embed_img_per_s']:g} images/s; {r['retrain_s']:.2f} s | | | | |"]


def _stderr(cell: dict) -> str:
    """" ± s" for a cell's gap standard error over its draws (results before 20 draws have none)."""
    return f" ± {cell['gap_stderr']:g}" if cell.get("gap_stderr") is not None else ""


def _text_rows(r: dict) -> list[str]:
    curve = ", ".join(f"{k}: {cell['headstart']:.1f}" for k, cell in r["accuracy"].items())
    best = ", ".join(f"{k}: {max(cell['ref_logreg'], cell['ref_linear']):.1f}" for k, cell in r["accuracy"].items())
    return [
        f"| text | bbc-news on all-MiniLM-L6-v2, % on val by labels per topic | {curve} | best reference: {best} "
        f"| worst gap {r['worst_gap']:+g}{_stderr(r['accuracy'].get(str(r['worst_gap_k']), {}))} points "
        f"(k={r['worst_gap_k']}), lowest cell {r['worst_gap_stderrs']:+g} standard errors "
        f"| no cell below by more than 2 standard errors | {_status(r, 'worst_gap_stderrs')} |",
        f"| text | texts embedded per second (CPU, 1 thread) | {r['embed_texts_per_s']:g} "
        f"| raw encoder: {r['raw_texts_per_s']:g} | {_times(r['embed_ratio'])} raw | ≥ 0.9× "
        f"| {_status(r, 'embed_ratio')} |",
        f"| text | retrain after one label; /predict 1 text p50 uncached (cached) | {r['retrain_s']:.2f} s; "
        f"{_ms(r['predict_uncached_p50_ms'])} ({_ms(r['predict_cached_p50_ms'])}) | | | | |",
    ]


def _loop_rows(r: dict, *, benchmark: str = "loop", inputs: str = "tasks") -> list[str]:
    """The full run (N = 5,000) and the CI-size one (N = 1,000, under `quick`), whichever were measured."""
    rows = []
    for section in (r, r.get("quick") or {}):
        if not section.get("tasks"):
            continue
        n, load = f"{section['tasks']:,} {inputs}", section.get("load_average_before", [None])[0]
        rows += [
            f"| {benchmark} | {n}, real Label Studio, 3 annotators: submit → version served, p50 (p95) "
            f"| {section['submit_to_version_p50_s']:g} s ({section['submit_to_version_p95_s']:g} s) | | "
            f"1-minute load average {load:g} at the start | p50 ≤ 2 s, p95 ≤ 5 s "
            f"| {_status(section, 'submit_to_version_p50_s')}, {_status(section, 'submit_to_version_p95_s')} |",
            f"| {benchmark} | {n}: promotion → every unlabeled task carries its prediction "
            f"| {section['repredict_all_s']:g} s | | | ≤ 10 s | {_status(section, 'repredict_all_s')} |",
            f"| {benchmark} | {n}: Label Studio API requests per training (median) "
            f"| {section['ls_requests_per_training']:g} | | | proportional to what changed | |",
            f"| {benchmark} | {n}: first embedding pass, 2 workers vs 1 | {section['two_worker_embed_speedup']:g}× "
            f"| 1 worker | | ≥ 1.7× | {_status(section, 'two_worker_embed_speedup')} |",
        ]
    return rows or [f"| {benchmark} | not measured yet | | | | | |"]


def _text_loop_rows(r: dict) -> list[str]:
    return _loop_rows(r, benchmark="loop (text)", inputs="text tasks")


def _accepted(h: dict) -> str:
    """"126 of 153 val tasks": how many tasks one seed's realized precision rests on."""
    accepted, coverage = h.get("autoaccept_accepted"), h.get("autoaccept_coverage")
    if not accepted or not coverage:
        return "val tasks accepted: n/a"
    return f"{accepted:.0f} of {accepted / coverage:.0f} val tasks"


def _trust_rows(r: dict) -> list[str]:
    """The headline cell of each set (all labels, 10 % of them flipped)."""
    rows = []
    for name in ("hymenoptera", "flowers12"):
        h = r.get(name) or {}
        if h.get("topn_precision") is None:
            rows.append(f"| trust | {name}: not measured yet | | | | | |")
            continue
        rows += [
            f"| trust | {name}, all labels, 10 % flipped: flipped labels in the top N (N = flipped) "
            f"| precision {h['topn_precision']:g} | logistic baseline: {h['baseline_topn_precision']:g} | "
            f"| ≥ baseline | {_status(r, f'{name}_topn_vs_baseline')} |",
            f"| trust | {name}: the suspect cut against the flipped set | precision {h['cut_precision']:g}, "
            f"recall {h['cut_recall']:g} | | | precision ≥ 0.9, recall ≥ 0.8 "
            f"| {_status(r, f'{name}_cut_precision')}, {_status(r, f'{name}_cut_recall')} |",
            f"| trust | {name}: auto-accept at {r['target']:.0%}, precision realized on val (coverage) "
            f"| {h['autoaccept_precision']:.3f} ({h['autoaccept_coverage']:.0%}, {_accepted(h)}) "
            f"| | gap {h['autoaccept_precision_gap']:g} points over the seeds' accepted tasks "
            f"({h.get('autoaccept_precision_gap_per_seed', 'n/a')} per seed) | ≤ 1 point | {_status(r, f'{name}_autoaccept_precision_gap')} |",
        ]
    return rows


def _guard_rows(r: dict) -> list[str]:
    """The promotion guard's noise: labels two versions one label apart disagree on, folds by task id vs reshuffled."""
    return [f"| guard | {r['trainings_per_set']} one-label-more trainings per set ({', '.join(r['sets'])}): labels "
            f"on which the new and the served version's out-of-fold results differ; trainings rejected "
            f"| {r['disagreements']['stable']}; {r['rejected']['stable']} rejected "
            f"| folds reshuffled per training: {r['disagreements']['reshuffled']}; "
            f"{r['rejected']['reshuffled']} rejected "
            f"| ratio {r['disagreement_ratio']:g} | ratio ≤ 0.5, rejected ≤ baseline "
            f"| {_status(r, 'disagreement_ratio')}, {_status(r, 'rejected_extra')} |",
            f"| guard | {r['audits_per_set']} one-label-more label audits per set, 10 % of the labels flipped: "
            f"suspects that appear or vanish on labels nothing changed (markers written or deleted in Label Studio) "
            f"| {r['churn']['stable']} | folds reshuffled per audit: {r['churn']['reshuffled']} "
            f"| ratio {r['churn_ratio']:g} | ratio ≤ 0.5 | {_status(r, 'churn_ratio')} |"]


ROWS = {"retrain": _retrain_rows, "predict": _predict_rows, "accuracy": _accuracy_rows,
        "webhook": _webhook_rows, "loop": _loop_rows, "gpu": _gpu_rows, "text": _text_rows,
        "loop-text": _text_loop_rows, "trust": _trust_rows,
        "guard": _guard_rows}


def _runs(record: dict) -> list[dict]:
    """The measured runs in a result file: the record itself, and loop's N = 1,000 section under `quick`."""
    return [run for run in (record, record.get("quick")) if isinstance(run, dict) and run.get("started_at")]


def markdown(results_dir: Path = RESULTS_DIR) -> str:
    records = {name: read_result(name, results_dir) for name in ROWS}
    found = {name: record for name, record in records.items() if record is not None}
    if not found:
        return "No benchmark results yet: run `python -m bench all`."
    runs = [run for record in found.values() for run in _runs(record)]
    machine = runs[0].get("machine", {})
    loads = [value for run in runs
             for value in run.get("load_average_before", [])[:1] + run.get("load_average_after", [])[:1]]
    gpu = machine.get("gpu") or "no GPU"
    dates = sorted(run["started_at"][:10] for run in runs)
    lines = [
        "Measured with `python -m bench all` (the loop rows with `python -m bench loop [--quick] [--text]`, the "
        "trust and guard rows with `python -m bench trust` and `python -m bench guard`) on "
        f"{machine.get('cpu') or cpu_model()}, "
        f"{machine.get('cores')} cores, "
        f"{gpu}, torch {machine.get('torch')}, {dates[0]}{'' if dates[0] == dates[-1] else ' to ' + dates[-1]}. "
        f"The machine was shared with other work (1-minute load average {min(loads):g} to {max(loads):g} "
        "around the runs), so each figure is set against its baseline measured in the same run. "
        "Details and method: [bench/README.md](../bench/README.md).",
        "",
        HEADER,
    ]
    for name, rows in ROWS.items():
        record = found.get(name)
        lines += rows(record) if record else [f"| {name} | not measured yet | | | | | |"]
    lines += ["", "Why the missed goals are missed, and what would fix them: "
              "[bench/README.md, Findings](../bench/README.md#findings)."]
    quick = [name for name, record in found.items() if record.get("quick") is True]  # loop's `quick` is a section
    if quick:
        lines += ["", f"Results of {', '.join(quick)} come from a `--quick` run and mean nothing."]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path = REPO / "docs" / "performance.md", results_dir: Path = RESULTS_DIR) -> str:
    """Write TABLE.md and, when docs/performance.md has the markers, the table between them. Says what it did."""
    table = markdown(results_dir)
    (results_dir / "TABLE.md").write_text(table)
    if not readme.exists():
        return f"{readme} does not exist; the table is in {results_dir / 'TABLE.md'}"
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        return f"{readme} has no {START} … {END} markers; the table is in {results_dir / 'TABLE.md'}"
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{table}{END}{after}")
    return f"updated the performance table in {readme} (and {results_dir / 'TABLE.md'})"
