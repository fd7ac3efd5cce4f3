"""A hospital site's side of a deployment: check the data folder, then run the SuperNode.

``fedsite site start`` first audits the data folder (:func:`client.audit.check_site`, the same check
as ``fedsite site check``) and refuses to start on a folder without a usable series, with the
check's reasons. It then runs Flower's ``flower-supernode`` with the federation's CA certificate
(to verify the SuperLink: TLS), the site's private key (to sign its requests: SuperNode
authentication) and the node config (``data-dir``, ``site-name``). Flower's SuperNode keeps
retrying while the SuperLink is down (no ``--max-retries`` unless given).

Nothing here imports Flower: the SuperNode runs as its own process.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import FedsiteError

__all__ = ["RUNTIME_PORT", "SiteSpec", "SiteStartError", "check_folder", "supernode_command", "supernode_env"]

#: The SuperNode's local Runtime API port (loopback only); two sites on one machine need two ports.
RUNTIME_PORT = 9094


class SiteStartError(FedsiteError):
    """The site cannot join: the message says why (never a patient value) and what to do."""


@dataclass(frozen=True)
class SiteSpec:
    """How to start a site's SuperNode.

    Attributes:
        superlink: ``HOST:PORT`` of the coordinator's SuperLink.
        data_dir: The site's data folder (checked first).
        ca: The federation's ``ca.pem`` (verifies the SuperLink's certificate).
        key: The site's private key (``NAME.key`` from ``fedsite certs site NAME``).
        name: The site's public name.
        state_dir: The SuperNode's own folder (Flower's home: installed apps); never the data folder.
        runtime_port: The SuperNode's loopback Runtime API port.
        max_retries: Give up after this many failed connection attempts (None: keep trying).
        insecure: No TLS and no authentication (only against ``fedsite server start --insecure``).
        approved: The site's approved-app list; when set the SuperNode runs with ``--isolation process``
            and :func:`executor_command` launches only approved apps (:mod:`client.approval`).
        extra: More ``flower-supernode`` arguments, passed as they are.
    """

    superlink: str
    data_dir: Path
    ca: Path | None
    key: Path | None
    name: str
    state_dir: Path
    runtime_port: int = RUNTIME_PORT
    max_retries: int | None = None
    insecure: bool = False
    approved: Path | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)


def check_folder(data_dir: Path, *, decode: bool = True) -> str:
    """Audit the site folder as ``fedsite site check`` does; returns the printed summary.

    Raises:
        SiteStartError: If the folder is missing or holds no usable series (with the check's reasons).
    """
    from client.audit import check_site, format_report

    if not Path(data_dir).is_dir():
        raise SiteStartError(
            f"{data_dir} is not a folder; give the site's data folder (the one holding dicom/ and labels/)"
        )
    report = check_site(Path(data_dir), decode=decode)
    summary = format_report(report)
    if report.series_usable == 0:
        reasons = (
            "; ".join(f"{g['reason']} ({g['files']} files)" for g in report.rejected_by_reason[:5]) or "no files found"
        )
        raise SiteStartError(
            f"the site folder has no usable series ({report.files_total} files): {reasons}. "
            "Fix these (see `fedsite site check DIR`) before joining the federation"
        )
    return summary


#: What Flower's SuperNode prints when the SuperLink refuses to activate it (key not enrolled, or the
#: site is still held as online after a crash).
ACTIVATION_REFUSED = "Failed to activate SuperNode"


def _exe(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise SiteStartError(f"`{name}` is not installed next to this Python; install fedsite's dependencies")
    return exe


def supernode_command(spec: SiteSpec) -> list[str]:
    """The ``flower-supernode`` command line for ``spec``.

    Raises:
        SiteStartError: If the CA certificate or the private key is missing (and not ``insecure``).
    """
    cmd = [_exe("flower-supernode"), "--superlink", spec.superlink]
    if spec.insecure:
        cmd += ["--insecure"]
    else:
        if spec.ca is None or not Path(spec.ca).is_file():
            raise SiteStartError(f"--ca {spec.ca} is not a file; ask the coordinator for the federation's ca.pem")
        if spec.key is None or not Path(spec.key).is_file():
            raise SiteStartError(
                f"--key {spec.key} is not a file; make the site's key pair with `fedsite certs site NAME` "
                "and send NAME.pub to the coordinator"
            )
        cmd += [
            "--root-certificates",
            str(Path(spec.ca).resolve()),
            "--auth-supernode-private-key",
            str(Path(spec.key).resolve()),
        ]
    data = str(Path(spec.data_dir).resolve()).replace("'", "")
    cmd += ["--node-config", f"data-dir='{data}' site-name='{spec.name}'", "--port", str(spec.runtime_port)]
    if spec.max_retries is not None:
        cmd += ["--max-retries", str(spec.max_retries)]
    if spec.approved is not None:
        cmd += ["--isolation", "process"]  # no executor of Flower's own: fedsite's checks the app first
    return [*cmd, *spec.extra]


def executor_command(spec: SiteSpec, parent_pid: int) -> list[str]:
    """The site's own executor next to a ``--isolation process`` SuperNode: approved apps only.

    It talks to the SuperNode's Runtime API on loopback (as Flower's own executor does) and stops
    when the SuperNode process ``parent_pid`` ends.

    Raises:
        SiteStartError: If ``spec`` has no approved list.
    """
    if spec.approved is None:
        raise SiteStartError("no approved-app list given (--approved FILE)")
    return [
        sys.executable,
        "-m",
        "client.approved_exec",
        "--insecure",
        "--runtime-api-address",
        f"127.0.0.1:{spec.runtime_port}",
        "--parent-pid",
        str(parent_pid),
        "--approved",
        str(Path(spec.approved).resolve()),
    ]


def supernode_env(spec: SiteSpec) -> dict[str, str]:
    """The SuperNode's environment: this process's, with Flower's home in the site's state folder."""
    home = Path(spec.state_dir).expanduser().resolve() / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FLWR_HOME": str(home)}
