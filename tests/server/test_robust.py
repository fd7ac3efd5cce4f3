"""Robust aggregation and update screening: one site sending weights x1000 cannot ruin the model."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.config import parse_run_config
from server.recording import RoundRecord
from server.screening import screen_distances
from server.strategies import make_strategy
from tests.flower_helpers import FakeGrid, train_reply

GLOBAL = np.zeros(4, dtype=np.float32)


def _strategy(**overrides: object):
    rounds: list[RoundRecord] = []
    s = make_strategy(parse_run_config(overrides), on_round=rounds.append)
    s.configure_train(1, ArrayRecord({"w": Array(GLOBAL.copy())}), ConfigRecord({}), FakeGrid())
    return s


def _replies(honest: int, *, attacker: bool = True, seed: int = 0):
    """``honest`` sites whose weights scatter around 1.0, and one that sends 1000 x its weights."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(honest):
        w = (1.0 + 0.05 * rng.standard_normal(4)).astype(np.float32)
        out.append(train_reply(10 + i, f"site-{i + 1:02d}", {"w": w}, {"num-examples": 20, "train-loss": 0.5}))
    if attacker:
        w = (1000.0 * (1.0 + 0.05 * rng.standard_normal(4))).astype(np.float32)
        out.append(train_reply(99, "site-bad", {"w": w}, {"num-examples": 20, "train-loss": 0.5}))
    return out


@pytest.mark.parametrize(
    ("overrides", "honest"),
    [
        ({"strategy.name": "fedmedian"}, 3),
        ({"strategy.name": "fedtrimmedavg", "strategy.trim-beta": 0.25}, 3),
        ({"strategy.name": "krum", "strategy.num-malicious": 1}, 3),
        ({"strategy.name": "multikrum", "strategy.num-malicious": 1, "strategy.krum-select": 2}, 4),
        # Bulyan needs 4f + 3 = 7 replies for f = 1
        ({"strategy.name": "bulyan", "strategy.num-malicious": 1}, 6),
        # FedAvg with screening: the outlier is rejected before averaging
        ({"strategy.name": "fedavg", "strategy.screen-mad": 3.0}, 3),
    ],
)
def test_a_site_sending_weights_x1000_barely_moves_a_robust_aggregate(task_identity, overrides, honest) -> None:
    s = _strategy(**overrides)
    arrays, _ = s.aggregate_train(1, _replies(honest))
    # the honest weights are 1 +- 0.05 per coordinate; any honest mix stays within 0.2 of 1
    assert np.all(np.abs(arrays["w"].numpy() - 1.0) < 0.2), overrides


def test_plain_fedavg_is_ruined_by_the_same_site(task_identity) -> None:
    s = _strategy(**{"strategy.name": "fedavg"})
    arrays, _ = s.aggregate_train(1, _replies(3))
    # a quarter of the weight at ~1000 pulls the mean to ~250
    assert np.all(arrays["w"].numpy() > 200)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_keep_every_accepted_sites_training_results(task_identity, name) -> None:
    s = _strategy(**{"strategy.name": name})
    s.aggregate_train(1, _replies(3, attacker=False))
    assert sorted(s.records[0].train) == ["site-01", "site-02", "site-03"]
    assert s.records[0].train["site-02"]["num-examples"] == 20


def test_screening_rejects_the_outlier_with_its_reason_and_keeps_the_honest_sites(task_identity) -> None:
    s = _strategy(**{"strategy.screen-mad": 3.0})
    s.aggregate_train(1, _replies(3))
    rec = s.records[0]
    (rej,) = rec.rejected
    assert rej["site"] == "site-bad" and rej["phase"] == "train" and "strategy.screen-mad" in rej["reason"]
    assert sorted(rec.train) == ["site-01", "site-02", "site-03"]


def test_screening_off_by_default_keeps_the_outlier(task_identity) -> None:
    s = _strategy()
    s.aggregate_train(1, _replies(3))
    assert s.records[0].rejected == [] and "site-bad" in s.records[0].train


def test_screening_needs_three_sites_a_median_of_two_names_no_culprit() -> None:
    assert screen_distances({"a": 1.0, "b": 1000.0}, 3.0) == {}
    assert set(screen_distances({"a": 1.0, "b": 1.1, "c": 1000.0}, 3.0)) == {"c"}


def test_screening_keeps_sites_whose_updates_are_nearly_equal_or_smaller_than_the_others() -> None:
    # identical honest updates make the MAD zero; the floor (10 % of the median) keeps a 20 % larger one
    assert screen_distances({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.2}, 3.0) == {}
    # an update that moved the model much less than the others does no harm: kept (one-sided rule)
    assert screen_distances({"a": 1.0, "b": 1.05, "c": 0.95, "d": 0.001}, 3.0) == {}


def test_bulyan_with_too_few_sites_skips_the_round_and_says_how_many_it_needs(task_identity) -> None:
    s = _strategy(**{"strategy.name": "bulyan", "strategy.num-malicious": 1})
    arrays, _ = s.aggregate_train(1, _replies(3, attacker=False))
    assert arrays is None
    assert "4 x strategy.num-malicious + 3 = 7" in s.records[0].skipped


@pytest.mark.parametrize(
    ("overrides", "honest", "chosen"),
    [
        ({"strategy.name": "krum", "strategy.num-malicious": 1}, 3, 1),
        ({"strategy.name": "multikrum", "strategy.num-malicious": 1, "strategy.krum-select": 2}, 4, 2),
    ],
)
def test_the_sites_krum_chose_are_recorded_and_never_the_x1000_site(task_identity, overrides, honest, chosen) -> None:
    s = _strategy(**overrides)
    arrays, _ = s.aggregate_train(1, _replies(honest))
    selected = s.records[0].selected
    assert len(selected) == chosen and "site-bad" not in selected
    # the aggregate is the mean of exactly the recorded sites' weights (equal num-examples)
    by_site = {r.content["site"]["name"]: r.content["arrays"]["w"].numpy() for r in _replies(honest)}
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean([by_site[x] for x in selected], axis=0), rtol=1e-6)


def test_strategies_without_a_selection_record_none(task_identity) -> None:
    s = _strategy(**{"strategy.name": "fedmedian"})
    s.aggregate_train(1, _replies(3))
    assert s.records[0].selected == []
