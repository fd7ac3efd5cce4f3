"""One real Flower simulation (Ray) through the `fedsite simulate` command, end to end."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fedsite.cli import main


@pytest.mark.slow
def test_fedsite_simulate_runs_a_federation_and_keeps_results_per_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--sites",
            "2",
            "--rounds",
            "2",
            "--local-epochs",
            "2",
            "--seed",
            "3",
            "--out",
            str(out),
            "--data-root",
            str(tmp_path / "sites"),
            "--run-config",
            "data.image-size=32 data.spacing-mm=7.5 sim.patients=3 sim.slices=6",
            "--run-config",
            "model.channels='8,16,32' strategy.name='fedprox'",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["strategy.name"] == "fedprox" and results["config"]["num-server-rounds"] == 2
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert set(r["per_site"]) == {"site-01", "site-02"}
        for metrics in r["per_site"].values():
            assert 0.0 <= metrics["dice"] <= 1.0 and "loss" in metrics
        assert r["mean"]["dice"] == pytest.approx(sum(m["dice"] for m in r["per_site"].values()) / 2)
        assert r["train"]["site-01"]["num-examples"] > 0
    assert set(results["final"]["per_site"]) == {"site-01", "site-02"}
    assert results["final"]["worst"]["dice"] <= results["final"]["mean"]["dice"]
    assert len(results["timing"]["round_s"]) == 2 and results["timing"]["total_s"] > 0
    assert (out / "final_model.pt").is_file()
    # progress per round and the per-site table are shown
    assert "round 1/2: mean dice" in printed and "round 2/2: mean dice" in printed
    assert "site-01" in printed and "worst" in printed and "mlflow ui --backend-store-uri" in printed
    # the MLflow store holds the run with per-site metrics and the model artifact
    with sqlite3.connect(out / "mlflow.db") as db:
        keys = {k for (k,) in db.execute("SELECT DISTINCT key FROM metrics")}
        params = dict(db.execute("SELECT key, value FROM params"))
    assert {"dice.site-01", "dice.site-02", "dice.mean", "dice.worst", "round-s"} <= keys
    assert params["strategy.name"] == "fedprox" and "version.flwr" in params
    assert list(out.glob("mlartifacts/*/artifacts/final_model.pt"))


@pytest.mark.slow
def test_two_federations_with_one_seed_give_identical_per_site_metrics(tmp_path: Path) -> None:
    """Sites finish in any order; the results must not depend on it (nor on anything but the seed)."""
    args = [
        "simulate",
        "--sites",
        "3",
        "--rounds",
        "2",
        "--local-epochs",
        "1",
        "--seed",
        "5",
        "--data-root",
        str(tmp_path / "sites"),
        "--run-config",
        "data.image-size=32 data.spacing-mm=7.5 sim.patients=3 sim.slices=4 model.channels='8,16,32'",
    ]
    runs = []
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        results = json.loads((tmp_path / name / "results.json").read_text())
        runs.append(
            [
                (r["round"], r["per_site"], {s: t["train-loss"] for s, t in r["train"].items()})
                for r in results["rounds"]
            ]
        )
    assert runs[0] == runs[1]
    assert len(runs[0]) == 2 and set(runs[0][0][1]) == {"site-01", "site-02", "site-03"}
