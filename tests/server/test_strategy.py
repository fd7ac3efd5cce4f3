"""Server aggregation with hand-made site replies: weighted by samples, per site, bad replies rejected."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.config import STRATEGY_NAMES, parse_run_config
from server.recording import RecordingStrategy, RoundRecord, inner_of
from server.results import build_results, site_table
from server.strategies import BUILDERS, make_strategy
from tests.flower_helpers import FakeGrid, error_reply, eval_reply, instruction, train_reply


def _instruction(node: int, kind: str) -> Message:
    return instruction(node, kind)


def _train_reply(node: int, site: str, w: np.ndarray, n: int) -> Message:
    return train_reply(node, site, {"w": w.astype(np.float32)}, {"num-examples": n, "train-loss": 0.5})


def _eval_reply(node: int, site: str, dice: float, n: int) -> Message:
    return eval_reply(node, site, {"dice": dice, "loss": 1 - dice, "num-examples": n})


@pytest.fixture()
def strategy(task_identity: None):
    rounds: list[RoundRecord] = []
    s = make_strategy(parse_run_config({}), on_round=rounds.append)
    s.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}), ConfigRecord({}), FakeGrid())
    return s, rounds


def test_weights_are_averaged_by_training_samples_not_by_site(strategy) -> None:
    s, _ = strategy
    arrays, _ = s.aggregate_train(
        1, [_train_reply(11, "site-a", np.ones(2), 30), _train_reply(12, "site-b", np.full(2, 4.0), 10)]
    )
    assert np.allclose(arrays["w"].numpy(), (30 * 1 + 10 * 4) / 40)


def test_a_reply_with_nan_weights_is_rejected_with_its_reason_and_the_rest_aggregated(strategy) -> None:
    s, _ = strategy
    bad = _train_reply(13, "site-c", np.array([np.nan, 1.0]), 1000)
    arrays, _ = s.aggregate_train(1, [_train_reply(11, "site-a", np.ones(2), 30), bad])
    assert np.allclose(arrays["w"].numpy(), 1.0)
    (rej,) = s.records[0].rejected
    assert rej["site"] == "site-c" and "NaN" in rej["reason"]


@pytest.mark.parametrize(
    ("reply_kwargs", "reason"),
    [
        (dict(w=np.ones(3), n=10), "do not match the global model"),
        (dict(w=np.ones(2), n=0), "num-examples must be a positive number"),
    ],
)
def test_misshapen_or_empty_replies_are_rejected(strategy, reply_kwargs, reason) -> None:
    s, _ = strategy
    arrays, _ = s.aggregate_train(
        1, [_train_reply(11, "site-a", np.ones(2), 30), _train_reply(12, "site-b", **reply_kwargs)]
    )
    assert np.allclose(arrays["w"].numpy(), 1.0)
    assert reason in s.records[0].rejected[0]["reason"]


def test_evaluation_results_are_kept_per_site_name(strategy) -> None:
    s, rounds = strategy
    s.aggregate_evaluate(1, [_eval_reply(11, "site-a", 0.8, 20), _eval_reply(12, "site-b", 0.4, 5)])
    (rec,) = rounds
    assert rec.per_site == {
        "site-a": {"dice": 0.8, "loss": pytest.approx(0.2), "num-examples": 20.0},
        "site-b": {"dice": 0.4, "loss": pytest.approx(0.6), "num-examples": 5.0},
    }
    assert rec.mean()["dice"] == pytest.approx(0.6)
    assert rec.worst()["dice"] == 0.4 and rec.worst()["loss"] == pytest.approx(0.6)


def test_two_nodes_claiming_one_site_name_keep_only_the_first(strategy) -> None:
    s, rounds = strategy
    s.aggregate_evaluate(1, [_eval_reply(11, "site-a", 0.8, 20), _eval_reply(12, "site-a", 0.1, 20)])
    assert rounds[0].per_site["site-a"]["dice"] == 0.8
    assert "second node claims" in rounds[0].rejected[0]["reason"]


def test_results_have_per_site_rounds_final_mean_worst_and_timing(strategy) -> None:
    s, _ = strategy
    s.aggregate_evaluate(1, [_eval_reply(11, "site-a", 0.5, 20), _eval_reply(12, "site-b", 0.3, 5)])
    res = build_results({"seed": 1}, s.records, total_s=3.0)
    assert res["rounds"][0]["per_site"]["site-b"]["dice"] == 0.3
    assert res["final"]["per_site"] == {
        "site-a": {"dice": 0.5, "loss": 0.5},
        "site-b": {"dice": 0.3, "loss": pytest.approx(0.7)},
    }
    assert res["final"]["mean"]["dice"] == pytest.approx(0.4) and res["final"]["worst"]["dice"] == 0.3
    assert res["timing"]["total_s"] == 3.0 and len(res["timing"]["round_s"]) == 1
    table = site_table(res)
    assert "site-a" in table and "worst" in table


def _uniform_reply(node: int, site: str, w: np.ndarray) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": 10, "uniform-weight": 1.0}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, reply_to=_instruction(node, MessageType.TRAIN))


def test_central_dp_clips_each_site_adds_noise_and_accounts_epsilon_per_round(task_identity: None) -> None:
    cfg = parse_run_config(
        {
            "privacy.central-dp": True,
            "privacy.central-noise": 0.5,
            "privacy.central-clip": 1.0,
            "privacy.central-sites": 2,
            # one site answering is enough to reach the central-DP check below (the quorum is tested elsewhere)
            "strategy.min-sites": 1,
        }
    )
    s = make_strategy(cfg)
    rec = s
    zero = ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))})
    eps = []
    for r in (1, 2):
        s.configure_train(r, zero, ConfigRecord({}), FakeGrid())
        huge = _uniform_reply(11, "site-a", np.full(1000, 100.0))  # norm ~3162, clipped to 1
        agg, _ = s.aggregate_train(r, [huge, _uniform_reply(12, "site-b", np.full(1000, 1e-4))])
        w = agg["w"].numpy()
        # clipped mean has norm 0.5; noise std = 0.5 * 1.0 / 2 per coordinate
        assert np.linalg.norm(w) < 20 and np.std(w) == pytest.approx(0.25, rel=0.2)
        eps.append(rec.records[-1].central_privacy["epsilon"])
    assert 0 < eps[0] < eps[1]
    # with privacy.central-sites = 2, a round with a missing site is not aggregated: the noise is scaled for 2
    s.configure_train(3, zero, ConfigRecord({}), FakeGrid())
    assert s.aggregate_train(3, [_uniform_reply(11, "site-a", np.ones(1000))]) == (None, None)
    assert "privacy.central-sites = 2" in rec.records[-1].skipped and not rec.records[-1].central_privacy


def test_fedbn_never_averages_normalization_layers(task_identity: None) -> None:
    from common.model import build_model, norm_keys

    cfg = parse_run_config({"strategy.name": "fedbn", "model.channels": "8,16,32", "data.image-size": 32})
    s = make_strategy(cfg)
    model = build_model(cfg.model)
    local = set(norm_keys(model))
    from server.fedbn import FedBN

    assert local and set(inner_of(s, FedBN).local_keys) == local
    start = {k: v.numpy() for k, v in ArrayRecord({k: v.detach() for k, v in model.state_dict().items()}).items()}
    glob = ArrayRecord({k: Array(v) for k, v in start.items()})
    s.configure_train(1, glob, ConfigRecord({}), FakeGrid())

    def reply(node: int, site: str, shift: float) -> Message:
        arrays = ArrayRecord({k: Array((v + shift).astype(v.dtype)) for k, v in start.items()})
        metrics = MetricRecord({"num-examples": 10})
        return Message(
            content=RecordDict({"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"name": site})}),
            reply_to=_instruction(node, MessageType.TRAIN),
        )

    agg, _ = s.aggregate_train(1, [reply(11, "site-a", 1.0), reply(12, "site-b", 3.0)])
    for k, v in start.items():
        expected = v if k in local else v + 2.0
        assert np.allclose(agg[k].numpy(), expected), k


def test_server_optimizers_get_their_measured_step_unless_one_is_set() -> None:
    from flwr.serverapp.strategy import FedAdam, FedYogi

    def server_optimizer(**config: object) -> FedAdam | FedYogi:
        return inner_of(
            make_strategy(parse_run_config(config)), FedAdam if config["strategy.name"] == "fedadam" else FedYogi
        )

    assert server_optimizer(**{"strategy.name": "fedadam"}).eta == pytest.approx(0.03)
    assert server_optimizer(**{"strategy.name": "fedyogi"}).eta == pytest.approx(0.01)
    assert server_optimizer(**{"strategy.name": "fedyogi", "strategy.server-lr": 0.2}).eta == pytest.approx(0.2)
    assert server_optimizer(**{"strategy.name": "fedadam"}).tau == pytest.approx(0.01)


# --- one table of strategy names -------------------------------------------------------------


def test_every_strategy_name_the_config_accepts_has_exactly_one_server_builder(task_identity: None) -> None:
    assert sorted(BUILDERS) == sorted(STRATEGY_NAMES)
    for name in STRATEGY_NAMES:
        cfg = parse_run_config({"strategy.name": name, "model.channels": "8,16", "data.image-size": 32})
        s = make_strategy(cfg)
        assert isinstance(s, RecordingStrategy) and s.strategy is not None, name


# --- reply checks: each claim of the README has a test that fails when the check is removed --


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"dice": 1.2, "loss": 0.1}, "dice must be in [0, 1], got 1.2"),
        ({"dice": -0.05, "loss": 0.1}, "dice must be in [0, 1], got -0.05"),
        ({"dice": 0.5, "ece": 1.5, "loss": 0.1}, "ece must be in [0, 1], got 1.5"),
        ({"dice": 0.5, "loss": float("nan")}, "metric 'loss' is not finite"),
        ({"dice": 0.5, "loss": float("inf")}, "metric 'loss' is not finite"),
    ],
)
def test_an_evaluation_with_a_score_outside_0_1_or_a_non_finite_metric_is_rejected_and_not_kept(
    strategy, metrics, reason
) -> None:
    s, rounds = strategy
    good = eval_reply(11, "site-a", {"dice": 0.7, "loss": 0.3, "num-examples": 10})
    s.aggregate_evaluate(1, [good, eval_reply(12, "site-b", {**metrics, "num-examples": 10})])
    (rec,) = rounds
    assert rec.rejected == [{"site": "site-b", "phase": "evaluate", "reason": reason}]
    assert set(rec.per_site) == {"site-a"}


def test_a_perfect_and_a_useless_site_are_both_kept_scores_0_and_1_are_in_range(strategy) -> None:
    s, rounds = strategy
    s.aggregate_evaluate(
        1,
        [
            eval_reply(11, "site-a", {"dice": 1.0, "loss": 0.0, "num-examples": 4}),
            eval_reply(12, "site-b", {"dice": 0.0, "loss": 2.0, "num-examples": 4}),
        ],
    )
    assert rounds[0].rejected == [] and rounds[0].worst()["dice"] == 0.0


def test_a_training_reply_with_a_non_finite_metric_is_rejected_and_its_weights_not_averaged(strategy) -> None:
    s, _ = strategy
    bad = train_reply(
        12, "site-b", {"w": np.full(2, 9.0, np.float32)}, {"num-examples": 10, "train-loss": float("inf")}
    )
    arrays, _ = s.aggregate_train(1, [_train_reply(11, "site-a", np.ones(2), 10), bad])
    assert np.allclose(arrays["w"].numpy(), 1.0)
    assert s.records[0].rejected == [
        {"site": "site-b", "phase": "train", "reason": "metric 'train-loss' is not finite"}
    ]


def test_a_site_error_is_recorded_by_node_with_its_reason_and_the_others_aggregated(task_identity: None) -> None:
    # a quorum of one: the site that answered is enough (strategy.min-sites = 2 would stop the round)
    s = make_strategy(parse_run_config({"strategy.min-sites": 1}))
    s.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}), ConfigRecord({}), FakeGrid())
    arrays, _ = s.aggregate_train(
        1, [_train_reply(11, "site-a", np.ones(2), 10), error_reply(12, "handler raised MemoryError")]
    )
    assert np.allclose(arrays["w"].numpy(), 1.0)
    (rej,) = s.records[0].rejected
    assert rej == {"site": "node-12", "phase": "train", "reason": "site reported an error: handler raised MemoryError"}


@pytest.mark.parametrize("name", ["../site-b", "site b", "", "x" * 65, 7, "Patient^Jane"])
def test_a_reply_without_a_safe_site_name_is_rejected_and_recorded_by_node_not_by_its_name(strategy, name) -> None:
    s, rounds = strategy
    s.aggregate_evaluate(
        1,
        [
            eval_reply(11, "site-a", {"dice": 0.7, "num-examples": 5}),
            eval_reply(12, name, {"dice": 0.2, "num-examples": 5}),
        ],
    )
    (rej,) = rounds[0].rejected
    assert rej["site"] == "node-12" and "no valid 'site' name" in rej["reason"]
    assert set(rounds[0].per_site) == {"site-a"}
    if isinstance(name, str) and name:  # an unchecked name could carry anything (here a patient-like name)
        assert name not in json.dumps(build_results({}, s.records, total_s=0.0)["rounds"])


# --- central DP counts the sites that answer -------------------------------------------------


def _sites_reply(node: int, site: str, value: float, size: int) -> Message:
    return train_reply(node, site, {"w": np.full(size, value, np.float32)}, {"num-examples": 10, "uniform-weight": 1.0})


def test_central_dp_with_4_sites_and_the_default_sim_sites_aggregates_every_round_for_4_sites(
    task_identity: None,
) -> None:
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    from server.central_dp import CentralDP

    cfg = parse_run_config({"privacy.central-dp": True, "privacy.central-noise": 0.5, "privacy.central-clip": 1.0})
    assert cfg.sim.sites == 3 and cfg.privacy.central_sites == 0  # the defaults: nothing says 4
    s = make_strategy(cfg)
    grid, size = FakeGrid([11, 12, 13, 14]), 4000
    zero = ArrayRecord({"w": Array(np.zeros(size, dtype=np.float32))})
    for r in (1, 2, 3):
        s.configure_train(r, zero, ConfigRecord({}), grid)
        replies = [_sites_reply(node, f"site-0{node - 10}", 10.0 * node, size) for node in grid.node_ids]
        agg, _ = s.aggregate_train(r, replies)
        assert agg is not None, f"round {r} was not aggregated: {s.records[-1].skipped}"
        # every update is clipped to norm 1; the noise is 0.5 x 1 / 4 sites per coordinate (for 3 it would be 0.167)
        assert np.std(agg["w"].numpy()) == pytest.approx(0.125, rel=0.08)
    dp = inner_of(s, CentralDP)
    assert dp.accountant is not None and dp.accountant.config.population_size == 4
    # 3 releases of the Gaussian mechanism over 4 sites, replace-one (sensitivity 2 x clip: noise ratio 0.5 / 2),
    # at the default delta 1e-5
    expected = RdpAccountant(
        PrivacyConfig(1e-5, 4, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    expected.compose(GaussianPrivacyEvent(noise_multiplier=0.25, sample_size=4, population_size=4), count=3)
    assert s.records[-1].central_privacy == {"epsilon": pytest.approx(expected.get_epsilon(1e-5)), "delta": 1e-5}
    assert [len(r.train) for r in s.records] == [4, 4, 4] and all(not r.rejected for r in s.records)


@pytest.mark.parametrize(("declared", "answering"), [(4, 3), (3, 4)])
def test_central_dp_with_declared_sites_skips_a_round_where_another_number_answers(
    task_identity: None, declared, answering
) -> None:
    cfg = parse_run_config({"privacy.central-dp": True, "privacy.central-sites": declared})
    s = make_strategy(cfg)
    nodes = list(range(11, 11 + answering))
    zero = ArrayRecord({"w": Array(np.zeros(10, dtype=np.float32))})
    s.configure_train(1, zero, ConfigRecord({}), FakeGrid(nodes))
    assert s.aggregate_train(1, [_sites_reply(n, f"site-{n}", 1.0, 10) for n in nodes]) == (None, None)
    rec = s.records[0]
    assert f"privacy.central-sites = {declared} sites, got {answering}" in rec.skipped and not rec.central_privacy
    assert build_results({}, s.records, total_s=0.0)["rounds"][0]["skipped"] == rec.skipped


def test_central_dp_rejects_a_site_that_sent_back_the_global_model_and_counts_only_the_others(
    task_identity: None,
) -> None:
    s = make_strategy(parse_run_config({"privacy.central-dp": True, "privacy.central-noise": 0.5}))
    size = 4000
    zero = ArrayRecord({"w": Array(np.zeros(size, dtype=np.float32))})
    s.configure_train(1, zero, ConfigRecord({}), FakeGrid())
    replies = [
        _sites_reply(11, "site-a", 5.0, size),
        _sites_reply(12, "site-b", 5.0, size),
        _sites_reply(13, "site-c", 0.0, size),
    ]
    agg, _ = s.aggregate_train(1, replies)
    assert s.records[0].rejected == [
        {"site": "site-c", "phase": "train", "reason": "update is exactly zero (nothing learnt)"}
    ]
    assert np.std(agg["w"].numpy()) == pytest.approx(0.5 / 2, rel=0.08)  # noise for the 2 sites aggregated


def test_averaged_weights_are_bit_identical_whatever_order_the_replies_arrive_in(task_identity: None) -> None:
    """Replies arrive in the order sites finish; a float32 sum in that order would differ in the last bits."""
    rng = np.random.default_rng(0)
    weights = {site: rng.standard_normal(1000).astype(np.float32) * 10 for site in ("site-a", "site-b", "site-c")}
    samples = {"site-a": 24, "site-b": 25, "site-c": 26}
    results = []
    for order in (["site-a", "site-b", "site-c"], ["site-c", "site-a", "site-b"], ["site-b", "site-c", "site-a"]):
        s = make_strategy(parse_run_config({}))
        s.configure_train(1, ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))}), ConfigRecord({}), FakeGrid())
        replies = [_train_reply(11 + i, site, weights[site], samples[site]) for i, site in enumerate(order)]
        arrays, _ = s.aggregate_train(1, replies)
        results.append(arrays["w"].numpy())
    assert all(np.array_equal(results[0], r) for r in results[1:])


def _with(reply: Message, name: str, record) -> Message:
    reply.content[name] = record
    return reply


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda: _with(_train_reply(12, "site-b", np.ones(2), 10), "patient", ConfigRecord({"id": "P-1"})),
            "record 'patient' not allowed in a training reply (allowed: arrays, metrics, site)",
        ),
        (
            lambda: _with(
                _train_reply(12, "site-b", np.ones(2), 10), "site", ConfigRecord({"name": "site-b", "ip": 1})
            ),
            "record 'site' carries a key 'ip' not allowed in a reply (allowed: name)",
        ),
        (
            lambda: _with(
                _train_reply(12, "site-b", np.ones(2), 10),
                "metrics",
                MetricRecord({"num-examples": 10, "per-patient-loss": [0.1, 0.9]}),
            ),
            "metric 'per-patient-loss' is a list; a reply carries single numbers",
        ),
        (
            lambda: _with(_train_reply(12, "site-b", np.ones(2), 10), "metrics", ConfigRecord({"num-examples": 10})),
            "record 'metrics' is a ConfigRecord, expected a MetricRecord",
        ),
    ],
    ids=["extra-record", "extra-site-key", "list-metric", "wrong-record-type"],
)
def test_a_training_reply_carrying_more_than_weights_counts_metrics_and_the_name_is_rejected(
    strategy, make, reason
) -> None:
    s, _ = strategy
    arrays, _ = s.aggregate_train(1, [_train_reply(11, "site-a", np.ones(2), 30), make()])
    assert np.allclose(arrays["w"].numpy(), 1.0)  # only site-a's weights
    (rej,) = s.records[0].rejected
    assert rej["site"] == "site-b" and reason in rej["reason"]


def test_an_evaluation_reply_carrying_weights_is_rejected(strategy) -> None:
    s, rounds = strategy
    leaky = _with(_eval_reply(12, "site-b", 0.5, 5), "arrays", ArrayRecord({"w": Array(np.ones(2, np.float32))}))
    s.aggregate_evaluate(1, [_eval_reply(11, "site-a", 0.8, 20), leaky])
    assert set(rounds[0].per_site) == {"site-a"}
    assert "record 'arrays' not allowed in an evaluation reply" in rounds[0].rejected[0]["reason"]
