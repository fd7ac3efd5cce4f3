"""Federated vs centralized wall time on the same data, model and sample-steps; JSON out.

One run, one machine, same cores:

* **centralized**: one process reads every site's DICOM with the same pipeline, pools the training
  splits and trains the same network for ``rounds x local-epochs`` epochs over the pooled set (the
  same number of sample-steps as the federation), evaluating on every site's validation split once
  per "round", as the federation does; torch uses all cores.
* **federated**: ``fedsite simulate`` on the same sites (Flower Simulation Runtime on Ray, one actor
  per ``sim.cpus-per-site`` cores), timed from the call to the results.

It writes ``ratio`` = federated / centralized wall time and, per round, the framework overhead =
round time minus the sites' compute time on the critical path (sum of the sites' train+evaluate
compute divided by the number of sites that run at once). Goal: ratio <= 1.10.

Usage::

    python benchmarks/federated_vs_central.py --out benchmarks/results/fed_vs_central.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from client.dataset import load_site  # noqa: E402
from common.config import RunConfig, flatten, parse_run_config  # noqa: E402
from common.model import build_model  # noqa: E402
from common.task import evaluate, stack_samples, train  # noqa: E402
from simulations.runner import prepare, simulate  # noqa: E402
from simulations.synth import site_name  # noqa: E402


def centralized(cfg: RunConfig) -> dict:
    """Pooled training with the federation's budget; returns timings and sample-steps."""
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    sites = [load_site(Path(cfg.sim.root) / site_name(i), cfg.data, seed=cfg.seed) for i in range(cfg.sim.sites)]
    pooled = stack_samples([s for site in sites for s in site.train])
    vals = [stack_samples(site.val) for site in sites]
    t_load = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    train_s = eval_s = 0.0
    dice = []
    for r in range(cfg.num_server_rounds):
        res = train(
            model,
            pooled,
            epochs=cfg.train.local_epochs,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            optimizer=cfg.train.optimizer,
            seed=cfg.seed + r,
        )
        train_s += res.seconds
        t1 = time.perf_counter()
        dice = [evaluate(model, v, batch_size=max(cfg.train.batch_size, 32))["dice"] for v in vals]
        eval_s += time.perf_counter() - t1
    return {
        "wall_s": time.perf_counter() - t0,
        "load_s": t_load,
        "train_s": train_s,
        "eval_s": eval_s,
        "threads": torch.get_num_threads(),
        "sample_steps": len(pooled) * cfg.train.local_epochs * cfg.num_server_rounds,
        "final_mean_dice": sum(dice) / len(dice),
    }


def federated(cfg: RunConfig, out: Path) -> dict:
    """The federation through the same runner `fedsite simulate` uses."""
    t0 = time.perf_counter()
    results = simulate(cfg, out, quiet=True)
    wall = time.perf_counter() - t0
    concurrent = max(1, math.floor((os.cpu_count() or 1) / cfg.sim.cpus_per_site))
    concurrent = min(concurrent, cfg.sim.sites)
    rounds = []
    for r in results["rounds"]:
        train_c = sum(m["compute-s"] for m in r["train"].values())
        handler = sum(m["handler-s"] for m in r["train"].values())
        eval_c = sum(m.get("compute-s", 0.0) for m in r["evaluate_timing"].values())
        critical = (train_c + eval_c) / concurrent
        rounds.append(
            {
                "round": r["round"],
                "round_s": r["seconds"],
                "sites_train_compute_s": train_c,
                "sites_train_handler_s": handler,
                "critical_path_compute_s": critical,
                "overhead_s": r["seconds"] - critical,
                "threads_per_site": sorted({int(m.get("threads", 0)) for m in r["train"].values()}),
            }
        )
    steps = (
        sum(m["num-examples"] for m in results["rounds"][0]["train"].values())
        * cfg.train.local_epochs
        * cfg.num_server_rounds
    )
    return {
        "wall_s": wall,
        "server_total_s": results["timing"]["total_s"],
        "startup_s": wall - results["timing"]["total_s"],
        "concurrent_sites": concurrent,
        "sample_steps": steps,
        "rounds": rounds,
        "final_mean_dice": results["final"]["mean"]["dice"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fed_vs_central.json")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--run-config", default="", help="extra 'key=value ...' overrides")
    args = p.parse_args()
    overrides: dict[str, object] = {
        "sim.sites": args.sites,
        "num-server-rounds": args.rounds,
        "train.local-epochs": args.local_epochs,
    }
    for part in args.run_config.split():
        k, v = part.split("=", 1)
        overrides[k] = json.loads(v) if v[:1].isdigit() or v[:1] == "-" else v.strip("'\"")
    with tempfile.TemporaryDirectory(prefix="fedsite-bench-") as tmp:
        cfg = parse_run_config({**flatten(RunConfig()), **overrides, "sim.root": str(Path(tmp) / "sites")})
        cfg = prepare(cfg, Path(tmp) / "run")  # write the sites once, outside both timings
        # Decode every site once (the site's disk cache), outside both timings: a site decodes its
        # DICOM once in its life; both runs then read the same cached samples.
        t0 = time.perf_counter()
        for i in range(cfg.sim.sites):
            load_site(Path(cfg.sim.root) / site_name(i), cfg.data, seed=cfg.seed)
        first_decode_s = time.perf_counter() - t0
        fed = federated(cfg, Path(tmp) / "run")
        cen = centralized(cfg)
    report = {
        "benchmark": "federated_vs_central",
        "config": {k: v for k, v in flatten(cfg).items() if not k.startswith(("sim.root", "output."))},
        "cpu_count": os.cpu_count(),
        "ratio": fed["wall_s"] / cen["wall_s"],
        "ratio_steady_state": (fed["wall_s"] - fed["startup_s"] - fed["rounds"][0]["overhead_s"])
        / max(cen["wall_s"] - cen["load_s"], 1e-9),
        "goal": 1.10,
        "first_decode_s": first_decode_s,
        "mean_overhead_s_per_round": sum(r["overhead_s"] for r in fed["rounds"]) / len(fed["rounds"]),
        "federated": fed,
        "centralized": cen,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: report[k] for k in ("ratio", "ratio_steady_state", "goal", "mean_overhead_s_per_round")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
