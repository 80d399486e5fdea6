"""How noisy the labels are, estimated from out-of-fold probabilities: the confident joint of confident learning.

Northcutt, Jiang & Chuang, "Confident learning: estimating uncertainty in dataset labels" (JAIR 2021), §3.1:
the threshold t_j of class j is the mean probability of j over the examples labeled j; an example labeled i
counts toward (given i, true j) when its probability of j reaches t_j (the largest such class when several do).
The counts are then calibrated so that each given label's row sums to how often that label was given, and
normalized into the joint distribution Q[i, j] of (given label, true label). From it, per class j:
- `flipped_out[j]` = P(given ≠ j | true j): how often an example of class j carries another label;
- `flipped_in[j]` = P(given = j | true ≠ j): how often an example of another class carries label j.

Torch only. Single choice: for `choice="multiple"` each class decision is a two-class problem of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseEstimate:
    joint: torch.Tensor  # Q[given, true], sums to 1
    flipped_out: torch.Tensor  # per class j: P(given ≠ j | true j)
    flipped_in: torch.Tensor  # per class j: P(given = j | true ≠ j)

    def label_agreement(self, j: int) -> float:
        """P(given = j | true j) − P(given = j | true ≠ j): how much a label j says about the class (1: noiseless)."""
        return 1.0 - float(self.flipped_out[j]) - float(self.flipped_in[j])


def self_confidence_thresholds(probabilities: torch.Tensor, targets: torch.Tensor, judged: list[int]) -> torch.Tensor:
    """t_j: the mean probability of class j over the examples labeled j; +inf for classes not judged."""
    thresholds = torch.full((probabilities.shape[1],), float("inf"))
    for j in judged:
        thresholds[j] = probabilities[targets == j, j].mean()
    return thresholds


def estimate_noise(probabilities: torch.Tensor, targets: torch.Tensor, judged: list[int]) -> NoiseEstimate:
    """The calibrated confident joint of (given label, true label) and the flip rates it implies."""
    n, k = probabilities.shape
    thresholds = self_confidence_thresholds(probabilities, targets, judged)
    above = probabilities >= thresholds
    confident_class = torch.where(above, probabilities, torch.full_like(probabilities, -1.0)).argmax(dim=1)
    counted = above.any(dim=1)
    confident = torch.zeros(k, k)
    confident.index_put_((targets[counted], confident_class[counted]), torch.ones(int(counted.sum())),
                         accumulate=True)
    given_counts = torch.bincount(targets, minlength=k).float()
    calibrated = confident / confident.sum(dim=1, keepdim=True).clamp(min=1.0) * given_counts[:, None]
    joint = calibrated / calibrated.sum().clamp(min=1.0)
    true_mass = joint.sum(dim=0)
    diagonal = joint.diagonal()
    flipped_out = torch.where(true_mass > 0, 1.0 - diagonal / true_mass.clamp(min=1e-12), torch.zeros(k))
    other_mass = true_mass.sum() - true_mass
    flipped_in = torch.where(other_mass > 0, (joint.sum(dim=1) - diagonal) / other_mass.clamp(min=1e-12),
                             torch.zeros(k))
    return NoiseEstimate(joint, flipped_out.clamp(0.0, 1.0), flipped_in.clamp(0.0, 1.0))
