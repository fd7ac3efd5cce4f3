"""Differential privacy at the site: DP-SGD with Opacus and its accountant, per patient or per slice. No Flower.

The accountant's state is its *history*: a list of ``(noise_multiplier, sample_rate, steps)``
entries, one per training call. A site keeps that history for its whole life
(:mod:`client.ledger` stores it on the site's disk, and :mod:`client.app` in Flower's
``Context.state`` during a run); every training call starts a PrivacyEngine whose accountant is
restored from it through Opacus' public state API (``load_state_dict``), so epsilon accumulates
across rounds and runs instead of restarting at zero.

Guarantee, and its *unit* (the site's policy chooses it, :class:`client.policy.SitePolicy.unit`):

* ``"patient"`` (:func:`train_private_patients`): (epsilon, delta)-DP for each training *patient*.
  Every step Poisson-samples patients, takes all of a sampled patient's slices, and clips the sum of
  their gradients as one unit; the accountant runs over patients (sample rate = expected patients
  per step / training patients). Adding or removing a whole patient is what epsilon bounds.
* ``"slice"`` (:func:`train_private`): (epsilon, delta)-DP for each training *slice*: slices of one
  patient are sampled and clipped one by one. For a patient with k slices this is, by group
  privacy, only (k epsilon, k e^{(k-1) epsilon} delta): per patient it can be far weaker.

Randomness: the Gaussian noise and the Poisson batch sampling come from :func:`secret_generator`, a
``torch.Generator`` seeded from the operating system's entropy (``secrets``) for every call. Nothing in
the run config (``seed``) or the results reaches it, so the published seed cannot replay the noise.
Opacus' ``secure_mode`` would use torchcsprng instead, which has no wheel for this torch (not on PyPI).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.task import Batchable, TrainResult, augment_intensity, loss_function, make_optimizer

__all__ = [
    "HistoryEntry",
    "PatientSchedule",
    "PrivateTrainResult",
    "accountant_state",
    "clipped_patient_sum",
    "default_delta",
    "epsilon_spent",
    "noise_for_remaining",
    "noise_for_target",
    "patient_index",
    "patient_schedule",
    "per_sample_loss",
    "per_sample_module",
    "secret_generator",
    "train_private",
    "train_private_patients",
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


# --- Patient-level DP-SGD: every patient's slices form one unit ---------------------------------------


def patient_index(patients: Sequence[str]) -> torch.Tensor:
    """Per slice, the ordinal of its patient among the distinct patient keys (sorted): ``(N,)`` int64.

    The ordinals are site-local bookkeeping for grouping slices; no key leaves the site.
    """
    order = {key: i for i, key in enumerate(sorted(set(patients)))}
    return torch.tensor([order[k] for k in patients], dtype=torch.long)


@dataclass(frozen=True)
class PatientSchedule:
    """How patient-level DP-SGD samples a site's training patients."""

    expected_patients: int
    """Patients expected per step: ``max(1, batch_size // slices per patient)``, so that a step
    holds about ``batch_size`` slices on average."""
    sample_rate: float
    """Each patient's chance to join a step (Poisson): 1 / steps per epoch."""
    steps_per_epoch: int


def patient_schedule(n_slices: int, n_patients: int, batch_size: int) -> PatientSchedule:
    """The Poisson schedule over patients for a split of ``n_slices`` slices from ``n_patients`` patients.

    As Opacus' Poisson loader does for slices: ``steps_per_epoch = ceil(patients / expected)`` and
    the sample rate is its inverse.

    Raises:
        ValueError: If there are no patients.
    """
    if n_patients <= 0:
        raise ValueError("no training patients: the site's training split is empty")
    per_patient = max(1, round(n_slices / n_patients))
    expected = min(max(1, batch_size // per_patient), n_patients)
    steps = math.ceil(n_patients / expected)
    return PatientSchedule(expected_patients=expected, sample_rate=1.0 / steps, steps_per_epoch=steps)


def per_sample_loss(
    task: str = "segmentation", weights: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The task loss as one value per sample, ``(B,)``: no sample's loss depends on another.

    Segmentation: the task loss (:func:`common.task.loss_function`, Dice per sample plus
    cross-entropy) on each sample alone. Classification: cross-entropy per sample, times the fixed
    weight of its class (a weighted *mean* over a batch would divide by the batch's weight sum and
    couple the samples).
    """
    if task == "classification":
        import torch.nn.functional as F

        def classify(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            w = None if weights is None else weights.to(logits.device)
            return F.cross_entropy(logits, y, weight=w, reduction="none")

        return classify
    loss_fn = loss_function(task)

    def segment(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([loss_fn(logits[i : i + 1], y[i : i + 1]) for i in range(len(logits))])

    return segment


@contextlib.contextmanager
def per_sample_module(model: torch.nn.Module, grad_sample_mode: str = "hooks") -> Iterator[Any]:
    """``model`` wrapped in Opacus' ``GradSampleModule`` (per-sample gradients of a summed loss) for the block.

    The wrapper's hooks are removed on exit, leaving the plain model. ``"functorch"`` uses
    ``torch.func`` per-sample gradients; any other mode (e.g. ``"ghost"``, which yields no
    per-sample gradients) uses hooks.
    """
    from opacus import GradSampleModule

    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="sum", force_functorch=grad_sample_mode == "functorch"
    )
    try:
        yield gsm
    finally:
        gsm._close()
        for p in model.parameters():
            p.grad_sample = None


def clipped_patient_sum(
    gsm: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    patients: torch.Tensor,
    *,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_grad_norm: float,
    chunk: int = 32,
    scale: float = 1.0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One step's sum over patients of each patient's clipped gradient (no noise).

    Each slice's gradient is computed alone (per-sample gradients), the slices of one patient are
    summed, and that patient's sum is clipped to ``max_grad_norm``: a patient's whole contribution
    has norm at most ``max_grad_norm``, however many slices it holds.

    Args:
        gsm: The model in :func:`per_sample_module`.
        x, y: The step's slices (all slices of the sampled patients) and their labels.
        patients: ``(B,)`` patient of each slice (any integers; equal = same patient).
        loss_of: Per-sample loss (:func:`per_sample_loss`).
        max_grad_norm: The clipping norm C, per patient.
        chunk: Slices per forward/backward pass (bounds memory; the result does not depend on it).
        scale: Each patient's summed gradient is multiplied by it before clipping (``1/K`` for K
            augmented copies of every slice: the mean over copies).

    Returns:
        ``(sums, losses)``: one tensor per trainable parameter (shaped like it), and the ``(B,)`` per-slice
        losses (detached).
    """
    params = [p for p in gsm.parameters() if p.requires_grad]
    if len(x) == 0:
        return [torch.zeros_like(p) for p in params], torch.zeros(0)
    _, group = torch.unique(patients, return_inverse=True)
    n_groups = int(group.max()) + 1
    per_patient = [torch.zeros((n_groups, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    losses = []
    for start in range(0, len(x), chunk):
        for p in params:
            p.grad_sample = None
            p.grad = None
        loss = loss_of(gsm(x[start : start + chunk]), y[start : start + chunk])
        with warnings.catch_warnings():  # the images need no gradient: Opacus' hooks still fire, as meant
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.sum().backward()
        g = group[start : start + chunk].to(x.device)
        for acc, p in zip(per_patient, params, strict=True):
            if p.grad_sample is not None:  # None: the parameter took no part in this pass
                acc.index_add_(0, g, p.grad_sample)
        losses.append(loss.detach())
    for p in params:
        p.grad_sample = None
        p.grad = None
    if scale != 1.0:
        for acc in per_patient:
            acc.mul_(scale)
    norms = torch.sqrt(sum(acc.reshape(n_groups, -1).pow(2).sum(1) for acc in per_patient))
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = [torch.einsum("g,g...->...", factor, acc) for acc in per_patient]
    return sums, torch.cat(losses).cpu()


def train_private_patients(
    model: torch.nn.Module,
    data: Batchable,
    patients: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adam",
    noise_multiplier: float,
    max_grad_norm: float,
    history: Sequence[HistoryEntry] = (),
    accountant: str = "rdp",
    grad_sample_mode: str = "hooks",
    proximal_mu: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    task: str = "segmentation",
    weights: torch.Tensor | None = None,
    augment_multiplicity: int = 0,
    augment: str = "intensity",
) -> PrivateTrainResult:
    """Patient-level DP-SGD: Poisson sampling of patients, clipping per patient, accountant over patients.

    Each step draws every training patient with probability ``q`` (:func:`patient_schedule`), takes
    all of the drawn patients' slices, sums their per-slice gradients per patient, clips each patient's
    sum to ``max_grad_norm`` (:func:`clipped_patient_sum`), adds Gaussian noise of std
    ``noise_multiplier x max_grad_norm`` and divides by the expected number of patients per step. A
    step that drew nobody still adds the noise and is accounted (the mechanism does not depend on
    who was drawn). The sampling and the noise come from :func:`secret_generator`.

    Args:
        model: The network (no BatchNorm); trained in place and left without Opacus hooks.
        data: The site's training split.
        patients: ``(N,)`` patient of each training slice (:func:`patient_index`); never leaves the site.
        epochs: Local epochs (each ``steps_per_epoch`` steps).
        batch_size: Expected batch size in slices; the expected patients per step follow from it.
        lr, optimizer: As for :func:`train_private`.
        noise_multiplier: Noise std / clipping norm; 0 clips without noise (no DP guarantee).
        max_grad_norm: Clipping norm of one patient's summed gradient.
        history: The site's accountant history (over patients) before this call.
        accountant: ``"rdp"`` or ``"prv"``.
        grad_sample_mode: ``"hooks"`` or ``"functorch"`` (:func:`per_sample_module`).
        proximal_mu: FedProx pull towards the global weights after each step (post-processing).
        seed: Seeds only non-private randomness (never sampling or noise).
        device: Where to train.
        task: ``"segmentation"`` or ``"classification"``.
        weights: Classification only: fixed per-class loss weights.
        augment_multiplicity: K > 0: each drawn slice enters the step as K augmented copies
            (``augment``'s transformations, :func:`common.task.augment_intensity`) and its gradient is
            the mean of theirs, before the patient's sum is clipped: the clipping bound, and so the
            guarantee, are unchanged; the step costs K times as much (De et al. 2022). 0: the slices
            as they are.
        augment: The transformations of ``augment_multiplicity`` (``"intensity"``; ``"none"`` turns it off).

    Returns:
        The training result and the accountant history including this call (sample rate over patients).

    Raises:
        ValueError: If ``data`` is empty, ``patients`` does not match it, or the model holds BatchNorm.
    """
    from opacus.validators import ModuleValidator

    if len(data) == 0:
        raise ValueError("no training samples: the site's training split is empty")
    if patients.shape != (len(data),):
        raise ValueError(f"patients has shape {tuple(patients.shape)}; one patient per training slice ({len(data)})")
    model.train()  # the validator checks training mode (the model may come from evaluation)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ValueError(
            f"the model cannot be trained with DP-SGD: {problems[0]}; use model.norm = 'instance' or 'group'"
        )
    start = time.perf_counter()
    device = torch.device(device)
    from client.per_sample import prepare

    prepare(model)  # fedsite's grad samplers (PReLU, transposed convolutions) for Opacus' hooks
    model.to(device).train()
    torch.manual_seed(seed)  # reproducibility of non-private randomness only
    secret = secret_generator()  # DP noise and Poisson sampling: OS entropy, never the run seed
    _, group = torch.unique(patients, return_inverse=True)
    n_patients = int(group.max()) + 1
    plan = patient_schedule(len(data), n_patients, batch_size)
    q = plan.sample_rate
    expected = q * n_patients
    slices_of = [torch.nonzero(group == i).flatten() for i in range(n_patients)]
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt = make_optimizer(model, optimizer, lr)
    loss_of = per_sample_loss(task, weights)
    acc = _accountant(accountant)
    acc.load_state_dict(accountant_state(history, accountant))
    params = [p for p in model.parameters() if p.requires_grad]
    # augmentation multiplicity: not private randomness (the bound holds for any augmentation)
    copies = max(1, augment_multiplicity)
    aug_gen = torch.Generator().manual_seed(seed + 1) if augment_multiplicity > 0 and augment != "none" else None
    if aug_gen is None:
        copies = 1
    steps = samples_seen = 0
    epoch_loss = 0.0
    with per_sample_module(model, grad_sample_mode) as gsm, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(epochs):
            total, seen = 0.0, 0
            for _ in range(plan.steps_per_epoch):
                drawn = torch.nonzero(torch.rand(n_patients, generator=secret) < q).flatten().tolist()
                rows = torch.cat([slices_of[i] for i in drawn]) if drawn else torch.zeros(0, dtype=torch.long)
                x, y, owners = data.images[rows], data.labels[rows], group[rows]
                if aug_gen is not None:
                    x = torch.cat([augment_intensity(x, aug_gen) for _ in range(copies)])
                    y, owners = y.repeat(copies, *([1] * (y.dim() - 1))), owners.repeat(copies)
                sums, losses = clipped_patient_sum(
                    gsm,
                    x.to(device),
                    y.to(device),
                    owners,
                    loss_of=loss_of,
                    max_grad_norm=max_grad_norm,
                    chunk=max(batch_size, 1),
                    scale=1.0 / copies,
                )
                opt.zero_grad(set_to_none=True)
                for p, s in zip(params, sums, strict=True):
                    noise = torch.normal(0.0, noise_multiplier * max_grad_norm, size=p.shape, generator=secret)
                    p.grad = (s + noise.to(device)) / expected
                opt.step()
                if proximal_mu > 0:
                    with torch.no_grad():
                        for p, g in zip(model.parameters(), global_params, strict=True):
                            p.sub_(lr * proximal_mu * (p - g))
                acc.step(noise_multiplier=noise_multiplier, sample_rate=q)
                steps += 1
                samples_seen += len(rows)
                total += float(losses.sum()) / copies
                seen += len(rows)
            epoch_loss = total / max(seen, 1)
    result = TrainResult(
        num_examples=len(data),
        steps=steps,
        loss=epoch_loss,
        seconds=time.perf_counter() - start,
        samples_seen=samples_seen,
    )
    return PrivateTrainResult(result=result, history=_history_of(acc), sample_rate=q, steps=steps)
