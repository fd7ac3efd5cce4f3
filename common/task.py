"""Training and evaluation of the two tasks. Plain PyTorch and MONAI; no Flower.

* ``"segmentation"``: lesion masks, samples ``{"image": (1, H, W), "label": (1, H, W)}``, Dice+CE
  loss (the lesion's Dice over each batch's pixels), Dice over the whole split.
* ``"classification"``: one class per image, samples ``{"image": (1, H, W), "label": ()}``
  (class index), cross-entropy (optionally weighted by inverse class frequency), AUC, accuracy,
  sensitivity, specificity and calibration error (:mod:`common.metrics`).

:func:`stack_samples` turns a list of sample dicts into two tensors once, so that every epoch
after the first reads memory, not dicts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss

from common.metrics import classification_metrics

__all__ = [
    "AUGMENTATIONS",
    "TASKS",
    "Batchable",
    "TrainResult",
    "augment_intensity",
    "class_weights",
    "dice_from_counts",
    "evaluate",
    "loss_function",
    "make_optimizer",
    "stack_samples",
    "train",
]

TASKS = ("segmentation", "classification")

#: ``train.augment``: ``"intensity"`` varies each training image's intensities as scanners do;
#: ``"none"`` trains on the images as they are.
AUGMENTATIONS = ("intensity", "none")


def augment_intensity(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What another scanner might have made of the same anatomy: random gamma, contrast, brightness, noise.

    Each image (values about 0..1 after the site's percentile scaling) gets its own gamma
    (``exp(U(-0.5, 0.5))``), contrast (``x U(0.7, 1.3)``), brightness (``+ U(-0.1, 0.1)``) and Gaussian
    noise (std ``U(0, 0.05)``). Geometry, and so the labels, are untouched. Measured on the default
    federation's hardest scanner (README, "For the researcher"): models trained with it hold up on a
    site whose lesion contrast and bias field differ from the others'.

    Args:
        images: A batch ``(B, C, H, W)``; not modified.
        gen: The random generator (seeded from the round's seed: a round is repeatable).

    Returns:
        The augmented batch.
    """
    b = images.shape[0]
    shape = (b,) + (1,) * (images.dim() - 1)
    gamma = torch.exp(torch.empty(shape).uniform_(-0.5, 0.5, generator=gen))
    contrast = torch.empty(shape).uniform_(0.7, 1.3, generator=gen)
    brightness = torch.empty(shape).uniform_(-0.1, 0.1, generator=gen)
    noise = torch.empty(shape).uniform_(0.0, 0.05, generator=gen)
    out = images.clamp(0.0, 1.0) ** gamma.to(images)
    out = out * contrast.to(images) + brightness.to(images)
    return out + noise.to(images) * torch.randn(images.shape, generator=gen).to(images)


@dataclass(frozen=True)
class Batchable:
    """A split held as two tensors: images ``(N, 1, H, W)`` float32; labels int64, ``(N, 1, H, W)``
    masks for segmentation or ``(N,)`` class indices for classification."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def stack_samples(samples: Sequence[Mapping[str, object]]) -> Batchable:
    """Stack MONAI sample dicts into one :class:`Batchable`.

    Args:
        samples: Dicts with ``"image"`` and ``"label"`` arrays or tensors of shape ``(1, H, W)``.

    Returns:
        The stacked split (empty tensors if ``samples`` is empty).
    """
    if not samples:
        return Batchable(torch.zeros(0, 1, 1, 1), torch.zeros(0, 1, 1, 1, dtype=torch.long))
    images = torch.stack([torch.as_tensor(s["image"], dtype=torch.float32) for s in samples])
    labels = torch.stack([torch.as_tensor(s["label"]).long() for s in samples])
    # MetaTensor -> plain tensor: metadata is not needed in the training loop.
    return Batchable(
        images.as_tensor() if hasattr(images, "as_tensor") else images,
        labels.as_tensor() if hasattr(labels, "as_tensor") else labels,
    )


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train` did."""

    num_examples: int
    """Training samples seen per epoch (not batches): the weight of this site in FedAvg."""
    steps: int
    loss: float
    """Mean training loss over the last epoch (task loss, without the proximal term)."""
    seconds: float
    samples_seen: int = 0
    """Sample-steps: samples that went through a training step, summed over all steps (the
    training budget; the same for two runs that did the same work)."""


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; use one of {', '.join(TASKS)}")


def loss_function(
    task: str = "segmentation", weights: torch.Tensor | None = None, *, batch_dice: bool = False
) -> torch.nn.Module:
    """The task loss, from logits.

    Args:
        task: ``"segmentation"`` (Dice + cross-entropy) or ``"classification"`` (cross-entropy).
        weights: Classification only: per-class loss weights (:func:`class_weights`).
        batch_dice: Segmentation: the lesion's soft Dice over all pixels of the batch, as
            :func:`evaluate` scores a split (a slice without lesion counts through its false
            positives), plus cross-entropy. It couples the samples of a batch, so DP-SGD (which
            needs one loss per sample) keeps the default: Dice per sample over both classes.
    """
    _check_task(task)
    if task == "classification":
        return torch.nn.CrossEntropyLoss(weight=weights)
    if batch_dice:
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights for an imbalanced training split.

    ``w_c = N / (K * n_c)`` over the ``K`` classes present (so a balanced split gets all ones); a
    class absent from the split gets weight 1.

    Args:
        labels: ``(N,)`` class indices.
        num_classes: Number of classes.

    Returns:
        ``(num_classes,)`` float32 weights.
    """
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).double()
    present = counts > 0
    weights = torch.ones(num_classes, dtype=torch.float64)
    if present.any():
        weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights.float()


def make_optimizer(model: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """``"adam"`` or ``"sgd"`` (momentum 0.9) over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterable[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train(
    model: torch.nn.Module,
    data: Batchable,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adam",
    proximal_mu: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    task: str = "segmentation",
    weights: torch.Tensor | None = None,
    augment: str = "none",
) -> TrainResult:
    """Train ``model`` in place on ``data``.

    Args:
        model: The network; its current weights are the starting (global) weights.
        data: The site's training split.
        epochs: Local epochs (full passes over ``data``).
        batch_size: Samples per optimizer step.
        lr: Learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        proximal_mu: FedProx weight; adds ``mu/2 * ||w - w_global||^2`` to the loss when > 0.
        seed: Seeds the shuffling order, so a round is repeatable.
        device: Where to train.
        task: ``"segmentation"`` or ``"classification"``.
        weights: Classification only: per-class loss weights (:func:`class_weights`).
        augment: One of :data:`AUGMENTATIONS` (``"intensity"``: :func:`augment_intensity`, drawn from
            its own generator seeded from ``seed``, so the batch order is the same either way).

    Returns:
        A :class:`TrainResult` with ``num_examples`` = number of training samples.

    Raises:
        ValueError: If ``data`` is empty or ``augment`` is unknown.
    """
    if len(data) == 0:
        raise ValueError("no training samples: the site's training split is empty")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment = {augment!r}: expected one of {', '.join(AUGMENTATIONS)}")
    start = time.perf_counter()
    device = torch.device(device)
    model.to(device).train()
    loss_fn = loss_function(task, None if weights is None else weights.to(device), batch_dice=True)
    opt = make_optimizer(model, optimizer, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1) if augment == "intensity" else None
    steps = samples_seen = 0
    epoch_loss = 0.0
    for _ in range(epochs):
        total, seen = 0.0, 0
        for idx in _batches(len(data), batch_size, gen):
            x = data.images[idx]
            if aug_gen is not None:
                x = augment_intensity(x, aug_gen)
            x = x.to(device, non_blocking=True)
            y = data.labels[idx].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            task_loss = loss_fn(model(x), y)
            loss = task_loss
            if proximal_mu > 0:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(params, global_params, strict=True))
                loss = loss + (proximal_mu / 2.0) * prox
            loss.backward()
            opt.step()
            steps += 1
            samples_seen += len(idx)
            total += float(task_loss.detach()) * len(idx)
            seen += len(idx)
        epoch_loss = total / max(seen, 1)
    return TrainResult(
        num_examples=len(data),
        steps=steps,
        loss=epoch_loss,
        seconds=time.perf_counter() - start,
        samples_seen=samples_seen,
    )


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """Dice = 2TP / (2TP + FP + FN); 1.0 when there is nothing to find and nothing was found."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else float(2 * tp / denom)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Batchable,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    task: str = "segmentation",
) -> dict[str, float]:
    """Evaluate ``model`` on ``data``.

    Segmentation: Dice is computed over the whole split (all pixels of all slices pooled), so
    slices without lesion count through their false positives instead of being undefined.
    Classification: :func:`common.metrics.classification_metrics` on the softmax outputs, the last
    class being the positive one; ``auc`` is left out when the split holds a single class (it is
    undefined there), so every value returned is finite.

    Args:
        model: The network to evaluate.
        data: A validation split.
        batch_size: Samples per forward pass.
        device: Where to run.
        task: ``"segmentation"`` or ``"classification"``.

    Returns:
        Segmentation ``{"dice", "loss", "num-examples"}``; classification ``{"auc", "accuracy",
        "sensitivity", "specificity", "balanced-accuracy", "ece", "loss", "num-examples"}``. The
        loss is the mean unweighted task loss per sample.

    Raises:
        ValueError: If ``data`` is empty.
    """
    _check_task(task)
    if len(data) == 0:
        raise ValueError("no validation samples: the site's validation split is empty")
    device = torch.device(device)
    model.to(device).eval()
    if task == "classification":
        return _evaluate_classification(model, data, batch_size=batch_size, device=device)
    loss_fn = loss_function()
    tp = fp = fn = 0.0
    loss_sum = 0.0
    for idx in _batches(len(data), batch_size, None):
        x = data.images[idx].to(device)
        y = data.labels[idx].to(device)
        logits = model(x)
        loss_sum += float(loss_fn(logits, y)) * len(idx)
        pred = logits.argmax(dim=1, keepdim=True)
        tp += float(((pred == 1) & (y == 1)).sum())
        fp += float(((pred == 1) & (y != 1)).sum())
        fn += float(((pred != 1) & (y == 1)).sum())
    return {"dice": dice_from_counts(tp, fp, fn), "loss": loss_sum / len(data), "num-examples": float(len(data))}


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module, data: Batchable, *, batch_size: int = 64, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Softmax class probabilities ``(N, C)`` of a classification model on ``data``."""
    device = torch.device(device)
    model.to(device).eval()
    out = [
        torch.softmax(model(data.images[idx].to(device)).float(), dim=1).cpu()
        for idx in _batches(len(data), batch_size, None)
    ]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))


def _evaluate_classification(
    model: torch.nn.Module, data: Batchable, *, batch_size: int, device: torch.device
) -> dict[str, float]:
    probs = predict_proba(model, data, batch_size=batch_size, device=device)
    labels = data.labels.reshape(-1).numpy()
    scores = classification_metrics(probs, labels, positive=probs.shape[1] - 1)
    eps = 1e-12
    scores["loss"] = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))))
    return {k: float(v) for k, v in scores.items() if np.isfinite(v)}
