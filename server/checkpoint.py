"""The server's checkpoint: everything a crashed run needs to continue from its last complete round.

One file, ``<output.dir>/checkpoint.npz``, written after every round by writing a temporary file in
the same folder, flushing it to disk and renaming it over the old one (a rename is atomic: a crash
mid-write leaves the previous checkpoint whole). It is a NumPy archive read with
``allow_pickle=False`` (no code runs when it is loaded) holding:

* ``global/<key>``: the global model after the round;
* ``state/<layer>/<name>/<key>``: array state of the strategy chain (FedAdam/FedYogi moments
  ``m_t``, ``v_t`` and their current model); JSON state (central DP's releases and sites seen) is
  in the metadata;
* ``rng/numpy``, ``rng/torch``: the server's random states (NumPy's drives central DP noise, Python's
  the site sampling; torch's the model initialisation);
* ``meta``: UTF-8 JSON: format version, the round, the flat run config, the per-site round records
  and the JSON parts of the strategy and RNG states.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from common.errors import FedsiteError
from server.recording import RoundRecord

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "restore_strategy",
    "resume_config",
    "save_checkpoint",
    "strategy_chain",
]

CHECKPOINT_FILE = "checkpoint.npz"
_VERSION = 1
#: Array state of Flower's server optimizers (FedAdam, FedYogi, FedAdagrad share FedOpt).
_FEDOPT_ARRAYS = ("m_t", "v_t", "current_arrays")
#: Config keys that may differ between the crashed run and its resumption.
RESUMABLE_DIFFERENCES = ("output.resume", "output.tracking-uri")


class CheckpointError(FedsiteError):
    """A checkpoint is missing, unreadable or belongs to another run configuration."""


@dataclass
class Checkpoint:
    """The state after ``round`` complete rounds."""

    round: int
    config: dict[str, Any]
    arrays: ArrayRecord
    records: list[RoundRecord]
    strategy_json: dict[str, Any] = field(default_factory=dict)
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    rng_json: dict[str, Any] = field(default_factory=dict)
    rng_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    mlflow_run_id: str | None = None


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """The strategy and every strategy it wraps (each holding the next as ``.strategy``), outermost first."""
    chain: list[Strategy] = []
    current: object = strategy
    while isinstance(current, Strategy):
        chain.append(current)
        current = getattr(current, "strategy", None)
    return chain


def _strategy_state(strategy: Strategy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    js: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(strategy_chain(strategy)):
        tag = f"{i}-{type(layer).__name__}"
        if isinstance(layer, FedOpt):
            for name in _FEDOPT_ARRAYS:
                for key, value in (getattr(layer, name, None) or {}).items():
                    arrays[f"state/{tag}/{name}/{key}"] = np.asarray(value)
        get_state = getattr(layer, "checkpoint_state", None)
        if callable(get_state):
            js[tag] = get_state()
    return js, arrays


def restore_strategy(strategy: Strategy, ckpt: Checkpoint) -> None:
    """Put the checkpoint's strategy state back into a freshly built strategy chain of the same kind."""
    for i, layer in enumerate(strategy_chain(strategy)):
        tag = f"{i}-{type(layer).__name__}"
        if isinstance(layer, FedOpt):
            for name in _FEDOPT_ARRAYS:
                prefix = f"state/{tag}/{name}/"
                found = {k[len(prefix) :]: v for k, v in ckpt.strategy_arrays.items() if k.startswith(prefix)}
                setattr(layer, name, found or None)
        set_state = getattr(layer, "restore_checkpoint_state", None)
        if callable(set_state) and tag in ckpt.strategy_json:
            set_state(ckpt.strategy_json[tag])


def _rng_state() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    js = {
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return js, {"rng/numpy": np.asarray(keys), "rng/torch": torch.get_rng_state().numpy()}


def restore_rng(ckpt: Checkpoint) -> None:
    """Set the server's NumPy, Python and torch random states to the checkpoint's."""
    name, pos, has_gauss, cached = ckpt.rng_json["numpy"]
    np.random.set_state((name, ckpt.rng_arrays["rng/numpy"], pos, has_gauss, cached))
    version, internal, gauss = ckpt.rng_json["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.from_numpy(ckpt.rng_arrays["rng/torch"].copy()))


def save_checkpoint(
    out: Path,
    *,
    server_round: int,
    config: dict[str, Any],
    arrays: ArrayRecord,
    records: list[RoundRecord],
    strategy: Strategy,
    mlflow_run_id: str | None = None,
) -> Path:
    """Write ``out/checkpoint.npz`` atomically (temporary file, fsync, rename); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    strategy_json, strategy_arrays = _strategy_state(strategy)
    rng_json, rng_arrays = _rng_state()
    meta = {
        "version": _VERSION,
        "round": server_round,
        "config": config,
        "records": [dataclasses.asdict(r) for r in records if r.round <= server_round],
        "strategy": strategy_json,
        "rng": rng_json,
        "mlflow_run_id": mlflow_run_id,
    }
    payload: dict[str, np.ndarray] = {f"global/{k}": v.numpy() for k, v in arrays.items()}
    payload.update(strategy_arrays)
    payload.update(rng_arrays)
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = out / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(out: Path, config: dict[str, Any] | None = None) -> Checkpoint:
    """Read ``out/checkpoint.npz``; with ``config``, check it is the checkpointed run's.

    Raises:
        CheckpointError: If there is no readable checkpoint, or the config differs (naming the keys).
    """
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: the run wrote none (it stopped before its first round ended); "
            "start it again without resuming"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(data.pop("meta").tobytes().decode())
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if meta.get("version") != _VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')}, expected {_VERSION}")
    if config is not None:
        differ = sorted(
            k
            for k in set(config) | set(meta["config"])
            if k not in RESUMABLE_DIFFERENCES and config.get(k) != meta["config"].get(k)
        )
        if differ:
            shown = ", ".join(f"{k} = {meta['config'].get(k)!r} (now {config.get(k)!r})" for k in differ[:5])
            raise CheckpointError(
                f"checkpoint {path} was written by another run configuration: {shown}; resume with the same config"
            )
    return Checkpoint(
        round=int(meta["round"]),
        config=meta["config"],
        arrays=ArrayRecord({k[len("global/") :]: Array(v) for k, v in data.items() if k.startswith("global/")}),
        records=[RoundRecord(**r) for r in meta["records"]],
        strategy_json=meta.get("strategy", {}),
        strategy_arrays={k: v for k, v in data.items() if k.startswith("state/")},
        rng_json=meta["rng"],
        rng_arrays={k: v for k, v in data.items() if k.startswith("rng/")},
        mlflow_run_id=meta.get("mlflow_run_id"),
    )


def resume_config(out: Path) -> tuple[dict[str, Any], int]:
    """The flat run config that continues the run in ``out``: its checkpoint's config, ``output.resume`` on.

    Returns:
        ``(config, last complete round)``.

    Raises:
        CheckpointError: If ``out`` holds no readable checkpoint.
    """
    out = Path(out).expanduser().resolve()
    ckpt = load_checkpoint(out)
    flat = dict(ckpt.config)
    flat["output.dir"] = str(out)
    flat["output.resume"] = True
    return flat, ckpt.round
