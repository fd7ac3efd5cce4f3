"""The membership audit a site runs on itself: a loss-threshold attack (Yeom et al.). No Flower.

The site asks whether its own training slices can be told from held-out slices of the same
patients by their loss under the model. 0.5 means the attacker learns nothing; 1.0 means
training samples are perfectly recognisable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.task import Batchable

__all__ = ["loss_attack_auc", "membership_auc", "per_sample_losses"]


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
