"""Pre-train a start model on public data only, for ``model.init``.

The data are synthetic MR phantoms written with :data:`simulations.profiles.PRETRAIN_PROFILES`:
scanners that no simulated site uses, and patients drawn from a seed of their own (derived from
the run seed, never equal to a site's), so the start model has seen no site's patients and no
site's scanner. The phantoms are written as DICOM and read back through the sites' own pipeline
(:func:`client.dataset.load_site`), so the start model sees exactly the samples a site makes.

:func:`pretrain` writes, in its output folder:

* ``start_model.pt``: the state dict, for ``model.init`` (checked against the run's ``model.*``);
* ``pretrain.json``: what the model saw (profiles, patients, slices, samples, seed, generator
  version), how it was trained, the ``model.*`` keys it fits, and its Dice on held-out phantom
  patients;
* ``data/``: the phantom sites it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from common import task
from common.config import ConfigError, RunConfig, flatten
from common.model import build_model

__all__ = ["PRETRAIN_JSON", "START_MODEL", "pretrain", "pretrain_data_seed"]

#: The state-dict file :func:`pretrain` writes (give it, or its folder's path, as ``model.init``).
START_MODEL = "start_model.pt"
#: What the start model saw and how it was trained.
PRETRAIN_JSON = "pretrain.json"


def pretrain_data_seed(seed: int) -> int:
    """The phantom seed of the pre-training data for run seed ``seed`` (never a site's own seed in practice)."""
    return int.from_bytes(hashlib.sha256(f"fedsite-pretrain:{seed}".encode()).digest()[:4], "little") % 2**31


def pretrain(
    out: Path,
    cfg: RunConfig | None = None,
    *,
    patients: int = 8,
    slices: int = 12,
    epochs: int = 20,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a start model on phantoms from the pre-training scanners and write it to ``out``.

    Args:
        out: Output folder (created); receives :data:`START_MODEL`, :data:`PRETRAIN_JSON` and ``data/``.
        cfg: The run config the start model is for (default: the defaults): its ``model.*``, ``data.*``,
            ``train.batch-size``, ``train.lr``, ``train.optimizer`` and ``seed`` are used.
        patients: Phantom patients per pre-training scanner (a quarter of them are held out for the Dice).
        slices: Slices per phantom series.
        epochs: Passes over the pooled pre-training samples.
        progress: Called with a line of text per step of the work.

    Returns:
        The content of :data:`PRETRAIN_JSON`.

    Raises:
        ConfigError: If ``cfg`` is not a segmentation config (the phantoms carry lesion masks).
    """
    from client.dataset import load_site
    from client.runtime import site_seed
    from simulations.profiles import PRETRAIN_PROFILES
    from simulations.synth import GENERATOR_VERSION, write_site

    cfg = cfg if cfg is not None else RunConfig()
    if cfg.task.name != "segmentation":
        raise ConfigError(
            f"config key 'task.name' = {cfg.task.name!r}: pre-training uses the lesion phantoms, so it makes "
            "segmentation start models only; use 'segmentation'"
        )
    if cfg.model.init:
        raise ConfigError("config key 'model.init' is set: pre-training starts from random weights; set it to ''")
    started = time.perf_counter()
    out = Path(out).expanduser().resolve()
    data_root = out / "data"
    data_seed = pretrain_data_seed(cfg.seed)
    say = progress or (lambda _m: None)
    train_parts, val_parts, seen = [], [], []
    for index, profile in enumerate(PRETRAIN_PROFILES):
        folder = write_site(data_root, index, seed=data_seed, patients=patients, slices=slices, profile=profile)
        site = load_site(folder, cfg.data, seed=data_seed)
        train_parts.append(task.stack_samples(site.train))
        val_parts.append(task.stack_samples(site.val))
        seen.append(
            {
                "profile": profile.name,
                "manufacturer": profile.manufacturer,
                "model": profile.model_name,
                "field_strength_t": profile.field_strength,
                "train_patients": site.train_patients,
                "train_samples": len(site.train),
                "held_out_patients": site.val_patients,
                "held_out_samples": len(site.val),
            }
        )
        say(f"pretrain data: {profile.name}: {len(site.train)} training / {len(site.val)} held-out slices")
    train = task.Batchable(torch.cat([p.images for p in train_parts]), torch.cat([p.labels for p in train_parts]))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.task)
    result = task.train(
        model,
        train,
        epochs=epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        optimizer=cfg.train.optimizer,
        seed=site_seed(cfg.seed, "pretrain", 0),
        augment=cfg.train.augment,
    )
    held_out = {s["profile"]: round(task.evaluate(model, v)["dice"], 4) for s, v in zip(seen, val_parts, strict=True)}
    say(f"pretrain: {result.steps} steps, held-out Dice {held_out}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / START_MODEL)
    model_keys = {
        k: v for k, v in flatten(replace(cfg, model=replace(cfg.model, init=""))).items() if k.startswith("model.")
    }
    doc = {
        "start_model": START_MODEL,
        "data": {
            "kind": "synthetic MR lesion phantoms (public: generated, no patient data)",
            "scanners": seen,
            "sites_share": "no site's scanner profile and no site's patients (own phantom seed)",
            "phantom_seed": data_seed,
            "patients_per_scanner": patients,
            "slices_per_series": slices,
            "generator_version": GENERATOR_VERSION,
            "data_keys": {k: v for k, v in asdict(cfg.data).items()},
        },
        "training": {
            "epochs": epochs,
            "steps": result.steps,
            "samples_seen": result.samples_seen,
            "batch_size": cfg.train.batch_size,
            "lr": cfg.train.lr,
            "optimizer": cfg.train.optimizer,
            "seed": cfg.seed,
            "final_loss": round(result.loss, 5),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "held_out_dice": held_out,
        "model_config": model_keys,
    }
    (out / PRETRAIN_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    return doc
