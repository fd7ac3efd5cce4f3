"""The app's packages resolve to this repository and the app declares itself as Flower expects."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", ["server", "client", "common", "simulations", "certs"])
def test_top_level_package_resolves_to_this_repository(package: str) -> None:
    """Nothing else on sys.path shadows the app's generic package names."""
    mod = importlib.import_module(package)
    assert Path(mod.__file__).resolve().parent == REPO / package


def test_pyproject_names_the_flower_components() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    comps = data["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from client.app import app as client_app
    from server.app import app as server_app

    assert isinstance(client_app, ClientApp) and isinstance(server_app, ServerApp)


def _imports(package: str) -> set[str]:
    names: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith("import ") or s.startswith("from "):
                names.add(s.split()[1].split(".")[0])
    return names


def test_client_and_server_never_import_each_other() -> None:
    assert "server" not in _imports("client")
    assert "client" not in _imports("server")


@pytest.mark.parametrize(
    "module",
    [
        "common/task.py",
        "common/model.py",
        "common/config.py",
        "client/dataset.py",
        "client/dicom.py",
        "simulations/synth.py",
        "simulations/profiles.py",
    ],
)
def test_training_data_and_model_code_do_not_import_flower(module: str) -> None:
    text = (REPO / module).read_text()
    assert "import flwr" not in text and "from flwr" not in text


def test_only_the_tracking_module_imports_mlflow() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for pkg in ("server", "client", "common", "simulations")
        for p in (REPO / pkg).rglob("*.py")
        if ("import mlflow" in p.read_text() or "from mlflow" in p.read_text()) and p.name != "tracking.py"
    ]
    assert offenders == []
