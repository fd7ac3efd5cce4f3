"""Run a whole federation on one machine with Flower's Simulation Runtime (Ray).

:func:`simulate` does what ``flwr run .`` does against a local simulation SuperLink, in-process:
it builds the run config (``pyproject.toml`` defaults fused with overrides, through Flower's own
mechanism), writes the synthetic sites if they are missing, starts the ServerApp and one virtual
SuperNode per site, and returns the results the ServerApp wrote.

It uses the Simulation Runtime's entry point of the flwr 1.41 series (``_run_simulation``, the one
``flwr-simulation`` calls); the public ``run_simulation`` cannot pass a run config to the sites.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import RunConfig, flatten
from simulations.sitefolder import GENERATOR_VERSION

if TYPE_CHECKING:
    from simulations.faults import Fault

__all__ = ["SimulationError", "app_dir", "default_sites_root", "prepare", "simulate", "start_ray", "synth_options"]

log = logging.getLogger("fedsite.sim")


def default_sites_root(cfg: RunConfig) -> Path:
    """Where simulated sites live when ``sim.root`` is empty: one folder per generator setting.

    The synthetic MR default is ``seed42-p8-s12-g<generator version>``; any other source,
    modality or skew adds to it, so two settings or generator versions never share a folder.
    """
    base = Path(os.environ.get("FEDSITE_CACHE", Path.home() / ".cache" / "fedsite")) / "sites"
    d = cfg.sim
    name = f"seed{cfg.seed}-p{d.patients}-s{d.slices}-g{GENERATOR_VERSION}"
    if d.source:
        source = Path(d.source).expanduser().resolve()
        digest = hashlib.sha256(str(source).encode()).hexdigest()[:8]
        name = f"{source.stem}-{digest}-seed{cfg.seed}-p{d.patients}-g{GENERATOR_VERSION}"
    if d.modality != "MR":
        name += f"-{d.modality}"
    if d.label_skew:
        name += f"-ls{d.label_skew:g}"
    if d.quantity_skew:
        name += f"-qs{d.quantity_skew:g}"
    return base / name


def synth_options(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`simulations.synth.write_sites` for the run config's ``sim.*``."""
    d = cfg.sim
    return {
        "seed": cfg.seed,
        "patients": d.patients,
        "slices": d.slices,
        "modality": d.modality,
        "source": Path(d.source).expanduser().resolve() if d.source else None,
        "label_skew": d.label_skew,
        "quantity_skew": d.quantity_skew,
    }


def app_dir() -> Path:
    """The Flower app folder (the one holding ``pyproject.toml``).

    Raises:
        FileNotFoundError: If fedsite was installed without its source tree (use ``pip install -e .``).
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"no pyproject.toml next to the installed packages ({root}); install fedsite from its source "
            "folder with `pip install -e .` so the simulation can read the app's config"
        )
    return root


def prepare(
    cfg: RunConfig, out: Path, *, progress: Callable[[str], None] | None = None, synthesize: bool = True
) -> RunConfig:
    """Resolve folders and write missing synthetic sites; returns the config the run will use.

    Args:
        cfg: The run config.
        out: The run's output folder.
        progress: Called with a line of text as sites are written.
        synthesize: Write the simulated sites under ``sim.root`` if missing; False when
            ``sim.root`` already holds the sites to use (e.g. a leave-one-site-out selection).

    A ``sim.root`` that already holds ``site-01`` .. ``site-NN`` is used as it is; sites are
    written (and checked against the run's generator settings) only under the default root, or
    when some are missing.
    """
    from client.layout import SITE_FILE, sim_site_name
    from simulations.synth import write_sites

    root = Path(cfg.sim.root).expanduser().resolve() if cfg.sim.root else default_sites_root(cfg)
    present = all((root / sim_site_name(i) / SITE_FILE).is_file() for i in range(cfg.sim.sites))
    if cfg.sim.root and present:
        # The researcher's own folder of sites (e.g. written by `fedsite data synth --source ...`):
        # used as it is, whatever settings wrote it.
        log.debug("using the %d sites under %s as they are", cfg.sim.sites, root)
    elif synthesize:
        write_sites(root, sites=cfg.sim.sites, progress=progress, **synth_options(cfg))
    return replace(
        cfg,
        sim=replace(cfg.sim, root=str(root)),
        output=replace(cfg.output, dir=str(Path(out).expanduser().resolve())),
    )


class SimulationError(RuntimeError):
    """The simulation could not run to the end; the message says why."""


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: ``sim.cpus-per-site`` CPUs per virtual site."""
    return {"client_resources": {"num_cpus": cfg.sim.cpus_per_site, "num_gpus": 0.0}}


def start_ray(*, quiet: bool) -> bool:
    """Start Ray on all of this machine's cores, unless it runs already; True if started here.

    Flower would start Ray itself; starting it here adds a worker set-up hook: each site process
    imports torch and MONAI (about 8 s) as soon as it starts, while the server is still starting,
    instead of inside the first round.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU sites: keep Ray's device variables alone
    # As Flower does: workers inherit the driver's import path.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        num_cpus=os.cpu_count() or 1,
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=not quiet,
        runtime_env={
            # the sites' own log lines reach this output with --verbose (client.app.prewarm)
            "env_vars": {"PYTHONPATH": pythonpath, "FEDSITE_SITE_LOG": "0" if quiet else "1"},
            "worker_process_setup_hook": "client.app.prewarm",
        },
    )
    return True


def simulate(
    cfg: RunConfig,
    out: Path,
    *,
    progress: Callable[[str], None] | None = None,
    quiet: bool = True,
    synthesize: bool = True,
    faults: Sequence[Fault] = (),
    after_round: Callable[[int, Any], None] | None = None,
) -> dict[str, Any]:
    """Run the federation described by ``cfg`` and return its ``results.json`` content.

    Args:
        cfg: The run config (``sim.sites`` sites, ``num-server-rounds`` rounds, ...).
        out: The output folder (results.json, final_model.pt, mlflow.db).
        progress: Called with a line of text as sites are written.
        quiet: Show only warnings from Flower and Ray (fedsite's own progress is always shown).
        synthesize: Write missing simulated sites first (see :func:`prepare`).
        faults: Injected faults (:mod:`simulations.faults`): the sites and the server run through
            simulation-only wrappers of the real apps.
        after_round: Called by the server with the round and the global arrays after each round's
            checkpoint (benchmarks, demos).

    Returns:
        The parsed ``results.json``.

    Raises:
        RuntimeError: If the simulation fails (the cause is chained).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    import client.app
    import server.app

    if quiet:
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING)
        flwr_log.propagate = False
    from simulations.faults import faulty_client_app, faulty_server_app

    site_faults = [f for f in faults if f.who != "server"]
    cfg = prepare(cfg, out, progress=progress, synthesize=synthesize)
    overrides = flatten(cfg)
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = overrides
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=overrides)
    import ray

    own_ray = start_ray(quiet=quiet)
    try:
        _run_simulation(
            num_supernodes=cfg.sim.sites,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=faulty_client_app(faults) if site_faults else client.app.app,
            server_app=faulty_server_app(faults, after_round)
            if len(site_faults) < len(faults) or after_round is not None
            else server.app.app,
            backend_name="ray",
            backend_config=backend_config(cfg),
            server_app_context=context,
            app_dir=str(app_dir()),
            run=run,
            is_app=True,
        )
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise SimulationError(f"the simulation failed: {type(cause).__name__}: {cause}") from exc
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()
    results_path = Path(cfg.output.dir) / "results.json"
    if not results_path.is_file():
        raise SimulationError(f"the simulation ended without writing {results_path}; see the log above for the cause")
    return json.loads(results_path.read_text())
