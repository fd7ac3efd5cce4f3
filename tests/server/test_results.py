"""results.json as the coordinator writes it: a whole federation of fake sites through server.app, no Flower runtime."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MessageType

from common.config import parse_run_config
from tests.flower_helpers import FakeGrid, eval_reply, refusal_reply, train_reply

SMALL_MODEL = {"model.channels": "8,16", "data.image-size": 32}


class NoTracker:
    """Stands in for MLflow (server.tracking is tested on its own)."""

    tracking_uri = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self) -> None:
        return None


Site = Callable[[int, str, Message], Message]


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], site: Site, nodes: list[int]) -> dict:
    import server.app

    monkeypatch.setattr(server.app, "Tracker", NoTracker)

    def answer(msg: Message) -> Message:
        return site(msg.content["config"]["server-round"], msg.metadata.message_type, msg)

    cfg = parse_run_config({**SMALL_MODEL, **config, "output.dir": str(tmp_path / "run")})
    server.app.run_federation(FakeGrid(nodes, answer=answer), cfg)
    return json.loads((tmp_path / "run" / "results.json").read_text())


def _learnt(msg: Message, step: float) -> dict[str, np.ndarray]:
    """The global weights moved by ``step`` (a site that learnt something)."""
    return {k: (v.numpy() + step).astype(v.numpy().dtype) for k, v in msg.content["arrays"].items()}


def test_results_keep_rejections_site_epsilons_and_why_the_federation_stopped(
    tmp_path, monkeypatch, task_identity
) -> None:
    names = {11: "site-01", 12: "site-02", 13: "site-03"}

    def site(r: int, kind: str, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if kind == MessageType.TRAIN:
            if node == 13 and r == 2:  # site-03's budget is spent in round 2
                return refusal_reply(node, names[node], epsilon=2.5, delta=1e-4, to=msg)
            return train_reply(
                node, names[node], _learnt(msg, 0.01), {"num-examples": 10, "epsilon": 1.0 * r, "delta": 1e-4}, to=msg
            )
        dice = 1.4 if (node == 12 and r == 1) else 0.5  # site-02 reports an impossible Dice in round 1
        return eval_reply(node, names[node], {"dice": dice, "loss": 0.5, "num-examples": 5}, to=msg)

    config = {"num-server-rounds": 3, "privacy.dp": True, "privacy.on-budget": "stop"}
    res = _run(tmp_path, monkeypatch, config, site, list(names))
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert res["rounds"][0]["rejected"] == [
        {"site": "site-02", "phase": "evaluate", "reason": "dice must be in [0, 1], got 1.4"}
    ]
    assert res["rounds"][0]["privacy"] == {s: {"epsilon": 1.0, "delta": 1e-4} for s in names.values()}
    (refused,) = res["rounds"][1]["rejected"]
    assert refused["site"] == "site-03" and refused["reason"].startswith("refused (privacy-budget)")
    assert res["stopped"] == {
        "round": 2,
        "reason": "privacy budget spent at site-03; privacy.on-budget = 'stop' ends the federation",
    }
    # each site's latest epsilon: two rounds spent at site-01 and -02, the refusal's own account at site-03
    assert res["final"]["privacy"] == {
        "site-01": {"epsilon": 2.0, "delta": 1e-4},
        "site-02": {"epsilon": 2.0, "delta": 1e-4},
        "site-03": {"epsilon": 2.5, "delta": 1e-4},
    }
    assert res["final"]["round"] == 1 and set(res["final"]["per_site"]) == {"site-01", "site-03"}
    assert "central_privacy" not in res["final"]


def test_results_and_the_site_table_name_the_unit_each_sites_epsilon_protects(
    tmp_path, monkeypatch, task_identity
) -> None:
    from server.results import site_table

    names = {11: "site-01", 12: "site-02"}
    unit = {11: 1.0, 12: 2.0}  # the reply's privacy-unit code: site-01 per patient, site-02 per slice

    def site(r: int, kind: str, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if kind == MessageType.TRAIN:
            spent = {"num-examples": 1, "epsilon": 1.5 * r, "delta": 1e-5, "privacy-unit": unit[node]}
            return train_reply(node, names[node], _learnt(msg, 0.01), spent, to=msg)
        return eval_reply(node, names[node], {"dice": 0.5, "loss": 0.5, "num-examples": 5}, to=msg)

    res = _run(tmp_path, monkeypatch, {"num-server-rounds": 2, "privacy.dp": True}, site, list(names))
    assert res["final"]["privacy"] == {
        "site-01": {"epsilon": 3.0, "delta": 1e-5, "unit": "patient"},
        "site-02": {"epsilon": 3.0, "delta": 1e-5, "unit": "slice"},
    }
    rows = {line.split()[0]: line for line in site_table(res).splitlines()}
    assert rows["site-01"].endswith("3 per patient") and rows["site-02"].endswith("3 per slice")


def test_results_of_central_dp_over_4_sites_report_the_site_level_epsilon_every_round(
    tmp_path, monkeypatch, task_identity
) -> None:
    names = {n: f"site-0{n - 10}" for n in (11, 12, 13, 14)}

    def site(r: int, kind: str, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if kind == MessageType.TRAIN:
            return train_reply(
                node, names[node], _learnt(msg, 0.01 * node), {"num-examples": 10, "uniform-weight": 1.0}, to=msg
            )
        return eval_reply(
            node, names[node], {"dice": 0.5, "loss": 0.5, "num-examples": 5, "uniform-weight": 1.0}, to=msg
        )

    res = _run(tmp_path, monkeypatch, {"num-server-rounds": 2, "privacy.central-dp": True}, site, list(names))
    central = [r["central_privacy"] for r in res["rounds"]]
    # the default central delta: far below 1/sites (issue 9), whatever sim.sites says
    assert all(c["delta"] == pytest.approx(1e-5) for c in central)
    assert 0 < central[0]["epsilon"] < central[1]["epsilon"]
    assert res["final"]["central_privacy"] == central[1]
    assert all(not r["rejected"] and "skipped" not in r for r in res["rounds"]) and "stopped" not in res


def _model_keys_and_bytes() -> tuple[set[str], int]:
    """The small model's state-dict keys and the bytes of its float32 weights, as built from the config."""
    from common.model import build_model

    cfg = parse_run_config(SMALL_MODEL)
    state = build_model(cfg.model, cfg.task).state_dict()
    return set(state), sum(t.numel() * t.element_size() for t in state.values())


#: Flower's serialisation adds per array three 64-hex object ids and a few headers (measured: 455 bytes);
#: per message a few hundred bytes of metadata, records and config.
PER_ARRAY, PER_MESSAGE = 512, 1024


def _noisy(msg: Message, node: int, r: int) -> dict[str, np.ndarray]:
    """The global weights plus noise: every array distinct, as after real training (no two arrays alike)."""
    rng = np.random.default_rng([node, r])
    return {
        k: (v.numpy() + 0.01 * rng.standard_normal(v.numpy().shape)).astype(v.numpy().dtype)
        for k, v in msg.content["arrays"].items()
    }


def test_results_keep_each_rounds_bytes_per_site_and_phase_and_the_replies_record_keys(
    tmp_path, monkeypatch, task_identity
) -> None:
    names = {11: "site-01", 12: "site-02", 13: "site-03"}
    keys, model_bytes = _model_keys_and_bytes()

    def site(r: int, kind: str, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if kind == MessageType.TRAIN:
            return train_reply(node, names[node], _noisy(msg, node, r), {"num-examples": 10, "train-loss": 0.5}, to=msg)
        return eval_reply(node, names[node], {"dice": 0.5, "loss": 0.5, "num-examples": 5}, to=msg)

    res = _run(tmp_path, monkeypatch, {"num-server-rounds": 2}, site, list(names))
    assert len(res["rounds"]) == 2
    for r in res["rounds"]:
        net = r["network"]
        assert set(net["per_site"]) == set(names.values())
        for s in names.values():
            train, evaluate = net["per_site"][s]["train"], net["per_site"][s]["evaluate"]
            # a training reply carries the weights, each array once: the model's bytes and a little more
            assert model_bytes <= train["received_bytes"] <= model_bytes + PER_ARRAY * len(keys) + PER_MESSAGE
            assert train["reply_records"] == {
                "arrays": {"count": len(keys), "model_keys": True},
                "metrics": ["num-examples", "train-loss"],
                "site": ["name"],
            }
            # an evaluation reply carries no weights: metrics and the name only
            assert evaluate["received_bytes"] < PER_MESSAGE
            assert evaluate["reply_records"] == {"metrics": ["dice", "loss", "num-examples"], "site": ["name"]}
        phases = [p for s in net["per_site"].values() for p in s.values()]
        assert net["sent_bytes"] == sum(p["sent_bytes"] for p in phases)
        assert net["received_bytes"] == sum(p["received_bytes"] for p in phases)
    # round 2's global model is the average of distinct noisy weights: every array travels, each instruction
    # (train and evaluate) is the model's bytes and a little more
    for s in names.values():
        for phase in ("train", "evaluate"):
            sent = res["rounds"][1]["network"]["per_site"][s][phase]["sent_bytes"]
            assert model_bytes <= sent <= model_bytes + PER_ARRAY * len(keys) + PER_MESSAGE


def test_a_reply_carrying_a_record_beyond_weights_metrics_and_the_name_is_rejected_and_listed(
    tmp_path, monkeypatch, task_identity
) -> None:
    from flwr.app import ConfigRecord

    names = {11: "site-01", 12: "site-02", 13: "site-03"}

    def site(r: int, kind: str, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if kind == MessageType.TRAIN:
            reply = train_reply(node, names[node], _learnt(msg, 0.01), {"num-examples": 10}, to=msg)
            if node == 12:
                reply.content["patient"] = ConfigRecord({"birth-date": "19700101"})
            return reply
        return eval_reply(node, names[node], {"dice": 0.5, "loss": 0.5, "num-examples": 5}, to=msg)

    res = _run(tmp_path, monkeypatch, {"num-server-rounds": 1}, site, list(names))
    (rejected,) = res["rounds"][0]["rejected"]
    assert rejected["site"] == "site-02" and rejected["phase"] == "train"
    assert "record 'patient'" in rejected["reason"] and "allowed: arrays, metrics, site" in rejected["reason"]
    assert sorted(res["rounds"][0]["train"]) == ["site-01", "site-03"]  # its weights are not averaged
    listed = res["rounds"][0]["network"]["per_site"]["site-02"]["train"]["reply_records"]
    assert listed["patient"] == ["birth-date"]  # the key is listed, never its value
    assert "19700101" not in (tmp_path / "run" / "results.json").read_text()


def test_the_summary_line_gives_the_mean_bytes_per_site_and_round_over_both_phases() -> None:
    from server.results import network_line

    def site(sent: int, received: int) -> dict:
        return {
            "train": {"sent_bytes": sent, "received_bytes": received},
            "evaluate": {"sent_bytes": sent, "received_bytes": 0},
        }

    rounds = [
        {"network": {"per_site": {"site-01": site(1_000_000, 1_000_000), "site-02": site(2_000_000, 3_000_000)}}},
        {"network": {"per_site": {"site-01": site(1_000_000, 1_000_000)}}},  # site-02 was not sampled
    ]
    # per site and round: sent (2 + 4 + 2) / 3 MB, received (1 + 3 + 1) / 3 MB
    line = network_line({"rounds": rounds})
    assert "mean of 3" in line and "sent 2.667 MB" in line and "received 1.667 MB" in line
