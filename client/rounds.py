"""One round at a site, as plain calls: train (with DP-SGD if configured) or evaluate. No Flower.

:mod:`client.app` unpacks a Flower message into a :class:`TrainRequest` and the site's
:class:`SiteMemory`, calls :func:`train_round` or :func:`evaluate_round`, and packs the
:class:`TrainOutcome`, :class:`Refusal` or :class:`EvaluationOutcome` into the reply. What a site
remembers between rounds (its privacy history, the membership attack's baseline, FedBN's local
normalization layers) is a :class:`SiteMemory` here, kept in Flower's ``Context.state`` by the
handler; it never leaves the site.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.ledger import PrivacyBudgetExceeded, ledger_for, private_round
from client.membership import loss_attack_auc, membership_auc, per_sample_losses
from client.policy import Grant, SitePolicy, grant
from client.runtime import LoadedSite, site_seed
from common import task
from common.config import RunConfig
from common.model import norm_keys

__all__ = [
    "EvaluationOutcome",
    "Refusal",
    "SiteMemory",
    "TrainOutcome",
    "TrainRequest",
    "evaluate_round",
    "restore_local_norms",
    "train_round",
]

log = logging.getLogger("fedsite.client")


@dataclass
class SiteMemory:
    """What a site keeps between the rounds of one run; it never leaves the site.

    :func:`train_round` updates it in place; the caller stores it back (Flower's ``Context.state``).
    """

    privacy_entries: list[dict[str, Any]] = field(default_factory=list)
    """The privacy ledger's entries as this run last wrote them (the run's own copy of the ledger)."""
    mia_reference: tuple[list[float], list[float]] | None = None
    """Per-sample losses (training, held-out) under the first global model this site saw."""
    fedbn_local: dict[str, torch.Tensor] | None = None
    """Under FedBN: this site's own normalization layers (state-dict entries) after its last round."""


@dataclass(frozen=True)
class TrainRequest:
    """What the server asks of one training round (its per-round config, with the run's defaults)."""

    server_round: int
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    proximal_mu: float = 0.0
    fedbn: bool = False


@dataclass(frozen=True)
class TrainOutcome:
    """A round the site trained: the model holds the new weights."""

    result: task.TrainResult
    epsilon: float | None = None
    """Under DP: the site's epsilon over its whole ledger after this round (else None)."""
    delta: float | None = None
    noise_multiplier: float | None = None
    unit: str | None = None
    """Under DP: what epsilon protects, ``"patient"`` or ``"slice"`` (the ledger's unit)."""


@dataclass(frozen=True)
class Refusal:
    """A round the site refused to train; nothing was spent.

    ``kind`` is ``"privacy-budget"`` (the budget would be exceeded) or ``"privacy-policy"`` (the run
    asks for less protection than the site's policy).
    """

    kind: str
    reason: str
    epsilon: float
    delta: float
    unit: str | None = None
    """The unit of ``epsilon`` when a ledger exists (a budget refusal)."""


@dataclass(frozen=True)
class EvaluationOutcome:
    """The scores of the global model on the site's validation split (and the membership audit)."""

    scores: dict[str, float]
    seconds: float
    """Time spent computing the scores."""


def restore_local_norms(model: torch.nn.Module, memory: SiteMemory) -> None:
    """Under FedBN, put this site's own normalization layers back over the global ones just loaded.

    In the site's first round there is nothing to restore: it starts from the global initialization.
    """
    if memory.fedbn_local is None:
        return
    state = model.state_dict()
    state.update({k: v.to(state[k].dtype) for k, v in memory.fedbn_local.items()})
    model.load_state_dict(state)


def _keep_local_norms(model: torch.nn.Module, memory: SiteMemory) -> None:
    keys = set(norm_keys(model))
    memory.fedbn_local = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}


def _class_weights(cfg: RunConfig, site: LoadedSite, policy: SitePolicy, dp: bool) -> torch.Tensor | None:
    """Classification loss weights: inverse frequency of the site's training labels, or under DP none.

    Under DP, weights computed from every training label would let one slice change the others'
    gradients (the clipping bound no longer holds), so they come from the site's policy (a public
    prior, fixed before training) or are uniform.
    """
    if cfg.task.name != "classification" or not cfg.task.class_weighted:
        return None
    n_classes = len(cfg.task.class_names)
    if dp:
        if not policy.class_weights:
            return None
        if len(policy.class_weights) != n_classes:
            raise ValueError(
                f"the site's privacy policy has {len(policy.class_weights)} class_weights for {n_classes} classes "
                f"({cfg.task.classes}); give one weight per class"
            )
        return torch.tensor(policy.class_weights, dtype=torch.float32)
    return task.class_weights(site.train.labels, n_classes)


def train_round(
    model: torch.nn.Module,
    site: LoadedSite,
    cfg: RunConfig,
    request: TrainRequest,
    memory: SiteMemory,
    *,
    site_dir: Path,
    run_id: int,
    device: torch.device | str = "cpu",
    policy: SitePolicy | None = None,
) -> TrainOutcome | Refusal:
    """Train ``model`` (holding the global weights) on the site's training split for one round.

    The run's privacy request is first checked against the site's own policy
    (:func:`client.policy.grant`): a run asking for less protection is refused. Under DP the round
    goes through the site's ledger and budget (:func:`client.ledger.private_round`); otherwise plain
    training (:func:`common.task.train`).
    Under ``request.fedbn`` the site's normalization layers must already be restored
    (:func:`restore_local_norms`); they are kept in ``memory`` after training.

    Args:
        model: The network, holding the global weights; trained in place.
        site: The site's data.
        cfg: The run config.
        request: The server's per-round settings.
        memory: What the site keeps between rounds; updated in place.
        site_dir: The site's data folder (the default place of its ledger).
        run_id: The run, recorded in the ledger.
        device: Where to train.
        policy: The site's privacy policy (:func:`client.policy.load_policy`); None = the default policy.

    Returns:
        A :class:`TrainOutcome`, or a :class:`Refusal` when the run asks for less protection than the
        policy or the privacy budget would be exceeded.

    Raises:
        LedgerError: If the privacy ledger cannot be read or written.
    """
    policy = policy or SitePolicy()
    granted = grant(policy, cfg)
    if isinstance(granted, str):
        log.warning("site %s refuses round %d: %s", site.name, request.server_round, granted)
        return Refusal(kind="privacy-policy", reason=granted, epsilon=float("nan"), delta=float("nan"))
    kwargs: dict[str, Any] = {
        "epochs": request.epochs,
        "batch_size": request.batch_size,
        "lr": request.lr,
        "optimizer": request.optimizer,
        "proximal_mu": request.proximal_mu,
        "seed": site_seed(cfg.seed, site.name, request.server_round),
        "device": device,
        "task": cfg.task.name,
        "weights": _class_weights(cfg, site, policy, granted.dp),
    }
    if site.audit is not None and granted.audit and memory.mia_reference is None:
        # Per-sample losses under the first global model this site sees: the attack's baseline.
        memory.mia_reference = (
            per_sample_losses(model, site.train).tolist(),
            per_sample_losses(model, site.audit).tolist(),
        )
    if not granted.dp:
        # DP-SGD trains on the images as they are (augmentation there is a per-sample choice of its own)
        outcome = TrainOutcome(result=task.train(model, site.train, augment=cfg.train.augment, **kwargs))
    else:
        # DP-SGD's own expected batch: its noise is divided by it, so DP wants a larger one than plain training
        kwargs["batch_size"] = cfg.privacy.batch_size or request.batch_size
        ledger = ledger_for(site_dir, site.name, policy)
        try:
            done = private_round(
                model,
                site.train,
                cfg,
                policy=policy,
                granted=granted,
                ledger=ledger,
                state_entries=memory.privacy_entries,
                run_id=run_id,
                server_round=request.server_round,
                patients=site.train_patients,
                **kwargs,
            )
        except PrivacyBudgetExceeded as exc:
            log.warning("site %s refuses round %d: %s", site.name, request.server_round, exc)
            state = ledger.read()
            eps, delta = (state.epsilon(), state.delta) if state is not None else (0.0, float("nan"))
            unit = state.unit if state is not None else None
            return Refusal(kind="privacy-budget", reason=str(exc), epsilon=eps, delta=delta, unit=unit)
        memory.privacy_entries = list(done.entries)
        outcome = TrainOutcome(
            result=done.result,
            epsilon=done.epsilon,
            delta=done.delta,
            noise_multiplier=done.noise_multiplier,
            unit=done.unit,
        )
    if request.fedbn:
        _keep_local_norms(model, memory)
    return outcome


def evaluate_round(
    model: torch.nn.Module,
    site: LoadedSite,
    cfg: RunConfig,
    memory: SiteMemory,
    *,
    device: torch.device | str = "cpu",
    policy: SitePolicy | None = None,
) -> EvaluationOutcome:
    """Score ``model`` on the site's validation split, and attack it with the site's own audit slices.

    Args:
        model: The network, holding the global weights (and, under FedBN, the site's own norms).
        site: The site's data.
        cfg: The run config.
        memory: What the site keeps between rounds (read only: the attack's baseline).
        device: Where to run.
        policy: The site's privacy policy; under DP the audit runs only if it allows (``audit``).

    Returns:
        The task's scores (:func:`common.task.evaluate`), plus ``mia-auc`` and ``mia-auc-initial``
        when the site runs the membership audit. Under DP these audit scores are computed on training
        slices outside the accountant: a release the policy allowed (``release-audit`` = 1 marks it).
    """
    t0 = time.perf_counter()
    scores = task.evaluate(model, site.val, batch_size=max(cfg.train.batch_size, 32), device=device, task=cfg.task.name)
    granted = grant(policy or SitePolicy(), cfg)
    if site.audit is not None and isinstance(granted, Grant) and granted.audit:
        if granted.dp:
            scores["release-audit"] = 1.0  # the audit's AUCs touch training data outside the accountant
        # The site attacks its own model: can its training slices be told from held-out slices
        # of the same patients?
        scores["mia-auc"] = membership_auc(model, site.train, site.audit, device=device)
        if memory.mia_reference is not None:  # the same attack against the run's initial model (should be ~0.5)
            train_losses, held_out = memory.mia_reference
            scores["mia-auc-initial"] = loss_attack_auc(np.asarray(train_losses), np.asarray(held_out))
    return EvaluationOutcome(scores=scores, seconds=time.perf_counter() - t0)
