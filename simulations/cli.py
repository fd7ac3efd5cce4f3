"""The simulation side of the ``fedsite`` command: ``simulate``, ``study privacy|shift``, ``data synth``.

* ``fedsite simulate``       run a whole federation of simulated scanner sites on this machine
* ``fedsite study privacy``  the same sites and seeds at several privacy budgets
* ``fedsite study shift``    domain shift across scanner sites: local-only, pooled and federated methods
* ``fedsite data synth``     write simulated scanner sites (DICOM + masks, or X-ray sites from an image set)

The ``fedsite`` front (:mod:`fedsite.cli`) registers these with :func:`add_parser` and runs them with
:func:`run`. Building the parser imports nothing heavy: the generator, the runner and the studies are
imported when a command runs. Errors a user can fix are printed as ``fedsite: error: ...`` (exit 2);
a federation that fails exits 1.

``python -m simulations.synth`` (:func:`synth_main`) is the generator's own command: the same
settings as ``fedsite data synth``, for a machine without the rest of fedsite's commands.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig, field_choices, flatten, parse_overrides, parse_run_config

__all__ = ["COMMANDS", "add_parser", "run", "synth_arguments_error", "synth_main"]

#: The top-level commands this side registers.
COMMANDS = ("simulate", "study", "data", "pretrain")

_RUN_CONFIG_HELP = "any key of [tool.flwr.app.config]"
_RUN_CONFIG_METAVAR = "'KEY=VALUE ...'"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``simulate``, ``study privacy``, ``study shift`` and ``data synth`` on ``fedsite``'s subparsers.

    Args:
        subparsers: The ``fedsite`` parser's subparsers action.
    """
    strategies = field_choices("strategy.name")
    sim = subparsers.add_parser(
        "simulate", help="run a federation of simulated scanner sites on this machine (Flower + Ray)"
    )
    sim.add_argument("--sites", type=int, help="number of sites (default 3)")
    sim.add_argument("--rounds", type=int, help="federated rounds (default 3)")
    sim.add_argument("--local-epochs", type=int, help="local epochs per round (default 3)")
    sim.add_argument("--strategy", choices=strategies, help="aggregation strategy (default fedavg)")
    sim.add_argument("--seed", type=int, help="run seed (data, split, init, shuffling)")
    sim.add_argument("--out", type=Path, help="output folder (default ./fedsite-runs/<time>)")
    sim.add_argument("--data-root", type=Path, help="folder of the simulated sites (written if missing)")
    sim.add_argument("--run-config", action="append", default=[], metavar=_RUN_CONFIG_METAVAR, help=_RUN_CONFIG_HELP)
    sim.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="WHO:KIND[@ROUND]",
        help="inject a fault (repeatable): site-02:raise|hang|nan|x1000|arch[@ROUND], or server:kill@ROUND "
        "(the server dies after that round's checkpoint); see simulations/faults.py",
    )
    sim.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last complete round (its checkpoint.npz and config)",
    )
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs")

    study = subparsers.add_parser("study", help="compare several federations on the same sites and seeds")
    studies = study.add_subparsers(dest="study_command", required=True)
    priv = studies.add_parser(
        "privacy", help="no DP, clip-only, epsilon 8/3/1: utility, epsilon spent, membership attack AUC"
    )
    priv.add_argument(
        "--out", type=Path, required=True, help="study folder (privacy.json, privacy.png, one run per setting)"
    )
    priv.add_argument(
        "--quick",
        action="store_true",
        help="3 small sites, 3 rounds x 3 local epochs, five settings: about 6 minutes on 2 cores; indicative only",
    )
    priv.add_argument(
        "--source",
        type=Path,
        help="a MedMNIST-layout .npz of labelled images (e.g. chest X-rays) written as CR/DX sites; classification",
    )
    priv.add_argument(
        "--site-size",
        type=int,
        metavar="N",
        help="at least N training slices per site (sets sim.patients; default 1000 without --quick)",
    )
    priv.add_argument(
        "--site-sizes",
        metavar="N,N",
        help="utility against site size: also run no DP and epsilon 8 on sites of these sizes "
        "(default 250,500 without --quick; 'none' to skip)",
    )
    priv.add_argument("--sites", type=int)
    priv.add_argument("--rounds", type=int)
    priv.add_argument("--seed", type=int)
    priv.add_argument("--data-root", type=Path)
    priv.add_argument("--run-config", action="append", default=[], metavar=_RUN_CONFIG_METAVAR)

    shift = studies.add_parser(
        "shift",
        help="domain shift across scanner sites: local-only, pooled and federated methods, cross-site matrix, "
        "unseen scanner",
    )
    shift.add_argument(
        "--out",
        type=Path,
        required=True,
        help="study folder (shift.json, report.md and its figures, one run per method)",
    )
    shift.add_argument(
        "--quick",
        action="store_true",
        help="3 sites, 3 rounds x 2 local epochs, 32x32 images: a few minutes on 2 cores",
    )
    shift.add_argument(
        "--source",
        type=Path,
        help="a MedMNIST-layout .npz of labelled images (e.g. chest X-rays) written as CR/DX sites; classification",
    )
    shift.add_argument(
        "--methods",
        help=f"comma-separated, from {','.join(('local-only', 'pooled', *strategies))} "
        "(default: quick set, or all without --quick)",
    )
    shift.add_argument(
        "--unseen",
        help="federated methods to run leave-one-site-out (default fedavg with --quick, else fedavg,fedbn; "
        "'none' to skip)",
    )
    shift.add_argument("--sites", type=int)
    shift.add_argument("--rounds", type=int)
    shift.add_argument("--seed", type=int)
    shift.add_argument("--data-root", type=Path)
    shift.add_argument("--run-config", action="append", default=[], metavar=_RUN_CONFIG_METAVAR)

    data = subparsers.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write simulated scanner sites: DICOM series and lesion masks")
    defaults = RunConfig()
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=defaults.seed)
    synth.add_argument("--patients", type=int, default=defaults.sim.patients, help="patients per site")
    synth.add_argument("--slices", type=int, default=defaults.sim.slices, help="slices per patient")
    # Literal choices keep this parser free of the generator's imports; tests/test_fedsite_cli.py checks them.
    synth.add_argument(
        "--transfer-syntax",
        choices=["explicit", "rle", "jpeg-ls", "jpeg2000", "deflate"],
        help="store every site in this lossless transfer syntax (default: each scanner profile's own)",
    )
    synth.add_argument(
        "--photometric",
        choices=["MONOCHROME1", "MONOCHROME2"],
        help="store every site with this photometric interpretation",
    )
    synth.add_argument(
        "--modality",
        choices=["MR", "CT", "CR", "DX", "auto"],
        help="MR or CT phantoms (default MR); with --source CR, DX or auto (CR and DX mixed, the default)",
    )
    synth.add_argument(
        "--source",
        type=Path,
        metavar="PATH.npz",
        help="a MedMNIST-layout .npz of labelled images: write X-ray classification sites from it",
    )
    synth.add_argument(
        "--task",
        choices=field_choices("task.name"),
        help="segmentation (phantoms) or classification (needs --source); default: classification with --source",
    )
    synth.add_argument(
        "--label-skew",
        type=float,
        default=0.0,
        help="0 = every site the global class mix / lesion burden; > 0 = stronger per-site imbalance",
    )
    synth.add_argument(
        "--quantity-skew",
        type=float,
        default=0.0,
        help="0 = equal site sizes; > 0 = lognormal site sizes around --patients (at least 4)",
    )
    synth.add_argument(
        "--classes",
        metavar="A,B",
        help="class names of the source's labels 0, 1, ... (default from the file name, e.g. normal,pneumonia)",
    )
    synth.set_defaults(synth_parser=synth)

    pre = subparsers.add_parser(
        "pretrain",
        help="pre-train a start model (model.init) on phantoms from scanners no simulated site uses",
    )
    pre.add_argument("--out", type=Path, required=True, help="folder for start_model.pt and pretrain.json")
    pre.add_argument("--patients", type=int, default=8, help="phantom patients per pre-training scanner")
    pre.add_argument("--slices", type=int, default=12, help="slices per phantom series")
    pre.add_argument("--epochs", type=int, default=20, help="passes over the pooled pre-training samples")
    pre.add_argument("--seed", type=int, help="run seed (default 42)")
    pre.add_argument("--run-config", action="append", default=[], metavar=_RUN_CONFIG_METAVAR, help=_RUN_CONFIG_HELP)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from simulations.pretrain import pretrain

    for name, value in (("--patients", args.patients), ("--slices", args.slices), ("--epochs", args.epochs)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    flat = flatten(RunConfig())
    flat.update(parse_overrides(args.run_config))
    if args.seed is not None:
        flat["seed"] = args.seed
    cfg = parse_run_config(flat)
    doc = pretrain(
        args.out,
        cfg,
        patients=args.patients,
        slices=args.slices,
        epochs=args.epochs,
        progress=lambda m: print(m, flush=True),
    )
    print(f"start model written to {args.out}; use it with --run-config \"model.init='{args.out}'\"")
    return 0 if doc else 1


def run(args: argparse.Namespace) -> int:
    """Run a command registered by :func:`add_parser`; returns the exit code.

    Args:
        args: The parsed ``fedsite`` arguments (``args.command`` is one of :data:`COMMANDS`).

    Returns:
        0 on success; 1 when a federation fails or no site returned results; 2 for an error the user
        can fix (printed as ``fedsite: error: ...``).
    """
    try:
        if args.command == "simulate":
            return _cmd_simulate(args)
        if args.command == "data" and args.data_command == "synth":
            return _cmd_synth(args)
        if args.command == "study" and args.study_command == "privacy":
            return _cmd_study_privacy(args)
        if args.command == "study" and args.study_command == "shift":
            return _cmd_study_shift(args)
        if args.command == "pretrain":
            return _cmd_pretrain(args)
    except (ConfigError, FileExistsError, FileNotFoundError) as exc:
        print(f"fedsite: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from simulations.runner import SimulationError

        if isinstance(exc, SimulationError):
            print(f"fedsite: error: {exc}", file=sys.stderr)
            return 1
        raise
    return 2


def synth_arguments_error(*, task: str | None, source: object, modality: str | None, classes: str | None) -> str | None:
    """Check the command-line combination of task, source, modality and class names.

    Args:
        task: ``--task`` (``None`` = implied by ``source``).
        source: ``--source`` (``None`` = phantom sites).
        modality: ``--modality`` (``None`` = the default for the task).
        classes: ``--classes``.

    Returns:
        The error message for the parser, or None if the combination is valid.
    """
    if task == "classification" and source is None:
        return (
            "--task classification needs --source PATH.npz (a MedMNIST-layout image set, e.g. "
            "../shared/data/pneumoniamnist/pneumoniamnist_merged.npz); phantom sites are for segmentation"
        )
    if task == "segmentation" and source is not None:
        return "--source gives class-labelled images (classification): drop --task segmentation or --source"
    if source is None and modality not in (None, "MR", "CT"):
        return (
            f"--modality {modality} needs --source PATH.npz (X-ray sites are made from a labelled image set); "
            "phantom sites are MR or CT"
        )
    if source is not None and modality == "CT":
        return "--modality CT is for phantom sites; with --source use CR, DX or auto"
    if classes is not None and source is None:
        return "--classes names the labels of --source; give --source PATH.npz or drop --classes"
    return None


def _simulate_config(args: argparse.Namespace, defaults: dict[str, object] | None = None) -> RunConfig:
    flat = flatten(RunConfig())
    flat.update(defaults or {})
    flat.update(parse_overrides(args.run_config))
    named = {
        "sim.sites": args.sites,
        "num-server-rounds": args.rounds,
        "train.local-epochs": getattr(args, "local_epochs", None),
        "strategy.name": getattr(args, "strategy", None),
        "seed": args.seed,
        "sim.root": str(args.data_root) if args.data_root else None,
    }
    flat.update({k: v for k, v in named.items() if v is not None})
    cfg = parse_run_config(flat)
    if cfg.sim.sites < cfg.strategy.min_sites:
        raise ConfigError(
            f"--sites {cfg.sim.sites} is fewer than strategy.min-sites = {cfg.strategy.min_sites}; "
            f"use --sites {cfg.strategy.min_sites} or more, or lower strategy.min-sites"
        )
    return cfg


def _resume_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The config of the run in ``--resume RUN_DIR`` (from its checkpoint), set to continue it."""
    from server.checkpoint import CheckpointError, resume_config

    conflicting = [f"--{a.replace('_', '-')}" for a in _RESUME_CONFLICTS if getattr(args, a, None)]
    if conflicting or args.run_config:
        given = ", ".join(conflicting + (["--run-config"] if args.run_config else []))
        raise ConfigError(f"--resume continues a run with its own config; drop {given}")
    out = args.resume.expanduser().resolve()
    try:
        flat, last = resume_config(out)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    print(f"fedsite simulate: resuming {out} after round {last}", flush=True)
    return parse_run_config(flat), out


#: Options that would change a resumed run's config (the checkpoint's config is used as it is).
_RESUME_CONFLICTS = ("sites", "rounds", "local_epochs", "strategy", "seed", "out", "data_root")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.faults import parse_fault
    from simulations.runner import simulate

    faults = [parse_fault(spec) for spec in args.fault]
    if args.resume is not None:
        cfg, out = _resume_config(args)
    else:
        cfg = _simulate_config(args)
        out = args.out or Path("fedsite-runs", time.strftime("%Y%m%d-%H%M%S"))
    print(
        f"fedsite simulate: {cfg.sim.sites} sites, {cfg.num_server_rounds} rounds x {cfg.train.local_epochs} "
        f"local epochs, strategy {cfg.strategy.name}, seed {cfg.seed}",
        flush=True,
    )
    results = simulate(cfg, out, progress=lambda m: print(m, flush=True), quiet=not args.verbose, faults=faults)
    final = results["final"]
    if not final["per_site"]:
        print("no site returned evaluation results; see the rejections in results.json", file=sys.stderr)
        return 1
    return 0


def _cmd_study_privacy(args: argparse.Namespace) -> int:
    from simulations.studies import FULL_SETTINGS, PRIVACY_SETTINGS, OverfitArm, patients_for_site_size, privacy_study

    quick: dict[str, object] = (
        {"num-server-rounds": 3, "train.local-epochs": 3, "sim.sites": 3}
        if args.quick
        else {"num-server-rounds": 5, "train.local-epochs": 1}
    )
    quick.update(_source_defaults(args.source))
    cfg = _simulate_config(args, quick)
    size = args.site_size if args.site_size is not None else (None if args.quick else 1000)
    if size is not None:
        try:
            cfg = replace(cfg, sim=replace(cfg.sim, patients=patients_for_site_size(cfg, size)))
        except ValueError as exc:
            raise ConfigError(f"--site-size: {exc}") from None
    sizes_text = args.site_sizes or ("none" if args.quick else "250,500")
    try:
        sizes = tuple(int(n) for n in _names(sizes_text)) if sizes_text != "none" else ()
    except ValueError:
        raise ConfigError(f"--site-sizes {sizes_text!r}: give training slices per site, e.g. 250,500") from None
    if any(n < 1 for n in sizes):  # checked before any run, not after the main settings' hour of work
        raise ConfigError(f"--site-sizes {sizes_text!r}: every size must be at least 1 training slice")
    settings = PRIVACY_SETTINGS if args.quick else FULL_SETTINGS
    print(
        f"fedsite study privacy: {cfg.task.name}, {len(settings)} settings x {cfg.num_server_rounds} rounds on "
        f"{cfg.sim.sites} sites of {cfg.sim.patients} patients, seed {cfg.seed}"
        + (f"; site sizes {', '.join(map(str, sizes))} at no DP and epsilon 8" if sizes else ""),
        flush=True,
    )
    if args.quick:
        print("quick study: tiny sites, few rounds: its figures are indicative only, not a basis for a claim")
    overfit = OverfitArm(slices=48, epochs=60, dp_epsilon=None) if args.quick else OverfitArm()
    report = privacy_study(
        cfg, args.out, settings=settings, overfit=overfit, site_sizes=sizes, progress=lambda m: print(m, flush=True)
    )
    print(format_privacy_table(report))
    print(f"wrote {Path(args.out) / 'privacy.json'} and {Path(args.out) / 'privacy.png'} in {report['seconds']:.0f}s")
    return 0


def _source_defaults(source: Path | None) -> dict[str, object]:
    """The run-config keys of ``--source`` (X-ray classification sites from a MedMNIST .npz)."""
    if source is None:
        return {}
    if not source.is_file():
        raise ConfigError(
            f"--source {source} is not a file; give a MedMNIST-layout .npz, e.g. "
            "../shared/data/pneumoniamnist/pneumoniamnist_merged.npz"
        )
    return {"task.name": "classification", "sim.source": str(source.resolve()), "sim.modality": "auto"}


def format_privacy_table(report: dict[str, Any]) -> str:
    """The privacy study's table: utility, epsilon and its unit, attack AUCs per setting; DP's cost; site sizes."""
    from simulations.studies import entry_metric

    key = entry_metric(report["settings"])
    rows = [("setting", f"mean {key}", f"worst {key}", "max epsilon", "attack AUC", "calibrated AUC [95% CI]", "n")]
    for s in report["settings"]:
        eps = list(s["epsilon_spent"].values())
        units = {u for u in s.get("unit", {}).values() if u}
        per = f" /{units.pop()}" if len(units) == 1 else ""
        eps_txt = (
            "-" if s["name"] == "no-dp" else ("unbounded" if any(e is None for e in eps) else f"{max(eps):.2f}{per}")
        )
        rows.append(
            (
                s["name"],
                f"{s['utility']['mean'].get(key, float('nan')):.3f}",
                f"{s['utility']['worst'].get(key, float('nan')):.3f}",
                eps_txt,
                f"{s['attack_auc'].get('mean', float('nan')):.3f}",
                *_calibrated_cells(s.get("calibrated_attack")),
            )
        )
    if "overfit_attack" in report:
        o = report["overfit_attack"]
        label = f"over-fit ({o['slices']} slices x {o['epochs']} ep)"
        rows.append((label, "-", "-", "-", "-", *_calibrated_cells(o)))
        if "dp" in o:
            eps = f"{o['dp']['epsilon']:g}"
            rows.append((f"{label}, DP-SGD", "-", "-", eps, "-", *_calibrated_cells(o["dp"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    if "start_model" in report:
        st = report["start_model"]
        lines.append(
            f"start model ({Path(st['init']).name}): mean {key} {st['mean'][key]:.3f}, worst {st['worst'][key]:.3f}"
        )
    if "utility_cost_eps8" in report:
        c = report["utility_cost_eps8"]
        lines.append(
            f"epsilon 8 per patient keeps {c['kept']:.2f} of the no-DP mean {key}: {c['mean_no_dp']:.3f} -> "
            f"{c['mean_eps8']:.3f} (worst site {c['worst_no_dp']:.3f} -> {c['worst_eps8']:.3f})"
        )
    for row in report.get("site_size", []):
        if "kept" in row:
            lines.append(
                f"site size {row['min_train_slices']} training slices: mean {key} {row['mean_no_dp']:.3f} without DP, "
                f"{row['mean_eps8']:.3f} at epsilon 8 (kept {row['kept']:.2f})"
            )
    return "\n".join(lines)


def _calibrated_cells(attack: dict | None) -> tuple[str, str]:
    """The calibrated attack's table cells: ``AUC [low, high]`` and ``members+non-members``."""
    if not attack:
        return "-", "-"
    low, high = attack["interval"]
    return f"{attack['auc']:.3f} [{low:.3f}, {high:.3f}]", f"{attack['members']}+{attack['non_members']}"


def _cmd_study_shift(args: argparse.Namespace) -> int:
    from simulations.report import format_table
    from simulations.shift import FULL_METHODS, QUICK_METHODS, check_plan, quick_defaults, shift_study

    defaults: dict[str, object] = _source_defaults(args.source)
    task = str(defaults.get("task.name", parse_overrides(args.run_config).get("task.name", "segmentation")))
    if args.quick:
        defaults.update(quick_defaults(task))
    cfg = _simulate_config(args, defaults)
    methods = _names(args.methods) if args.methods else list(QUICK_METHODS if args.quick else FULL_METHODS)
    unseen = _names(args.unseen) if args.unseen else (["fedavg"] if args.quick else ["fedavg", "fedbn"])
    if unseen == ["none"]:
        unseen = []
    try:
        check_plan(methods, unseen, cfg.sim.sites)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(
        f"fedsite study shift: {cfg.task.name} on {cfg.sim.sites} sites, {cfg.num_server_rounds} rounds x "
        f"{cfg.train.local_epochs} local epochs, methods {', '.join(methods)}; unseen scanner for "
        f"{', '.join(unseen) or 'none'}; seed {cfg.seed}",
        flush=True,
    )
    try:
        doc = shift_study(
            cfg, args.out, methods=methods, unseen=unseen, quick=args.quick, progress=lambda m: print(m, flush=True)
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(format_table(doc))
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _synth_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`simulations.synth.write_sites` settings of a ``data synth`` command line."""
    return {
        "sites": args.sites,
        "seed": args.seed,
        "patients": args.patients,
        "slices": args.slices,
        "transfer_syntax": args.transfer_syntax,
        "photometric": args.photometric,
        "modality": args.modality or ("auto" if args.source is not None else "MR"),
        "source": args.source,
        "label_skew": args.label_skew,
        "quantity_skew": args.quantity_skew,
        "class_names": [c.strip() for c in args.classes.split(",")] if args.classes else None,
    }


def _cmd_synth(args: argparse.Namespace) -> int:
    from simulations.synth import write_sites

    problem = synth_arguments_error(task=args.task, source=args.source, modality=args.modality, classes=args.classes)
    if problem:
        args.synth_parser.error(problem)  # exits 2 with the subcommand's usage, like any argparse error
    for name, value in (("--sites", args.sites), ("--patients", args.patients), ("--slices", args.slices)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if args.patients < 2:
        raise ConfigError(f"--patients must be at least 2 (one for training, one for validation), got {args.patients}")
    started = time.perf_counter()
    try:
        paths = write_sites(args.out, progress=print, **_synth_kwargs(args))
    except ValueError as exc:  # a bad value or an unusable --source: reported like a config error
        raise ConfigError(str(exc)) from None
    print(f"wrote {len(paths)} sites under {args.out} in {time.perf_counter() - started:.1f}s")
    return 0


def synth_main(argv: list[str] | None = None) -> int:
    """``python -m simulations.synth``: write simulated sites (phantoms, or X-ray sites from an image set).

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for a bad value (printed as ``error: ...``); argparse errors exit 2.
    """
    from simulations.profiles import PHOTOMETRICS, SITE_MODALITIES, TRANSFER_SYNTAX_NAMES
    from simulations.synth import write_sites

    p = argparse.ArgumentParser(
        prog="python -m simulations.synth", description="Write simulated scanner sites (DICOM + masks or labels)."
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the site folders")
    p.add_argument("--sites", type=int, default=3)
    defaults = RunConfig()
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--patients", type=int, default=defaults.sim.patients, help="patients (images for --source) per site"
    )
    p.add_argument("--slices", type=int, default=defaults.sim.slices, help="slices per patient (phantoms only)")
    p.add_argument(
        "--transfer-syntax",
        choices=sorted(TRANSFER_SYNTAX_NAMES),
        help="write every site with this lossless transfer syntax",
    )
    p.add_argument("--photometric", choices=PHOTOMETRICS, help="write every site with this photometric interpretation")
    p.add_argument(
        "--modality",
        choices=SITE_MODALITIES,
        help="MR or CT phantoms (default MR); CR, DX or auto (mixed, default) with --source",
    )
    p.add_argument(
        "--source",
        type=Path,
        metavar="PATH.npz",
        help="a MedMNIST-layout .npz of labelled images: write X-ray classification sites",
    )
    p.add_argument(
        "--task",
        choices=field_choices("task.name"),
        help="segmentation (phantoms) or classification (needs --source); default from --source",
    )
    p.add_argument(
        "--label-skew",
        type=float,
        default=0.0,
        help="0 = same class mix / lesion burden on every site; > 0 = per-site skew",
    )
    p.add_argument("--quantity-skew", type=float, default=0.0, help="0 = equal site sizes; > 0 = lognormal site sizes")
    p.add_argument(
        "--classes", help="comma-separated class names of the source's labels 0, 1, ... (default from the file name)"
    )
    args = p.parse_args(argv)
    problem = synth_arguments_error(task=args.task, source=args.source, modality=args.modality, classes=args.classes)
    if problem:
        p.error(problem)
    try:
        paths = write_sites(args.out, progress=print, **_synth_kwargs(args))
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {len(paths)} sites under {args.out}")
    return 0
