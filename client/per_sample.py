"""Per-sample gradients for DP-SGD on fedsite's networks: Opacus grad samplers it lacks, and a vmap path. No Flower.

Opacus' ``hooks`` mode computes each layer's per-sample gradients from the layer's input and the
gradient at its output, with one function per layer type. It has none for ``ConvTranspose2d`` (the
UNet's up-sampling) or ``PReLU`` (MONAI's default activation), and falls back to ``torch.func``
(``vmap`` of the layer's forward, recomputed per sample) for them, which made a DP-SGD step of the
default UNet about 4x a plain step. The closed forms below replace that fallback:

- ``PReLU`` ``y = max(0, x) + a min(0, x)``: ``dL/da`` per sample is ``sum(g * min(0, x))`` over
  the sample's elements (per channel for a per-channel ``a``).
- ``ConvTranspose2d`` is the adjoint of ``Conv2d`` with the same weight, stride, padding and
  dilation, so its weight gradient is a convolution's weight gradient with input and output
  gradient exchanged: unfold the output gradient and contract it with the input, per sample.

:func:`prepare` installs them (idempotent) and turns off in-place activations (MONAI's ResNet uses
``ReLU(inplace=True)``, which Opacus' backward hooks refuse); :func:`client.dpsgd.train_private` calls it.

:func:`vmap_grad_samples` is the other way: ``torch.func.vmap(grad)`` over the whole model, one
sample's loss at a time, for Opacus' ``no_op`` mode (its optimizer clips, adds noise and accounts).

``benchmarks/dp_overhead.py`` checks every mode's clipped gradient sum against a per-sample loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["conv_transpose2d_grad_sample", "prelu_grad_sample", "prepare", "register", "vmap_grad_samples"]

_registered = False


def prelu_grad_sample(
    layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of a ``PReLU``'s slope(s): ``(B, num_parameters)``."""
    x = activations[0].to(backprops.dtype)
    contrib = backprops * torch.clamp(x, max=0)
    n = x.shape[0]
    if layer.weight.numel() == 1:
        grad = contrib.reshape(n, -1).sum(dim=1, keepdim=True)
    else:
        grad = contrib.reshape(n, contrib.shape[1], -1).sum(dim=2)
    return {layer.weight: grad.reshape(n, *layer.weight.shape)}


def conv_transpose2d_grad_sample(
    layer: nn.ConvTranspose2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``ConvTranspose2d``'s weight ``(B, C_in, C_out/groups, kH, kW)`` and bias."""
    from opacus.utils.tensor_utils import unfold2d

    x = activations[0].to(backprops.dtype)
    n, c_in = x.shape[:2]
    groups = layer.groups
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        # (B, C_out * kH * kW, H_in * W_in): the output gradient under each kernel tap, at each input pixel
        cols = unfold2d(
            backprops,
            kernel_size=layer.kernel_size,
            padding=layer.padding,
            stride=layer.stride,
            dilation=layer.dilation,
        )
        if cols.shape[-1] != x.shape[2] * x.shape[3]:
            raise ValueError(
                f"ConvTranspose2d per-sample gradient: unfolded {cols.shape[-1]} positions for an input of "
                f"{tuple(x.shape[2:])}; output_padding must be smaller than the stride"
            )
        xs = x.reshape(n, groups, c_in // groups, -1)
        cs = cols.reshape(n, groups, -1, cols.shape[-1])
        grad = torch.einsum("ngiq,ngpq->ngip", xs, cs)
        ret[layer.weight] = grad.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, backprops.shape[1], -1).sum(dim=2)
    return ret


def register() -> None:
    """Install the functions above as Opacus grad samplers (``hooks`` and ``ghost`` modes); idempotent."""
    global _registered
    if _registered:
        return
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(nn.PReLU)(prelu_grad_sample)
    register_grad_sampler(nn.ConvTranspose2d)(conv_transpose2d_grad_sample)
    _registered = True


def prepare(model: nn.Module) -> nn.Module:
    """Make ``model`` ready for Opacus' hooks: register the grad samplers, turn off in-place activations.

    Turning ``inplace`` off changes no weight and no output, only whether an activation overwrites
    its input. Returns ``model`` (changed in place).
    """
    register()
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    return model


@contextlib.contextmanager
def _onehot_outside(loss_fn: nn.Module) -> Iterator[bool]:
    """MONAI's Dice losses one-hot the labels with an in-place scatter, which ``vmap`` cannot batch: for the
    block, the loss takes one-hot targets instead (the same value); yields whether to one-hot them."""
    dice = getattr(loss_fn, "dice", loss_fn)
    if not getattr(dice, "to_onehot_y", False):
        yield False
        return
    dice.to_onehot_y = False
    try:
        yield True
    finally:
        dice.to_onehot_y = True


def vmap_grad_samples(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Set ``p.grad_sample`` (``(B, *p.shape)``) of every trainable parameter to each sample's own gradient.

    Each sample's loss is ``loss_fn`` on that sample alone (a batch of one), computed for all samples
    at once with ``torch.func.vmap(grad)``; the model needs no hooks. A class-weighted cross-entropy
    keeps its weight: the sample's loss is ``w[y]`` times its cross-entropy (alone, the weight would
    cancel in the weighted mean); the optimizer's division by the batch size, not by the batch's
    weight sum, keeps the samples independent. For Opacus' ``no_op`` mode, whose
    optimizer then clips, sums, adds noise and divides by the expected batch size.

    Returns:
        The batch mean of the per-sample losses (detached), for reporting.
    """
    from torch.func import functional_call, grad_and_value, vmap

    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    names = [k for k, _ in named]
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    weight = loss_fn.weight if isinstance(loss_fn, nn.CrossEntropyLoss) else None

    def sample_loss(params, xi, yi):
        out = functional_call(model, {**dict(zip(names, params, strict=True)), **frozen, **buffers}, (xi[None],))
        target = yi[None]
        if onehot:  # (1, 1, H, W) labels -> (1, C, H, W), out of place
            classes = torch.arange(out.shape[1], device=out.device).reshape(1, -1, *([1] * (out.dim() - 2)))
            target = (target.long() == classes).to(out.dtype)
        loss = loss_fn(out, target)
        return loss if weight is None else loss * weight[yi]

    with _onehot_outside(loss_fn) as onehot:
        grads, losses = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0))([p.detach() for _, p in named], x, y)
    for (_, p), g in zip(named, grads, strict=True):
        p.grad_sample = g
    return losses.mean().detach()
