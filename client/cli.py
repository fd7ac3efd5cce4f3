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
from pathlib import Path

from client.layout import LABELS_DIR, SITE_FILE
from common.config import RunConfig

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsite site`` and its subcommands on the ``fedsite`` parser's subparsers."""
    site = subparsers.add_parser("site", help="site tools: check a site folder before joining")
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
            f"fedsite site check: error: {args.dir} is not a folder; give the site's data folder (the one holding dicom/ and {LABELS_DIR}/)",
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
            f"fedsite site check: no usable series in this folder ({report.files_total} files; most common reason: {top}). "
            "Point DIR at the folder holding the site's DICOM (or NIfTI/NRRD) images, or fix the reasons above.",
            file=sys.stderr,
        )
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a ``fedsite site`` subcommand; returns the exit code and never raises."""
    try:
        if args.site_command == "check":
            return _check(args)
    except KeyboardInterrupt:
        print("fedsite site: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(
            f"fedsite site {args.site_command}: error: unexpected {type(exc).__name__}; nothing was written. "
            "Please report this with the command you ran (not the data).",
            file=sys.stderr,
        )
        return 2
    print(f"fedsite site: unknown command {args.site_command!r}", file=sys.stderr)
    return 2
