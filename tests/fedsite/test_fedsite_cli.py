"""The ``fedsite`` front: one parser over the sides' commands, each command run by the side that registered it."""

from __future__ import annotations

import argparse
import sys
import types

import pytest

from common.config import StrategyConfig
from fedsite.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_of_the_fedsite_command_is_run_by_the_side_that_registered_it() -> None:
    parser, owner = build_parser()
    assert list(_subcommands(parser)) == [
        "simulate",
        "study",
        "data",
        "pretrain",
        "site",
        "predict",
        "server",
        "run",
        "certs",
    ]
    assert {c: m.__name__ for c, m in owner.items()} == {
        "simulate": "simulations.cli",
        "study": "simulations.cli",
        "data": "simulations.cli",
        "pretrain": "simulations.cli",
        "site": "client.cli",
        "predict": "client.predict_cli",
        "server": "server.cli",
        "run": "server.cli",
        "certs": "certs.cli",
    }


def test_a_side_is_added_by_naming_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new side (here a stand-in for the server's) needs only its name in the list; its run gets its arguments."""
    side = types.ModuleType("fake_server_cli")
    seen: list[argparse.Namespace] = []
    side.add_parser = lambda sub: sub.add_parser("server").add_argument("--port", type=int)  # type: ignore
    side.run = lambda args: seen.append(args) or 7  # type: ignore
    monkeypatch.setitem(sys.modules, "fake_server_cli", side)
    parser, owner = build_parser(["simulations.cli", "fake_server_cli"])
    args = parser.parse_args(["server", "--port", "9092"])
    assert owner[args.command].run(args) == 7 and seen[0].port == 9092


def test_simulate_offers_exactly_the_strategies_the_run_config_accepts() -> None:
    simulate = _subcommands(build_parser()[0])["simulate"]
    action = next(a for a in simulate._actions if a.dest == "strategy")
    declared = next(f for f in StrategyConfig.__dataclass_fields__.values() if f.name == "name").metadata["choices"]
    assert tuple(action.choices) == tuple(declared)


def test_data_synth_offers_exactly_the_generators_storage_and_modality_values() -> None:
    """The parser lists these literally (to stay light); they must match what the generator accepts."""
    from simulations.profiles import PHOTOMETRICS, SITE_MODALITIES, TRANSFER_SYNTAX_NAMES

    synth = _subcommands(_subcommands(build_parser()[0])["data"])["synth"]
    choices = {a.dest: a.choices for a in synth._actions if a.choices}
    assert set(choices["transfer_syntax"]) == set(TRANSFER_SYNTAX_NAMES)
    assert set(choices["photometric"]) == set(PHOTOMETRICS)
    assert set(choices["modality"]) == set(SITE_MODALITIES)


def test_a_config_error_is_one_line_naming_the_fix_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--sites", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsite: error: --sites 1 is fewer than strategy.min-sites = 2") and err.count("\n") == 1


def test_a_bad_run_config_pair_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--run-config", "train.lr"]) == 2
    assert "fedsite: error: --run-config expects key=value pairs, got 'train.lr'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site-sizes", "250,0"], "--site-sizes '250,0': every size must be at least 1 training slice"),
        (["--site-sizes", "many"], "--site-sizes 'many': give training slices per site"),
        (["--site-size", "0"], "--site-size: site size must be at least 1 training slice"),
    ],
)
def test_a_bad_privacy_study_size_is_refused_before_any_run(
    args: list[str], message: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    assert main(["study", "privacy", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was written, nothing ran
