"""Fault injection specs and corrupted replies (no Flower runtime), and the --fault/--resume command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError
from fedsite.cli import main
from server.recording import check_reply
from simulations.faults import Fault, corrupt_reply, parse_fault
from tests.flower_helpers import train_reply


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("site-02:nan@3", Fault("site-02", "nan", 3)),
        ("site-01:x1000", Fault("site-01", "x1000", 0)),
        ("server:kill@2", Fault("server", "kill", 2)),
    ],
)
def test_fault_specs_name_who_what_and_when(spec: str, fault: Fault) -> None:
    assert parse_fault(spec) == fault


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("site-02:melt@3", "unknown kind 'melt'"),
        ("site-02", "expected WHO:KIND[@ROUND]"),
        ("server:kill", "server:kill@ROUND"),
        ("server:nan@2", "server:kill@ROUND"),
    ],
)
def test_a_bad_fault_spec_says_what_is_allowed(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_fault(spec)


def test_a_fault_without_a_round_hits_every_round_with_one_only_that_round() -> None:
    assert Fault("site-02", "nan").applies("site-02", 7)
    assert Fault("site-02", "nan", 3).applies("site-02", 3) and not Fault("site-02", "nan", 3).applies("site-02", 4)
    assert not Fault("site-02", "nan").applies("site-01", 3)


GLOBAL = {"a": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _reply():
    weights = {"a": np.ones((2, 2), dtype=np.float32), "b": np.full(3, 2.0, dtype=np.float32)}
    return train_reply(11, "site-02", weights, {"num-examples": 5})


def test_x1000_scales_every_weight_and_passes_the_shape_and_finiteness_checks(task_identity: None) -> None:
    reply = corrupt_reply(_reply(), "x1000")
    assert np.all(reply.content["arrays"]["a"].numpy() == 1000.0)
    assert np.all(reply.content["arrays"]["b"].numpy() == 2000.0)
    assert check_reply(reply, is_train=True, seen=set(), global_ref=GLOBAL)[1] is None


@pytest.mark.parametrize(("kind", "reason"), [("nan", "NaN"), ("arch", "do not match the global model")])
def test_nan_and_another_architecture_are_caught_by_the_reply_checks(task_identity: None, kind, reason) -> None:
    reply = corrupt_reply(_reply(), kind)
    site, why = check_reply(reply, is_train=True, seen=set(), global_ref=GLOBAL)
    assert site == "site-02" and reason in why


def test_resume_refuses_options_that_would_change_the_run(tmp_path: Path, capsys) -> None:
    assert main(["simulate", "--resume", str(tmp_path), "--rounds", "5"]) == 2
    assert "--resume continues a run with its own config; drop --rounds" in capsys.readouterr().err


def test_resume_without_a_checkpoint_says_there_is_none(tmp_path: Path, capsys) -> None:
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "start it again without resuming" in err


def test_a_bad_fault_option_stops_before_any_site_is_written(tmp_path: Path, capsys) -> None:
    code = main(["simulate", "--out", str(tmp_path / "r"), "--data-root", str(tmp_path / "s"), "--fault", "x"])
    assert code == 2 and "expected WHO:KIND[@ROUND]" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
