"""The run config is parsed once into typed objects; bad keys and values fail with a clear message."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from common.config import ConfigError, default_flat_config, flatten, parse_run_config
from tests.paths import REPO


def test_pyproject_config_equals_the_parsers_defaults() -> None:
    """Every tunable lives in [tool.flwr.app.config] and the two never drift apart."""
    from flwr.common.config import flatten_dict

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    table = flatten_dict(data["tool"]["flwr"]["app"]["config"])
    assert table == default_flat_config()
    assert flatten(parse_run_config(table)) == table


def test_values_are_typed_and_grouped() -> None:
    cfg = parse_run_config({"train.local-epochs": 5, "strategy.name": "fedprox", "train.lr": 1})
    assert cfg.train.local_epochs == 5
    assert cfg.strategy.name == "fedprox"
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


def test_unknown_key_names_the_key_and_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train.local-epoch'.*'train.local-epochs'"):
        parse_run_config({"train.local-epoch": 2})


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("strategy.name", "fedsgd", r"'strategy.name' = 'fedsgd' is not allowed; choose one of 'fedavg', 'fedprox'"),
        ("train.local-epochs", 0, r"'train.local-epochs' = 0 is out of range; it must be >= 1"),
        ("train.local-epochs", 1.5, r"'train.local-epochs' = 1.5: expected a whole number"),
        ("train.lr", "fast", r"'train.lr' = 'fast': expected a number"),
        ("data.val-fraction", 0.0, r"'data.val-fraction' = 0.0 is out of range; it must be > 0.0"),
        ("model.channels", "16,x", r"'model.channels' = '16,x': expected comma-separated whole numbers"),
        ("data.image-size", 60, r"'data.image-size' = 60: must be divisible by 8"),
    ],
)
def test_invalid_value_names_key_value_and_what_is_allowed(key: str, value: object, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_run_config({key: value})


def test_config_objects_are_frozen() -> None:
    cfg = parse_run_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 0.1  # type: ignore[misc]


def test_a_deployed_classification_config_needs_no_generator_key() -> None:
    """Sites that bring their own labels.csv: no sim.* key is needed (nor read) to start a classification run."""
    cfg = parse_run_config({"task.name": "classification", "data.image-size": 32})
    assert cfg.task.name == "classification" and cfg.sim.source == "" and cfg.sim.root == ""


def test_generator_keys_live_under_sim_and_site_keys_under_data() -> None:
    """The site reads data.* and task.*; only the simulation reads sim.* (old data.* generator keys are unknown)."""
    from dataclasses import fields

    from common.config import DataConfig, SimConfig

    generator = {"root", "patients", "slices", "synth_patients", "synth_slices", "source", "modality"}
    assert not generator & {f.name for f in fields(DataConfig)}
    assert {"root", "patients", "slices", "source", "modality", "label_skew", "quantity_skew"} <= {
        f.name for f in fields(SimConfig)
    }
    for old in ("data.root", "data.source", "data.synth-patients", "data.modality"):
        with pytest.raises(ConfigError, match="unknown config key"):
            parse_run_config({old: 1})
