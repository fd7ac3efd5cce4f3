"""Model factory: the one network every site and the server build from the run config."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from common.config import ModelConfig

__all__ = ["build_model", "pick_device", "norm_keys", "NUM_CLASSES"]

_NORM_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


def norm_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the normalization layers (weights, biases, running statistics).

    FedBN keeps exactly these on each site: they absorb the scanner's intensity statistics.
    """
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys.extend(prefix + k for k in module.state_dict())
    return sorted(keys)

NUM_CLASSES = 2
"""Segmentation classes: 0 background, 1 lesion."""


def _norm(name: str) -> tuple[str, dict[str, object]] | str:
    if name == "instance":
        # Affine instance norm: per-image statistics, learnable scale and shift. No running
        # statistics, so it is valid for differential privacy too.
        return ("instance", {"affine": True})
    if name == "group":
        # MONAI's UNet also normalizes its 2-channel top up-sampling block, so groups must divide 2.
        return ("group", {"num_groups": 2})
    return "batch"


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """Build the 2D segmentation network described by ``cfg``.

    Args:
        cfg: The ``model.*`` group of the run config.

    Returns:
        A MONAI ``UNet`` with one input channel (the image) and ``NUM_CLASSES`` output logits
        per pixel, shape ``(B, 1, H, W) -> (B, 2, H, W)``.
    """
    channels = cfg.channel_tuple
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=NUM_CLASSES,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=cfg.num_res_units,
        norm=_norm(cfg.norm),
    )


def pick_device() -> torch.device:
    """CUDA when a GPU is present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
