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
from pathlib import Path

from common.config import ConfigError, RunConfig, flatten, parse_overrides, parse_run_config
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
    if getattr(args, "resume", None) is not None:
        return _resume_overrides(args)
    out: dict[str, object] = dict(parse_overrides(args.run_config))
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


#: ``fedsite run`` options that would change a resumed run's config (the checkpoint's is used as it is).
_RESUME_CONFLICTS = ("rounds", "local_epochs", "strategy", "seed", "out")


def _resume_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The whole run config of the run in ``--resume RUN_DIR``, set to continue from its checkpoint."""
    from server.checkpoint import CheckpointError, resume_config

    conflicting = [f"--{a.replace('_', '-')}" for a in _RESUME_CONFLICTS if getattr(args, a, None) is not None]
    if conflicting or args.run_config:
        given = ", ".join(conflicting + (["--run-config"] if args.run_config else []))
        raise ConfigError(f"--resume continues a run with its own config; drop {given}")
    try:
        flat, last = resume_config(args.resume)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    parse_run_config(flat)
    print(f"fedsite run: resuming {flat['output.dir']} after round {last}", flush=True)
    return flat


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
    text = res.stdout[res.stdout.find("{") :] if "{" in res.stdout else "{}"
    try:
        runs = json.loads(text).get("runs", [])
    except ValueError:
        runs = []
    return runs[0] if runs else {}


def _follow(home: Path, run_id: str, *, verbose: bool, poll_s: float = 5.0) -> dict:
    """Print the run's log (filtered) until the run has finished; returns its final status."""
    import threading

    proc = subprocess.Popen(
        [*flwr_command(), "log", run_id, CONNECTION, "--stream"],
        env={**os.environ, "FLWR_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if keep_line(line, verbose=verbose) and (line.strip() or verbose) and "Starting logstream" not in line:
                print(line, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while True:
            status = _run_status(home, run_id)
            if str(status.get("status", "")).startswith("finished"):
                break
            time.sleep(poll_s)
        reader.join(timeout=30)  # the last lines (the per-site table) arrive after the status changes
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return status


def submit(args: argparse.Namespace, home: Path) -> int:
    """Submit the run, follow its progress, and return 0 when it finished successfully."""
    try:
        overrides = run_config_overrides(args)
    except ConfigError as exc:
        raise DeployError(str(exc)) from None
    app = Path(args.app).resolve() if args.app else app_folder()
    cmd = ["run", str(app), CONNECTION, "--format", "json"]
    if overrides:
        cmd += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())]
    started = time.perf_counter()
    res = flwr(cmd, home, timeout=600, cwd=app)
    text = res.stdout[res.stdout.find("{") :] if "{" in res.stdout else ""
    try:
        run_id = json.loads(text).get("run-id") if text else None
    except ValueError:
        run_id = None
    if res.returncode != 0 or not run_id:
        reason = (res.stdout + res.stderr).strip()[-800:]
        raise DeployError(f"the SuperLink did not accept the run: {reason}")
    print(f"fedsite run: run {run_id} submitted to {args.superlink}", flush=True)
    status = _follow(home, str(run_id), verbose=args.verbose)
    state = status.get("status", "unknown")
    print(f"fedsite run: run {run_id} {state} in {time.perf_counter() - started:.1f}s", flush=True)
    traffic = status.get("network-traffic")
    if traffic:
        print(
            f"fedsite run: network traffic (Flower's count for the run): inbound {traffic.get('inbound-bytes', 0)} B, "
            f"outbound {traffic.get('outbound-bytes', 0)} B",
            flush=True,
        )
        results = Path(str(overrides.get("output.dir", ""))) / "results.json"
        if overrides.get("output.dir") and results.is_file():  # the coordinator's own run: keep it with the results
            data = json.loads(results.read_text())
            data["network"] = {"source": "flwr ls network-traffic (whole run)", **traffic}
            results.write_text(json.dumps(data, indent=2) + "\n")
    if state != "finished:completed":
        print(f"fedsite run: {status.get('status-details') or 'see the SuperLink log'}", file=sys.stderr)
        return 1
    return 0
