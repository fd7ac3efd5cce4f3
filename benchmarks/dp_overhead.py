"""DP-SGD step time over a plain step, per per-sample-gradient mode, both tasks' default models; JSON out.

For each task (segmentation: the default UNet; classification: the default ResNet without
BatchNorm) at the default image size and batch size, one process builds a plain model (Adam) and
one DP-SGD model per mode, all from the same weights, then runs rounds of interleaved steps
``plain, mode1, plain, mode2, ...`` on the same batches: each DP step's time is divided by the
plain step just before it, so a load change on the machine hits both sides of a ratio alike. After
``--warmup`` rounds, ``--steps`` rounds are timed; the JSON reports each mode's median ratio with
its quartiles and min/max, and the median step times. One thread (``--threads``) by default.

Modes:

- ``hooks``: Opacus hooks with fedsite's grad samplers for ``PReLU`` and ``ConvTranspose2d``
  (:mod:`client.grad_samplers`); what :func:`client.dpsgd.train_private` runs by default.
- ``hooks-stock``: Opacus hooks alone (those two layers fall back to Opacus' per-layer ``vmap``).
- ``hooks-channels-last``: ``hooks`` with the model and the images in channels-last memory format.
- ``functorch``: Opacus' ``vmap`` per-sample gradients for every layer.
- ``ghost``: Opacus' fast gradient clipping (per-sample norms, then a second, reweighted backward).
- ``vmap``: hand-written ``torch.func.vmap(grad)`` over the whole model, clipped and summed with
  ``einsum``, noise added, then the same Adam step.
- ``vmap-compile``: ``vmap`` under ``torch.compile`` (inductor; compile time reported apart).

Before timing, every mode is checked on one fixed batch with noise 0: its clipped, summed gradient
divided by the batch size must equal the ground truth computed one sample at a time (each
per-sample gradient clipped to C, summed, divided by the batch size), relative error <= 1e-3. A
mode that fails the check or raises is reported and not timed. Goal: DP step <= 1.5x plain.

Usage::

    python benchmarks/dp_overhead.py --out benchmarks/results/dp_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = ("hooks", "hooks-stock", "hooks-channels-last", "functorch", "ghost", "vmap", "vmap-compile")
TASKS = ("segmentation", "classification")
CLIP = 1.0
NOISE = 1.0
LR = 1e-3
Step = Callable[[object, object], None]


def _setup(task: str, size: int, batch: int):
    import torch

    from common.config import parse_run_config
    from common.model import build_model
    from common.task import loss_function

    cfg = parse_run_config({"data.image-size": size, "task.name": task})
    torch.manual_seed(0)
    n = batch * 8
    x = torch.rand(n, 1, size, size)
    y = (x > 0.8).long() if task == "segmentation" else torch.randint(0, len(cfg.task.class_names), (n,))
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    base = build_model(cfg.model, cfg.task)

    def fresh():
        model = build_model(cfg.model, cfg.task)
        model.load_state_dict(base.state_dict())
        return model.train()

    return fresh, lambda: loss_function(task), batches


def _ground_truth(fresh, make_loss, xb, yb) -> list:
    """Clip each sample's gradient to CLIP, sum, divide by the batch size: one sample at a time."""
    import torch

    ref = fresh()
    loss_fn = make_loss()
    truth = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(len(xb)):
        ref.zero_grad()
        loss_fn(ref(xb[i : i + 1]), yb[i : i + 1]).backward()
        g = [p.grad.detach().clone() for p in ref.parameters()]
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        factor = min(1.0, CLIP / (float(norm) + 1e-6))
        truth = [a + b * factor for a, b in zip(truth, g, strict=True)]
    return [t / len(xb) for t in truth]


@contextlib.contextmanager
def _stock_samplers() -> Iterator[None]:
    """Opacus without fedsite's grad samplers, for the duration of the block."""
    import torch
    from opacus.grad_sample import GradSampleModule

    reg = GradSampleModule.GRAD_SAMPLERS
    saved = {k: reg.pop(k) for k in (torch.nn.PReLU, torch.nn.ConvTranspose2d) if k in reg}
    try:
        yield
    finally:
        reg.update(saved)


def _opacus(mode: str, model, make_loss, batch: int, noise: float, lr: float) -> Step:
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from client.per_sample import vmap_grad_samples
    from common.task import make_optimizer

    opacus_mode = {"hooks-stock": "hooks", "hooks-channels-last": "hooks", "vmap": "no_op"}.get(mode, mode)
    channels_last = mode == "hooks-channels-last"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, "adam", lr) if lr > 0 else torch.optim.SGD(model.parameters(), lr=0.0)
    # The loader only fixes the expected batch size (no Poisson sampling here: batches are fed directly).
    loader = DataLoader(TensorDataset(torch.zeros(batch, 1)), batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    kwargs = dict(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=CLIP,
        grad_sample_mode=opacus_mode,
        poisson_sampling=False,
    )
    if mode == "ghost":
        dp_model, dp_opt, loss_fn, _ = engine.make_private(**kwargs, criterion=make_loss())
    else:
        # hooks-stock: Opacus prepares its vmap fallback for the layers it has no sampler for when it wraps
        with _stock_samplers() if mode == "hooks-stock" else contextlib.nullcontext():
            dp_model, dp_opt, _ = engine.make_private(**kwargs)
        loss_fn = make_loss()

    def step(xb, yb) -> None:
        if mode == "vmap":  # Opacus' optimizer clips, adds noise and scales what vmap_grad_samples computed
            dp_opt.zero_grad(set_to_none=True)
            vmap_grad_samples(model, loss_fn, xb, yb)
            dp_opt.step()
            return
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        dp_opt.zero_grad(set_to_none=True)
        loss_fn(dp_model(xb), yb).backward()
        dp_opt.step()

    if mode == "hooks-stock":
        inner = step

        def step(xb, yb) -> None:
            with _stock_samplers():
                inner(xb, yb)

    return step


def _vmap(model, make_loss, batch: int, noise: float, lr: float, compile_: bool) -> Step:
    """Per-sample gradients with ``torch.func.vmap(grad)``, clip, sum, noise, then the optimizer."""
    import torch
    from torch.func import functional_call, grad, vmap

    from common.task import make_optimizer

    loss_fn = make_loss()
    dice = getattr(loss_fn, "dice", None)  # this private loss takes one-hot targets: vmap cannot scatter in place
    onehot = bool(getattr(dice, "to_onehot_y", False))
    if onehot:
        dice.to_onehot_y = False
    names = [k for k, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    opt = make_optimizer(model, "adam", lr) if lr > 0 else torch.optim.SGD(params, lr=0.0)
    noise_gen = torch.Generator().manual_seed(1)

    def sample_loss(ps, x, y):
        out = functional_call(model, ({**dict(zip(names, ps, strict=True)), **buffers}), (x[None],))
        target = y[None]
        if onehot:
            target = (target.long() == torch.arange(out.shape[1]).reshape(1, -1, 1, 1)).to(out.dtype)
        return loss_fn(out, target)

    def clipped_sum(ps, xb, yb):
        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(ps, xb, yb)
        norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in per_sample))
        factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
        return [torch.einsum("n,n...->...", factor, g) for g in per_sample]

    fn = torch.compile(clipped_sum) if compile_ else clipped_sum

    def step(xb, yb) -> None:
        with torch.no_grad():
            summed = fn([p.detach() for p in params], xb, yb)
            for p, s in zip(params, summed, strict=True):
                if noise > 0:
                    s = s + torch.normal(0.0, noise * CLIP, size=s.shape, generator=noise_gen)
                p.grad = s / batch
        opt.step()

    return step


def _make(mode: str, fresh, make_loss, batch: int, noise: float, lr: float) -> Step:
    from client.per_sample import prepare

    model = prepare(fresh())  # as train_private does: in-place activations off, fedsite's grad samplers on
    if mode == "vmap-compile":
        return _vmap(model, make_loss, batch, noise, lr, compile_=True)
    return _opacus(mode, model, make_loss, batch, noise, lr)


def _check(mode: str, fresh, make_loss, batches) -> dict:
    """Noise 0, lr 0: the mode's gradient after one step against the per-sample ground truth."""
    import torch

    xb, yb = batches[0]
    truth = _ground_truth(fresh, make_loss, xb, yb)
    model = fresh()
    step = _make(mode, lambda: model, make_loss, len(xb), noise=0.0, lr=0.0)
    step(xb, yb)
    got = [p.grad for p in model.parameters()]
    if any(g is None for g in got):
        return {"ok": False, "error": "some parameters got no gradient"}
    err = max(float((a - b).abs().max()) for a, b in zip(got, truth, strict=True))
    scale = max(float(t.abs().max()) for t in truth)
    rel = err / max(scale, 1e-12)
    return {"max_abs_error": err, "relative_error": rel, "ok": bool(torch.isfinite(torch.tensor(rel)) and rel <= 1e-3)}


def _stats(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4)
    return {
        "median": statistics.median(values),
        "q1": q[0],
        "q3": q[2],
        "min": min(values),
        "max": max(values),
    }


def _plain(fresh, make_loss, lr: float) -> Step:
    from common.task import make_optimizer

    model = fresh()
    opt = make_optimizer(model, "adam", lr)
    loss_fn = make_loss()

    def step(xb, yb) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()

    return step


def _timed(step: Step, xb, yb) -> float:
    t = time.perf_counter()
    step(xb, yb)
    return time.perf_counter() - t


def run_task(task: str, modes: list[str], *, size: int, batch: int, steps: int, warmup: int) -> dict:
    """Check each mode, then time ``steps`` interleaved rounds after ``warmup`` ones."""
    fresh, make_loss, batches = _setup(task, size, batch)
    report: dict = {"modes": {}}
    live: dict[str, Step] = {}
    for mode in modes:
        entry: dict = {}
        try:
            t = time.perf_counter()
            entry["correct"] = _check(mode, fresh, make_loss, batches)
            entry["check_s"] = time.perf_counter() - t
            if entry["correct"]["ok"]:
                live[mode] = _make(mode, fresh, make_loss, batch, NOISE, LR)
        except Exception as exc:  # a mode that cannot run here is reported, not fatal
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        report["modes"][mode] = entry
    plain = _plain(fresh, make_loss, LR)
    times: dict[str, list[float]] = {m: [] for m in live}
    plain_times: dict[str, list[float]] = {m: [] for m in live}
    for r in range(warmup + steps):
        xb, yb = batches[r % len(batches)]
        for mode, step in live.items():
            tp = _timed(plain, xb, yb)
            try:
                td = _timed(step, xb, yb)
            except Exception as exc:
                report["modes"][mode]["error"] = f"{type(exc).__name__} while timing: {str(exc)[:300]}"
                del times[mode]
                break
            if r >= warmup:
                plain_times[mode].append(tp)
                times[mode].append(td)
        live = {m: s for m, s in live.items() if m in times}
    for mode in times:
        ratios = [d / p for d, p in zip(times[mode], plain_times[mode], strict=True)]
        report["modes"][mode].update(
            {
                "time_ratio": _stats(ratios),
                "step_ms": 1000 * statistics.median(times[mode]),
                "plain_step_ms": 1000 * statistics.median(plain_times[mode]),
                "steps": len(ratios),
            }
        )
    timed = {m: e["time_ratio"]["median"] for m, e in report["modes"].items() if "time_ratio" in e}
    report["median_time_ratio"] = timed
    report["fastest_correct"] = min(timed, key=timed.get) if timed else None
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dp_overhead.json")
    p.add_argument("--steps", type=int, default=50, help="timed interleaved rounds per task (after warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=0, help="0 = train.batch-size of the default config")
    p.add_argument("--size", type=int, default=0, help="0 = data.image-size of the default config")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from client.per_sample import register
    from common.config import parse_run_config

    torch.set_num_threads(args.threads)
    register()
    defaults = parse_run_config({})
    size = args.size or defaults.data.image_size
    batch = args.batch or defaults.train.batch_size
    report: dict = {
        "benchmark": "dp_overhead",
        "image_size": size,
        "batch": batch,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "load_average_before": os.getloadavg(),
        "goal_time_ratio": 1.5,
        "torch": torch.__version__,
        "tasks": {},
    }
    modes = [m for m in args.modes.split(",") if m]
    for task in args.tasks.split(","):
        report["tasks"][task] = run_task(task, modes, size=size, batch=batch, steps=args.steps, warmup=args.warmup)
    report["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {
        task: {
            m: (
                {k: round(v, 2) for k, v in e["time_ratio"].items() if k in ("median", "q1", "q3")}
                if "time_ratio" in e
                else e.get("error") or e.get("correct")
            )
            for m, e in r["modes"].items()
        }
        | {"fastest_correct": r["fastest_correct"]}
        for task, r in report["tasks"].items()
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
