"""The shift study's accounting and matrices: equal budgets, every model on every site, the goals."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import parse_run_config
from common.metrics import summarize_sites
from common.task import Batchable
from simulations.shift import (
    cross_site_matrix,
    federated_budget,
    goals,
    shift_pairs,
    train_rounds,
)

CLS = {
    "task.name": "classification",
    "sim.source": "x.npz",
    "model.channels": "4,8,8,16",
    "num-server-rounds": 2,
    "train.local-epochs": 3,
    "train.batch-size": 4,
}


def _split(n: int, positives: int, seed: int) -> Batchable:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1] * positives + [0] * (n - positives))
    return Batchable(torch.rand(n, 1, 32, 32, generator=g), labels)


class _Constant(torch.nn.Module):
    """Always the same logits: class 1 with probability ``p`` for every image."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.logits = torch.tensor([math.log(1 - p), math.log(p)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), 2)


def test_pooled_training_gets_the_same_sample_steps_as_the_sites_together() -> None:
    from common.model import build_model

    cfg = parse_run_config(CLS)
    sites = [_split(10, 4, 1), _split(7, 3, 2), _split(13, 5, 3)]  # sizes not multiples of the batch
    local = 0
    for i, data in enumerate(sites):
        steps, _ = train_rounds(build_model(cfg.model, cfg.task), data, cfg, seed_name=f"site-0{i + 1}")
        local += steps
    pooled = Batchable(torch.cat([s.images for s in sites]), torch.cat([s.labels for s in sites]))
    pooled_steps, curve = train_rounds(
        build_model(cfg.model, cfg.task), pooled, cfg, seed_name="pooled", evaluate_on={"a": sites[0], "b": sites[1]}
    )
    expected = cfg.num_server_rounds * cfg.train.local_epochs * sum(len(s) for s in sites)
    assert local == pooled_steps == expected
    assert [c["round"] for c in curve] == [1, 2]
    assert all(c["worst"] <= c["mean"] for c in curve)


def test_federated_budget_sums_what_every_site_trained_in_every_round() -> None:
    results = {
        "rounds": [
            {"train": {"site-01": {"samples-seen": 30.0}, "site-02": {"samples-seen": 21.0}}},
            {"train": {"site-01": {"samples-seen": 30.0}}},  # site-02 was rejected this round
        ]
    }
    assert federated_budget(results) == 81


def test_cross_site_matrix_scores_every_model_on_every_site() -> None:
    cfg = parse_run_config(CLS)
    vals = {"site-01": _split(10, 8, 4), "site-02": _split(10, 2, 5)}
    models = {"says-positive": _Constant(0.9), "says-negative": _Constant(0.1)}
    matrix = cross_site_matrix(models, vals, cfg)
    assert set(matrix) == set(models) and all(set(row) == set(vals) for row in matrix.values())
    # accuracy of a constant answer = the share of that class at the site
    assert matrix["says-positive"]["site-01"]["accuracy"] == pytest.approx(0.8)
    assert matrix["says-positive"]["site-02"]["accuracy"] == pytest.approx(0.2)
    assert matrix["says-negative"]["site-02"]["accuracy"] == pytest.approx(0.8)
    assert matrix["says-positive"]["site-01"]["sensitivity"] == pytest.approx(1.0)
    assert matrix["says-positive"]["site-01"]["specificity"] == pytest.approx(0.0)
    # a constant score cannot rank: AUC 0.5; confidence 0.9 with accuracy 0.8 -> ECE 0.1
    assert matrix["says-positive"]["site-01"]["auc"] == pytest.approx(0.5)
    assert matrix["says-positive"]["site-01"]["ece"] == pytest.approx(0.1, abs=1e-6)


def test_shift_pairs_report_how_much_each_local_model_loses_away_from_home() -> None:
    matrix = {
        "local:a": {"a": {"dice": 0.9}, "b": {"dice": 0.5}},
        "local:b": {"a": {"dice": 0.6}, "b": {"dice": 0.8}},
        "pooled": {"a": {"dice": 0.7}, "b": {"dice": 0.7}},
    }
    distances = {"a": {"a": 0.0, "b": 0.3}, "b": {"a": 0.3, "b": 0.0}}
    pairs = {(p["train_site"], p["test_site"]): p for p in shift_pairs(matrix, distances, "dice")}
    assert set(pairs) == {("a", "b"), ("b", "a")}
    assert pairs[("a", "b")]["loss"] == pytest.approx(0.4)
    assert pairs[("b", "a")]["loss"] == pytest.approx(0.2)
    assert pairs[("a", "b")]["distance"] == 0.3


def test_worst_site_is_the_lowest_score_and_the_highest_loss_or_calibration_error() -> None:
    mean, worst = summarize_sites(
        {
            "a": {"auc": 0.9, "loss": 0.2, "ece": 0.05},
            "b": {"auc": 0.7, "loss": 0.6, "ece": 0.2},
            "c": {"loss": 0.1, "ece": 0.01},
        }
    )
    assert worst == {"auc": 0.7, "loss": 0.6, "ece": 0.2}
    assert mean["auc"] == pytest.approx(0.8)  # a site without AUC (one class) does not count as 0


def test_goals_compare_fedavg_with_pooled_the_best_worst_site_with_local_and_unseen_with_seen() -> None:
    methods = {
        "local-only": {
            "per_site": {"a": {"dice": 0.8}, "b": {"dice": 0.5}},
            "mean": {"dice": 0.65},
            "worst": {"dice": 0.5},
        },
        "pooled": {"mean": {"dice": 0.8}, "worst": {"dice": 0.7}},
        "fedavg": {
            "per_site": {"a": {"dice": 0.75}, "b": {"dice": 0.6}},
            "mean": {"dice": 0.675},
            "worst": {"dice": 0.6},
            "unseen_mean": {"dice": 0.54},
        },
        "fedbn": {
            "per_site": {"a": {"dice": 0.85}, "b": {"dice": 0.65}},
            "mean": {"dice": 0.75},
            "worst": {"dice": 0.65},
        },
    }
    g = goals(methods, "dice")
    assert g["fedavg_over_pooled"] == pytest.approx(0.675 / 0.8)
    assert g["best_worst_site"] == {
        "method": "fedbn",
        "worst_site": "b",
        "value": 0.65,
        "local_only_on_that_site": 0.5,
        "at_least_local": True,
    }
    assert g["unseen_over_seen"] == {"fedavg": pytest.approx(0.8)}


def test_home_advantage_separates_a_hard_site_from_a_shifted_one() -> None:
    from simulations.shift import home_advantage

    # site b is hard for everyone (row-wise its own model looks worse at home), but on b's images
    # b's own model still beats the visitor: shift, measured column-wise.
    matrix = {
        "local:a": {"a": {"auc": 0.95}, "b": {"auc": 0.70}},
        "local:b": {"a": {"auc": 0.90}, "b": {"auc": 0.80}},
    }
    home = home_advantage(matrix, ["a", "b"], "auc")
    assert home["per_site"]["b"]["row_gap"] == pytest.approx(-0.10)
    assert home["per_site"]["b"]["column_gap"] == pytest.approx(0.10)
    assert home["per_site"]["a"]["column_gap"] == pytest.approx(0.05)
    assert (home["rows_home_best"], home["columns_home_best"], home["sites"]) == (1, 2, 2)


@pytest.mark.parametrize(
    ("methods", "unseen", "sites", "message"),
    [
        (["fedavg", "bogus"], [], 3, "unknown method 'bogus'"),
        (["fedavg"], ["pooled"], 3, "unseen-site runs are for federated methods"),
        (["fedavg"], ["fedavg"], 2, "--unseen none"),
        (["fedavg"], [], 1, "--sites 2 or more"),
    ],
)
def test_a_study_that_cannot_run_is_refused_before_any_work_with_the_fix(
    methods: list, unseen: list, sites: int, message: str
) -> None:
    from simulations.shift import check_plan

    with pytest.raises(ValueError, match=message):
        check_plan(methods, unseen, sites)


@pytest.mark.slow
def test_fedsite_study_shift_writes_shift_json_and_a_report_with_its_pictures(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command end to end on tiny sites: local-only, pooled, FedAvg (Flower) and FedAvg left-one-site-out."""
    import json

    from fedsite.cli import main

    out = tmp_path / "study"
    code = main(
        [
            "study",
            "shift",
            "--out",
            str(out),
            "--sites",
            "3",
            "--rounds",
            "1",
            "--data-root",
            str(tmp_path / "sites"),
            "--methods",
            "local-only,pooled,fedavg",
            "--unseen",
            "fedavg",
            "--run-config",
            "data.image-size=32 data.spacing-mm=7.5 sim.patients=3 sim.slices=4 model.channels='8,16,32' "
            "train.local-epochs=1",
        ]
    )
    assert code == 0
    doc = json.loads((out / "shift.json").read_text())
    sites = ["site-01", "site-02", "site-03"]
    assert doc["task"] == "segmentation" and doc["sites"] == sites
    assert set(doc["methods"]) == {"local-only", "pooled", "fedavg"}
    for entry in doc["methods"].values():
        assert set(entry["per_site"]) == set(sites) and "dice" in entry["mean"] and "dice" in entry["worst"]
    steps = {m: e["sample_steps"] for m, e in doc["methods"].items()}
    assert len(set(steps.values())) == 1 and steps["pooled"] > 0  # the same budget for every method
    assert set(doc["methods"]["fedavg"]["unseen"]) == set(sites)
    assert set(doc["cross_site"]["rows"]) == {"local:site-01", "local:site-02", "local:site-03", "pooled", "fedavg"}
    assert all(set(row) == set(sites) for row in doc["cross_site"]["rows"].values())
    assert len(doc["shift"]["pairs"]) == 6 and doc["shift"]["home"]["sites"] == 3
    for picture in ("montage.png", "histograms.png", "cross_site.png", "curves.png", "shift.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({picture})" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "local-only: mean dice" in printed and "fedavg on unseen scanners" in printed and "unseen dice" in printed
