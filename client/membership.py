"""Membership attacks: the loss-threshold attack (Yeom et al.) and a calibrated one, with intervals. No Flower.

The site asks whether its own training slices can be told from held-out slices of the same
patients by their loss under the model. 0.5 means the attacker learns nothing; 1.0 means
training samples are perfectly recognisable.

The plain loss attack confuses "hard" samples with non-members. The calibrated attack (the
reference-model attack "R" of Ye et al. 2022, the offline form of LiRA in its simplest shape) scores
each sample by how much lower its loss is under the target model than under a *reference* model
trained on other data of the same population, which saw neither the members nor the non-members:
``score = loss_reference - loss_target``. Its AUC comes with a bootstrap percentile interval
(members and non-members resampled separately), so a figure from few samples says that it is noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.task import Batchable

__all__ = [
    "AttackResult",
    "auc_interval",
    "balanced_indices",
    "calibrated_attack",
    "calibrated_scores",
    "loss_attack_auc",
    "membership_auc",
    "per_sample_losses",
    "score_attack",
]


@torch.no_grad()
def per_sample_losses(
    model: torch.nn.Module, data: Batchable, *, batch_size: int = 64, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Cross-entropy per sample (mean over its pixels): what a loss-threshold attacker observes."""
    model.to(device).eval()
    out = []
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device)
        y = data.labels[start : start + batch_size].to(device).long()
        target = y[:, 0] if y.dim() > 1 else y  # a mask (B, 1, H, W) or class indices (B,)
        ce = F.cross_entropy(model(x), target, reduction="none")
        out.append(ce.reshape(len(ce), -1).mean(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the ROC AUC of a score, via ranks (Mann-Whitney U)."""
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    allv = np.concatenate([pos, neg])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]  # average ranks for ties
    u_pos = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u_pos / (len(pos) * len(neg)))


def loss_attack_auc(member_losses: np.ndarray, non_member_losses: np.ndarray) -> float:
    """AUC of the loss-threshold attack (Yeom et al.) given per-sample losses: low loss = "member"."""
    return _auc(-np.asarray(member_losses), -np.asarray(non_member_losses))


def membership_auc(
    model: torch.nn.Module, members: Batchable, non_members: Batchable, *, device: torch.device | str = "cpu"
) -> float:
    """AUC of a loss-threshold membership-inference attack that a site runs on its own data.

    The attacker guesses "member" when a sample's loss is below a threshold; the AUC sweeps every
    threshold, calibrated on held-out (non-member) samples. 0.5: the attacker learns nothing;
    1.0: training samples are perfectly recognisable. Non-members must come from the same
    distribution as members (the site holds out slices of its training patients for this), or
    the attack measures how patients differ instead of what the model memorised.

    Args:
        model: The model under attack.
        members: Samples it was trained on.
        non_members: Samples of the same distribution it never saw.
        device: Where to run.

    Returns:
        The attack's ROC AUC in [0, 1].
    """
    return loss_attack_auc(
        per_sample_losses(model, members, device=device), per_sample_losses(model, non_members, device=device)
    )


def calibrated_scores(target_losses: np.ndarray, reference_losses: np.ndarray) -> np.ndarray:
    """Per-sample membership scores ``loss_reference - loss_target``: higher = more likely a member.

    Args:
        target_losses: Each sample's loss under the model under attack.
        reference_losses: The same samples' losses under a reference model that never saw any of them.

    Returns:
        The scores, one per sample.

    Raises:
        ValueError: If the two arrays differ in length.
    """
    target = np.asarray(target_losses, dtype=np.float64)
    reference = np.asarray(reference_losses, dtype=np.float64)
    if target.shape != reference.shape:
        raise ValueError(
            f"{len(target)} target losses but {len(reference)} reference losses; give both for the same samples"
        )
    return reference - target


def auc_interval(
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap percentile interval of the attack AUC (higher score = "member").

    Members and non-members are resampled separately (with replacement, each to its own size),
    ``resamples`` times; the interval holds the central ``level`` of the resampled AUCs. The seed
    serves reproducibility of the report only (nothing private depends on it).

    Args:
        member_scores: Scores of samples the model was trained on.
        non_member_scores: Scores of samples it never saw.
        resamples: Bootstrap resamples.
        level: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling generator (:func:`numpy.random.default_rng`).

    Returns:
        ``(low, high)``; ``(0.0, 1.0)`` if either set is empty (nothing is known).
    """
    pos = np.asarray(member_scores, dtype=np.float64)
    neg = np.asarray(non_member_scores, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return 0.0, 1.0
    # A resample's AUC from its multiplicities: each member counts the (resampled) non-members below
    # it, and half of those tied with it, found once by binary search in the sorted non-members.
    order = np.argsort(neg, kind="mergesort")
    sorted_neg = neg[order]
    left = np.searchsorted(sorted_neg, pos, side="left")
    right = np.searchsorted(sorted_neg, pos, side="right")
    rng = np.random.default_rng(seed)
    aucs = np.empty(resamples)
    cum = np.zeros(len(neg) + 1)
    for i in range(resamples):
        pos_counts = np.bincount(rng.integers(0, len(pos), len(pos)), minlength=len(pos))
        neg_counts = np.bincount(rng.integers(0, len(neg), len(neg)), minlength=len(neg))[order]
        np.cumsum(neg_counts, out=cum[1:])
        below = cum[left] + 0.5 * (cum[right] - cum[left])
        aucs[i] = float(pos_counts @ below) / (len(pos) * len(neg))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(aucs, [tail, 100.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class AttackResult:
    """A membership attack's AUC with its bootstrap interval and the numbers it rests on."""

    auc: float
    low: float
    high: float
    members: int
    non_members: int
    level: float = 0.95
    resamples: int = 1000

    @property
    def detects(self) -> bool:
        """True if the whole interval lies above 0.5: the attacker tells members apart."""
        return self.low > 0.5

    def as_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (``interval`` = ``[low, high]``)."""
        return {
            "auc": self.auc,
            "interval": [self.low, self.high],
            "level": self.level,
            "resamples": self.resamples,
            "members": self.members,
            "non_members": self.non_members,
        }


def score_attack(
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> AttackResult:
    """The AUC of per-sample membership scores (higher = "member") with its bootstrap interval."""
    pos, neg = np.asarray(member_scores), np.asarray(non_member_scores)
    low, high = auc_interval(pos, neg, resamples=resamples, level=level, seed=seed)
    return AttackResult(
        auc=_auc(pos, neg) if len(pos) and len(neg) else 0.5,
        low=low,
        high=high,
        members=len(pos),
        non_members=len(neg),
        level=level,
        resamples=resamples,
    )


def balanced_indices(n_members: int, n_non_members: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of as many members as non-members: the larger set is subsampled without replacement.

    Returns:
        ``(member_indices, non_member_indices)``, each of length ``min(n_members, n_non_members)``, sorted.
    """
    n = min(n_members, n_non_members)
    rng = np.random.default_rng(seed)
    pick = [
        np.sort(rng.choice(total, size=n, replace=False)) if total > n else np.arange(n)
        for total in (n_members, n_non_members)
    ]
    return pick[0], pick[1]


def calibrated_attack(
    target: torch.nn.Module,
    reference: torch.nn.Module,
    members: Batchable,
    non_members: Batchable,
    *,
    balance: bool = True,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> AttackResult:
    """The calibrated membership attack: each sample's loss under ``target`` against its loss under ``reference``.

    Args:
        target: The model under attack.
        reference: A model of the same task trained on other samples of the same population; it must
            have seen neither ``members`` nor ``non_members``.
        members: Samples ``target`` was trained on.
        non_members: Samples of the same distribution ``target`` never saw.
        balance: Use as many members as non-members (the larger set subsampled with ``seed``).
        resamples: Bootstrap resamples of the interval.
        level: Coverage of the interval.
        seed: Seeds the subsampling and the bootstrap (reproducibility of the report only).
        device: Where to run the models.

    Returns:
        The AUC of ``loss_reference - loss_target`` (members vs non-members) with its interval.
    """
    if balance:
        mi, ni = balanced_indices(len(members), len(non_members), seed=seed)
        members = Batchable(members.images[mi], members.labels[mi])
        non_members = Batchable(non_members.images[ni], non_members.labels[ni])
    pos = calibrated_scores(
        per_sample_losses(target, members, device=device), per_sample_losses(reference, members, device=device)
    )
    neg = calibrated_scores(
        per_sample_losses(target, non_members, device=device), per_sample_losses(reference, non_members, device=device)
    )
    return score_attack(pos, neg, resamples=resamples, level=level, seed=seed)
