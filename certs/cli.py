"""``fedsite certs ...``: the federation's CA, the SuperLink's TLS certificate and the sites' keys.

* ``fedsite certs init [--dir D]``                   the root CA (coordinator; ``ca.key`` mode 0600)
* ``fedsite certs server --host NAME_OR_IP ... [--dir D]``  (re)issue the SuperLink's certificate
* ``fedsite certs site NAME [--dir D]``               a site's SuperNode key pair (OpenSSH EC)
* ``fedsite certs status [--dir D]``                  every certificate and key with its expiry

The logic lives in :mod:`certs.authority`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsite certs`` and its subcommands on the ``fedsite`` parser's subparsers."""
    from certs.authority import WARN_DAYS, default_dir

    certs = subparsers.add_parser(
        "certs", help="certificates and keys: the federation CA, the SuperLink's TLS, site keys"
    )
    sub = certs.add_subparsers(dest="certs_command", required=True)
    dir_help = f"certificate folder (default {default_dir()}, or $FEDSITE_CERTS); keep it out of any repository"

    init = sub.add_parser("init", help="create the federation's root CA (the coordinator keeps ca.key)")
    init.add_argument("--dir", type=Path, default=None, help=dir_help)
    init.add_argument("--name", default="fedsite federation CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.add_argument(
        "--force", action="store_true", help="replace an existing CA (then reissue the server certificate)"
    )

    server = sub.add_parser("server", help="issue or reissue the SuperLink's TLS certificate, signed by the CA")
    server.add_argument("--dir", type=Path, default=None, help=dir_help)
    server.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="a DNS name or IP address sites use to reach the SuperLink (repeatable), e.g. fl.hospital.org",
    )
    server.add_argument("--days", type=int, default=397, help="validity in days (default 397)")

    site = sub.add_parser("site", help="make a site's SuperNode key pair; hand only NAME.pub to the coordinator")
    site.add_argument("name", metavar="NAME", help="the site's public name, e.g. site-01")
    site.add_argument("--dir", type=Path, default=None, help=dir_help)
    site.add_argument("--force", action="store_true", help="replace an existing key pair (then re-register the site)")

    st = sub.add_parser("status", help=f"list every certificate and key with its expiry (warns {WARN_DAYS} days ahead)")
    st.add_argument("--dir", type=Path, default=None, help=dir_help)


def run(args: argparse.Namespace) -> int:
    """Run a ``fedsite certs`` subcommand; returns 0, 1 (a warning in ``status``) or 2 (an error)."""
    from certs import authority as a

    d = (args.dir or a.default_dir()).expanduser().resolve()
    try:
        if args.certs_command == "init":
            path = a.init_ca(d, name=args.name, days=args.days, force=args.force)
            print(f"CA certificate: {path} (give this file to every site)")
            print(f"CA private key: {d / a.CA_KEY} (mode 0600; keep it with the coordinator, never share it)")
            return 0
        if args.certs_command == "server":
            path = a.issue_server_cert(d, args.host, days=args.days)
            print(f"SuperLink certificate: {path} for {', '.join(args.host)}")
            print(f"SuperLink private key: {d / a.SERVER_KEY} (mode 0600)")
            print("restart the SuperLink to use it (`fedsite server start`); sites need no change")
            return 0
        if args.certs_command == "site":
            priv, pub = a.make_site_key(d, args.name, force=args.force)
            print(f"site private key: {priv} (mode 0600; stays at the site)")
            print(f"site public key:  {pub} (send this to the coordinator: `fedsite server add-site {pub.name}`)")
            return 0
        if args.certs_command == "status":
            return _status(a.status(d))
    except a.CertError as exc:
        print(f"fedsite certs {args.certs_command}: error: {exc}", file=sys.stderr)
        return 2
    return 2


def _status(entries: list) -> int:
    if not entries:
        print("no certificates or keys here; start with `fedsite certs init`")
        return 1
    for e in entries:
        expiry = f"expires {e.not_after:%Y-%m-%d} ({e.days_left} days)" if e.not_after else "no expiry"
        flag = f"  WARNING: {e.problem}" if e.warning else ""
        print(f"{e.kind:<12} {e.subject:<40} {expiry:<28} {e.path}{flag}")
    return 1 if any(e.warning for e in entries) else 0
