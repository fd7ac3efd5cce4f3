"""What the site's DP guarantee rests on: secret randomness, the site's own policy, what leaves the site."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType

from client.dpsgd import epsilon_spent, noise_for_remaining, train_private
from client.ledger import LedgerError, LedgerState, PrivacyLedger
from client.policy import PolicyError, SitePolicy, grant, load_policy
from common.config import parse_run_config
from common.model import build_model
from common.records import to_arrays
from common.task import Batchable
from tests.flower_helpers import site_context, site_message

FAST = {"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32", "train.batch-size": 8}


def _update(model: torch.nn.Module, data: Batchable, seed: int) -> torch.Tensor:
    """The flattened weight change of one noisy DP-SGD call (SGD, lr 1: the update is the noisy mean gradient)."""
    trained = copy.deepcopy(model)
    train_private(
        trained,
        data,
        epochs=1,
        batch_size=16,
        lr=1.0,
        optimizer="sgd",
        noise_multiplier=50.0,
        max_grad_norm=1.0,
        seed=seed,
    )
    return torch.cat(
        [(a - b).flatten() for a, b in zip(trained.parameters(), model.parameters(), strict=True)]
    ).detach()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_replaying_the_published_seed_does_not_reproduce_the_dp_noise() -> None:
    torch.manual_seed(0)
    model = build_model(parse_run_config(FAST).model)
    data = Batchable(torch.rand(16, 1, 32, 32), (torch.rand(16, 1, 32, 32) > 0.7).long())
    first, second = _update(model, data, seed=7), _update(model, data, seed=7)
    # The noise (std 50 per coordinate, over a clipped mean gradient of norm <= 1) dominates the update:
    # two calls with the same seed and data would be identical if the seed drove the noise.
    assert abs(_corr(first, second)) < 0.1
    # Replaying the seed without the data: the noise a seeded generator draws does not match the update.
    for replay_gen in (torch.Generator().manual_seed(7), torch.manual_seed(7)):
        replay = torch.randn(first.shape, generator=replay_gen)
        assert abs(_corr(first, replay)) < 0.1


DP = {**FAST, "privacy.dp": True, "privacy.noise-multiplier": 1.0, "privacy.max-grad-norm": 1.0}


def _policy_file(tmp_path: Path, site: str, **policy: object) -> Path:
    path = tmp_path / f"{site}-privacy.json"
    path.write_text(json.dumps({"ledger_dir": str(tmp_path), **policy}))
    return path


def _train(site_dir: Path, policy: Path, run: dict[str, object], server_round: int = 1):
    from client.app import train

    ctx = site_context(site_dir, run, node_id=3, node_config={"privacy-policy": str(policy)})
    arrays = to_arrays(build_model(parse_run_config(FAST).model))
    msg = site_message(arrays, MessageType.TRAIN, node_id=3, **{"server-round": server_round, "local-epochs": 1})
    return train(msg, ctx)


def test_a_dp_site_refuses_a_run_that_asks_for_less_protection_than_its_policy() -> None:
    policy = SitePolicy(dp=True, max_epsilon=8.0, delta=1e-5)
    for ask, why in (
        ({"privacy.dp": False}, "requires DP"),
        ({**DP, "privacy.max-epsilon": 20.0}, "privacy.max-epsilon = 20"),
        ({**DP, "privacy.noise-multiplier": 0.0, "privacy.target-epsilon": 50.0}, "privacy.target-epsilon = 50"),
        ({**DP, "privacy.delta": 1e-2}, "privacy.delta"),
        ({**DP, "privacy.noise-multiplier": 0.0}, "without noise"),
    ):
        refused = grant(policy, parse_run_config(ask))
        assert isinstance(refused, str) and why in refused, (ask, refused)
    # asking for more protection is granted, and the smaller budget wins
    granted = grant(policy, parse_run_config({**DP, "privacy.max-epsilon": 3.0, "privacy.audit": True}))
    assert not isinstance(granted, str)
    assert granted.dp and granted.budget == 3.0 and granted.delta == 1e-5 and not granted.audit
    # a site without a DP policy does what the run asks
    assert grant(SitePolicy(), parse_run_config(DP)).dp
    assert not grant(SitePolicy(), parse_run_config(FAST)).dp


def test_the_coordinator_turning_dp_off_gets_a_refusal_and_no_weights(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    policy = _policy_file(tmp_path, "site-01", dp=True, max_epsilon=8.0)
    reply = _train(small_sites / "site-01", policy, {**FAST, "privacy.dp": False})
    assert "arrays" not in reply.content.array_records
    assert reply.content["refusal"]["kind"] == "privacy-policy"
    assert "requires DP" in reply.content["refusal"]["reason"]
    assert not (tmp_path / "site-01.json").exists()  # nothing trained, nothing spent


def test_under_dp_no_training_data_metric_reaches_the_server(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    from client.app import evaluate

    policy = _policy_file(tmp_path, "site-02", dp=True, max_epsilon=50.0)
    run = {**DP, "privacy.audit": True}
    reply = _train(small_sites / "site-02", policy, run)
    metrics = dict(reply.content["metrics"])
    accounted = {"epsilon", "delta", "noise-multiplier", "privacy-unit"}  # privacy-unit: the policy's unit, a code
    assert set(metrics) == {"num-examples", "threads", "uniform-weight"} | accounted
    assert metrics["privacy-unit"] == 1.0  # per patient: the policy's default unit
    assert metrics["num-examples"] == 1  # the training-set size is withheld (policy public_size = 0)
    # the audit (training slices, outside the accountant) does not run: the policy does not allow it
    ctx = site_context(small_sites / "site-02", run, node_id=3, node_config={"privacy-policy": str(policy)})
    arrays = to_arrays(build_model(parse_run_config(FAST).model))
    scores = dict(evaluate(site_message(arrays, MessageType.EVALUATE, node_id=3), ctx).content["metrics"])
    assert "dice" in scores and not {"mia-auc", "mia-auc-initial", "release-audit"} & set(scores)
    # allowed by the policy, it runs and is labelled a release
    allowed = _policy_file(tmp_path, "site-02b", dp=True, max_epsilon=50.0, audit=True)
    ctx = site_context(small_sites / "site-02", run, node_id=3, node_config={"privacy-policy": str(allowed)})
    scores = dict(evaluate(site_message(arrays, MessageType.EVALUATE, node_id=3), ctx).content["metrics"])
    assert scores["release-audit"] == 1.0 and "mia-auc" in scores


def test_a_missing_ledger_stops_a_dp_site_that_trained_before(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    from client.app import SiteError

    policy = _policy_file(tmp_path, "site-01", dp=True, max_epsilon=50.0)
    first = _train(small_sites / "site-01", policy, DP)
    assert first.content["metrics"]["epsilon"] > 0
    ledger_id = json.loads(policy.read_text())["ledger_id"]  # the site now knows it has a ledger
    assert PrivacyLedger(tmp_path / "site-01.json").read().id == ledger_id
    (tmp_path / "site-01.json").unlink()
    with pytest.raises(SiteError, match=r"LedgerError: privacy ledger .* is missing.*restore the ledger"):
        _train(small_sites / "site-01", policy, DP, server_round=2)
    assert not (tmp_path / "site-01.json").exists()  # epsilon was not counted from zero


def test_delta_is_fixed_when_the_ledger_is_created() -> None:
    state = LedgerState(id="a", delta=1e-5, accountant="rdp", entries=[])
    entry = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 100}
    state = LedgerState(
        id="a", delta=1e-5, accountant="rdp", entries=[{**entry, "n_train": 40}, {**entry, "n_train": 1000}]
    )
    # the epsilon of a ledger depends on its entries and its fixed delta, not on today's dataset size
    assert state.epsilon() == pytest.approx(epsilon_spent([(1.0, 0.1, 100)] * 2, delta=1e-5))


def test_the_ledger_is_locked_while_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.ledger

    monkeypatch.setattr(client.ledger, "_LOCK_WAIT_S", 0.3)

    def take() -> None:
        with PrivacyLedger(tmp_path / "l.json").locked():
            pass

    with PrivacyLedger(tmp_path / "l.json").locked(), pytest.raises(LedgerError, match="locked by another process"):
        take()
    with PrivacyLedger(tmp_path / "l.json").locked():  # released afterwards
        pass


def test_a_policy_with_dp_but_no_budget_or_unknown_keys_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "privacy.json").write_text(json.dumps({"dp": True}))
    with pytest.raises(PolicyError, match="needs a lifetime budget"):
        load_policy(tmp_path)
    (tmp_path / "privacy.json").write_text(json.dumps({"dp": True, "max_epsilon": 8, "budget": 3}))
    with pytest.raises(PolicyError, match=r"unknown key\(s\) \['budget'\]"):
        load_policy(tmp_path)
    assert load_policy(tmp_path / "nowhere") == SitePolicy()


def test_a_lifetime_target_counts_what_was_spent_and_refuses_past_it() -> None:
    spent = [(2.0, 0.1, 100)]  # epsilon 2.58 at delta 1e-5
    sigma = noise_for_remaining(8.0, spent, delta=1e-5, sample_rate=0.1, steps=300)
    assert epsilon_spent([*spent, (sigma, 0.1, 300)], delta=1e-5) == pytest.approx(8.0, rel=0.05)
    assert epsilon_spent([*spent, (sigma, 0.1, 300)], delta=1e-5) <= 8.0
    # a fresh site with the same plan needs less noise than one that has spent part of its budget
    assert noise_for_remaining(8.0, [], delta=1e-5, sample_rate=0.1, steps=300) < sigma
    assert noise_for_remaining(1.0, spent, delta=1e-5, sample_rate=0.1, steps=10) == float("inf")


def test_dp_classification_uses_policy_or_uniform_class_weights_never_the_labels() -> None:
    from client.rounds import _class_weights

    cfg = parse_run_config(
        {**FAST, "model.channels": "8,16,32,64", "task.name": "classification", "task.class-weighted": True}
    )

    class Site:
        train = Batchable(torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 0, 1]))

    assert _class_weights(cfg, Site(), SitePolicy(), dp=True) is None
    fixed = _class_weights(cfg, Site(), SitePolicy(class_weights=(1.0, 2.0)), dp=True)
    assert fixed.tolist() == [1.0, 2.0]
    assert _class_weights(cfg, Site(), SitePolicy(), dp=False).tolist() != [1.0, 1.0]


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism with sensitivity/noise ratio ``mu`` (Balle & Wang 2018)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    return brentq(lambda e: delta_of(e) - delta, 0.0, 500.0)


def test_central_dp_epsilon_matches_an_independent_replace_one_computation(task_identity: None) -> None:
    import numpy as np
    from flwr.app import Array as FlwrArray
    from flwr.app import ArrayRecord, ConfigRecord

    from server.strategies import make_strategy
    from tests.flower_helpers import FakeGrid, train_reply

    sigma, clip, sites, rounds = 2.0, 1.0, 4, 5
    cfg = {"privacy.central-dp": True, "privacy.central-noise": sigma, "privacy.central-clip": clip}
    s = make_strategy(parse_run_config({**cfg, "privacy.central-sites": sites}))
    grid, zero = FakeGrid([11, 12, 13, 14]), ArrayRecord({"w": FlwrArray(np.zeros(100, dtype=np.float32))})
    for r in range(1, rounds + 1):
        s.configure_train(r, zero, ConfigRecord({}), grid)
        replies = [
            train_reply(
                n, f"site-{n}", {"w": np.full(100, float(n), np.float32)}, {"num-examples": 9, "uniform-weight": 1.0}
            )
            for n in grid.node_ids
        ]
        assert s.aggregate_train(r, replies)[0] is not None
    spent = s.records[-1].central_privacy
    assert spent["delta"] == 1e-5 < 1 / sites
    # Independently: replacing one site moves the mean of 4 clipped updates by up to 2 clip / 4; the noise
    # std is sigma clip / 4; 5 releases compose to one Gaussian with ratio sqrt(5) x 2 / sigma.
    exact = _exact_gaussian_epsilon(math.sqrt(rounds) * 2.0 / sigma, spent["delta"])
    assert exact <= spent["epsilon"] <= 1.25 * exact  # RDP is an upper bound, tight to a few percent here
    # an add/remove-one account (sensitivity 1 clip / 4) would claim far less than the truth
    assert _exact_gaussian_epsilon(math.sqrt(rounds) / sigma, spent["delta"]) < 0.6 * exact


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedbn"])
def test_central_dp_with_a_server_optimizer_is_refused_at_start(name: str) -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=f"'strategy.name' = '{name}' cannot be used with 'privacy.central-dp'"):
        parse_run_config({"privacy.central-dp": True, "strategy.name": name})
    assert parse_run_config({"privacy.central-dp": True, "strategy.name": "fedprox"}).privacy.central_dp


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_the_classification_resnet_has_no_batchnorm_when_model_norm_says_otherwise(norm: str) -> None:
    from opacus.validators import ModuleValidator

    cfg = parse_run_config({**FAST, "model.channels": "8,16,32,64", "task.name": "classification", "model.norm": norm})
    model = build_model(cfg.model, cfg.task)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []  # DP-SGD can train it
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)
