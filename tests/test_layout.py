"""The app's packages resolve to this repository, keep to their floors, and declare themselves as Flower expects."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.paths import REPO


@pytest.mark.parametrize("package", ["server", "client", "common", "simulations", "certs", "fedsite"])
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


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _imports_package(path: Path, package: str) -> bool:
    return any(name == package or name.startswith(package + ".") for name in _imported_modules(path))


def _modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def _lint_imports() -> subprocess.CompletedProcess[str]:
    """Run import-linter on this repository's pyproject.toml contracts (on this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", command, "--no-cache", "pyproject.toml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_floors_hold_common_at_the_bottom_client_and_server_on_common_alone() -> None:
    """The import-linter contracts in pyproject.toml (the floors) are all kept."""
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_finds_nothing_to_fix_or_reformat(command: list[str]) -> None:
    """``ruff check .`` and ``ruff format --check .`` pass with the pyproject.toml configuration."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_floor_contracts_cover_every_top_level_package() -> None:
    """A new top-level package cannot slip past the floors unchecked."""
    linter = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(linter["root_packages"]) == sorted(packages)
    checked = {m for c in linter["contracts"] if c["type"] == "forbidden" for m in c["source_modules"]}
    assert checked == {"common", "client", "server", "certs"}


#: Modules that talk to Flower: the handlers, the records conversion and the simulation runner.
FLOWER_FACING = {
    "common/records.py",
    "client/app.py",
    # deployment glue: hashes an app as Flower builds it, and wraps Flower's executor to run only approved apps
    "client/approval.py",
    "client/approved_exec.py",
    "simulations/runner.py",
    # wraps the real ClientApp and ServerApp for fault injection (simulation only)
    "simulations/faults.py",
}


PLAIN_MODULES = [
    name for p in _modules("common", "client", "simulations") if (name := str(p.relative_to(REPO))) not in FLOWER_FACING
]


@pytest.mark.parametrize("module", PLAIN_MODULES)
def test_training_data_and_model_code_do_not_import_flower(module: str) -> None:
    assert not _imports_package(REPO / module, "flwr")


#: The coordinator's tracking, and the artifact download both sides use (model.init, fedsite predict).
MLFLOW_MODULES = {Path("server/tracking.py"), Path("common/mlflow_artifacts.py")}


def test_only_the_tracking_and_artifact_modules_import_mlflow() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in _modules("server", "client", "common", "simulations", "certs", "fedsite")
        if _imports_package(p, "mlflow") and p.relative_to(REPO) not in MLFLOW_MODULES
    ]
    assert offenders == []
