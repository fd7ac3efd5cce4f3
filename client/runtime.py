"""What a site process keeps between rounds: its data and its model, built once.

A Flower site process (a Ray actor in simulation, a SuperNode's ClientApp process in deployment)
handles many rounds. Reading DICOM and building the network every round is the main cost of a
naive app, so both are cached here per process: samples are decoded, preprocessed and stacked
into tensors once; the model object is reused and only its weights are replaced each round.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from client.dataset import SiteData, load_site
from client.dpsgd import patient_index
from client.errors import DicomError
from client.layout import sim_site_name
from common.config import DataConfig, ModelConfig, RunConfig, TaskConfig
from common.model import build_model
from common.task import Batchable, stack_samples

__all__ = ["LoadedSite", "apply_threads", "loaded_site", "model_for", "resolve_site_dir", "site_seed"]

log = logging.getLogger("fedsite.client")


@dataclass(frozen=True)
class LoadedSite:
    """A site's data as tensors, plus the counts that may be reported."""

    data: SiteData
    train: Batchable
    val: Batchable
    audit: Batchable | None = None
    """Training-patient slices held out of training for the membership audit (same distribution
    as the training slices, so the attack measures memorisation, not patient differences)."""
    train_patients: torch.Tensor | None = None
    """``(N,)`` int64: the patient of each training slice, as a site-local ordinal (patient-level DP
    groups slices by it; it never leaves the site)."""

    @property
    def name(self) -> str:
        return self.data.name


def resolve_site_dir(node_config: Mapping[str, Any], cfg: RunConfig) -> Path:
    """Find this site's data folder.

    In deployment the SuperNode names it: ``--node-config "data-dir='/path/to/site'"``.
    In simulation ``partition-id`` picks ``site-NN`` under ``sim.root``, written by the simulation
    runner before the federation starts; a site never generates data itself.

    Raises:
        DicomError: If neither ``data-dir`` nor ``partition-id`` is given, or the folder is missing.
    """
    if "data-dir" in node_config:
        path = Path(str(node_config["data-dir"])).expanduser()
        if not path.is_dir():
            raise DicomError(f"node config data-dir={path} is not a folder; point it at the site's data folder")
        return path
    if "partition-id" not in node_config:
        raise DicomError(
            "this SuperNode has no data folder: start it with --node-config \"data-dir='/path/to/site'\" "
            "(check the folder first with `fedsite site check /path/to/site`)"
        )
    # A simulated site: the runner wrote site-01, site-02, ... under sim.root before it started.
    index = int(node_config["partition-id"])
    if not cfg.sim.root:
        raise DicomError(
            "simulated site without a site folder: 'sim.root' is empty. Write the sites first with "
            "`fedsite data synth --out DIR` and set sim.root = DIR, or run `fedsite simulate`, which writes them"
        )
    path = Path(cfg.sim.root).expanduser() / sim_site_name(index)
    if not path.is_dir():
        raise DicomError(
            f"simulated site folder {sim_site_name(index)} is missing under sim.root; write the sites with "
            "`fedsite data synth --out DIR --sites N` (N at least the number of simulated sites), "
            "or run `fedsite simulate`"
        )
    return path


@lru_cache(maxsize=16)
def _load(
    site_dir: str, data_cfg: DataConfig, seed: int, audit_fraction: float, task: TaskConfig = TaskConfig()
) -> LoadedSite:
    data = load_site(Path(site_dir), data_cfg, seed=seed, task=task)
    train, audit = list(data.train), None
    if audit_fraction > 0 and len(train) >= 4:
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(site_seed(seed, data.name, -1))
        ).tolist()
        n_audit = max(1, round(audit_fraction * len(train)))
        held = set(order[:n_audit])
        audit = stack_samples([s for i, s in enumerate(train) if i in held])
        train = [s for i, s in enumerate(train) if i not in held]
    log.info(
        "site %s: %d train / %d validation slices from %d/%d patients, %d audit slices, "
        "%d series used, %d files or series rejected",
        data.name,
        len(train),
        len(data.val),
        data.train_patients,
        data.val_patients,
        0 if audit is None else len(audit),
        data.series_used,
        len(data.rejected),
    )
    return LoadedSite(
        data=data,
        train=stack_samples(train),
        val=stack_samples(data.val),
        audit=audit,
        train_patients=patient_index([s["patient"] for s in train]),
    )


def loaded_site(site_dir: Path, cfg: RunConfig) -> LoadedSite:
    """The site's samples, read once per process and reused every round."""
    audit = cfg.privacy.audit_fraction if cfg.privacy.audit else 0.0
    return _load(str(Path(site_dir).resolve()), cfg.data, cfg.seed, audit, cfg.task)


_MODELS: dict[tuple[ModelConfig, TaskConfig], torch.nn.Module] = {}


def model_for(cfg: ModelConfig, task: TaskConfig = TaskConfig()) -> torch.nn.Module:
    """The process' model for ``cfg`` and ``task``, built once; callers overwrite its weights each round."""
    if (cfg, task) not in _MODELS:
        _MODELS[(cfg, task)] = build_model(cfg, task)
    return _MODELS[(cfg, task)]


def site_seed(seed: int, site: str, server_round: int) -> int:
    """A per-site, per-round seed derived from the run seed."""
    digest = hashlib.sha256(f"{seed}:{site}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def apply_threads(cfg: RunConfig, node_config: Mapping[str, Any]) -> int:
    """Set torch's intra-op threads for this site process; returns the threads torch uses.

    ``train.threads`` > 0 wins. Otherwise a simulated site (one with a ``partition-id``) uses the
    cores Ray gave it (``sim.cpus-per-site``, at least 1): torch may have been imported before Ray
    set ``OMP_NUM_THREADS`` for the actor, and would then run one thread per core in every site
    process at once. A deployed site keeps torch's default (all of its machine's cores).
    """
    want = cfg.train.threads
    if want <= 0 and "partition-id" in node_config:
        want = max(1, int(cfg.sim.cpus_per_site))
    if want > 0 and torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return torch.get_num_threads()
