"""The privacy study's calibrated audit: who is a member, who is not, what the reference saw, what is reported."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
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


def _entry(name: str, mean: float, worst: float, key: str = "auc", unit: str | None = "patient") -> dict:
    return {
        "name": name,
        "target_epsilon": None if name == "no-dp" else 8.0,
        "utility": {"mean": {key: mean, "loss": 0.3}, "worst": {key: worst}},
        "epsilon_spent": {} if name == "no-dp" else {"site-01": 7.99, "site-02": 7.98},
        "unit": {} if unit is None else {"site-01": unit, "site-02": unit},
        "attack_auc": {"mean": 0.5},
        "attack_auc_initial_model": {},
    }


def test_the_report_states_what_epsilon_8_keeps_and_utility_against_site_size(tmp_path: Path) -> None:
    """Classification entries carry AUC: the cost at epsilon 8 and each site size use it, sizes in order."""
    from simulations.cli import format_privacy_table
    from simulations.studies import _finish

    main = [_entry("no-dp", 0.96, 0.95, unit=None), _entry("eps-8", 0.90, 0.86)]
    small = [_entry("no-dp", 0.92, 0.90, unit=None), _entry("eps-8", 0.70, 0.60)]
    sizes = [
        {"train_slices": {"site-01": 1004, "site-02": 1010}, "entries": main},
        {"train_slices": {"site-01": 251, "site-02": 260}, "entries": small},
    ]
    report = _finish(main, tmp_path, 0.0, sizes=sizes)
    cost = report["utility_cost_eps8"]
    assert cost["metric"] == "auc" and cost["kept"] == pytest.approx(0.90 / 0.96)
    assert cost["worst_eps8"] == 0.86 and cost["drop"] == pytest.approx(0.06)
    assert [r["min_train_slices"] for r in report["site_size"]] == [251, 1004]
    assert report["site_size"][0]["kept"] == pytest.approx(0.70 / 0.92)
    table = format_privacy_table(report)
    assert "mean auc" in table and "7.99 /patient" in table
    assert "keeps 0.94 of the no-DP mean auc" in table and "site size 251 training slices" in table


def test_site_size_sets_enough_patients_for_the_training_slices_after_the_splits() -> None:
    from simulations.studies import patients_for_site_size

    phantoms = parse_run_config({"sim.slices": 12, "data.val-fraction": 0.25, "privacy.audit-fraction": 0.2})
    patients = patients_for_site_size(phantoms, 1000)
    assert patients * 12 * 0.75 * 0.8 >= 1000 and (patients - 3) * 12 * 0.75 * 0.8 < 1000
    xrays = replace(phantoms, sim=replace(phantoms.sim, source="/data/pneumoniamnist.npz"))
    assert patients_for_site_size(xrays, 1000) == 1667 + 2  # one image per patient
    with pytest.raises(ValueError, match="at least 1"):
        patients_for_site_size(phantoms, 0)
