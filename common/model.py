"""Model factory: the one network every site and the server build from the run config."""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121, ResNet, UNet

from common.config import ModelConfig, TaskConfig

__all__ = ["NUM_CLASSES", "architecture", "build_model", "norm_keys", "pick_device"]

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


def architecture(cfg: ModelConfig, task: TaskConfig = TaskConfig()) -> str:
    """The network ``cfg`` names for ``task``: ``model.name``, or for ``"auto"`` UNet/ResNet by task."""
    if cfg.name != "auto":
        return cfg.name
    return "unet" if task.name == "segmentation" else "resnet"


def _replace_batchnorm(model: torch.nn.Module, norm: str) -> torch.nn.Module:
    """Swap every BatchNorm layer of ``model`` for the ``norm`` (``"instance"`` or ``"group"``) layer, in place."""
    from monai.networks.layers.utils import get_norm_layer

    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(model, name, get_norm_layer(name=_norm(norm), spatial_dims=2, channels=child.num_features))
        else:
            _replace_batchnorm(child, norm)
    return model


def build_model(cfg: ModelConfig, task: TaskConfig = TaskConfig()) -> torch.nn.Module:
    """Build the 2D network described by ``cfg`` for ``task``.

    Args:
        cfg: The ``model.*`` group of the run config.
        task: The ``task.*`` group (segmentation by default).

    Returns:
        Segmentation: a MONAI ``UNet``, ``(B, 1, H, W) -> (B, NUM_CLASSES, H, W)`` logits per pixel.
        Classification: a MONAI ``ResNet`` (basic blocks, one per stage, stage widths
        ``model.channels``) or ``DenseNet121``, ``(B, 1, H, W) -> (B, len(task.classes))`` logits.
    """
    arch = architecture(cfg, task)
    if arch == "resnet":
        net = ResNet(
            block="basic",
            layers=[1] * len(cfg.channel_tuple),
            block_inplanes=list(cfg.channel_tuple),
            spatial_dims=2,
            n_input_channels=1,
            conv1_t_size=3,
            conv1_t_stride=1,
            num_classes=len(task.class_names),
            norm=_norm(cfg.norm),
        )
        # MONAI's ResNet does not pass ``norm`` to its stages (their blocks and shortcuts stay BatchNorm).
        return net if cfg.norm == "batch" else _replace_batchnorm(net, cfg.norm)
    if arch == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(task.class_names), norm=_norm(cfg.norm))
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
