"""The `loop` benchmark's results: its JSON section, the plot and the printed table.

A labeling phase is handed over as a `LabelingRun` (what bench.loop observed); everything here is
computed from it after the processes are gone.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from backend.common.settings import Settings
from bench import loop_measure as measure
from bench.annotators import Action
from bench.harness import goal, median, print_table, read_result, rounded
from bench.ls_proxy import ProxiedRequest

NAME = "loop"
TEXT_NAME = "loop-text"  # `python -m bench loop --text`: the same run on a text project
KEYS = ("tasks", "submit_to_version_p50_s", "submit_to_version_p95_s", "repredict_all_s",
        "ls_requests_per_training", "two_worker_embed_speedup")


@dataclass(frozen=True)
class LabelingRun:
    """What the labeling phase observed."""
    actions: list[Action]
    served: list[dict]                  # versions served, with served_at (loop_measure.ServedWatcher.served)
    jobs: list[measure.JobRecord]
    requests: list[ProxiedRequest]      # every request headstart sent Label Studio, tagged backend / worker
    final: dict                         # the final label's promotion and re-prediction (bench.loop._final)
    settle_s: float | None
    labeling_started: float
    labeling_ended: float
    observed_until: float
    embedded_before_final: int
    setup_model_version: str | None
    label_studio_model_version: str | None


def summarize(*, tasks: int, label_seconds: float, settle_timeout_s: float, annotators: int,
              pace_s: tuple[float, float], embed: dict, run: LabelingRun, media: str = "images") -> dict:
    """This mode's section of loop.json (loop-text.json for `media` "texts"): the six keys, their goals, notes
    and the details behind them."""
    actions = run.actions
    first = measure.first_trainable(actions, min_labels_per_class=Settings().min_labels_per_class)
    timed = measure.latencies(actions, run.served, observed_until=run.observed_until)
    counted = [entry for index, entry in enumerate(timed) if first is not None and index >= first
               and entry["outcome"] != "superseded"]
    seconds = [entry["seconds"] for entry in counted]
    spread = measure.spread(seconds)
    requests = [request for request in run.requests if request.tag == "worker"]
    trainings = measure.trainings(run.jobs)
    per_training = [_training_requests(job, requests) for job in trainings]
    from_result = [entry for entry in per_training if entry["source"] == "job result"]
    counts = [entry["requests"] for entry in per_training]
    one, two = embed[1]["seconds"], embed[2]["seconds"]
    final = run.final
    results = {
        "tasks": tasks,
        "submit_to_version_p50_s": rounded(spread["p50"], 2),
        "submit_to_version_p95_s": rounded(spread["p95"], 2),
        "repredict_all_s": final.get("repredict_all_s"),
        "ls_requests_per_training": median(counts) if counts else None,
        "two_worker_embed_speedup": rounded(one / two, 2) if one and two else None,
    }
    goals = {"submit_to_version_p50_s": goal(results["submit_to_version_p50_s"], 2, at_least=False),
             "submit_to_version_p95_s": goal(results["submit_to_version_p95_s"], 5, at_least=False),
             "repredict_all_s": goal(results["repredict_all_s"], 10, at_least=False),
             "two_worker_embed_speedup": goal(results["two_worker_embed_speedup"], 1.7, at_least=True)}
    by_kind = {kind: measure.spread([e["seconds"] for e in counted if e["kind"] == kind and e["seconds"] is not None])
               for kind in sorted({e["kind"] for e in counted})}
    kinds = Counter(f"{job.kind}:{job.status}" for job in run.jobs)
    details = {
        "actions": len(actions), "action_kinds": dict(Counter(action.kind for action in actions)),
        "first_trainable_action": first, "timed_actions": len(counted),
        "unserved_actions": sum(entry["outcome"] == "unserved" for entry in counted),
        "superseded_actions": sum(entry["outcome"] == "superseded" for entry in timed),
        "submit_to_version_max_s": rounded(spread["max"], 2),
        "submit_to_version_by_kind": {kind: {k: rounded(v, 2) for k, v in s.items()} for kind, s in by_kind.items()},
        "submit_request_p50_s": rounded(median([a.seconds for a in actions]), 3) if actions else None,
        "labeling_s": round(run.labeling_ended - run.labeling_started, 1),
        "labels_per_s": rounded(len(actions) / max(run.labeling_ended - run.labeling_started, 1e-9), 2),
        "versions_served": len(run.served),
        "versions_rejected": sum(1 for job in trainings for control in _controls(job).values()
                                 if control.get("status") == "rejected"),
        "trainings": len(trainings),
        "jobs": dict(sorted(kinds.items())),
        "settle_s": rounded(run.settle_s, 1),
        "embedded_before_final": run.embedded_before_final,
        "final": {key: value for key, value in final.items() if key != "progress"},
        "ls_requests_per_training_source": ("job result" if from_result and len(from_result) == len(per_training)
                                            else "bench proxy (job results carry no ls_requests)" if not from_result
                                            else "mixed: job result where present, else bench proxy"),
        "ls_requests_per_training_mean": rounded(sum(counts) / len(counts), 1) if counts else None,
        "ls_requests_per_training_max": max(counts) if counts else None,
        "ls_bytes_per_training_p50": median([entry["proxy_bytes"] for entry in per_training]) if per_training else None,
        "ls_requests_by_endpoint": dict(Counter(measure.endpoint(r.path) for job in trainings
                                                for r in measure.requests_in(job, requests)).most_common()),
        "ls_requests_by_job_kind": _requests_by_job(run.jobs, requests),
        "ls_requests_backend": len([r for r in run.requests if r.tag == "backend"]),
        "per_training": per_training,
        "embed": {str(workers): value for workers, value in embed.items()},
        "setup_model_version": run.setup_model_version,
        "label_studio_model_version": run.label_studio_model_version,
        "timeline": [{**entry, "sent_at": round(entry["sent_at"] - run.labeling_started, 2)} for entry in timed],
        "worker_jobs": _job_timeline(run.jobs, run.labeling_started),
        "repredict_progress": final.get("progress", []),
    }
    notes = [
        (f"{tasks} tasks of distinct images (bench/loop_images.py)" if media == "images" else
         f"{tasks} tasks of distinct bbc-news articles held in the tasks (bench/loop_texts.py), all-MiniLM-L6-v2")
        + f"; headstart as `headstart up` starts it (gunicorn with default settings + {Settings().up_workers} "
        "`headstart worker`s, REPREDICT_UNLABELED=true), own redis-server",
        f"{annotators} annotators, one action every {pace_s[0]:g}-{pace_s[1]:g} s each, for "
        f"{label_seconds:g} s: true classes, plus one mistake, its relabel and one delete",
        "submit_to_version: from sending an action to Label Studio until the first served version (the store's "
        "promoted_at) trained on it (`trained_on`), over every action from the first trainable one on; actions "
        "never served count with the lower bound end-of-run − sent (see unserved_actions); a mistake corrected "
        "before any version read it is left out (superseded_actions)",
        "repredict_all_s: after the queues drained and one more label was promoted, from that promotion until "
        "Label Studio's /api/projects/ID/model-versions/ counts a prediction of the version per unlabeled task "
        "(polled every 0.5 s), then every unlabeled task checked (final.missing, final.duplicates)",
        "ls_requests_per_training: median over training jobs of their Label Studio API requests, source: "
        f"{details['ls_requests_per_training_source']}; per_training also has what the bench proxy saw the worker "
        "send while each job ran (proxy_requests, proxy_bytes)",
        "two_worker_embed_speedup: `headstart embed`'s job (backend.admin.actions.embed) on a fresh Redis, from "
        "enqueueing it until no job is pending and every task's embedding is cached; 1 worker's time / 2 workers' "
        "time (TORCH_THREADS=1 each, Label Studio idle meanwhile, on this machine's cores)",
    ]
    notes.append("load average around the embedding passes (1 min, 5 min, 15 min): " + "; ".join(
        f"{workers} worker(s) {value['load_average_before']} → {value['load_average_after']}, workers' CPU "
        f"{value['workers_cpu_s']} s in {value['seconds']} s" for workers, value in embed.items())
                 + f", on {os.cpu_count()} cores: other work on the machine takes cores the second worker needs")
    if first is None:
        notes.append("no action made the labels trainable: no latency measured")
    if details["unserved_actions"]:
        notes.append(f"{details['unserved_actions']} action(s) were never served; counted as lower bounds")
    if run.settle_s is None:
        notes.append(f"the queues did not drain within {settle_timeout_s:g} s after labeling")
    if final.get("promoted_by", "the guard") != "the guard":
        notes.append(f"the final version was promoted by {final['promoted_by']}")
    if final.get("outcome") != "promoted" or final.get("repredict_all_s") is None:
        notes.append(f"repredict_all_s not measured: {final.get('outcome')}, {final.get('missing')} task(s) without "
                     "the version's prediction")
    return {**results, "goals": goals, "notes": notes, "details": details}


def _controls(job: measure.JobRecord) -> dict:
    return job.result.get("controls", {}) if isinstance(job.result, dict) else {}


def _training_requests(job: measure.JobRecord, requests: list) -> dict:
    seen = measure.requests_in(job, requests)
    reported = job.result.get("ls_requests") if isinstance(job.result, dict) else None
    labels = max((control.get("labels", 0) or 0 for control in _controls(job).values()), default=None)
    read = job.result.get("labels_read") if isinstance(job.result, dict) else None
    return {"job": job.id, "labels": labels, "seconds": round(job.ended_at - job.started_at, 3),
            "requests": reported if isinstance(reported, int) else len(seen), "proxy_requests": len(seen),
            "tasks_read": read.get("tasks_read") if isinstance(read, dict) else None,
            "proxy_bytes": sum(request.bytes for request in seen),
            "source": "job result" if isinstance(reported, int) else "bench proxy",
            "status": "/".join(sorted({c.get("status", "?") for c in _controls(job).values()})) or job.status}


def _job_timeline(jobs: list[measure.JobRecord], base: float) -> list[dict]:
    """Every job of the labeling phase: kind, start (s since labeling started), duration and what it reported."""
    def brief(result) -> dict | str | None:
        if not isinstance(result, dict):
            return result if result is None or isinstance(result, (str, int, float)) else str(result)[:200]
        return {key: value for key, value in result.items() if isinstance(value, (str, int, float, bool))}

    return [{"kind": job.kind, "status": job.status, "start_s": round(job.started_at - base, 2),
             "seconds": round(job.ended_at - job.started_at, 3), "result": brief(job.result)}
            for job in jobs if job.started_at and job.ended_at]


def _requests_by_job(jobs: list[measure.JobRecord], requests: list) -> dict:
    counts: Counter = Counter()
    attributed = set()
    for job in jobs:
        if job.started_at and job.ended_at:
            inside = measure.requests_in(job, requests)
            counts[job.kind] += len(inside)
            attributed.update(id(request) for request in inside)
    counts["outside any finished job"] = sum(1 for request in requests if id(request) not in attributed)
    return dict(counts)


def write_record(section: dict, *, quick: bool, results_dir: Path, name: str = NAME) -> dict:
    """Write this mode's section into `name`.json, keeping the other mode's: the full run (N = 5,000) at the top
    level, the quick one (N = 1,000) under `quick`."""
    previous = read_result(name, results_dir) or {}
    if quick:
        top = {key: value for key, value in previous.items() if key != "quick"} or _not_run()
        record = {**top, "benchmark": name, "quick": section}
    else:
        record = {"benchmark": name, **section, "quick": previous.get("quick")}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _not_run() -> dict:
    return {**{key: None for key in KEYS}, "notes": ["the full mode (N = 5,000, `python -m bench loop`) has not run: "
                                                     "only `quick` holds figures"]}


def plot(section: dict, run: LabelingRun, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is missing: no plot; pip install -e '.[bench]')")
        return
    details = section["details"]
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 10))
    for kind, marker in (("create", "o"), ("mistake", "x"), ("relabel", "s"), ("delete", "D")):
        points = [(e["sent_at"], e["seconds"]) for e in details["timeline"] if e["kind"] == kind and e["seconds"]]
        if points:
            top.scatter(*zip(*points), s=12, marker=marker, label=kind)
    top.axhline(2, color="green", linestyle="--", linewidth=1, label="goal p50 2 s")
    top.axhline(5, color="orange", linestyle="--", linewidth=1, label="goal p95 5 s")
    top.set(title=f"submit → new version served ({section['tasks']} tasks): p50 {section['submit_to_version_p50_s']} s,"
                  f" p95 {section['submit_to_version_p95_s']} s", xlabel="s since labeling started", ylabel="seconds")
    top.legend(fontsize=8)
    base = run.labeling_started
    labeled = sorted(a.sent_at - base for a in run.actions)
    middle.step(labeled, range(1, len(labeled) + 1), where="post", label="actions sent")
    versions = [(meta["served_at"] - base, len(meta.get("trained_on") or {})) for meta in run.served]
    if versions:
        middle.step(*zip(*versions), where="post", label="labels in the served version")
    shades = {"predict_unlabeled": "tab:purple", "train_project": None}
    for job in run.jobs:
        shade = shades.get(job.kind, "tab:olive")  # anything else: indexing and embedding
        if job.started_at and job.ended_at and shade:
            middle.axvspan(job.started_at - base, job.ended_at - base, color=shade, alpha=0.15, linewidth=0)
    middle.set(title="labels sent and served; the worker's other jobs shaded (olive: indexing and embedding, "
                     "purple: re-prediction)",
               xlabel="s since labeling started", ylabel="labels")
    middle.legend(fontsize=8)
    progress = details["repredict_progress"]
    if progress:
        bottom.plot(*zip(*progress), marker=".")
        bottom.axhline(details["final"].get("unlabeled", 0), color="grey", linestyle=":", label="unlabeled tasks")
        bottom.legend(fontsize=8)
    bottom.set(title=f"after the final promotion: predictions of {details['final'].get('model_version')} in Label "
                     f"Studio (repredict_all_s {section['repredict_all_s']})", xlabel="s since promotion",
               ylabel="predictions")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_summary(section: dict) -> None:
    details = section["details"]
    goals = section["goals"]

    def status(key: str) -> str:
        return {True: "met", False: "MISSED", None: "n/a"}[goals[key]["met"]] if key in goals else ""

    embed = details["embed"]
    print_table(f"loop ({section['tasks']} tasks, {details['actions']} actions, {details['trainings']} trainings)",
                ["measure", "value", "goal", ""], [
        ["submit → version served, p50 (s)", section["submit_to_version_p50_s"], "≤ 2", status("submit_to_version_p50_s")],
        ["submit → version served, p95 (s)", section["submit_to_version_p95_s"], "≤ 5", status("submit_to_version_p95_s")],
        ["submit → version served, max (s)", details["submit_to_version_max_s"], "", ""],
        ["actions never served", details["unserved_actions"], "", ""],
        ["promotion → every unlabeled task predicted (s)", section["repredict_all_s"], "≤ 10",
         status("repredict_all_s")],
        ["LS requests per training (median)", section["ls_requests_per_training"], "∝ change", ""],
        ["LS requests per training (max)", details["ls_requests_per_training_max"], "", ""],
        ["first embedding pass, 1 worker (s)", embed["1"]["seconds"], "", ""],
        ["first embedding pass, 2 workers (s)", embed["2"]["seconds"], "", ""],
        ["2-worker embedding speedup", section["two_worker_embed_speedup"], "≥ 1.7", status("two_worker_embed_speedup")],
    ])
    print(f"LS requests per training from: {details['ls_requests_per_training_source']}")
