"""Sample-level differential privacy at the site: DP-SGD with Opacus and its accountant. No Flower.

The accountant's state is its *history*: a list of ``(noise_multiplier, sample_rate, steps)``
entries, one per training call. A site keeps that history for its whole life
(:mod:`client.ledger` stores it on the site's disk, and :mod:`client.app` in Flower's
``Context.state`` during a run); every training call starts a PrivacyEngine whose accountant is
restored from it through Opacus' public state API (``load_state_dict``), so epsilon accumulates
across rounds and runs instead of restarting at zero.

Guarantee: (epsilon, delta)-DP for the site's training samples (one slice is one sample: slices
of one patient are not grouped, so the guarantee is per slice, not per patient).

Randomness: the Gaussian noise and the Poisson batch sampling come from :func:`secret_generator`, a
``torch.Generator`` seeded from the operating system's entropy (``secrets``) for every call. Nothing in
the run config (``seed``) or the results reaches it, so the published seed cannot replay the noise.
Opacus' ``secure_mode`` would use torchcsprng instead, which has no wheel for this torch (not on PyPI).
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.task import Batchable, TrainResult, loss_function, make_optimizer

__all__ = [
    "HistoryEntry",
    "PrivateTrainResult",
    "accountant_state",
    "default_delta",
    "epsilon_spent",
    "noise_for_remaining",
    "noise_for_target",
    "secret_generator",
    "train_private",
]

HistoryEntry = tuple[float, float, int]
"""(noise multiplier, sample rate, steps) of one DP-SGD training call."""


def default_delta(n_train: int) -> float:
    """delta = 1 / (10 x training samples): well below the 1/n at which DP means little."""
    return 1.0 / (10.0 * max(n_train, 1))


def secret_generator() -> torch.Generator:
    """A CPU generator seeded with 64 bits of OS entropy: DP noise and sampling nobody can replay.

    The seed is drawn with :mod:`secrets` at every call and never stored, logged or sent.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "prv":
        return PRVAccountant()
    return RDPAccountant()


def accountant_state(history: Sequence[HistoryEntry], accountant: str = "rdp") -> dict[str, Any]:
    """The Opacus accountant state (``IAccountant.state_dict()`` form) holding ``history``.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` per DP-SGD call.
        accountant: ``"rdp"`` or ``"prv"``: the accountant's mechanism name.

    Returns:
        ``{"history": [...], "mechanism": accountant}``, for ``accountant.load_state_dict``.
    """
    entries = [(float(s), float(q), int(k)) for s, q, k in history]
    return {"history": entries, "mechanism": _accountant(accountant).mechanism()}


def _history_of(acc) -> list[HistoryEntry]:
    return [(float(s), float(q), int(k)) for s, q, k in acc.state_dict()["history"]]


def epsilon_spent(history: Sequence[HistoryEntry], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the whole history at ``delta``.

    Args:
        history: Every DP-SGD call the site's data went through.
        delta: The target delta.
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        Epsilon; 0.0 for an empty history; ``inf`` if any call added no noise (clipping only).
    """
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    acc = _accountant(accountant)
    acc.load_state_dict(accountant_state(history, accountant))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def noise_for_target(
    target_epsilon: float, *, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The noise multiplier at which ``steps`` DP-SGD steps spend ``target_epsilon``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


def noise_for_remaining(
    target_epsilon: float,
    history: Sequence[HistoryEntry],
    *,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier at which ``history`` plus ``steps`` more steps spend at most ``target_epsilon``.

    A lifetime target: what is already spent counts, and the remaining budget is spread over the
    planned steps. Bisection on the accountant itself (relative precision 1e-2 in the noise).

    Returns:
        The noise multiplier; ``inf`` if the history alone already spends the target.
    """
    if epsilon_spent(history, delta=delta, accountant=accountant) >= target_epsilon:
        return math.inf

    def eps(sigma: float) -> float:
        return epsilon_spent([*history, (sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


@dataclass(frozen=True)
class PrivateTrainResult:
    """What one DP-SGD call did, and the accountant history after it."""

    result: TrainResult
    history: list[HistoryEntry]
    sample_rate: float
    steps: int


def train_private(
    model: torch.nn.Module,
    data: Batchable,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adam",
    noise_multiplier: float,
    max_grad_norm: float,
    history: Sequence[HistoryEntry] = (),
    accountant: str = "rdp",
    grad_sample_mode: str = "vmap",
    proximal_mu: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    task: str = "segmentation",
    weights: torch.Tensor | None = None,
) -> PrivateTrainResult:
    """DP-SGD: per-sample clipping to ``max_grad_norm`` plus Gaussian noise, Poisson batches.

    The model is trained in place and left without Opacus hooks or wrapper, so its
    ``state_dict`` keys are the plain ones (no ``_module.`` prefix).

    Args:
        model: The network (no BatchNorm: use instance or group norm).
        data: The site's training split.
        epochs: Local epochs.
        batch_size: Expected batch size; the sample rate is ``batch_size / len(data)``.
        lr: Learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        noise_multiplier: Noise std / clipping norm; 0 clips without noise (no DP guarantee).
        max_grad_norm: Per-sample gradient clipping norm.
        history: The site's accountant history before this call.
        accountant: ``"rdp"`` or ``"prv"``.
        grad_sample_mode: How per-sample gradients are computed: ``"vmap"``
            (:func:`client.per_sample.vmap_grad_samples`, ``torch.func`` over the whole model), or Opacus'
            ``"hooks"`` (with :mod:`client.per_sample`'s grad samplers), ``"functorch"`` or ``"ghost"``. All
            give the same clipped sum; ``benchmarks/dp_overhead.py`` checks and times them.
        proximal_mu: FedProx weight, applied as a data-independent pull towards the global weights
            after each private step (post-processing: it costs no privacy).
        seed: Seeds only what is not private (e.g. dropout); batch sampling and noise use
            :func:`secret_generator`, never this seed.
        device: Where to train.
        task: ``"segmentation"`` or ``"classification"`` (the loss, :func:`common.task.loss_function`).
        weights: Classification only: per-class loss weights (computed from the site's own labels).

    Returns:
        The training result and the accountant history including this call.

    Raises:
        ValueError: If ``data`` is empty or the model holds BatchNorm.
    """
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    if len(data) == 0:
        raise ValueError("no training samples: the site's training split is empty")
    model.train()
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ValueError(
            f"the model cannot be trained with DP-SGD: {problems[0]}; use model.norm = 'instance' or 'group'"
        )
    from client.per_sample import prepare, vmap_grad_samples

    prepare(model)  # fedsite's grad samplers on, in-place activations off (Opacus' hooks refuse them)
    start = time.perf_counter()
    device = torch.device(device)
    model.to(device).train()
    torch.manual_seed(seed)  # reproducibility of non-private randomness only
    secret = secret_generator()  # DP noise and Poisson sampling: OS entropy, never the run seed
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt = make_optimizer(model, optimizer, lr)
    loss_fn = loss_function(task, None if weights is None else weights.to(device))
    loader = DataLoader(
        TensorDataset(data.images, data.labels),
        batch_size=min(batch_size, len(data)),
        shuffle=True,
        generator=secret,  # Opacus' Poisson DPDataLoader inherits this generator
    )
    with warnings.catch_warnings():
        # Opacus warns that secure_mode (a cryptographic RNG, torchcsprng) is off; see README.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
        # The site's accountant, restored through Opacus' state API.
        engine.accountant.load_state_dict(accountant_state(history, accountant))
        if grad_sample_mode == "ghost":
            dp_model, dp_opt, dp_loss, dp_loader = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                grad_sample_mode="ghost",
                criterion=loss_fn,
                poisson_sampling=True,
                noise_generator=secret,
            )
        else:
            dp_model, dp_opt, dp_loader = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                # vmap: per-sample gradients from vmap_grad_samples; Opacus' optimizer clips, noises, accounts
                grad_sample_mode="no_op" if grad_sample_mode == "vmap" else grad_sample_mode,
                poisson_sampling=True,
                noise_generator=secret,
            )
            dp_loss = loss_fn
    sample_rate = 1.0 / len(loader)  # Opacus' Poisson loader: each sample joins a batch with this rate
    steps = samples_seen = 0
    epoch_loss = 0.0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                total, seen = 0.0, 0
                for x, y in dp_loader:
                    if len(x) == 0:  # Poisson sampling drew nobody: nothing is released, nothing accounted
                        continue
                    x, y = x.to(device), y.to(device)
                    dp_opt.zero_grad(set_to_none=True)
                    if grad_sample_mode == "vmap":
                        loss = vmap_grad_samples(model, dp_loss, x, y)
                    else:
                        loss = dp_loss(dp_model(x), y)
                        loss.backward()
                    dp_opt.step()
                    if proximal_mu > 0:
                        with torch.no_grad():
                            for p, g in zip(model.parameters(), global_params, strict=True):
                                p.sub_(lr * proximal_mu * (p - g))
                    steps += 1
                    samples_seen += len(x)
                    total += float(loss.detach()) * len(x)
                    seen += len(x)
                epoch_loss = total / max(seen, 1)
    finally:
        # Leave the plain model behind: remove Opacus hooks and per-sample gradient buffers.
        if hasattr(dp_model, "_close"):
            dp_model._close()
        for p in model.parameters():
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
    new_history = _history_of(engine.accountant)
    result = TrainResult(
        num_examples=len(data),
        steps=steps,
        loss=epoch_loss,
        seconds=time.perf_counter() - start,
        samples_seen=samples_seen,
    )
    return PrivateTrainResult(result=result, history=new_history, sample_rate=sample_rate, steps=steps)
