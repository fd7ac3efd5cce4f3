"""``fedsite server ...`` and ``fedsite run``: the coordinator's commands of a deployment.

* ``fedsite server start``        the SuperLink: TLS and SuperNode authentication on, state kept, log to a file
* ``fedsite server add-site PUB``  enroll a site by its public key (``flwr supernode register``)
* ``fedsite server remove-site NAME_OR_ID``  unenroll it; its key can no longer connect
* ``fedsite server sites``        the enrolled sites and whether they are online
* ``fedsite run``                 submit the app to the SuperLink and show progress like a simulation

The logic lives in :mod:`server.deploy` and :mod:`server.submit`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common.locations import certs_dir, state_dir

__all__ = ["add_parser", "run"]

_LINK_DEFAULT = "127.0.0.1:8000"


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--superlink", default=_LINK_DEFAULT, metavar="HOST:PORT", help=f"the SuperLink (default {_LINK_DEFAULT})"
    )
    p.add_argument("--ca", type=Path, default=None, help=f"the federation's ca.pem (default {certs_dir() / 'ca.pem'})")
    p.add_argument("--state-dir", type=Path, default=None, help=f"coordinator state folder (default {state_dir()})")
    p.add_argument(
        "--insecure", action="store_true", help="plain HTTP, only against a SuperLink started with --insecure"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsite server`` and ``fedsite run`` on the ``fedsite`` parser's subparsers."""
    server = subparsers.add_parser("server", help="the coordinator's SuperLink and its enrolled sites")
    sub = server.add_subparsers(dest="server_command", required=True)

    start = sub.add_parser(
        "start", help="start the SuperLink (TLS + SuperNode authentication; refuses without them unless --insecure)"
    )
    start.add_argument(
        "--certs-dir", type=Path, default=None, help=f"folder of ca.pem, server.pem, server.key (default {certs_dir()})"
    )
    start.add_argument("--cert", type=Path, help="the SuperLink's TLS certificate (default CERTS_DIR/server.pem)")
    start.add_argument("--key", type=Path, help="its private key (default CERTS_DIR/server.key)")
    start.add_argument("--ca", type=Path, help="the federation CA certificate (default CERTS_DIR/ca.pem)")
    start.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    start.add_argument("--port", type=int, default=8000, help="the one port sites connect to (default 8000)")
    start.add_argument(
        "--state-dir", type=Path, default=None, help=f"database, log and Flower home (default {state_dir()})"
    )
    start.add_argument("--insecure", action="store_true", help="no TLS, no authentication: a closed test machine only")

    add = sub.add_parser("add-site", help="enroll a site by its public key (NAME.pub from `fedsite certs site NAME`)")
    add.add_argument("pubkey", type=Path, metavar="PUBKEY")
    add.add_argument("--name", help="the site's public name (default: the key file's name without .pub)")
    _connection_args(add)

    rm = sub.add_parser("remove-site", help="unenroll a site (by name or node id); its key can no longer connect")
    rm.add_argument("site", metavar="NAME_OR_ID")
    _connection_args(rm)

    ls = sub.add_parser("sites", help="list enrolled sites: name, node id, status")
    _connection_args(ls)

    runp = subparsers.add_parser("run", help="submit a federated run to a deployed SuperLink and follow it")
    _connection_args(runp)
    runp.add_argument(
        "--app", type=Path, default=None, help="the Flower app folder (default: fedsite's own source folder)"
    )
    runp.add_argument("--rounds", type=int, help="federated rounds")
    runp.add_argument("--local-epochs", type=int, help="local epochs per round")
    runp.add_argument("--strategy", help="aggregation strategy, e.g. fedavg")
    runp.add_argument("--seed", type=int)
    runp.add_argument("--out", type=Path, help="results folder on the coordinator (results.json, MLflow store)")
    runp.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (on the coordinator) from its last complete round, with its own config",
    )
    runp.add_argument(
        "--run-config", action="append", default=[], metavar="'KEY=VALUE ...'", help="any key of [tool.flwr.app.config]"
    )
    runp.add_argument("-v", "--verbose", action="store_true", help="also show Flower's own log lines")


def _home(args: argparse.Namespace) -> Path:
    from server.deploy import flwr_home, write_connection

    home = flwr_home(args.state_dir or state_dir())
    ca = args.ca or certs_dir() / "ca.pem"
    write_connection(home, args.superlink, ca=ca, insecure=args.insecure)
    return home


def _registry_path(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or state_dir()).expanduser().resolve() / "sites.json"


def _registry(args: argparse.Namespace) -> dict[str, str]:
    p = _registry_path(args)
    return json.loads(p.read_text()) if p.is_file() else {}


def _save_registry(args: argparse.Namespace, reg: dict[str, str]) -> None:
    p = _registry_path(args)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(reg, indent=2, sort_keys=True) + "\n")


def _start(args: argparse.Namespace) -> int:
    from server.deploy import INSECURE_WARNING, SuperLinkSpec, flwr_home, superlink_command

    d = (args.certs_dir or certs_dir()).expanduser()
    st = Path(args.state_dir or state_dir()).expanduser().resolve()
    st.mkdir(parents=True, exist_ok=True)
    spec = SuperLinkSpec(
        certfile=args.cert or d / "server.pem",
        keyfile=args.key or d / "server.key",
        cafile=args.ca or d / "ca.pem",
        database=st / "state.db",
        log_file=st / "superlink.log",
        host=args.host,
        port=args.port,
        insecure=args.insecure,
    )
    cmd = superlink_command(spec)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    home = flwr_home(st)
    home.mkdir(parents=True, exist_ok=True)
    print(f"SuperLink on {args.host}:{args.port} ({'NO TLS' if args.insecure else 'TLS, enrolled sites only'})")
    print(f"state: {spec.database}\nlog:   {spec.log_file}\nstop with Ctrl-C", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"note: Flower's Control API shares port {args.port} and has no account authentication in the open-source "
            "SuperLink: open the port to the sites' addresses only (or pass only /v1/fleet/ through a reverse proxy)",
            flush=True,
        )
    from common.processes import run_foreground

    proc = subprocess.Popen(cmd, env={**os.environ, "FLWR_HOME": str(home)}, stdout=subprocess.DEVNULL)
    return run_foreground([proc])


def _add_site(args: argparse.Namespace) -> int:
    from server.deploy import register_site

    name = args.name or args.pubkey.name.removesuffix(".pub")
    node_id = register_site(args.pubkey, _home(args), name=name)
    reg = _registry(args)
    reg[str(node_id)] = name
    _save_registry(args, reg)
    print(f"site {name} enrolled as node {node_id}")
    return 0


def _remove_site(args: argparse.Namespace) -> int:
    from server.deploy import DeployError, unregister_site

    reg = _registry(args)
    ids = [nid for nid, name in reg.items() if name == args.site] or ([args.site] if args.site.isdigit() else [])
    if not ids:
        raise DeployError(f"no enrolled site named {args.site!r}; see `fedsite server sites` for names and node ids")
    for nid in ids:
        unregister_site(int(nid), _home(args))
        print(f"site {reg.get(nid, nid)} (node {nid}) removed; its key can no longer connect")
        reg.pop(nid, None)
    _save_registry(args, reg)
    return 0


def _sites(args: argparse.Namespace) -> int:
    from server.deploy import list_sites

    reg = _registry(args)
    nodes = list_sites(_home(args))
    print(f"{'site':<20} {'node id':<22} status")
    for n in nodes:
        print(f"{reg.get(str(n['node-id']), '?'):<20} {n['node-id']:<22} {n['status']}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``fedsite server ...`` or ``fedsite run``; returns the exit code."""
    from server.deploy import DeployError

    try:
        if args.command == "run":
            from server.submit import submit

            return submit(args, _home(args))
        command = {"start": _start, "add-site": _add_site, "remove-site": _remove_site, "sites": _sites}
        return command[args.server_command](args)
    except DeployError as exc:
        print(f"fedsite {args.command}: error: {exc}", file=sys.stderr)
        return 2
