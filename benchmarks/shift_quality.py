"""Quality under scanner shift, in one run: the shift study's goals as measured ratios (JSON).

Runs :func:`simulations.shift.shift_study` (local-only, pooled, FedAvg, FedProx, FedBN, with
FedAvg and FedBN also left-one-site-out) and prints:

* ``fedavg_over_pooled``: FedAvg's mean metric / the pooled model's (goal >= 0.98);
* ``best_worst_site``: the federated method with the best worst site, that site's metric and
  the site's own local-only model on it (goal: not below);
* ``unseen_over_seen``: mean metric on a scanner left out of training / the same method's mean
  in distribution (goal >= 0.95).

Usage::

    python benchmarks/shift_quality.py                          # synthetic MR phantoms, quick settings
    python benchmarks/shift_quality.py --source ../shared/data/pneumoniamnist/pneumoniamnist_merged.npz
    python benchmarks/shift_quality.py --full --rounds 10       # the full method set, longer
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.config import RunConfig, flatten, parse_run_config  # noqa: E402
from simulations.shift import FULL_METHODS, QUICK_METHODS, quick_defaults, shift_study  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--source",
        type=Path,
        help="MedMNIST-layout .npz (classification); default: synthetic MR phantoms (segmentation)",
    )
    p.add_argument(
        "--full", action="store_true", help="all methods incl. FedAdam/FedYogi (default: the quick method set)"
    )
    p.add_argument("--rounds", type=int, help="federated rounds (default: the quick setting, 3)")
    p.add_argument("--sites", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, help="keep the study here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "shift_quality.json")
    args = p.parse_args()
    flat = flatten(RunConfig())
    if args.source:
        flat.update({"task.name": "classification", "sim.source": str(args.source.resolve()), "sim.modality": "auto"})
    flat.update(quick_defaults(str(flat["task.name"])))
    for key, value in (("num-server-rounds", args.rounds), ("sim.sites", args.sites), ("seed", args.seed)):
        if value is not None:
            flat[key] = value
    with tempfile.TemporaryDirectory(prefix="fedsite-shift-") as tmp:
        flat["sim.root"] = str(Path(tmp) / "sites")
        cfg = parse_run_config(flat)
        out = args.out or Path(tmp) / "study"
        t0 = time.perf_counter()
        doc = shift_study(
            cfg,
            out,
            methods=FULL_METHODS if args.full else QUICK_METHODS,
            unseen=("fedavg", "fedbn"),
            progress=lambda m: print(m, file=sys.stderr, flush=True),
        )
        wall = time.perf_counter() - t0
    metric = doc["metric"]
    report = {
        "benchmark": "shift_quality",
        "task": doc["task"],
        "metric": metric,
        "sites": doc["sites"],
        "rounds": doc["rounds"],
        "local_epochs": doc["local_epochs"],
        "wall_s": wall,
        **doc["goals"],
        "mean": {m: e.get("mean", {}).get(metric) for m, e in doc["methods"].items()},
        "worst": {m: e.get("worst", {}).get(metric) for m, e in doc["methods"].items()},
        "unseen_mean": {m: e["unseen_mean"].get(metric) for m, e in doc["methods"].items() if "unseen_mean" in e},
        "sample_steps": {m: e.get("sample_steps") for m, e in doc["methods"].items()},
        "shift_spearman": doc["shift"]["spearman"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
