"""DP-SGD step time and peak memory over plain training: same model, batch and data; JSON out.

Each mode runs in its own process (so peak RSS is its own): ``none`` (plain Adam), and Opacus'
per-sample gradient modes ``hooks``, ``functorch`` and ``ghost`` (fast gradient clipping). Each
DP mode is also checked for correctness on one fixed batch with noise 0: its clipped, summed
gradient must equal the ground truth computed one sample at a time (clip each per-sample gradient
to C, sum, divide by the batch size). Goal: DP step time <= 1.5x plain.

Usage::

    python benchmarks/dp_overhead.py --out benchmarks/results/dp_overhead.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("none", "hooks", "functorch", "ghost")


def _measure(mode: str, steps: int, batch: int, size: int, threads: int) -> dict:
    sys.path.insert(0, str(REPO))
    warnings.filterwarnings("ignore")
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common.config import parse_run_config
    from common.model import build_model
    from common.task import loss_function, make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = parse_run_config({"data.image-size": size})
    n = batch * (steps + 3)
    x = torch.rand(n, 1, size, size)
    y = (x > 0.8).long()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model(cfg.model)
    opt = make_optimizer(model, "adam", 1e-3)
    loss_fn = loss_function()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    correct = None
    if mode != "none":
        # correctness on one fixed batch, noise 0, before timing
        xb, yb = x[:batch], y[:batch]
        ref = build_model(cfg.model)
        ref.load_state_dict(model.state_dict())
        clip = 0.5
        truth = [torch.zeros_like(p) for p in ref.parameters()]
        for i in range(batch):
            ref.zero_grad()
            loss_function()(ref(xb[i : i + 1]), yb[i : i + 1]).backward()
            g = [p.grad.detach().clone() for p in ref.parameters()]
            norm = torch.sqrt(sum((t**2).sum() for t in g))
            factor = min(1.0, clip / (float(norm) + 1e-6))
            truth = [a + b * factor for a, b in zip(truth, g, strict=True)]
        truth = [t / batch for t in truth]
        probe = build_model(cfg.model)
        probe.load_state_dict(model.state_dict())
        popt = torch.optim.SGD(probe.parameters(), lr=0.0)
        pl = DataLoader(TensorDataset(xb, yb), batch_size=batch)
        pe = PrivacyEngine(accountant="rdp")
        if mode == "ghost":
            pm, popt, plf, pl = pe.make_private(
                module=probe,
                optimizer=popt,
                data_loader=pl,
                noise_multiplier=0.0,
                max_grad_norm=clip,
                grad_sample_mode="ghost",
                criterion=loss_function(),
                poisson_sampling=False,
            )
        else:
            pm, popt, pl = pe.make_private(
                module=probe,
                optimizer=popt,
                data_loader=pl,
                noise_multiplier=0.0,
                max_grad_norm=clip,
                grad_sample_mode=mode,
                poisson_sampling=False,
            )
            plf = loss_function()
        for xb2, yb2 in pl:
            popt.zero_grad()
            plf(pm(xb2), yb2).backward()
            popt.step()
        got = [p.grad for p in probe.parameters()]
        err = max(float((a - b).abs().max()) for a, b in zip(got, truth, strict=True))
        scale = max(float(t.abs().max()) for t in truth)
        correct = {
            "max_abs_error": err,
            "relative_error": err / max(scale, 1e-12),
            "ok": err <= 1e-3 * max(scale, 1e-12) + 1e-6,
        }
        pe = PrivacyEngine(accountant="rdp")
        if mode == "ghost":
            model, opt, loss_fn, loader = pe.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                grad_sample_mode="ghost",
                criterion=loss_fn,
                poisson_sampling=False,
            )
        else:
            model, opt, loader = pe.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                grad_sample_mode=mode,
                poisson_sampling=False,
            )
    times = []
    for xb, yb in loader:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    times = times[3:]  # warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "step_ms": 1000 * sum(times) / len(times),
        "steps": len(times),
        "peak_rss_mb": peak / 1024,
        "rss_growth_mb": (peak - base_rss) / 1024,
        "correct": correct,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dp_overhead.json")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:  # child process
        print(json.dumps(_measure(args.mode, args.steps, args.batch, args.size, args.threads)))
        return
    results = {}
    for mode in MODES:
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--size",
            str(args.size),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            results[mode] = {
                "mode": mode,
                "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed",
            }
            continue
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    plain = results["none"]
    report = {
        "benchmark": "dp_overhead",
        "model": "MONAI UNet 16,32,64,128, instance norm",
        "batch": args.batch,
        "image_size": args.size,
        "threads": args.threads,
        "modes": results,
        "time_ratio": {
            m: r["step_ms"] / plain["step_ms"] for m, r in results.items() if "step_ms" in r and m != "none"
        },
        "memory_ratio": {
            m: r["peak_rss_mb"] / plain["peak_rss_mb"] for m, r in results.items() if "peak_rss_mb" in r and m != "none"
        },
        "goal_time_ratio": 1.5,
    }
    valid = {m: v for m, v in report["time_ratio"].items() if (results[m].get("correct") or {}).get("ok")}
    report["fastest_correct"] = min(valid, key=valid.get) if valid else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: report[k] for k in ("time_ratio", "memory_ratio", "fastest_correct", "goal_time_ratio")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
