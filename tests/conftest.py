"""Shared fixtures: small simulated sites written once per test session, Flower message helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

SMALL = dict(sites=3, seed=7, patients=4, slices=6)


@pytest.fixture(scope="session")
def small_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small simulated sites (4 patients x 6 slices each), shared by the session."""
    from simulations.synth import write_sites

    root = tmp_path_factory.mktemp("sites")
    write_sites(root, **SMALL)
    return root


@pytest.fixture()
def task_identity() -> None:
    """Flower messages need a task identity; the runtime sets it, a unit test sets it by hand."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


#: The tiny segmentation model of the prediction tests: 32-pixel windows at 7.5 mm, two UNet levels.
TINY_SEG = {"model.channels": "8,16", "data.image-size": 32, "data.spacing-mm": 7.5, "seed": 3}


@pytest.fixture(scope="session")
def tiny_seg_run(small_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (results.json, final_model.pt) of a tiny UNet trained for 12 epochs on site-01 and site-02.

    Its validation Dice (the two sites' validation patients) is in ``results.json`` under
    ``final.mean.dice``, as a real run writes it. About 20 s on one core.
    """
    import json

    import torch

    from client.dataset import load_site
    from common.config import flatten, parse_run_config
    from common.model import build_model
    from common.task import evaluate, stack_samples, train

    cfg = parse_run_config(TINY_SEG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.task)
        train_s, val_s = [], []
        for name in ("site-01", "site-02"):
            data = load_site(small_sites / name, cfg.data, seed=cfg.seed, use_cache=False)
            train_s += data.train
            val_s += data.val
        train(model, stack_samples(train_s), epochs=12, batch_size=8, lr=0.01, task="segmentation")
        val = evaluate(model, stack_samples(val_s))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("tiny-seg-run")
    torch.save(model.state_dict(), out / "final_model.pt")
    doc = {"config": flatten(cfg), "final": {"mean": {"dice": val["dice"]}}, "mlflow": {"run_id": "tinyseg0001"}}
    (out / "results.json").write_text(json.dumps(doc))
    return out
