"""``fedsite site ...``: the commands a hospital site runs next to its data.

``fedsite site check DIR [--json REPORT]`` audits a site folder before it joins a federation
(:mod:`client.audit`). It prints a summary and exits 0 when at least one usable series is
found, 1 when none is, 2 when the command cannot run (e.g. ``DIR`` is not a folder). It never
prints a traceback or a patient value.

This module imports nothing heavy at import time: ``fedsite`` builds its parser from
:func:`add_parser` for every command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from client.guard import run_guarded
from client.layout import LABELS_DIR, SITE_FILE
from common.config import RunConfig

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsite site`` and its subcommands on the ``fedsite`` parser's subparsers."""
    site = subparsers.add_parser("site", help="site tools: check a site folder, join a federation")
    sub = site.add_subparsers(dest="site_command", required=True)
    check = sub.add_parser(
        "check",
        help="audit a site folder: usable series by modality and scanner, labels, split, rejected files with reasons",
        description=(
            "Read every file under DIR (headers, then pixel data), and report what the site client can use "
            "and why the rest is rejected. Nothing identifying is printed or written."
        ),
    )
    check.add_argument(
        "dir",
        type=Path,
        metavar="DIR",
        help=f"the site folder (dicom/, {LABELS_DIR}/, {SITE_FILE}), or any folder of images",
    )
    check.add_argument(
        "--json", dest="report", type=Path, metavar="REPORT", help="also write the full report as JSON to REPORT"
    )
    check.add_argument(
        "--modality",
        action="append",
        metavar="MOD",
        help="keep only this DICOM Modality, e.g. MR (repeatable; default all)",
    )
    check.add_argument(
        "--headers-only",
        action="store_true",
        help="do not decode pixel data (faster; damaged pixel data goes unnoticed)",
    )
    defaults = RunConfig()
    check.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help=f"run seed used for the patient split (default {defaults.seed}, the run default)",
    )
    check.add_argument(
        "--volume",
        default=defaults.data.volume,
        metavar="POLICY",
        help=f"multi-volume series: 'first', 'all' or a rule like 'b-value=0' (default {defaults.data.volume!r}, "
        "the run's data.volume)",
    )
    check.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.data.val_fraction,
        help=f"validation share of patients (default {defaults.data.val_fraction}, the run's data.val-fraction)",
    )
    from client.predict_cli import add_pull_parser

    add_pull_parser(sub)
    _add_start(sub)


#: How long ``fedsite site start`` keeps trying to join after the SuperLink refused to activate the site.
REJOIN_WAIT_S = 180.0
REJOIN_PAUSE_S = 10.0


def _add_start(sub: argparse._SubParsersAction) -> None:
    from common.locations import certs_dir

    start = sub.add_parser(
        "start",
        help="check the data folder, then join the federation (SuperNode with TLS and the site's key)",
        description=(
            "Audit DATA_DIR as `fedsite site check` does and refuse on an unusable folder; then run Flower's "
            "SuperNode against the coordinator's SuperLink, verifying it with CA and signing with KEY. "
            "Keeps retrying while the SuperLink is down."
        ),
    )
    start.add_argument(
        "--data", dest="data_dir", type=Path, required=True, metavar="DATA_DIR", help="the site's data folder"
    )
    start.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink, e.g. fl.hospital.org:8000"
    )
    start.add_argument(
        "--ca", type=Path, default=certs_dir() / "ca.pem", help="the federation's ca.pem (from the coordinator)"
    )
    start.add_argument("--key", type=Path, help="this site's private key (default CERTS_DIR/sites/NAME.key)")
    start.add_argument("--name", help="this site's public name (default: from site.json, else the folder name)")
    start.add_argument(
        "--state-dir", type=Path, help="the SuperNode's own folder (default ~/.local/share/fedsite/site-NAME)"
    )
    start.add_argument("--runtime-port", type=int, default=9094, help="local Runtime API port (loopback; default 9094)")
    start.add_argument(
        "--max-retries", type=int, help="give up after this many failed connection attempts (default: never)"
    )
    start.add_argument(
        "--rejoin-wait",
        type=float,
        default=REJOIN_WAIT_S,
        metavar="SECONDS",
        help=(
            "after a crash the SuperLink holds the site as online until its heartbeat expires (about a minute) "
            f"and refuses to activate it again: keep trying to join for this long (default {REJOIN_WAIT_S:g} s; "
            "not with --max-retries)"
        ),
    )
    start.add_argument(
        "--headers-only", action="store_true", help="check headers only (faster; damaged pixel data goes unnoticed)"
    )
    start.add_argument(
        "--insecure", action="store_true", help="no TLS, no key: only against `fedsite server start --insecure`"
    )
    start.add_argument(
        "--approved",
        type=Path,
        metavar="FILE",
        help=(
            "run only apps whose FAB hash is in FILE (see `fedsite site approve`); "
            "others are refused before any code runs"
        ),
    )
    approve = sub.add_parser(
        "approve", help="add an app's FAB hash to the site's approved list (after reviewing its code)"
    )
    approve.add_argument("app", type=Path, nargs="?", metavar="APP_DIR", help="the reviewed source folder of the app")
    approve.add_argument("--hash", dest="fab_hash", help="approve this FAB hash instead (as `flwr ls` shows it)")
    approve.add_argument("--approved", type=Path, required=True, metavar="FILE", help="the site's approved list (JSON)")


def _start(args: argparse.Namespace) -> int:
    import subprocess

    from client.deploy import SiteSpec, SiteStartError, check_folder, supernode_command, supernode_env
    from client.site import site_name_of
    from common.locations import certs_dir

    try:
        summary = check_folder(args.data_dir, decode=not args.headers_only)
    except SiteStartError as exc:
        print(f"fedsite site start: refused: {exc}", file=sys.stderr)
        return 1
    print(summary, flush=True)
    name = args.name or site_name_of(args.data_dir.resolve())
    spec = SiteSpec(
        superlink=args.superlink,
        data_dir=args.data_dir,
        ca=args.ca,
        key=args.key or certs_dir() / "sites" / f"{name}.key",
        name=name,
        state_dir=args.state_dir or Path.home() / ".local" / "share" / "fedsite" / f"site-{name}",
        runtime_port=args.runtime_port,
        max_retries=args.max_retries,
        insecure=args.insecure,
        approved=args.approved,
    )
    try:
        cmd = supernode_command(spec)
    except SiteStartError as exc:
        print(f"fedsite site start: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"site {name}: joining {args.superlink} ({'NO TLS' if args.insecure else 'TLS, signed with the site key'})",
        flush=True,
    )
    from client.deploy import ACTIVATION_REFUSED, executor_command
    from common.processes import run_foreground, start_watched

    env = supernode_env(spec)
    if spec.approved is not None:
        print(f"site {name}: runs only apps approved in {spec.approved}", flush=True)
    give_up = time.monotonic() + args.rejoin_wait
    while True:
        node, refused = start_watched(cmd, env, ACTIVATION_REFUSED)
        procs = [node]
        if spec.approved is not None:
            procs.append(subprocess.Popen(executor_command(spec, procs[0].pid), env=env))
        code = run_foreground(procs)
        if code == 0 or not refused.wait(5) or spec.max_retries is not None or time.monotonic() > give_up:
            break
        print(
            f"site {name}: the SuperLink did not let this site join; after a crash it still holds the site as "
            f"online until the heartbeat expires (about a minute): trying again in {REJOIN_PAUSE_S:g} s "
            f"(for up to {args.rejoin_wait:g} s in all; if it keeps refusing, check that the coordinator "
            "enrolled this site's public key: `fedsite server sites`)",
            flush=True,
        )
        time.sleep(REJOIN_PAUSE_S)
    return code


def _approve(args: argparse.Namespace) -> int:
    from client.approval import ApprovalError, approve, fab_hash_of_app

    try:
        if args.fab_hash:
            fab_hash, app, version = args.fab_hash, "", ""
        elif args.app is not None:
            fab_hash, app, version = fab_hash_of_app(args.app)
        else:
            print("fedsite site approve: give APP_DIR (the reviewed source) or --hash", file=sys.stderr)
            return 2
        approve(args.approved, fab_hash, app=app, version=version)
    except ApprovalError as exc:
        print(f"fedsite site approve: error: {exc}", file=sys.stderr)
        return 2
    print(f"approved {app or 'app'} {version} (FAB hash {fab_hash}) in {args.approved}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from client.audit import check_site, format_report, write_report

    if not 0.0 < args.val_fraction < 1.0:
        print(
            f"fedsite site check: error: --val-fraction {args.val_fraction} must be between 0 and 1 (e.g. 0.25)",
            file=sys.stderr,
        )
        return 2
    if not args.dir.is_dir():
        print(
            f"fedsite site check: error: {args.dir} is not a folder; give the site's data folder "
            f"(the one holding dicom/ and {LABELS_DIR}/)",
            file=sys.stderr,
        )
        return 2
    from client.errors import SiteDataError
    from client.volume_split import parse_policy

    try:
        parse_policy(args.volume)
    except SiteDataError as exc:
        print(f"fedsite site check: error: --volume: {exc}", file=sys.stderr)
        return 2
    modalities = tuple(m.upper() for m in args.modality) if args.modality else None
    report = check_site(
        args.dir,
        modalities=modalities,
        decode=not args.headers_only,
        seed=args.seed,
        val_fraction=args.val_fraction,
        volume=args.volume,
    )
    print(format_report(report), flush=True)
    if args.report is not None:
        write_report(report, args.report)
        print(f"report written to {args.report}")
    if report.series_usable == 0:
        top = report.rejected_by_reason[0]["reason"] if report.rejected_by_reason else "no files found"
        print(
            f"fedsite site check: no usable series in this folder ({report.files_total} files; "
            f"most common reason: {top}). "
            "Point DIR at the folder holding the site's DICOM (or NIfTI/NRRD) images, or fix the reasons above.",
            file=sys.stderr,
        )
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a ``fedsite site`` subcommand; returns the exit code and never raises."""
    commands = {"check": _check, "start": _start, "approve": _approve, "pull": _pull}
    if args.site_command not in commands:
        print(f"fedsite site: unknown command {args.site_command!r}", file=sys.stderr)
        return 2
    return run_guarded(
        f"fedsite site {args.site_command}",
        lambda: commands[args.site_command](args),
        unexpected="nothing was written",
    )


def _pull(args: argparse.Namespace) -> int:
    from client.predict_cli import run_pull

    return run_pull(args)
