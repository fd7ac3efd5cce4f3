"""The coordinator's side of a deployment: the SuperLink, its enrolled sites, and submitting runs.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI) and the Runtime API
(the ServerApp) on one ``--host/--port`` over HTTPS. This module builds the ``flower-superlink``
command (TLS and SuperNode authentication on, state in a database, no run-time dependency
installation, logs to a file) and drives Flower's own ``flwr`` CLI for the Control API through a
private ``$FLWR_HOME/config.toml`` holding one connection named :data:`CONNECTION`.

Nothing here imports Flower: it runs Flower's commands as processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import FedsiteError

__all__ = [
    "CONNECTION",
    "DEFAULT_PORT",
    "INSECURE_WARNING",
    "DeployError",
    "SuperLinkSpec",
    "flwr",
    "flwr_command",
    "flwr_home",
    "list_sites",
    "register_site",
    "superlink_command",
    "unregister_site",
    "write_connection",
]

#: The name of the SuperLink connection fedsite writes into ``$FLWR_HOME/config.toml``.
CONNECTION = "fedsite"
#: Flower 1.41's SuperLink port (Fleet, Control and Runtime APIs); the one port to open to the sites.
DEFAULT_PORT = 8000

INSECURE_WARNING = (
    "WARNING: --insecure starts the SuperLink without TLS and without SuperNode authentication. "
    "Model weights, metrics and site names then cross the network in clear text, anyone on the "
    "network can read or alter them, and any machine that reaches this port can join the federation "
    "as a site. Use it only on a closed test machine, never with hospital data."
)


class DeployError(FedsiteError):
    """A deployment step cannot run; the message names the file or value and the fix."""


@dataclass(frozen=True)
class SuperLinkSpec:
    """How to start the SuperLink.

    Attributes:
        certfile: The SuperLink's TLS certificate (``fedsite certs server``).
        keyfile: Its private key.
        cafile: The federation CA's certificate (``ca.pem``).
        database: The state file (registered sites, runs) kept across restarts.
        log_file: Where the SuperLink writes its log.
        host: The address to listen on (``0.0.0.0``: every interface).
        port: The one port sites and the ``flwr`` CLI connect to.
        insecure: No TLS and no SuperNode authentication (tests on one machine only).
        extra: More ``flower-superlink`` arguments, passed as they are.
    """

    certfile: Path | None
    keyfile: Path | None
    cafile: Path | None
    database: Path
    log_file: Path
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    insecure: bool = False
    extra: tuple[str, ...] = field(default_factory=tuple)


def _launcher(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """The ``flower-superlink`` command line for ``spec``.

    Raises:
        DeployError: If TLS files are missing and ``insecure`` is not set.
    """
    cmd = _launcher("server.superlink_main")
    if spec.insecure:
        cmd += ["--insecure"]
    else:
        missing = [
            f"{flag} {path}" if path else flag
            for flag, path in (("--cert", spec.certfile), ("--key", spec.keyfile), ("--ca", spec.cafile))
            if path is None or not Path(path).is_file()
        ]
        if missing:
            raise DeployError(
                f"TLS files missing: {', '.join(missing)}. Create them with `fedsite certs init` and "
                "`fedsite certs server --host NAME_OR_IP`, or give --certs-dir; the SuperLink does not start "
                "without TLS and SuperNode authentication (--insecure exists for a closed test machine only)"
            )
        cmd += [
            "--ssl-certfile",
            str(Path(spec.certfile).resolve()),  # type: ignore[arg-type]
            "--ssl-keyfile",
            str(Path(spec.keyfile).resolve()),  # type: ignore[arg-type]
            "--ssl-ca-certfile",
            str(Path(spec.cafile).resolve()),  # type: ignore[arg-type]
            "--enable-supernode-auth",
        ]
    cmd += [
        "--database",
        str(Path(spec.database).resolve()),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(Path(spec.log_file).resolve()),
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        *spec.extra,
    ]
    return cmd


def flwr_home(state_dir: Path) -> Path:
    """The private ``$FLWR_HOME`` fedsite uses for the ``flwr`` CLI (connections, installed apps)."""
    return Path(state_dir).expanduser().resolve() / "flwr-home"


def write_connection(home: Path, superlink: str, *, ca: Path | None, insecure: bool = False) -> Path:
    """Write ``home/config.toml`` with the connection :data:`CONNECTION` to ``superlink``.

    Args:
        home: The ``$FLWR_HOME`` folder.
        superlink: ``HOST:PORT`` of the SuperLink (the Control API shares its port).
        ca: The federation CA's certificate; the ``flwr`` CLI verifies the SuperLink with it.
        insecure: Plain HTTP (only against a SuperLink started with ``--insecure``).

    Returns:
        The path of ``config.toml``.

    Raises:
        DeployError: If ``ca`` is missing while ``insecure`` is False.
    """
    if not insecure and (ca is None or not Path(ca).is_file()):
        raise DeployError(f"--ca {ca} is not a file; give the federation's ca.pem (from `fedsite certs init`)")
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{superlink}"']
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(ca).resolve()}"')  # type: ignore[arg-type]
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flwr_command() -> list[str]:
    """The ``flwr`` executable next to this Python, as a command prefix."""
    exe = shutil.which("flwr", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise DeployError("the `flwr` command is not installed next to this Python; install fedsite's dependencies")
    return [exe]


def flwr(
    args: list[str], home: Path, *, timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run Flower's ``flwr`` CLI with ``$FLWR_HOME`` = ``home``; returns the finished process."""
    env = {**os.environ, "FLWR_HOME": str(home)}
    return subprocess.run(
        [*flwr_command(), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def _json_out(res: subprocess.CompletedProcess, what: str) -> dict:
    """Parse ``flwr ... --format json`` output; raise a readable error when the command failed."""
    text = res.stdout.strip()
    start = text.find("{")
    data: dict = {}
    if start >= 0:
        try:
            data = json.loads(text[start:])
        except ValueError:
            data = {}
    if res.returncode != 0 or not data.get("success", False):
        reason = data.get("error-message") or (res.stderr.strip() or text)[-600:]
        raise DeployError(f"{what} failed: {reason}")
    return data


def register_site(pubkey: Path, home: Path, *, name: str | None = None) -> int:
    """Register a site's public key with the SuperLink (``flwr supernode register``).

    Returns:
        The node id Flower assigned.

    Raises:
        DeployError: If the key is not an OpenSSH NIST EC public key, or the SuperLink refuses.
    """
    if not Path(pubkey).is_file():
        raise DeployError(
            f"{pubkey} is not a file; give the site's public key (NAME.pub from `fedsite certs site NAME`)"
        )
    args = ["supernode", "register", str(Path(pubkey).resolve()), CONNECTION, "--format", "json"]
    if name:
        args += ["--name", name]
    return int(_json_out(flwr(args, home), f"registering {Path(pubkey).name}")["node-id"])


def unregister_site(node_id: int, home: Path) -> None:
    """Unregister a site by node id (``flwr supernode unregister``); its key can no longer connect.

    Raises:
        DeployError: If the SuperLink refuses (e.g. an unknown node id).
    """
    _json_out(
        flwr(["supernode", "unregister", str(int(node_id)), CONNECTION, "--format", "json"], home),
        f"removing {node_id}",
    )


def list_sites(home: Path) -> list[dict]:
    """The SuperLink's registered sites (``flwr supernode list``): node id, status, times.

    Raises:
        DeployError: If the SuperLink cannot be reached.
    """
    return list(_json_out(flwr(["supernode", "list", CONNECTION, "--format", "json"], home), "listing sites")["nodes"])
