"""Server aggregation with hand-made site replies: weighted by samples, per site, bad replies rejected."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.config import parse_run_config
from server.results import build_results, site_table
from server.strategies import RoundRecord, make_strategy


class FakeGrid:
    """Just enough of a Grid for configure_* to sample nodes."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


def _instruction(node: int, kind: str) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=kind)


def _train_reply(node: int, site: str, w: np.ndarray, n: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, reply_to=_instruction(node, MessageType.TRAIN))


def _eval_reply(node: int, site: str, dice: float, n: int) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord({"dice": dice, "loss": 1 - dice, "num-examples": n}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, reply_to=_instruction(node, MessageType.EVALUATE))


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
    s, rounds = strategy
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
    from server.strategies import recorder_of

    cfg = parse_run_config(
        {"privacy.central-dp": True, "privacy.central-noise": 0.5, "privacy.central-clip": 1.0, "sim.sites": 2}
    )
    s = make_strategy(cfg)
    rec = recorder_of(s)
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
    # a round with a missing site is not aggregated: the noise is scaled for every site
    s.configure_train(3, zero, ConfigRecord({}), FakeGrid())
    assert s.aggregate_train(3, [_uniform_reply(11, "site-a", np.ones(1000))]) == (None, None)


def test_fedbn_never_averages_normalization_layers(task_identity: None) -> None:
    from common.model import build_model, norm_keys

    cfg = parse_run_config({"strategy.name": "fedbn", "model.channels": "8,16,32", "data.image-size": 32})
    s = make_strategy(cfg)
    model = build_model(cfg.model)
    local = set(norm_keys(model))
    assert local and set(s.local_keys) == local
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
    from common.config import parse_run_config
    from server.strategies import make_strategy

    assert make_strategy(parse_run_config({"strategy.name": "fedadam"})).eta == pytest.approx(0.03)
    assert make_strategy(parse_run_config({"strategy.name": "fedyogi"})).eta == pytest.approx(0.01)
    assert make_strategy(
        parse_run_config({"strategy.name": "fedyogi", "strategy.server-lr": 0.2})
    ).eta == pytest.approx(0.2)
    assert make_strategy(parse_run_config({"strategy.name": "fedadam"})).tau == pytest.approx(0.01)
