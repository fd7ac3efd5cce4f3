"""``fedsite run``: submit the app to a deployed SuperLink and follow it like a simulation.

``flwr run APP fedsite --stream`` prints the ServerApp's log. fedsite keeps its own lines (per-round
progress, the per-site table) and drops Flower's INFO chatter and the HTTP client's request lines
unless ``--verbose``; warnings and errors always pass. The results (``results.json``, the MLflow
store) are written by the ServerApp into ``output.dir`` on the coordinator.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from common.config import ConfigError, RunConfig, flatten, parse_run_config
from server.deploy import CONNECTION, DeployError, flwr, flwr_command

__all__ = ["app_folder", "keep_line", "run_config_overrides", "submit"]

# Flower's console format: a coloured level name, then ':' and spaces ("\x1b[92mINFO \x1b[0m:      ...").
_FLWR_LEVEL = re.compile(r"^(?:\x1b\[\d+m)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*(?:\x1b\[0m)?\s*:")
_CHATTER = ("HTTP Request:", "Using SuperLink:")


def app_folder() -> Path:
    """fedsite's own source folder (the Flower app: the one holding ``pyproject.toml``).

    Raises:
        DeployError: If fedsite was installed without its source folder.
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise DeployError(f"no pyproject.toml in {root}; give --app with fedsite's source folder")
    return root


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def run_config_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The run-config keys ``fedsite run`` sets: named options and ``--run-config``, checked.

    Raises:
        ConfigError: If a key is unknown or a value invalid (named like ``fedsite simulate`` does).
    """
    out: dict[str, object] = {}
    for item in args.run_config:
        for part in item.split():
            if "=" not in part:
                raise ConfigError(f"--run-config expects key=value pairs, got {part!r}")
            key, value = part.split("=", 1)
            try:
                out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                out[key.strip()] = value
    named = {
        "num-server-rounds": args.rounds,
        "train.local-epochs": args.local_epochs,
        "strategy.name": args.strategy,
        "seed": args.seed,
        "output.dir": str(Path(args.out).expanduser().resolve()) if args.out else None,
    }
    out.update({k: v for k, v in named.items() if v is not None})
    flat = flatten(RunConfig())
    flat.update(out)
    parse_run_config(flat)  # fails here, before anything is submitted
    return out


def keep_line(line: str, *, verbose: bool) -> bool:
    """Whether ``fedsite run`` shows a line of ``flwr run --stream`` output."""
    if verbose:
        return True
    if any(c in line for c in _CHATTER):
        return False
    m = _FLWR_LEVEL.match(line)
    if m:
        return m.group(1) in ("WARNING", "ERROR", "CRITICAL")
    return True


def _run_status(home: Path, run_id: str) -> dict:
    res = flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], home, timeout=60)
    text = res.stdout[res.stdout.find("{"):] if "{" in res.stdout else "{}"
    try:
        runs = json.loads(text).get("runs", [])
    except ValueError:
        runs = []
    return runs[0] if runs else {}


def submit(args: argparse.Namespace, home: Path) -> int:
    """Submit the run, stream its progress, and return 0 when it finished successfully."""
    try:
        overrides = run_config_overrides(args)
    except ConfigError as exc:
        raise DeployError(str(exc)) from None
    app = Path(args.app).resolve() if args.app else app_folder()
    cmd = ["run", str(app), CONNECTION, "--stream"]
    if overrides:
        cmd += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*flwr_command(), *cmd], env={**os.environ, "FLWR_HOME": str(home)}, cwd=app,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    run_id = None
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        m = re.search(r"Successfully started run (\d+)", line)
        if m:
            run_id = m.group(1)
            print(f"fedsite run: run {run_id} submitted to {args.superlink}", flush=True)
            continue
        if not keep_line(line, verbose=args.verbose) or (not line.strip() and not args.verbose):
            continue
        print(line, flush=True)
    code = proc.wait()
    elapsed = time.perf_counter() - started
    if run_id is None:
        print(f"fedsite run: the SuperLink did not accept the run (flwr exit code {code})", file=sys.stderr)
        return code or 1
    status = _run_status(home, run_id)
    state = status.get("status", "unknown")
    print(f"fedsite run: run {run_id} {state} in {elapsed:.1f}s", flush=True)
    if state != "finished:completed":
        detail = status.get("status-details", "")
        print(f"fedsite run: {detail or 'see the SuperLink log'}", file=sys.stderr)
        return 1
    return 0
