"""Which unlabeled tasks to label next: typicality first (TypiClust), margin uncertainty once a head knows each class.

Torch only: features in, an order of task positions out. Nothing here knows Label Studio or Redis
(`backend.loop.active_queue` turns the order into what Label Studio's uncertainty sampling reads).

Typicality (Hacohen et al. 2022, "Active learning on a budget"): cluster every task's embedding
into as many clusters as there will be labels (the labels so far plus the next batch), and take,
from each cluster no label covers yet, its most typical point (the inverse mean distance to its
nearest neighbours), largest clusters first. Representative tasks teach a weak head more than the
ones it is unsure about. Once every class has `switch_labels_per_class` labels, the head's own
uncertainty (smallest margin between its two most likely classes) picks instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TYPICALITY_NEIGHBOURS = 20
KMEANS_ITERATIONS = 25


@dataclass(frozen=True)
class Ranking:
    order: list[int]  # positions of unlabeled tasks, best to label first
    strategy: str  # "typicality" or "margin"
    clusters: list[int]  # cluster of each position (-1 for positions not clustered)


def rank_unlabeled(features: torch.Tensor, labeled: list[bool], *, batch: int,
                   probabilities: torch.Tensor | None = None, labels_per_class: list[int] | None = None,
                   switch_labels_per_class: int = 3, seed: int = 0) -> Ranking:
    """Order the unlabeled rows of `features` (N×D), best first.

    `probabilities` (N×C, the served head's) and `labels_per_class` choose the margin strategy once
    every class has `switch_labels_per_class` labels; otherwise (or without a head) typicality picks
    one task per uncovered cluster, `batch` new clusters beyond the labels so far.
    """
    if features.ndim != 2 or features.shape[0] != len(labeled):
        raise ValueError(f"features must be N×D with N = len(labeled) = {len(labeled)}, got {tuple(features.shape)}")
    unlabeled = [i for i, done in enumerate(labeled) if not done]
    if not unlabeled:
        return Ranking(order=[], strategy="typicality", clusters=[-1] * len(labeled))
    ready = (probabilities is not None and labels_per_class is not None and len(labels_per_class) > 0
             and min(labels_per_class) >= switch_labels_per_class)
    if ready:
        return Ranking(order=margin_order(probabilities, unlabeled), strategy="margin", clusters=[-1] * len(labeled))
    clusters_wanted = min(len(labeled), sum(labeled) + max(1, batch))
    assignment = kmeans(_normalized(features), clusters_wanted, seed=seed)
    return Ranking(order=typicality_order(features, labeled, assignment), strategy="typicality",
                   clusters=assignment.tolist())


def margin_order(probabilities: torch.Tensor, positions: list[int]) -> list[int]:
    """`positions` by ascending margin between the two most likely classes (ties: by position)."""
    probs = probabilities[positions].float()
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    margin = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
    ranked = sorted(range(len(positions)), key=lambda k: (float(margin[k]), positions[k]))
    return [positions[k] for k in ranked]


def typicality_order(features: torch.Tensor, labeled: list[bool], assignment: torch.Tensor) -> list[int]:
    """The most typical unlabeled task of each uncovered cluster (largest clusters first), then the remaining
    unlabeled tasks by descending typicality."""
    x = _normalized(features)
    typical = torch.zeros(len(labeled))
    sizes: dict[int, int] = {}
    for cluster in assignment.unique().tolist():
        members = (assignment == cluster).nonzero().flatten()
        sizes[cluster] = len(members)
        typical[members] = typicality(x[members])
    covered = {int(assignment[i]) for i, done in enumerate(labeled) if done}
    picks = []
    for cluster in sorted(sizes, key=lambda c: (-sizes[c], c)):
        if cluster in covered:
            continue
        candidates = [i for i in (assignment == cluster).nonzero().flatten().tolist() if not labeled[i]]
        if candidates:
            picks.append(max(candidates, key=lambda i: (float(typical[i]), -i)))
    chosen = set(picks)
    rest = sorted((i for i, done in enumerate(labeled) if not done and i not in chosen),
                  key=lambda i: (-float(typical[i]), i))
    return picks + rest


def typicality(x: torch.Tensor, neighbours: int = TYPICALITY_NEIGHBOURS) -> torch.Tensor:
    """Inverse mean distance of each row to its nearest neighbours among `x` (itself excluded)."""
    if len(x) == 1:
        return torch.ones(1)
    k = min(neighbours, len(x) - 1)
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(k, dim=1, largest=False).values
    return 1.0 / (nearest.mean(dim=1) + 1e-8)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Cluster index of each row: Lloyd's algorithm from a k-means++ start, deterministic for a seed."""
    n = len(x)
    k = max(1, min(k, n))
    generator = torch.Generator().manual_seed(seed)
    centres = [int(torch.randint(n, (1,), generator=generator))]
    nearest = torch.cdist(x, x[centres]).min(dim=1).values ** 2
    for _ in range(1, k):
        if float(nearest.sum()) <= 0:
            break
        pick = int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator))
        centres.append(pick)
        nearest = torch.minimum(nearest, torch.cdist(x, x[[pick]]).flatten() ** 2)
    centroids = x[centres].clone()
    assignment = torch.cdist(x, centroids).argmin(dim=1)
    for _ in range(iterations):
        for c in range(len(centroids)):
            members = x[assignment == c]
            if len(members):
                centroids[c] = members.mean(dim=0)
        updated = torch.cdist(x, centroids).argmin(dim=1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment


def _normalized(features: torch.Tensor) -> torch.Tensor:
    x = features.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
