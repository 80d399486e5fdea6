"""`trust`: does the label audit find flipped labels, and does auto-accept reach its target precision?

For each shared set, at k = 10, 20 and all labels per class drawn from `train`, a fraction (0, 5, 10, 20 %) of
the drawn labels is flipped to another class at random (10 seeds: at 10 % noise on hymenoptera one seed flips 24
labels, so one seed's recall moves by 0.04 per label found). Then, with the product's own functions on the
product's features (MobileNetV2, as `accuracy` embeds them):
- the audit: `backend.core.audit.out_of_fold_probabilities` + `judge_labels`, what the audit job
  (`backend.loop.audit`) runs after each training. Reported: precision of its ranking at N = the number of
  flipped labels (`topn_precision`), and precision / recall of its cut (the flagged suspects) against the
  flipped set;
- the baseline, in the same run: scikit-learn LogisticRegression(C=1, class_weight="balanced"), 5-fold
  out-of-fold probabilities, ranked by the probability of the given label (`baseline_topn_precision`);
- auto-accept: the served head (`fit_candidate`, calibrated); per class thresholds at AUTO_ACCEPT_PRECISION's
  default (0.98) from the out-of-fold probabilities of that head's recipe (`served_recipe_probabilities`, on the
  noisy labels), as the audit job computes them, applied to the served head on all of `val`: the precision
  realized there against the true labels, its gap to the target in points, and the coverage.
Not through Redis, RQ and Label Studio: tests/test_audit_loop.py and tests/e2e/test_label_audit.py check that
path; this measures the numbers. Features are cached in HEADSTART_BENCH_FEATURES
(default ~/.cache/headstart/bench-features.pt) after the first embedding (`bench.cached_features`).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.audit import (auto_accept_thresholds, judge_labels, out_of_fold_probabilities,
                                served_recipe_probabilities)
from backend.core.candidates import fit_candidate
from backend.core.head_fitting import encode_targets
from backend.core.heads import head_probabilities
from backend.core.torch_runtime import set_torch_threads
from bench.cached_features import EncoderRecord, image_features, zero_shot_anchor
from bench.harness import RESULTS_DIR, Run, goal, print_table, rounded

NAME = "trust"
SETS = ("hymenoptera", "flowers12")
TARGET = 0.98  # AUTO_ACCEPT_PRECISION's default


@dataclass(frozen=True)
class Params:
    ks: tuple
    noise: tuple
    seeds: int
    per_class_cap: int | None = None


FULL = Params(ks=(10, 20, "all"), noise=(0.0, 0.05, 0.1, 0.2), seeds=10)  # 0: what auto-accept does on clean labels
QUICK = Params(ks=("all",), noise=(0.1,), seeds=1, per_class_cap=12)


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    params = QUICK if quick else FULL
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    set_torch_threads(1)
    features = image_features(SETS, params.per_class_cap)
    cells, rows = {name: {} for name in SETS}, []
    # the headline cells (all labels, 10 % noise) first; results are written after every cell, so a run stopped
    # early keeps what it measured (`complete` says whether the whole grid ran)
    order = sorted(((k, noise) for k in params.ks for noise in params.noise),
                   key=lambda cell: (cell[0] != "all", cell[1] != 0.1))
    record = {}
    for k, noise in order:
        for name in SETS:
            (x_train, y_train), (x_val, y_val), classes = features[name]
            runs = [_trial(x_train, y_train, x_val, y_val, classes, k=k, noise=noise, seed=seed)
                    for seed in range(params.seeds)]
            cell = {key: rounded(statistics.mean(r[key] for r in runs if r[key] is not None), 3)
                    if any(r[key] is not None for r in runs) else None for key in runs[0] if key != "autoaccept_right"}
            cell["autoaccept_precision_gap_per_seed"] = cell.pop("autoaccept_precision_gap")
            cell.update(_pooled(runs))
            cells[name][f"k={k} noise={noise}"] = cell
            rows.append([name, str(k), f"{noise:.0%}", cell["labels"], cell["flipped"], cell["topn_precision"],
                         cell["baseline_topn_precision"], cell["cut_precision"], cell["cut_recall"],
                         cell["autoaccept_precision"], cell["autoaccept_pooled_precision"], cell["autoaccept_coverage"],
                         cell["autoaccept_accepted"]])
            print(f"{name} k={k} noise={noise:.0%}: {cell}", flush=True)
            record = _finish(bench_run, params, cells, complete=len(rows) == len(order) * len(SETS))
    print_table("label audit: flipped labels found, auto-accept realized", ["set", "k", "noise", "labels", "flipped",
                "top-N prec.", "baseline", "cut prec.", "cut recall", "auto-accept prec. (val)", "pooled",
                "coverage (val)", "accepted (val)"],
                rows)
    return record


def _finish(bench_run: Run, params: Params, cells: dict, *, complete: bool) -> dict:
    headline = {name: _headline(cells[name].get("k=all noise=0.1")) for name in SETS}
    goals = {}
    for name, figures in headline.items():
        gap = None if figures["topn_precision"] is None else figures["topn_precision"] - figures["baseline_topn_precision"]
        goals[f"{name}_topn_vs_baseline"] = goal(gap, 0.0, at_least=True)
        goals[f"{name}_cut_precision"] = goal(figures["cut_precision"], 0.9, at_least=True)
        goals[f"{name}_cut_recall"] = goal(figures["cut_recall"], 0.8, at_least=True)
        goals[f"{name}_autoaccept_precision_gap"] = goal(figures["autoaccept_precision_gap"], 1.0, at_least=False)
    notes = [f"{params.seeds} seeds per cell; flipped labels go to another class drawn at random",
             "auto-accept thresholds come from the served recipe's out-of-fold probabilities on the noisy labels; "
             "precision is realized on all of val against its true labels, over the val tasks the seeds accepted "
             "together (autoaccept_precision_gap = |that - target|, the rule's own error); "
             "autoaccept_precision_gap_per_seed is the mean over seeds of each seed's |realized - target|, which "
             "adds one draw's sampling noise (one val task is 100/accepted points); "
             "autoaccept_accepted is the mean number of val tasks accepted per seed (one task is 100/accepted points)",
             "noise 0: clean labels (no flips), for auto-accept and the number of suspects on clean labels",
             "the cut and the auto-accept correction have no tuned constant (backend/core/audit.py); the one guard, "
             "MIN_LABEL_AGREEMENT, only turns the correction off for labels too noisy to estimate from"]
    return bench_run.finish({**headline, "cells": cells, "target": TARGET, "complete": complete}, goals=goals,
                            notes=notes)


def _pooled(runs: list[dict]) -> dict:
    """Auto-accept's realized precision over the val tasks accepted in all the seeds together, and its gap to the
    target: the rule's error, without most of the sampling noise one seed's accepted tasks carry (the seeds share
    val, so not all of it)."""
    accepted, right = sum(r["autoaccept_accepted"] for r in runs), sum(r["autoaccept_right"] for r in runs)
    if not accepted:
        return {"autoaccept_pooled_precision": None, "autoaccept_precision_gap": None}
    return {"autoaccept_pooled_precision": rounded(right / accepted, 3),
            "autoaccept_precision_gap": rounded(abs(right / accepted - TARGET) * 100, 3)}


def _headline(cell: dict | None) -> dict:
    keys = ("topn_precision", "baseline_topn_precision", "cut_precision", "cut_recall", "autoaccept_precision_gap",
            "autoaccept_precision", "autoaccept_coverage", "autoaccept_accepted", "autoaccept_pooled_precision",
            "autoaccept_precision_gap_per_seed")
    return {key: (cell or {}).get(key) for key in keys}


def _trial(x_train, y_train, x_val, y_val, classes, *, k, noise: float, seed: int) -> dict:
    rng = random.Random(seed)
    chosen = _draw(y_train, k, rng)
    x, truth = x_train[chosen], y_train[chosen]
    flipped = sorted(rng.sample(range(len(chosen)), round(noise * len(chosen))))
    given = truth.clone()
    for row in flipped:
        given[row] = rng.choice([c for c in range(len(classes)) if c != int(truth[row])])
    labels = [[classes[int(c)]] for c in given]
    task_ids = list(chosen)  # the drawn train indices stand for the labeled tasks' ids
    probabilities = out_of_fold_probabilities(x, given, num_classes=len(classes), multi_label=False, keys=task_ids)
    audit = judge_labels(probabilities, labels, classes, multi_label=False)
    wrong = set(flipped)
    result = {"labels": len(chosen), "flipped": len(wrong), "suspects": None, "topn_precision": None,
              "baseline_topn_precision": None, "cut_precision": None, "cut_recall": None,
              "autoaccept_precision": None, "autoaccept_precision_gap": None, "autoaccept_coverage": None,
              "autoaccept_accepted": 0, "autoaccept_right": 0}
    if not audit.judged:
        return result
    flagged = {suspect.index for suspect in audit.suspects}
    result["suspects"] = len(flagged)
    if wrong:
        top = {suspect.index for suspect in audit.ranking[:len(wrong)]}
        baseline = _baseline_ranking(x, given, seed)[:len(wrong)]
        result.update(topn_precision=len(top & wrong) / len(wrong),
                      baseline_topn_precision=len(set(baseline) & wrong) / len(wrong),
                      cut_precision=len(flagged & wrong) / len(flagged) if flagged else None,
                      cut_recall=len(flagged & wrong) / len(wrong))
    anchor = zero_shot_anchor(classes)
    candidate = fit_candidate(control="label", classes=classes, multi_label=False, features=x, labels=labels,
                              task_ids=task_ids, encoder=EncoderRecord(), anchor=anchor)
    served_oof, _ = served_recipe_probabilities(x, given, candidate.meta["selection"], num_classes=len(classes),
                                                multi_label=False, anchor=anchor, keys=task_ids)
    if served_oof is None:
        return result
    thresholds = auto_accept_thresholds(served_oof, labels, classes, multi_label=False, target=TARGET)
    served = head_probabilities(candidate.head, x_val, multi_label=False)
    confidence, predicted = served.max(dim=1)
    cuts = torch.tensor([thresholds[name].threshold if thresholds[name].threshold is not None else 2.0
                         for name in classes])
    accepted = confidence >= cuts[predicted]
    if int(accepted.sum()):
        right = int((predicted[accepted] == y_val[accepted]).sum())
        realized = right / int(accepted.sum())
        result.update(autoaccept_precision=realized, autoaccept_precision_gap=abs(realized - TARGET) * 100,
                      autoaccept_accepted=int(accepted.sum()), autoaccept_right=right)
    result["autoaccept_coverage"] = float(accepted.float().mean())
    return result


def _draw(targets: torch.Tensor, k, rng: random.Random) -> list[int]:
    if k == "all":
        return list(range(len(targets)))
    chosen = []
    for label in sorted(set(targets.tolist())):
        members = [i for i, t in enumerate(targets.tolist()) if t == label]
        chosen += rng.sample(members, min(k, len(members)))
    return sorted(chosen)


def _baseline_ranking(x: torch.Tensor, given: torch.Tensor, seed: int) -> list[int]:
    """Indices ranked by the 5-fold out-of-fold probability of the given label (class-balanced logistic)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = min(5, int(torch.bincount(given)[torch.bincount(given) > 0].min()))
    probabilities = cross_val_predict(LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000), x.numpy(),
                                      given.numpy(), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                      method="predict_proba")
    present = sorted(set(given.tolist()))
    column = {c: i for i, c in enumerate(present)}
    given_probability = probabilities[np.arange(len(given)), [column[int(c)] for c in given]]
    return np.argsort(given_probability, kind="stable").tolist()
