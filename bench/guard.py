"""`guard`: how much chance moves the promotion guard's comparison and the label audit's suspects, with each label's
fold fixed by its task id (the product) against folds reshuffled at every training (the baseline: the same code,
given fresh task ids).

On each shared image set (cached MobileNetV2 features), labels arrive one at a time in a random order (3 orders
per set), from 3 per class, every label true; after each, the training job's own functions run as `retrain_control`
runs them: the served recipe refitted and validated (`fit_provisional`, `validate_provisional`) while its choice
holds, else a new choice (`fit_candidate`, with the zero-shot anchor and the unlabeled rest of train as the pool),
then the guard (`decide`) against the served version. Per set and arm:
- `disagreements`: summed over the trainings and orders, the labels on which the new version's out-of-fold result
  and the served version's differ (gained + lost): the noise the guard's paired test has to see through;
- `rejected`: trainings the guard rejected; every label is true, so each one held a label back for nothing;
- `val_accuracy`: the served version's accuracy on all of val, averaged over the trainings and orders (both arms
  should serve as well), and `val_accuracy_end` after each order's last training, averaged.
Baseline: before each training the task ids are replaced by a fresh random permutation of other ids, and mapped
back for the guard, so the folds differ at every training as they did before they followed the task ids.
The audit part (`audit`): with 10 % of the set's train labels flipped, the last `audits` labels arrive one at a
time and after each the audit job's suspects are computed (`out_of_fold_probabilities` + `judge_labels`, as
`backend.loop.audit` runs them). `churn`: labels present in two consecutive audits that are a suspect in one and
not the other, summed; each is a suspect marker written or deleted in Label Studio, and a flag an annotator sees
come and go although nothing about that label changed.
Goals: `disagreement_ratio` and `churn_ratio` (product over baseline, all sets) ≤ 0.5, and no more rejections than
the baseline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.audit import judge_labels, out_of_fold_probabilities
from backend.core.candidates import fit_candidate, fit_provisional, is_refit_enough, validate_provisional
from backend.core.heads import head_probabilities
from backend.core.promotion import current_results, decide
from backend.core.store import HeadVersion
from backend.core.torch_runtime import set_torch_threads
from bench.cached_features import EncoderRecord, image_features, zero_shot_anchor
from bench.harness import RESULTS_DIR, Run, goal, print_table, rounded

NAME = "guard"
SETS = ("flowers12", "hymenoptera")
ARMS = ("stable", "reshuffled")
START_PER_CLASS = 3


@dataclass(frozen=True)
class Params:
    trainings: int
    seeds: int  # label orders per set
    audits: int  # one-label-more audits per set and arm
    per_class_cap: int | None = None


FULL = Params(trainings=150, seeds=3, audits=60)
QUICK = Params(trainings=6, seeds=1, audits=4, per_class_cap=8)
FLIPPED = 0.1  # audit part: share of the labels flipped to another class


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    set_torch_threads(1)
    features = image_features(SETS, params.per_class_cap)
    cells = {name: {arm: _summed([_labeling(*features[name], arm=arm, trainings=params.trainings, seed=seed)
                                  for seed in range(params.seeds)]) for arm in ARMS}
             for name in SETS}
    totals = {arm: sum(cells[name][arm]["disagreements"] for name in SETS) for arm in ARMS}
    rejected = {arm: sum(cells[name][arm]["rejected"] for name in SETS) for arm in ARMS}
    ratio = rounded(totals["stable"] / totals["reshuffled"], 3) if totals["reshuffled"] else None
    audits = {name: {arm: _audit_churn(*features[name][0], features[name][2], arm=arm, audits=params.audits)
                     for arm in ARMS} for name in SETS}
    churn = {arm: sum(audits[name][arm]["churn"] for name in SETS) for arm in ARMS}
    churn_ratio = rounded(churn["stable"] / churn["reshuffled"], 3) if churn["reshuffled"] else None
    results = {"sets": cells, "trainings_per_set": params.trainings * params.seeds, "seeds": params.seeds,
               "disagreements": totals,
               "rejected": rejected, "disagreement_ratio": ratio,
               "rejected_extra": rejected["stable"] - rejected["reshuffled"],
               "audit": audits, "audits_per_set": params.audits, "churn": churn, "churn_ratio": churn_ratio}
    notes = ["labels arrive one at a time (random order, true labels) from 3 per class; the job's functions on cached "
             "features; disagreements: labels whose out-of-fold result differs between the new and the served "
             "version, summed over trainings; reshuffled: the same code given fresh task ids at every training"]
    record = bench_run.finish(results, goals={"disagreement_ratio": goal(ratio, 0.5, at_least=False),
                                              "churn_ratio": goal(churn_ratio, 0.5, at_least=False),
                                              "rejected_extra": goal(results["rejected_extra"], 0, at_least=False)},
                              notes=notes)
    print_table(f"guard: {params.seeds} × {params.trainings} one-label-more trainings per set",
                ["set", "arm", "disagreements", "rejected", "val accuracy % (mean, end)", "s"],
                [[name, arm, cell["disagreements"], cell["rejected"],
                  f"{cell['val_accuracy']}, {cell['val_accuracy_end']}", cell["seconds"]]
                 for name in SETS for arm, cell in cells[name].items()])
    print(f"disagreement ratio (stable / reshuffled): {ratio}")
    print_table(f"audit: {params.audits} one-label-more audits per set, {FLIPPED:.0%} of the labels flipped",
                ["set", "arm", "suspects per audit", "churn"],
                [[name, arm, cell["suspects_per_audit"], cell["churn"]] for name in SETS
                 for arm, cell in audits[name].items()])
    print(f"churn ratio (stable / reshuffled): {churn_ratio}")
    return record


def _labeling(train, val, classes, *, arm: str, trainings: int, seed: int = 0) -> dict:
    (x_train, y_train), (x_val, y_val) = train, val
    rng = random.Random(seed)
    order = list(range(len(y_train)))
    rng.shuffle(order)
    first = [i for c in range(len(classes)) for i in [j for j in order if y_train[j] == c][:START_PER_CLASS]]
    arriving = [i for i in order if i not in set(first)][:trainings]
    anchor = zero_shot_anchor(classes)
    labeled, current, disagreements, rejected, accuracies = list(first), None, 0, 0, []
    aliases = random.Random(seed + 1)
    started = time.perf_counter()
    for step in range(len(arriving) + 1):
        if step:
            labeled.append(arriving[step - 1])
        task_ids = sorted(labeled)
        keys = task_ids if arm == "stable" else aliases.sample(range(10**6), len(task_ids))
        meta, head = _train(x_train, y_train, classes, task_ids=task_ids, keys=keys, current=current, anchor=anchor)
        labels = [[classes[int(y_train[i])]] for i in task_ids]
        decision = decide(meta, current, task_ids=task_ids, labels=labels, current_features=x_train[task_ids])
        disagreements += _disagreements(meta, current, task_ids, labels, x_train[task_ids])
        if decision.promote:
            current = HeadVersion("1", "label", step, head, meta)
        else:
            rejected += 1
        predicted = head_probabilities(current.head, x_val, multi_label=False).argmax(dim=1)
        accuracies.append(100.0 * float((predicted == y_val).float().mean()))
    return {"trainings": len(arriving) + 1, "labels_at_end": len(labeled), "disagreements": disagreements,
            "rejected": rejected, "val_accuracy": round(sum(accuracies) / len(accuracies), 2),
            "val_accuracy_end": round(accuracies[-1], 2), "seconds": round(time.perf_counter() - started, 1)}


def _audit_churn(x_train, y_train, classes, *, arm: str, audits: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    order = list(range(len(y_train)))
    rng.shuffle(order)
    given = y_train.clone()
    for row in rng.sample(range(len(given)), round(FLIPPED * len(given))):
        given[row] = rng.choice([c for c in range(len(classes)) if c != int(y_train[row])])
    aliases = random.Random(seed + 1)
    previous, previous_ids, churn, flagged_total = None, set(), 0, 0
    first = max(len(order) - audits, 2 * len(classes))
    for count in range(first, len(order) + 1):
        task_ids = sorted(order[:count])
        keys = task_ids if arm == "stable" else aliases.sample(range(10**6), len(task_ids))
        probabilities = out_of_fold_probabilities(x_train[task_ids], given[task_ids], num_classes=len(classes),
                                                  multi_label=False, keys=keys)
        audit = judge_labels(probabilities, [[classes[int(c)]] for c in given[task_ids]], classes, multi_label=False)
        flagged = {task_ids[suspect.index] for suspect in audit.suspects}
        flagged_total += len(flagged)
        if previous is not None:
            churn += len((flagged ^ previous) & previous_ids)
        previous, previous_ids = flagged, set(task_ids)
    runs = len(order) + 1 - first
    return {"audits": runs, "labels_at_end": len(order), "flipped": round(FLIPPED * len(given)),
            "suspects_per_audit": round(flagged_total / runs, 1), "churn": churn}


def _summed(runs: list[dict]) -> dict:
    """The seeds' label orders together: counts summed, accuracies averaged, and each seed's cell."""
    summed = {key: sum(run[key] for run in runs) for key in ("trainings", "disagreements", "rejected", "seconds")}
    means = {key: round(sum(run[key] for run in runs) / len(runs), 2) for key in ("val_accuracy", "val_accuracy_end")}
    return {**summed, "seconds": round(summed["seconds"], 1), **means, "per_seed": runs}


def _train(x_train, y_train, classes, *, task_ids, keys, current, anchor):
    """One training as the job runs it, the job seeing `keys` as the task ids; its metadata keyed by `task_ids`."""
    features = x_train[task_ids]
    labels = [[classes[int(y_train[i])]] for i in task_ids]
    rest = torch.ones(len(y_train), dtype=torch.bool)
    rest[task_ids] = False
    pool = x_train[rest] if bool(rest.any()) else None
    common = dict(classes=classes, multi_label=False, features=features, labels=labels, task_ids=keys,
                  anchor=anchor, pool=pool)
    if current is not None and is_refit_enough(current.meta, len(labels), anchored=anchor is not None,
                                               pooled=pool is not None):
        provisional = fit_provisional(control="label", encoder=EncoderRecord(), served=current.head,
                                      served_meta=current.meta, **common)
        meta = {**provisional.meta, **validate_provisional(provisional, **common)}
        head = provisional.head
    else:
        candidate = fit_candidate(control="label", encoder=EncoderRecord(), **common)
        meta, head = candidate.meta, candidate.head
    back = {str(key): str(task) for key, task in zip(keys, task_ids)}
    for field in ("out_of_fold_correct", "trained_on"):
        if meta.get(field) is not None:
            meta[field] = {back[key]: value for key, value in meta[field].items()}
    return meta, head


def _disagreements(meta: dict, current: HeadVersion | None, task_ids, labels, features) -> int:
    """Labels whose out-of-fold result differs between the new version and the served one (what the guard compares);
    0 for the first version or where the guard compares nothing."""
    served = current_results(current, task_ids=task_ids, labels=labels, features=features) if current else None
    new = meta.get("out_of_fold_correct")
    if served is None or new is None:
        return 0
    return sum(bool(new[str(task)]) != old for task, old in zip(task_ids, served))
