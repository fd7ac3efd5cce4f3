"""Checkpoint, resume, quorum and deadline: a whole federation on a FakeGrid of deterministic sites.

The sites here answer from the round number and the global model alone (no training, no Flower
runtime), so the server is the only thing that can make an interrupted run differ from an
uninterrupted one: its strategy state (FedAdam moments), its random state (central-DP noise), the
per-site records and the round it continues from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Error, Message, MessageType
from flwr.common.constant import SUPERLINK_NODE_ID

from common.config import parse_run_config
from server.app import run_federation
from server.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from server.recording import StopFederation
from tests.flower_helpers import FakeGrid, eval_reply, train_reply

NODES = {11: "site-01", 12: "site-02", 13: "site-03"}


class Killed(RuntimeError):
    pass


class Sites:
    """Deterministic sites: a training reply moves the model by a site- and round-seeded step.

    Args:
        fail: ``{(site, round): "error" | "late" | "unavailable" | "x1000"}`` for a training instruction.
    """

    def __init__(self, fail: dict[tuple[str, int], str] | None = None) -> None:
        self.fail = fail or {}
        self.train_rounds: list[int] = []

    def __call__(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        site = NODES[node]
        rnd = int(msg.content["config"]["server-round"])
        arrays = msg.content["arrays"]
        if msg.metadata.message_type == MessageType.EVALUATE:
            w = np.concatenate([v.numpy().ravel() for v in arrays.values()])
            dice = float(1.0 / (1.0 + np.abs(w).mean()))
            return eval_reply(
                node, site, {"dice": dice, "loss": 1 - dice, "num-examples": 10, "uniform-weight": 1.0}, to=msg
            )
        self.train_rounds.append(rnd)
        what = self.fail.get((site, rnd))
        if what == "late":
            return None
        if what == "error":
            return Message(error=Error(code=0, reason="site handler raised"), reply_to=msg)
        if what == "unavailable":  # the SuperLink answers for a node whose heartbeat stopped (a crash)
            reply = Message(error=Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            return reply
        rng = np.random.default_rng([node, rnd])
        scale = 1000.0 if what == "x1000" else 1.0
        weights = {
            k: (scale * (v.numpy() + 0.01 * rng.standard_normal(v.numpy().shape))).astype(v.numpy().dtype)
            for k, v in arrays.items()
        }
        return train_reply(
            node, site, weights, {"num-examples": 10 + node, "train-loss": 0.5, "uniform-weight": 1.0}, to=msg
        )


def _cfg(out: Path, **extra: object):
    raw = {
        "num-server-rounds": 4,
        "model.channels": "4,8",
        "data.image-size": 32,
        "output.dir": str(out),
        "output.tracking-uri": "file:///nonexistent-dir-for-tests/mlruns",
        **extra,
    }
    return parse_run_config(raw)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_model.pt")


def _kill_after(n: int):
    def after_round(server_round: int, arrays) -> None:
        if server_round == n:
            raise Killed(f"killed after round {n}")

    return after_round


#: Server state the checkpoint must carry: FedAdam's moments; central DP's releases and its noise (NumPy's
#: global RNG). Central DP runs with FedAvg only (a server optimizer would work on un-noised updates).
SERVER_STATE = {
    "fedadam": {"strategy.name": "fedadam"},
    "central-dp": {"privacy.central-dp": True, "privacy.central-noise": 0.8},
}


@pytest.mark.parametrize("state", list(SERVER_STATE))
def test_a_run_killed_after_round_2_and_resumed_ends_exactly_like_an_uninterrupted_one(
    state: str, tmp_path: Path, task_identity: None
) -> None:
    settings = SERVER_STATE[state]
    # Tolerance: exact. Same inputs, same CPU NumPy operations, same random states -> bit-identical floats.
    whole = run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(tmp_path / "a", **settings))
    cut = tmp_path / "b"
    with pytest.raises(Killed):
        run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(cut, **settings), after_round=_kill_after(2))
    assert load_checkpoint(cut).round == 2
    sites = Sites()
    resumed = run_federation(FakeGrid(list(NODES), answer=sites), _cfg(cut, **settings, **{"output.resume": True}))
    assert sorted(set(sites.train_rounds)) == [3, 4]  # rounds 1 and 2 are not run again
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert resumed["final"]["per_site"] == whole["final"]["per_site"]
    assert resumed["final"].get("central_privacy") == whole["final"].get("central_privacy")
    a, b = _final(tmp_path / "a"), _final(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("state", list(SERVER_STATE))
def test_without_the_checkpointed_server_state_the_resumed_run_would_differ(
    state: str, tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = SERVER_STATE[state]
    # The control for the test above: resume with the strategy state and RNG not restored -> different model.
    import server.app

    whole = tmp_path / "a"
    run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(whole, **settings))
    cut = tmp_path / "b"
    with pytest.raises(Killed):
        run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(cut, **settings), after_round=_kill_after(2))
    monkeypatch.setattr(server.app, "restore_strategy", lambda *a: None)
    monkeypatch.setattr(server.app, "restore_rng", lambda *a: None)
    run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(cut, **settings, **{"output.resume": True}))
    a, b = _final(whole), _final(cut)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_whole(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.checkpoint

    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(out), after_round=_kill_after(1))
    real_savez = np.savez

    def dying_savez(fh, **arrays):
        real_savez(fh, **arrays)
        fh.truncate(100)  # half a file on disk
        raise OSError("disk full")

    monkeypatch.setattr(server.checkpoint.np, "savez", dying_savez)
    with pytest.raises(OSError, match="disk full"):
        run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(out, **{"output.resume": True}))
    assert load_checkpoint(out).round == 1
    assert [p.name for p in out.iterdir() if p.name.startswith(f".{CHECKPOINT_FILE}")] == []


def test_resuming_with_another_config_is_refused_naming_the_key(tmp_path: Path, task_identity: None) -> None:
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(out), after_round=_kill_after(1))
    with pytest.raises(CheckpointError, match=r"train.lr = 0.003 \(now 0.01\)"):
        run_federation(FakeGrid(list(NODES), answer=Sites()), _cfg(out, **{"output.resume": True, "train.lr": 0.01}))


def test_a_late_site_is_recorded_missing_and_the_round_goes_on_with_the_quorum(
    tmp_path: Path, task_identity: None
) -> None:
    sites = Sites({("site-02", 2): "late", ("site-03", 3): "error"})
    res = run_federation(FakeGrid(list(NODES), answer=sites), _cfg(tmp_path, **{"strategy.round-timeout": 5.0}))
    r2, r3 = res["rounds"][1], res["rounds"][2]
    (late,) = r2["missing"]
    assert late["site"] == "site-02" and "no reply within the round deadline (5 s" in late["reason"]
    assert sorted(r2["train"]) == ["site-01", "site-03"] and not r2.get("skipped")
    (failed,) = r3["missing"]
    assert failed["site"] == "site-03" and "site reported an error" in failed["reason"]
    assert res["rounds"][0]["missing"] == [] and len(res["rounds"]) == 4


def test_a_site_that_crashed_before_it_ever_answered_is_named_in_the_rounds_it_missed_once_it_rejoins(
    tmp_path: Path, task_identity: None
) -> None:
    # site-03 dies in round 1's training before any reply told the server which node it is
    sites = Sites({("site-03", 1): "late"})
    res = run_federation(FakeGrid(list(NODES), answer=sites), _cfg(tmp_path, **{"strategy.round-timeout": 5.0}))
    (late,) = res["rounds"][0]["missing"]
    assert late["site"] == "site-03" and late["phase"] == "train"
    assert "node-13" not in json.dumps(res["rounds"])
    assert sorted(res["rounds"][1]["train"]) == ["site-01", "site-02", "site-03"]


def test_a_crashed_site_the_superlink_reports_unavailable_is_recorded_missing_under_its_name(
    tmp_path: Path, task_identity: None
) -> None:
    sites = Sites({("site-02", 1): "unavailable"})
    res = run_federation(FakeGrid(list(NODES), answer=sites), _cfg(tmp_path))
    r1 = res["rounds"][0]  # before site-02 ever answered: named once it does, in round 1's evaluation
    (gone,) = r1["missing"]
    assert gone["site"] == "site-02" and "Node Unavailable" in gone["reason"]
    assert [r["site"] for r in r1["rejected"]] == ["site-02"]
    assert sorted(r1["train"]) == ["site-01", "site-03"]


def test_a_round_below_quorum_is_retried_once_and_goes_on_if_the_sites_come_back(
    tmp_path: Path, task_identity: None
) -> None:
    # round 2's first attempt: two of three sites fail; the retry is a new instruction, answered by all
    class Flaky(Sites):
        def __call__(self, msg):
            site, rnd = NODES[msg.metadata.dst_node_id], int(msg.content["config"]["server-round"])
            first_try = self.train_rounds.count(2) < 3
            self.fail = {(s, 2): "error" for s in ("site-01", "site-02")} if first_try and rnd == 2 else {}
            del site
            return super().__call__(msg)

    res = run_federation(FakeGrid(list(NODES), answer=Flaky()), _cfg(tmp_path, **{"strategy.min-sites": 2}))
    r2 = res["rounds"][1]
    assert "1 sites answered in time, strategy.min-sites = 2 needed" in r2["retried"]
    assert sorted(r2["train"]) == ["site-01", "site-02", "site-03"] and len(res["rounds"]) == 4
    # both attempts' instructions crossed the network: round 2 sent each site twice round 3's training bytes
    sent = [r["network"]["per_site"]["site-01"]["train"]["sent_bytes"] for r in res["rounds"]]
    assert sent[1] == 2 * sent[2]


def test_a_round_below_quorum_twice_stops_the_run_with_a_resumable_checkpoint(
    tmp_path: Path, task_identity: None
) -> None:
    down = {(s, r): "error" for s in ("site-02", "site-03") for r in (3, 4)}
    res = run_federation(FakeGrid(list(NODES), answer=Sites(down)), _cfg(tmp_path, **{"strategy.min-sites": 2}))
    assert res["stopped"]["round"] == 3 and "quorum lost twice" in res["stopped"]["reason"]
    assert "stopped after round 2" in res["stopped"]["reason"]
    assert load_checkpoint(tmp_path).round == 2
    # the sites are back: the resumed run finishes rounds 3 and 4
    sites = Sites()
    resumed = run_federation(FakeGrid(list(NODES), answer=sites), _cfg(tmp_path, **{"output.resume": True}))
    assert sorted(set(sites.train_rounds)) == [3, 4] and "stopped" not in resumed
    assert sorted(resumed["rounds"][2]["train"]) == ["site-01", "site-02", "site-03"]


def test_site_sampling_with_fraction_train_below_1_is_seeded(tmp_path: Path, task_identity: None) -> None:
    def sampled(seed: int, name: str) -> list[list[str]]:
        cfg = _cfg(tmp_path / name, seed=seed, **{"strategy.fraction-train": 0.5, "strategy.min-sites": 1})
        res = run_federation(FakeGrid(list(NODES), answer=Sites()), cfg)
        return [sorted(r["train"]) for r in res["rounds"]]

    first = sampled(1, "a")
    assert sampled(1, "b") == first
    assert any(sampled(s, f"s{s}") != first for s in (2, 3, 4))


def test_stop_federation_is_what_a_lost_quorum_raises_inside_the_strategy(task_identity: None) -> None:
    # the recording strategy alone (no run_federation): the second failed attempt raises StopFederation
    from flwr.app import Array, ArrayRecord

    from server.strategies import make_strategy

    s = make_strategy(parse_run_config({"strategy.min-sites": 3}))
    grid = FakeGrid(list(NODES), answer=Sites({("site-01", 1): "late"}))
    with pytest.raises(StopFederation, match="quorum lost twice"):
        s.start(grid, ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}), num_rounds=1, timeout=0.1)
