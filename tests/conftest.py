"""Shared fixtures: small simulated sites written once per test session, Flower message helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

SMALL = dict(sites=3, seed=7, patients=4, slices=6)


@pytest.fixture(scope="session")
def small_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small simulated sites (4 patients x 6 slices each), shared by the session."""
    from simulations.synth import write_sites

    root = tmp_path_factory.mktemp("sites")
    write_sites(root, **SMALL)
    return root


@pytest.fixture()
def task_identity() -> None:
    """Flower messages need a task identity; the runtime sets it, a unit test sets it by hand."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
