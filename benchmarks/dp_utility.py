"""DP utility: which training choices keep a useful model under patient-level DP-SGD; JSON out.

Runs an in-process FedAvg (uniform mean of the sites' weights, as FedAvg weighs DP sites that
withhold their size) over site folders written by ``fedsite data synth``, through the site's own
round code (:func:`client.rounds.train_round`: policy, ledger, lifetime target, patient-level
DP-SGD) and evaluation (:func:`common.task.evaluate` on each site's validation patients). Flower is
left out so that many settings fit in the time of a few simulations; the study
(``fedsite study privacy``) then runs the chosen setting through Flower.

Each ``--arm`` is ``name:key=value,key=value`` over run-config keys (``train.batch-size``,
``privacy.max-grad-norm``, ``train.lr``, ``model.init``, ``privacy.augment-multiplicity`` ...) and
``eps`` (a lifetime target per patient; 0 = no DP). Every arm starts from the same weights and
uses fresh ledgers. Prints one line per round and a JSON document at the end.

Usage::

    python benchmarks/dp_utility.py --sites /tmp/sites --rounds 5 \
        --base "data.image-size=32 train.local-epochs=1" \
        --arm "no-dp:eps=0" --arm "eps8-b96:eps=8,train.batch-size=96"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _config(base: str, arm: dict[str, str]):
    from common.config import RunConfig, flatten, parse_overrides, parse_run_config

    flat = flatten(RunConfig())
    flat.update(parse_overrides([base]) if base else {})
    eps = float(arm.pop("eps", "0"))
    flat.update(parse_overrides([" ".join(f"{k}={v}" for k, v in arm.items())]) if arm else {})
    flat["privacy.dp"] = eps > 0
    flat["privacy.target-epsilon"] = eps
    if eps > 0 and flat.get("model.norm") == "batch":
        flat["model.norm"] = "instance"
    return parse_run_config(flat), eps


def run_arm(sites: list[Path], base: str, name: str, spec: dict[str, str], *, rounds: int, say) -> dict:
    import torch

    from client.policy import SitePolicy
    from client.rounds import SiteMemory, TrainOutcome, TrainRequest, train_round
    from client.runtime import loaded_site
    from common import task
    from common.model import build_model, load_start_weights

    cfg, eps = _config(base, dict(spec))
    cfg = replace(cfg, num_server_rounds=rounds)
    torch.set_num_threads(max(1, cfg.train.threads or 1))
    loaded = [loaded_site(s, cfg) for s in sites]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.task)
    if cfg.model.init:
        load_start_weights(model, cfg.model.init)
    memories = [SiteMemory() for _ in sites]
    out = {"name": name, "spec": spec, "epsilon_target": eps, "rounds": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as ledgers:
        policy = SitePolicy(dp=eps > 0, max_epsilon=eps, ledger_dir=ledgers)
        for r in range(0, rounds + 1):
            if r:
                start = {k: v.clone() for k, v in model.state_dict().items()}
                states, epsilons = [], []
                for site, site_dir, memory in zip(loaded, sites, memories, strict=True):
                    model.load_state_dict(start)
                    request = TrainRequest(
                        server_round=r,
                        epochs=cfg.train.local_epochs,
                        batch_size=cfg.train.batch_size,
                        lr=cfg.train.lr,
                        optimizer=cfg.train.optimizer,
                    )
                    done = train_round(model, site, cfg, request, memory, site_dir=site_dir, run_id=1, policy=policy)
                    if not isinstance(done, TrainOutcome):
                        raise RuntimeError(f"{site.name} refused round {r}: {done.reason}")
                    states.append({k: v.clone() for k, v in model.state_dict().items()})
                    epsilons.append(done.epsilon)
                model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in start})
            scores = {site.name: task.evaluate(model, site.val, task=cfg.task.name) for site in loaded}
            key = "dice" if cfg.task.name == "segmentation" else "auc"
            per_site = {n: round(s[key], 4) for n, s in scores.items()}
            mean = sum(per_site.values()) / len(per_site)
            entry = {
                "round": r,
                key: per_site,
                "mean": round(mean, 4),
                "worst": min(per_site.values()),
                "epsilon": max(epsilons) if r and eps > 0 else None,
                "seconds": round(time.perf_counter() - started, 1),
            }
            out["rounds"].append(entry)
            say(
                f"{name} r{r}: mean {key} {mean:.3f} worst {entry['worst']:.3f} "
                f"eps {entry['epsilon']} ({entry['seconds']}s)"
            )
    out["final"] = out["rounds"][-1]
    out["train_slices"] = {s.name: len(s.train) for s in loaded}
    out["train_patients"] = {s.name: int(s.train_patients.max()) + 1 for s in loaded}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=Path, required=True, help="folder of site-01, site-02, ...")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--base", default="", help="run-config overrides shared by every arm")
    ap.add_argument("--arm", action="append", required=True, metavar="NAME:K=V,K=V")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sites = sorted(p for p in args.sites.iterdir() if p.is_dir() and p.name.startswith("site-"))
    doc = {"sites": [s.name for s in sites], "rounds": args.rounds, "base": args.base, "arms": []}
    for arm in args.arm:
        name, _, rest = arm.partition(":")
        spec = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
        say = lambda m: print(m, flush=True)  # noqa: E731
        doc["arms"].append(run_arm(sites, args.base, name, spec, rounds=args.rounds, say=say))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=2) + "\n")
    summary = [{"name": a["name"], **{k: a["final"][k] for k in ("mean", "worst", "epsilon")}} for a in doc["arms"]]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
