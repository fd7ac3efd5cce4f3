"""Real Flower simulations (Ray) with injected faults: a killed-and-resumed DP run, misbehaving sites.

Small on purpose: 2-3 sites, 32 px images, 1 local epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsite.cli import main

SMALL = "data.image-size=32 data.spacing-mm=7.5 sim.patients=3 sim.slices=6 model.channels='8,16'"


def _simulate(tmp_path: Path, out: str, *extra: str, sites: str = "sites") -> int:
    return main(
        [
            "simulate",
            "--local-epochs",
            "1",
            "--seed",
            "5",
            "--out",
            str(tmp_path / out),
            "--data-root",
            str(tmp_path / sites),
            "--run-config",
            SMALL,
            *extra,
        ]
    )


@pytest.mark.slow
def test_a_dp_run_killed_after_round_2_of_4_and_resumed_ends_like_the_uninterrupted_run(tmp_path: Path) -> None:
    """Each run on its own copy of the sites, so each site's ledger (in its own folder) counts one run only."""
    dp = "privacy.dp=true privacy.noise-multiplier=1.0"
    assert _simulate(tmp_path, "whole", "--sites", "2", "--rounds", "4", "--run-config", dp, sites="sites-a") == 0
    args = ("--sites", "2", "--rounds", "4", "--run-config", dp)
    assert _simulate(tmp_path, "cut", *args, "--fault", "server:kill@2", sites="sites-b") == 1
    assert main(["simulate", "--resume", str(tmp_path / "cut")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert [r["round"] for r in cut["rounds"]] == [1, 2, 3, 4]
    # The metrics themselves cannot be compared under DP: its noise and sampling come from a secret
    # generator (issue 9), so two DP runs differ by design. Without DP the resumed run equals the
    # uninterrupted one exactly (tests/server/test_resume.py). Both runs report every site every round:
    assert set(cut["final"]["per_site"]) == set(whole["final"]["per_site"]) == {"site-01", "site-02"}
    # the sites spent the same privacy: 4 rounds each, none re-run, none forgotten
    for site, spent in whole["final"]["privacy"].items():
        assert cut["final"]["privacy"][site]["epsilon"] == pytest.approx(spent["epsilon"], rel=1e-9)
    ledgers = list((tmp_path / "sites-b").glob("site-*/.fedsite-privacy/*.json"))
    assert len(ledgers) == 2
    for ledger in ledgers:
        assert sorted(e["round"] for e in json.loads(ledger.read_text())["entries"]) == [1, 2, 3, 4]


@pytest.mark.slow
def test_each_injected_site_fault_is_recorded_and_the_robust_run_stays_near_the_clean_one(tmp_path: Path) -> None:
    robust = "strategy.name='fedmedian' strategy.screen-mad=3.0 strategy.round-timeout=90.0"
    common = ("--sites", "3", "--rounds", "5", "--run-config", robust)
    assert _simulate(tmp_path, "clean", *common) == 0
    # round 1 first: the server learns which node is which site (an error reply carries no site name)
    faults = ["site-02:x1000@1", "site-01:raise@2", "site-03:nan@3", "site-01:arch@4", "site-02:hang@5"]
    assert _simulate(tmp_path, "faulty", *common, *(a for f in faults for a in ("--fault", f))) == 0
    res = json.loads((tmp_path / "faulty" / "results.json").read_text())
    r = {x["round"]: x for x in res["rounds"]}
    reasons = {n: {(m["site"], m["reason"]) for m in r[n]["rejected"]} for n in r}
    assert any(s == "site-02" and "strategy.screen-mad" in why for s, why in reasons[1])
    assert any(m["site"] == "site-01" and "site reported an error" in m["reason"] for m in r[2]["missing"])
    assert any(s == "site-03" and "NaN" in why for s, why in reasons[3])
    assert any(s == "site-01" and "do not match the global model" in why for s, why in reasons[4])
    assert any(m["site"] == "site-02" and "no reply within the round deadline" in m["reason"] for m in r[5]["missing"])
    for n in r:
        assert len(r[n]["train"]) >= 2 and not r[n].get("skipped"), n
    # the x1000 site never reached the model: the final weights are of the clean run's size
    clean_w = torch.load(tmp_path / "clean" / "final_model.pt")
    faulty_w = torch.load(tmp_path / "faulty" / "final_model.pt")
    for k, v in clean_w.items():
        if v.is_floating_point():
            assert faulty_w[k].abs().max() <= 3 * v.abs().max() + 1e-3, k
    # and the faults did not ruin it: at most 0.1 Dice below the clean run. Each faulty round had 2 honest
    # sites instead of 3, so on sites this small the faulty run may also land higher (seen: 0.52 vs 0.40).
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert res["final"]["mean"]["dice"] >= clean["final"]["mean"]["dice"] - 0.1
