"""Model factory: the one network every site and the server build from the run config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from monai.networks.nets import DenseNet121, ResNet, UNet
from monai.networks.nets.resnet import ResNetBlock

from common.config import ConfigError, ModelConfig, TaskConfig

__all__ = [
    "FINAL_MODEL",
    "MLFLOW_SCHEMES",
    "NUM_CLASSES",
    "SegmentationUNet",
    "architecture",
    "build_model",
    "check_start_weights",
    "init_weights_path",
    "load_start_weights",
    "norm_keys",
    "pick_device",
]

#: The file a run folder keeps its final global weights in (a state dict).
FINAL_MODEL = "final_model.pt"
#: ``model.init`` values starting with one of these are MLflow URIs, resolved by the coordinator.
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
_FIX = (
    "set model.name, model.channels, model.num-res-units and model.norm to the ones the start model was "
    "trained with (its pretrain.json or results.json says), or pretrain a start model for this config"
)

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
        # Two groups divide every feature size of the networks built here.
        return ("group", {"num_groups": 2})
    return "batch"


class SegmentationUNet(torch.nn.Module):
    """A MONAI ``UNet`` that ends in ``channels[0]`` features, then a 1x1 convolution to class logits.

    MONAI's ``UNet`` with ``out_channels=2`` normalizes and activates its top up-sampling block
    at the output width: the two class maps pass through a 2-channel instance norm, which forces
    each map to zero mean and unit variance over every image whatever the lesion covers. Trained
    from scratch it then predicts nothing useful for its first ~30 steps and stays fragile later
    (a default three-site federation ended at Dice 0.000 on its noisiest scanner). Here the top
    block normalizes ``channels[0]`` features and a plain linear head makes the logits, as in
    nnU-Net.

    Shapes: ``(B, 1, H, W) -> (B, NUM_CLASSES, H, W)``.
    """

    def __init__(
        self, channels: tuple[int, ...], num_res_units: int, norm: tuple[str, dict[str, object]] | str
    ) -> None:
        super().__init__()
        self.unet = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=channels[0],
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
            norm=norm,
        )
        self.head = torch.nn.Conv2d(channels[0], NUM_CLASSES, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet(x))


class _ResNetBlock(ResNetBlock):
    """MONAI's basic ResNet block without in-place operations (same parameters, same output).

    MONAI's block adds the shortcut with ``out += residual`` and uses ``ReLU(inplace=True)``; Opacus'
    per-sample gradient hooks refuse an in-place change of a hooked layer's output, so DP-SGD could
    not train the classification ResNet.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(getattr(self.act, "inplace", None), bool):
            self.act.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


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
        Segmentation: a :class:`SegmentationUNet` (MONAI ``UNet`` + 1x1 head), ``(B, 1, H, W) ->
        (B, NUM_CLASSES, H, W)`` logits per pixel.
        Classification: a MONAI ``ResNet`` (basic blocks, one per stage, stage widths
        ``model.channels``) or ``DenseNet121``, ``(B, 1, H, W) -> (B, len(task.classes))`` logits.
    """
    arch = architecture(cfg, task)
    if arch == "resnet":
        net = ResNet(
            block=_ResNetBlock,
            layers=[1] * len(cfg.channel_tuple),
            block_inplanes=list(cfg.channel_tuple),
            spatial_dims=2,
            n_input_channels=1,
            conv1_t_size=3,
            conv1_t_stride=1,
            num_classes=len(task.class_names),
            norm=_norm(cfg.norm),
            act=("relu", {"inplace": False}),
        )
        # MONAI's ResNet does not pass ``norm`` to its stages (their blocks and shortcuts stay BatchNorm).
        return net if cfg.norm == "batch" else _replace_batchnorm(net, cfg.norm)
    if arch == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(task.class_names), norm=_norm(cfg.norm))
    return SegmentationUNet(cfg.channel_tuple, cfg.num_res_units, _norm(cfg.norm))


def pick_device() -> torch.device:
    """CUDA when a GPU is present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_weights_path(source: str, *, fetch: Callable[[str], Path] | None = None) -> Path:
    """The state-dict file that ``model.init`` = ``source`` names.

    Args:
        source: A ``.pt`` state-dict file, a run folder holding :data:`FINAL_MODEL`, or an MLflow URI
            (:data:`MLFLOW_SCHEMES`, e.g. ``runs:/RUN_ID/final_model.pt``).
        fetch: Downloads an MLflow URI and returns the local path (the coordinator's tracking
            module); without it an MLflow URI is an error.

    Raises:
        ConfigError: If nothing usable is found there; the message says what to give instead.
    """
    what = f"config key 'model.init' = {source!r}"
    if source.startswith(MLFLOW_SCHEMES):
        if fetch is None:
            raise ConfigError(f"{what} is an MLflow URI; only the coordinator can resolve it (or give a local file)")
        try:
            path = Path(fetch(source))
        except Exception as exc:  # MLflow raises many types; the message says what to check
            raise ConfigError(
                f"{what}: MLflow could not download it ({type(exc).__name__}); check the URI and output.tracking-uri, "
                "or give the final_model.pt file itself"
            ) from exc
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        if (path / FINAL_MODEL).is_file():
            return path / FINAL_MODEL
        found = sorted(p.name for p in path.glob("*.pt"))[:3]
        if len(found) == 1:
            return path / found[0]
        raise ConfigError(
            f"{what} is a folder without {FINAL_MODEL}; point it at a run folder or at the .pt file itself"
            + (f" (found {', '.join(found)})" if found else "")
        )
    if not path.is_file():
        raise ConfigError(
            f"{what}: no such file or folder; give a .pt state dict, a run folder holding {FINAL_MODEL}, "
            "or an MLflow URI such as runs:/RUN_ID/final_model.pt"
        )
    return path


def check_start_weights(state: Mapping[str, object], model: torch.nn.Module, *, source: str = "") -> None:
    """Check that a state dict fits ``model``: the same keys, each of the same shape, finite values.

    Raises:
        ConfigError: Naming the missing, unexpected and mis-shaped keys (a few of each) and the fix.
    """
    what = f"config key 'model.init' = {source!r}" if source else "the start weights"
    reference = model.state_dict()
    bad_type = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad_type:
        raise ConfigError(f"{what} is not a PyTorch state dict: entry {bad_type[0]!r} is not a tensor")
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    shapes = sorted(
        k
        for k in set(reference) & set(state)
        if tuple(state[k].shape) != tuple(reference[k].shape)  # type: ignore[union-attr]
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
            )
        if shapes:
            shown = ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(reference[k].shape)}"
                for k in shapes[:3]  # type: ignore[union-attr]
            )
            parts.append(f"{len(shapes)} of another shape ({shown}{', ...' if len(shapes) > 3 else ''})")
        raise ConfigError(f"{what} does not fit the configured model: keys {'; '.join(parts)}. Fix: {_FIX}")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():  # type: ignore[union-attr]
            raise ConfigError(f"{what}: weight {key!r} holds NaN or infinite values; use another start model")


def load_start_weights(model: torch.nn.Module, source: str, *, fetch: Callable[[str], Path] | None = None) -> Path:
    """Load ``model.init`` weights into ``model`` (the federation's round-0 global model).

    Args:
        model: The network built from the run config (:func:`build_model`).
        source: The ``model.init`` value (see :func:`init_weights_path`).
        fetch: Resolves an MLflow URI to a local file (the coordinator passes its tracker's).

    Returns:
        The file the weights came from.

    Raises:
        ConfigError: If the source is missing, not a state dict, or does not fit ``model``.
    """
    path = init_weights_path(source, fetch=fetch)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"config key 'model.init' = {source!r}: {path.name} is not a PyTorch state dict ({type(exc).__name__}); "
            "give a file written by torch.save(model.state_dict(), ...), e.g. a run's final_model.pt"
        ) from None
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"config key 'model.init' = {source!r}: {path.name} holds a {type(state).__name__}, not a state dict"
        )
    check_start_weights(state, model, source=source)
    reference = model.state_dict()
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()})
    return path
