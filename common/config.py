"""Run configuration: parsed once, at the edge, into frozen dataclasses.

Flower hands every app a flat ``run_config`` dict built from ``[tool.flwr.app.config]`` in
``pyproject.toml`` plus ``--run-config`` overrides, with dotted keys for groups
(``train.local-epochs``). :func:`parse_run_config` turns that dict into a :class:`RunConfig`;
an unknown key, a value of the wrong type or a value out of range raises :class:`ConfigError`
naming the key, the value and what is allowed.

The dataclass defaults below are the same values as ``pyproject.toml`` (a test keeps them equal),
so code that runs outside Flower (the CLI, benchmarks, tests) gets the same defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from common.errors import FedsiteError

__all__ = [
    "STRATEGY_NAMES",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OutputConfig",
    "PrivacyConfig",
    "RunConfig",
    "SimConfig",
    "StrategyConfig",
    "TaskConfig",
    "TrainConfig",
    "default_flat_config",
    "field_choices",
    "flatten",
    "parse_overrides",
    "parse_run_config",
]


class ConfigError(FedsiteError, ValueError):
    """A run-config key or value is invalid; the message names it and what is allowed."""


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"range": (lo, hi, lo_open)}


@dataclass(frozen=True)
class DataConfig:
    """How a site turns its images into samples (the same at every site)."""

    image_size: int = field(default=64, metadata=_range(16, 1024))
    spacing_mm: float = field(default=3.75, metadata=_range(0.0, 100.0, lo_open=True))
    val_fraction: float = field(default=0.25, metadata=_range(0.0, 0.9, lo_open=True))
    volume: str = field(
        default="first",
        metadata={
            "help": "multi-volume series (diffusion, fMRI, multi-echo): 'first' (lowest b-value, echo or time "
            "point), 'all', or a header rule such as 'b-value=0' or 'echo=1'"
        },
    )


TASKS = ("segmentation", "classification")

#: The aggregation strategies ``strategy.name`` may name: the one list (the server maps each to its
#: builder in ``server.strategies.BUILDERS``; a test keeps the two equal).
STRATEGY_NAMES = (
    "fedavg",
    "fedprox",
    "fedbn",
    "fedadam",
    "fedyogi",
    # robust aggregation (Flower 1.41): coordinate-wise median, trimmed mean, (Multi)Krum selection, Bulyan
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)


@dataclass(frozen=True)
class TaskConfig:
    """What the network learns: lesion segmentation (pixels) or image classification."""

    name: str = field(default="segmentation", metadata=_choice(*TASKS))
    classes: str = field(
        default="normal,pneumonia",
        metadata={
            "help": "classification: comma-separated class names (labels.csv values); the last is the positive class"
        },
    )
    class_weighted: bool = field(
        default=True,
        metadata={"help": "classification: weight the loss by inverse class frequency of the site's training split"},
    )

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names in index order, e.g. ``("normal", "pneumonia")``."""
        return tuple(c.strip() for c in self.classes.split(",") if c.strip())

    @property
    def metric(self) -> str:
        """The primary validation metric (higher is better): ``"dice"`` or ``"auc"``."""
        return "dice" if self.name == "segmentation" else "auc"


@dataclass(frozen=True)
class ModelConfig:
    """The MONAI network every site trains (same on every site)."""

    name: str = field(
        default="auto",
        metadata={
            **_choice("auto", "unet", "resnet", "densenet121"),
            "help": "auto = unet for segmentation, resnet for classification",
        },
    )
    channels: str = field(default="16,32,64,128", metadata={"help": "comma-separated feature sizes"})
    num_res_units: int = field(default=1, metadata=_range(0, 8))
    norm: str = field(default="instance", metadata=_choice("instance", "batch", "group"))
    init: str = field(
        default="",
        metadata={
            "help": "start weights: a .pt state dict, a run folder holding final_model.pt, or an MLflow URI "
            "(runs:/RUN_ID/final_model.pt); '' = random from seed"
        },
    )

    @property
    def channel_tuple(self) -> tuple[int, ...]:
        """The feature sizes as integers, e.g. ``(16, 32, 64, 128)``."""
        return tuple(int(c) for c in self.channels.split(","))


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site."""

    local_epochs: int = field(default=3, metadata=_range(1, 1_000))
    batch_size: int = field(default=8, metadata=_range(1, 4_096))
    lr: float = field(default=3e-3, metadata=_range(0.0, 10.0, lo_open=True))
    optimizer: str = field(default="adam", metadata=_choice("adam", "sgd"))
    augment: str = field(
        default="intensity",
        metadata={
            **_choice("intensity", "none"),
            "help": "'intensity' = random gamma, contrast, brightness and noise per training image (what "
            "another scanner might make of it); 'none' = the images as they are",
        },
    )
    threads: int = field(
        default=0, metadata={**_range(0, 256), "help": "torch threads per site process (0 = what the runtime gives)"}
    )


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation."""

    #: ``server-lr = 0`` picks these: measured on three small sites (README, "For the coordinator").
    SERVER_LR_DEFAULTS: ClassVar[dict[str, float]] = {"fedadam": 0.03, "fedyogi": 0.01}

    name: str = field(default="fedavg", metadata=_choice(*STRATEGY_NAMES))
    proximal_mu: float = field(default=0.01, metadata=_range(0.0, 100.0))
    server_lr: float = field(
        default=0.0,
        metadata={
            **_range(0.0, 10.0),
            "help": "FedAdam/FedYogi server step; 0 = measured default: FedAdam 0.03, FedYogi 0.01 "
            "(Flower's 0.1 collapses on small sites)",
        },
    )
    tau: float = field(
        default=0.01,
        metadata={
            **_range(0.0, 1.0, lo_open=True),
            "help": "FedAdam/FedYogi adaptivity: updates smaller than tau move about as in FedAvg, "
            "larger ones at most about server-lr",
        },
    )
    fraction_train: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    fraction_evaluate: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    min_sites: int = field(default=2, metadata=_range(1, 100_000))
    trim_beta: float = field(
        default=0.2,
        metadata={**_range(0.0, 0.49), "help": "fedtrimmedavg: fraction of sites cut at each end, per coordinate"},
    )
    num_malicious: int = field(
        default=0,
        metadata={**_range(0, 10_000), "help": "krum/multikrum/bulyan: sites assumed malicious (bulyan needs 4f+3)"},
    )
    krum_select: int = field(
        default=1, metadata={**_range(1, 100_000), "help": "multikrum: sites selected and averaged"}
    )
    round_timeout: float = field(
        default=0.0,
        metadata={
            **_range(0.0, 1e7),
            "help": "seconds a round waits for the sites' replies; the round goes on with those in time if at "
            "least min-sites (0 = wait up to an hour, Flower's default)",
        },
    )
    screen_mad: float = field(
        default=0.0,
        metadata={
            **_range(0.0, 1e6),
            "help": "reject an update whose distance to the global model exceeds the median by this many "
            "median absolute deviations (needs 3 or more sites; 0 = off)",
        },
    )

    @property
    def effective_server_lr(self) -> float:
        """``server-lr``, or for 0 the measured default of this server optimizer."""
        return self.server_lr if self.server_lr > 0 else self.SERVER_LR_DEFAULTS.get(self.name, 0.03)


@dataclass(frozen=True)
class PrivacyConfig:
    """What the run *asks* of each site's DP-SGD, budget and audit; each site's own policy decides.

    A site's privacy policy (``<site>/privacy.json``, see ``client/policy.py``) owns whether DP is
    on, the lifetime budget, delta, the accountant and the ledger's place; a site refuses a run whose
    request here asks for less protection than its policy. ``target-epsilon`` is a lifetime target.
    """

    dp: bool = False
    target_epsilon: float = field(
        default=0.0,
        metadata={
            **_range(0.0, 1e6),
            "help": "> 0: a lifetime target: noise sized so the site's ledger reaches it at the last round",
        },
    )
    noise_multiplier: float = field(
        default=0.0, metadata={**_range(0.0, 1e3), "help": "used when target-epsilon = 0; 0 = clip only (no guarantee)"}
    )
    max_grad_norm: float = field(default=1.0, metadata=_range(0.0, 1e6, lo_open=True))
    delta: float = field(default=0.0, metadata={**_range(0.0, 1.0), "help": "0 = 1/(10 x site training samples)"})
    accountant: str = field(default="rdp", metadata=_choice("rdp", "prv"))
    max_epsilon: float = field(default=0.0, metadata={**_range(0.0, 1e6), "help": "a site's lifetime budget; 0 = none"})
    on_budget: str = field(default="continue", metadata=_choice("continue", "stop"))
    grad_sample_mode: str = field(default="vmap", metadata=_choice("vmap", "hooks", "functorch", "ghost"))
    batch_size: int = field(
        default=64,
        metadata={
            **_range(0, 65_536),
            "help": "expected slices per DP-SGD step (noise is divided by it: DP wants large batches); "
            "0 = train.batch-size",
        },
    )
    augment_multiplicity: int = field(
        default=0,
        metadata={
            **_range(0, 64),
            "help": "patient-level DP-SGD: K > 0 = each slice's gradient is the mean over K augmented copies "
            "(train.augment's transformations) before clipping; 0 = the images as they are",
        },
    )
    central_dp: bool = False
    central_noise: float = field(
        default=1.0,
        metadata={**_range(0.0, 1e3, lo_open=True), "help": "central DP: noise multiplier on the clipped site updates"},
    )
    central_clip: float = field(
        default=1.0,
        metadata={**_range(0.0, 1e6, lo_open=True), "help": "central DP: L2 norm each site's update is clipped to"},
    )
    central_sites: int = field(
        default=0,
        metadata={
            **_range(0, 100_000),
            "help": "central DP: sites expected to answer each round (a round with another number is not aggregated); "
            "0 = the sites that answer",
        },
    )
    audit: bool = False
    audit_fraction: float = field(
        default=0.2, metadata={**_range(0.0, 0.5, lo_open=True), "help": "training slices held out for the audit"}
    )


@dataclass(frozen=True)
class SimConfig:
    """The one-machine simulation and its site generator (never read by a deployed site)."""

    root: str = field(
        default="",
        metadata={"help": "folder holding site-01, site-02, ... ('' = ~/.cache/fedsite/sites/<generator settings>)"},
    )
    patients: int = field(default=8, metadata=_range(2, 10_000))
    slices: int = field(default=12, metadata=_range(1, 1_000))
    source: str = field(
        default="",
        metadata={"help": "a MedMNIST-layout .npz of labelled images written as X-ray sites ('' = synthetic phantoms)"},
    )
    modality: str = field(
        default="MR",
        metadata={**_choice("MR", "CT", "CR", "DX", "auto"), "help": "scanner modality of the generated sites"},
    )
    label_skew: float = field(
        default=0.0,
        metadata={**_range(0.0, 100.0), "help": "per-site label imbalance (0 = every site has the global mix)"},
    )
    quantity_skew: float = field(
        default=0.0, metadata={**_range(0.0, 100.0), "help": "spread of site sizes (0 = equal sizes)"}
    )
    sites: int = field(default=3, metadata=_range(1, 1_000))
    cpus_per_site: float = field(default=1.0, metadata=_range(0.0, 256.0, lo_open=True))


@dataclass(frozen=True)
class OutputConfig:
    """Where the server writes results, the final model and the MLflow store."""

    dir: str = field(default="", metadata={"help": "'' = ./fedsite-runs/<timestamp>"})
    tracking_uri: str = field(
        default="", metadata={"help": "MLflow tracking URI ('' = sqlite store in the output folder)"}
    )
    experiment: str = "fedsite"
    resume: bool = field(
        default=False,
        metadata={"help": "continue the run in output.dir from its checkpoint.npz (the last complete round)"},
    )


@dataclass(frozen=True)
class RunConfig:
    """The whole, validated run configuration."""

    seed: int = field(default=42, metadata=_range(0, 2**31 - 1))
    num_server_rounds: int = field(default=3, metadata=_range(1, 100_000))
    data: DataConfig = DataConfig()
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    sim: SimConfig = SimConfig()
    output: OutputConfig = OutputConfig()


def _key(name: str) -> str:
    return name.replace("_", "-")


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[dataclasses.Field[Any], type]]:
    """Map every flat dotted key (``train.local-epochs``) to its field and owning class."""
    out: dict[str, tuple[dataclasses.Field[Any], type]] = {}
    for f in fields(cls):
        key = prefix + _key(f.name)
        if dataclasses.is_dataclass(f.default):
            out.update(_leaf_fields(type(f.default), key + "."))
        else:
            out[key] = (f, cls)
    return out


_LEAVES = _leaf_fields(RunConfig)


def _coerce(key: str, value: Any, f: dataclasses.Field[Any]) -> Any:
    typ = type(f.default)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r}: expected true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a whole number")
        value = int(value)
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
        value = float(value)
    elif typ is str and not isinstance(value, str):
        raise ConfigError(f"config key '{key}' = {value!r}: expected a string")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed; choose one of {allowed}")
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and value > hi
        if too_low or too_high:
            lo_txt = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            hi_txt = "" if hi is None else f"<= {hi}"
            allowed = " and ".join(t for t in (lo_txt, hi_txt) if t)
            raise ConfigError(f"config key '{key}' = {value!r} is out of range; it must be {allowed}")
    return value


def parse_run_config(raw: Mapping[str, Any] | None) -> RunConfig:
    """Validate a flat Flower run config and build a :class:`RunConfig`.

    Keys that are absent take their defaults (the same as ``pyproject.toml``).

    Args:
        raw: Flat mapping with dotted keys, e.g. ``{"train.local-epochs": 2}``.

    Returns:
        The frozen, validated configuration.

    Raises:
        ConfigError: For an unknown key (with the closest known keys) or an invalid value.
    """
    raw = dict(raw or {})
    unknown = sorted(k for k in raw if k not in _LEAVES)
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(_LEAVES), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown config key '{k}'{hint} Known keys: {', '.join(sorted(_LEAVES))}")
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in raw.items():
        f, _owner = _LEAVES[key]
        coerced = _coerce(key, value, f)
        if "." in key:
            group, _ = key.split(".", 1)
            groups.setdefault(group.replace("-", "_"), {})[f.name] = coerced
        else:
            top[f.name] = coerced
    kwargs: dict[str, Any] = dict(top)
    for f in fields(RunConfig):
        if dataclasses.is_dataclass(f.default):
            kwargs[f.name] = dataclasses.replace(f.default, **groups.get(f.name, {}))
    cfg = RunConfig(**kwargs)
    _check_cross_field(cfg)
    return cfg


def _check_cross_field(cfg: RunConfig) -> None:
    p = cfg.privacy
    if p.target_epsilon > 0 and p.noise_multiplier > 0:
        raise ConfigError(
            f"config keys 'privacy.target-epsilon' = {p.target_epsilon} "
            f"and 'privacy.noise-multiplier' = {p.noise_multiplier} "
            "are both set; set one of them (the other to 0)"
        )
    if p.central_dp and cfg.strategy.name not in ("fedavg", "fedprox"):
        raise ConfigError(
            f"config key 'strategy.name' = {cfg.strategy.name!r} cannot be used with 'privacy.central-dp' = true: "
            "central DP noises the plain average of the clipped site updates, and a server optimizer or FedBN's "
            "partial averaging would work on un-noised updates; use 'fedavg' or 'fedprox'"
        )
    if p.dp and cfg.model.norm == "batch":
        raise ConfigError(
            "config key 'model.norm' = 'batch' cannot be used with 'privacy.dp' = true: BatchNorm mixes samples, "
            "so per-sample gradients are undefined; use 'instance' or 'group'"
        )
    if cfg.task.name == "classification":
        if len(cfg.task.class_names) < 2 or len(set(cfg.task.class_names)) != len(cfg.task.class_names):
            raise ConfigError(
                f"config key 'task.classes' = {cfg.task.classes!r}: name at least two different classes, "
                "e.g. 'normal,pneumonia'"
            )
        if cfg.model.name == "unet":
            raise ConfigError(
                "config key 'model.name' = 'unet' is a segmentation network; "
                "for 'task.name' = 'classification' use 'resnet', 'densenet121' or 'auto'"
            )
    elif cfg.model.name in ("resnet", "densenet121"):
        raise ConfigError(
            f"config key 'model.name' = {cfg.model.name!r} is a classification network; "
            "for 'task.name' = 'segmentation' use 'unet' or 'auto'"
        )
    elif cfg.sim.source:
        raise ConfigError(
            f"config key 'sim.source' = {cfg.sim.source!r} gives class-labelled images; "
            "set 'task.name' = 'classification' "
            "(segmentation sites are the synthetic phantoms: 'sim.source' = '')"
        )
    if cfg.task.name == "segmentation" and cfg.sim.modality not in ("MR", "CT"):
        raise ConfigError(
            f"config key 'sim.modality' = {cfg.sim.modality!r}: the segmentation phantoms are 'MR' or 'CT'"
        )
    try:
        channels = cfg.model.channel_tuple
    except ValueError:
        raise ConfigError(
            f"config key 'model.channels' = {cfg.model.channels!r}: expected comma-separated whole numbers, "
            "e.g. '16,32,64'"
        ) from None
    if len(channels) < 2 or any(c < 1 for c in channels):
        raise ConfigError(
            f"config key 'model.channels' = {cfg.model.channels!r}: needs at least two positive sizes, e.g. '16,32,64'"
        )
    if cfg.task.name == "classification" and cfg.model.name in ("auto", "resnet") and len(channels) != 4:
        raise ConfigError(
            f"config key 'model.channels' = {cfg.model.channels!r}: the classification ResNet has 4 stages; "
            "give 4 sizes, e.g. '8,16,32,64'"
        )
    if cfg.task.name == "classification" and cfg.data.image_size < 32:
        raise ConfigError(
            f"config key 'data.image-size' = {cfg.data.image_size}: classification networks downsample 16x; "
            "use at least 32"
        )
    depth = 2 ** (len(channels) - 1)
    if cfg.task.name == "segmentation" and cfg.data.image_size % depth:
        raise ConfigError(
            f"config key 'data.image-size' = {cfg.data.image_size}: must be divisible by {depth} "
            f"for a UNet with {len(channels)} levels ('model.channels' = {cfg.model.channels!r})"
        )
    if cfg.model.norm == "group" and any(c % 2 for c in channels):
        raise ConfigError(
            f"config key 'model.channels' = {cfg.model.channels!r}: group norm uses 2 groups, "
            "so every size must be even"
        )


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """The flat, dotted-key form of ``cfg`` (what Flower's run config holds)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + _key(f.name) + ".")
            else:
                out[prefix + _key(f.name)] = value

    walk(cfg, "")
    return out


def default_flat_config() -> dict[str, Any]:
    """The defaults as a flat dict; equal to ``[tool.flwr.app.config]`` in pyproject.toml."""
    return flatten(RunConfig())


def field_choices(key: str) -> tuple[str, ...]:
    """The allowed values of a run-config key that takes one of a fixed set, e.g. ``strategy.name``.

    Args:
        key: A flat dotted key of ``[tool.flwr.app.config]``.

    Returns:
        The allowed values, in their declared order (what a command's ``choices=`` should use).

    Raises:
        KeyError: If ``key`` is unknown or does not take one of a fixed set.
    """
    f, _ = _LEAVES[key]
    if "choices" not in f.metadata:
        raise KeyError(f"config key {key!r} is not a choice among fixed values")
    return tuple(f.metadata["choices"])


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``--run-config`` overrides into a flat dict, values typed as TOML scalars.

    Each item holds one or more whitespace-separated ``key=value`` pairs, as Flower's ``--run-config``:
    ``["train.lr=0.01", "strategy.name='fedprox' seed=3"]`` -> ``{"train.lr": 0.01, "strategy.name":
    "fedprox", "seed": 3}``. A value that is not valid TOML is kept as a bare string. Keys are not
    checked here (:func:`parse_run_config` does that).

    Args:
        items: The option's values, one string per ``--run-config``.

    Returns:
        The overrides; a later pair for the same key wins.

    Raises:
        ConfigError: If a part has no ``=``.
    """
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        for part in item.split():
            if "=" not in part:
                raise ConfigError(f"--run-config expects key=value pairs, got {part!r}")
            key, value = part.split("=", 1)
            try:
                out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                out[key.strip()] = value  # a bare string
    return out
