"""The privacy study's calibrated audit: who is a member, who is not, what the reference saw, what is reported."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from common.config import parse_run_config

TINY = {"model.channels": "8,16", "data.image-size": 32, "data.spacing-mm": 7.5, "seed": 3, "privacy.audit": True}


def _rows(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


def test_the_attack_game_keeps_members_non_members_and_reference_data_apart(small_sites: Path) -> None:
    """Training slices are members, audit slices non-members, validation slices the reference's data: disjoint."""
    from simulations.studies import attack_game

    cfg = parse_run_config({**TINY, "sim.sites": 1})
    cfg = replace(cfg, sim=replace(cfg.sim, root=str(small_sites)))
    game = attack_game(cfg)
    # site-01: 4 patients x 6 slices; 1 validation patient, a fifth of the training patients' slices held out
    assert len(game.reference_data) == 6
    assert len(game.members) + len(game.non_members) == 3 * 6 and len(game.non_members) == round(0.2 * 18)
    members, others, reference = (_rows(b.images) for b in (game.members, game.non_members, game.reference_data))
    assert not members & others and not reference & (members | others)


def test_the_study_report_carries_each_interval_and_the_over_fit_arm(tmp_path: Path) -> None:
    from simulations.studies import _finish

    attack = {"auc": 0.55, "interval": [0.45, 0.65], "level": 0.95, "resamples": 1000, "members": 40, "non_members": 40}
    entry = {
        "name": "eps-8",
        "target_epsilon": 8.0,
        "utility": {"mean": {"dice": 0.4}, "worst": {"dice": 0.3}},
        "epsilon_spent": {"site-01": 7.9},
        "attack_auc": {"mean": 0.5},
        "attack_auc_initial_model": {},
        "calibrated_attack": attack,
    }
    over = {"slices": 32, "epochs": 40, **attack, "auc": 0.7, "interval": [0.56, 0.82]}
    report = _finish([entry], tmp_path, 0.0, over)
    saved = json.loads((tmp_path / "privacy.json").read_text())
    assert saved["settings"][0]["calibrated_attack"]["interval"] == [0.45, 0.65]
    assert saved["overfit_attack"]["interval"] == [0.56, 0.82] == report["overfit_attack"]["interval"]
    assert (tmp_path / "privacy.png").stat().st_size > 0
