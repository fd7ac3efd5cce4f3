"""The domain-shift study: how a model trained at one scanner site holds up at the others.

:func:`shift_study` runs, on the same simulated sites, split and seed:

* **local-only**: each site trains alone, the same rounds x local epochs it trains in the
  federation (a fresh optimizer each round, the same per-round shuffling seeds), no averaging;
* **pooled**: one model trained on all sites' training splits put together, the same rounds x
  local epochs over the pooled set: the same number of sample-steps as the federation, with the
  same optimizer and learning rate;
* the **federated** methods (FedAvg, FedProx, FedBN, FedAdam, FedYogi), each a real Flower
  simulation through :func:`simulations.runner.simulate`;
* **unseen scanner** (leave-one-site-out): for the chosen federated methods, one more federation
  per site on the other sites only, its final model evaluated on the left-out site.

It measures each model on every site's validation split (the **cross-site matrix**), the mean
and worst site per method, and a **shift measure** between sites computed from what a site may
share: the intensity histogram of the images its model sees (:mod:`simulations.shift_measure`), set next to
the loss each local model suffers from one site to another. Everything is written to
``shift.json`` and a Markdown report with figures (:mod:`simulations.report`).

The study is a simulation: it reads every site's data on one machine. Local-only and pooled
training run in this process with the same plain functions the sites use (:mod:`common.task`).

The budget is accounted, not assumed: every method's ``sample_steps`` is the number of samples
that went through an optimizer step, summed (pooled and local-only from :class:`~common.task.TrainResult`,
federated from the sites' ``samples-seen`` in ``results.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import STRATEGY_NAMES, RunConfig, flatten
from common.metrics import summarize_sites

__all__ = [
    "FEDERATED",
    "FULL_METHODS",
    "QUICK_METHODS",
    "SiteSplits",
    "check_plan",
    "cross_site_matrix",
    "federated_budget",
    "goals",
    "home_advantage",
    "quick_defaults",
    "shift_pairs",
    "shift_study",
    "train_rounds",
]

log = logging.getLogger("fedsite.sim")

#: Federated methods (a ``strategy.name`` each).
FEDERATED = STRATEGY_NAMES
QUICK_METHODS = ("local-only", "pooled", "fedavg", "fedprox", "fedbn")
FULL_METHODS = ("local-only", "pooled", *FEDERATED)


@dataclass(frozen=True)
class SiteSplits:
    """One site's samples as tensors (the split every site makes: same seed, same function)."""

    name: str
    train: Any
    val: Any
    profile: str


def quick_defaults(task: str) -> dict[str, Any]:
    """The ``--quick`` settings (flat run-config keys): 3 sites, 5 rounds x 2 local epochs.

    Segmentation: the default sites (8 patients x 12 slices, 64 x 64 pixels of 3.75 mm) and a
    small UNet. Classification: 300 chest X-rays per site at 32 x 32 pixels of 7.5 mm (the source
    images are 28 x 28) and a small ResNet. Smaller settings leave the local models so
    undertrained, and the validation splits so small, that the shift drowns in noise.
    """
    flat: dict[str, Any] = {
        "num-server-rounds": 5,
        "train.local-epochs": 2,
        "sim.sites": 3,
        "model.channels": "8,16,32,64",
    }
    if task == "classification":
        flat.update({"sim.patients": 300, "data.image-size": 32, "data.spacing-mm": 7.5})
    return flat


def train_rounds(
    model: torch.nn.Module,
    data: Any,
    cfg: RunConfig,
    *,
    seed_name: str,
    evaluate_on: Mapping[str, Any] | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """Train ``model`` as a site trains it in a federation, without the averaging.

    ``num-server-rounds`` calls of :func:`common.task.train` with ``train.local-epochs`` epochs
    each (a fresh optimizer per call, as each round starts one), the shuffling seed of round
    ``r`` derived from ``(seed, seed_name, r)`` as a site derives it.

    Args:
        model: The network, trained in place.
        data: The training split (:class:`common.task.Batchable`).
        cfg: The run config (rounds, local epochs, batch size, optimizer, learning rate, task).
        seed_name: The name the per-round seeds derive from (the site name, or ``"pooled"``).
        evaluate_on: Validation splits by site: evaluated after every round for the learning curve.
        weights: Classification: per-class loss weights.

    Returns:
        ``(sample_steps, curve)``: samples that went through an optimizer step, summed over all
        rounds; per round ``{"round", "mean", "worst"}`` of the primary metric over ``evaluate_on``.
    """
    from client.runtime import site_seed
    from common import task

    samples = 0
    curve: list[dict[str, float]] = []
    metric = cfg.task.metric
    for r in range(1, cfg.num_server_rounds + 1):
        res = task.train(
            model,
            data,
            epochs=cfg.train.local_epochs,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            optimizer=cfg.train.optimizer,
            seed=site_seed(cfg.seed, seed_name, r),
            task=cfg.task.name,
            weights=weights,
            augment=cfg.train.augment,
        )
        samples += res.samples_seen
        if evaluate_on:
            values = [_evaluate(model, v, cfg).get(metric, math.nan) for v in evaluate_on.values()]
            curve.append({"round": r, "mean": float(np.nanmean(values)), "worst": float(np.nanmin(values))})
    return samples, curve


def _evaluate(model: torch.nn.Module, data: Any, cfg: RunConfig) -> dict[str, float]:
    from common import task

    scores = task.evaluate(model, data, batch_size=max(cfg.train.batch_size, 32), task=cfg.task.name)
    scores.pop("num-examples", None)
    return scores


def cross_site_matrix(
    models: Mapping[str, torch.nn.Module], vals: Mapping[str, Any], cfg: RunConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate every model on every site's validation split.

    Args:
        models: Row name (e.g. ``"local:site-01"``, ``"pooled"``) -> model.
        vals: Site name -> validation split.
        cfg: The run config (task, batch size).

    Returns:
        ``{row: {site: {metric: value}}}`` with every metric :func:`common.task.evaluate` gives.
    """
    return {row: {site: _evaluate(model, val, cfg) for site, val in vals.items()} for row, model in models.items()}


def federated_budget(results: Mapping[str, Any]) -> int:
    """Sample-steps of a federation: the sites' ``samples-seen`` summed over every round."""
    total = 0.0
    for r in results.get("rounds", []):
        for m in r.get("train", {}).values():
            total += float(m.get("samples-seen", 0.0))
    return round(total)


def shift_pairs(
    matrix: Mapping[str, Mapping[str, Mapping[str, float]]], distances: Mapping[str, Mapping[str, float]], metric: str
) -> list[dict[str, Any]]:
    """For each ordered pair of sites: histogram distance and the local model's loss of ``metric``.

    ``loss`` = site A's local-only model on A minus the same model on B (positive: worse away
    from home).
    """
    pairs = []
    sites = sorted(distances)
    for a in sites:
        row = matrix.get(f"local:{a}", {})
        own = row.get(a, {}).get(metric)
        for b in sites:
            if a == b or own is None or metric not in row.get(b, {}):
                continue
            pairs.append(
                {
                    "train_site": a,
                    "test_site": b,
                    "distance": float(distances[a][b]),
                    "loss": float(own - row[b][metric]),
                }
            )
    return pairs


def home_advantage(
    matrix: Mapping[str, Mapping[str, Mapping[str, float]]], sites: Sequence[str], metric: str
) -> dict[str, Any]:
    """Is the shift real? Each local-only model at home against the same model away, and against the visitors.

    Per site ``a``: ``own`` = local model of ``a`` on ``a``; ``away`` = the same model's mean on the
    other sites (row-wise; a hard site makes its own model look bad at home, so this mixes shift
    with difficulty); ``visitors`` = the other sites' local models' mean on ``a`` (column-wise:
    same test images, so only the training site differs). ``row_gap = own - away``,
    ``column_gap = own - visitors``; positive gaps mean shift.

    Returns:
        ``{"per_site": {site: {...}}, "rows_home_best": k, "columns_home_best": k, "sites": n,
        "mean_row_gap": ..., "mean_column_gap": ...}`` (home best = beats every other value).
    """
    per_site: dict[str, dict[str, float]] = {}
    rows_best = cols_best = 0
    for a in sites:
        row = matrix.get(f"local:{a}", {})
        if metric not in row.get(a, {}):
            continue
        own = row[a][metric]
        away = [row[b][metric] for b in sites if b != a and metric in row.get(b, {})]
        visitors = [
            matrix[f"local:{b}"][a][metric]
            for b in sites
            if b != a and metric in matrix.get(f"local:{b}", {}).get(a, {})
        ]
        if not away or not visitors:
            continue
        per_site[a] = {
            "own": own,
            "away": float(np.mean(away)),
            "visitors": float(np.mean(visitors)),
            "row_gap": own - float(np.mean(away)),
            "column_gap": own - float(np.mean(visitors)),
        }
        rows_best += int(own > max(away))
        cols_best += int(own > max(visitors))
    out: dict[str, Any] = {
        "per_site": per_site,
        "rows_home_best": rows_best,
        "columns_home_best": cols_best,
        "sites": len(per_site),
    }
    if per_site:
        out["mean_row_gap"] = float(np.mean([v["row_gap"] for v in per_site.values()]))
        out["mean_column_gap"] = float(np.mean([v["column_gap"] for v in per_site.values()]))
    return out


def _load_sites(cfg: RunConfig) -> list[SiteSplits]:
    from client.dataset import load_site
    from client.layout import sim_site_name
    from common.task import stack_samples

    out = []
    for i in range(cfg.sim.sites):
        folder = Path(cfg.sim.root) / sim_site_name(i)
        data = load_site(folder, cfg.data, seed=cfg.seed, task=cfg.task)
        out.append(
            SiteSplits(
                name=data.name,
                train=stack_samples(data.train),
                val=stack_samples(data.val),
                profile=_profile_name(folder),
            )
        )
    return out


def _profile_name(folder: Path) -> str:
    try:
        doc = json.loads((folder / "site.json").read_text())
        return str(doc.get("profile", {}).get("name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _example_image(folder: Path) -> np.ndarray | None:
    """The middle slice of the site's first series, as decoded modality values (for the montage)."""
    from client.discovery import read_series
    from client.errors import DicomError
    from client.site import scan_site

    try:
        series = scan_site(folder).series
        if not series:
            return None
        volume = read_series(series[0])
        return np.asarray(volume[len(volume) // 2], dtype=np.float32)
    except DicomError:
        return None


def _loso_root(out: Path, sites_root: Path, names: Sequence[str], left_out: int) -> Path:
    """A data root whose ``site-01``, ``site-02``, ... link to every site but ``left_out``."""
    from client.layout import sim_site_name

    root = out / f"without-{names[left_out]}"
    root.mkdir(parents=True, exist_ok=True)
    kept = [i for i in range(len(names)) if i != left_out]
    for j, i in enumerate(kept):
        link = root / sim_site_name(j)
        target = (sites_root / sim_site_name(i)).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return root


def _curve(results: Mapping[str, Any], metric: str) -> list[dict[str, float]]:
    curve = []
    for r in results.get("rounds", []):
        values = [m[metric] for m in r.get("per_site", {}).values() if metric in m]
        if values:
            curve.append({"round": r["round"], "mean": float(np.mean(values)), "worst": float(np.min(values))})
    return curve


def _method_entry(
    per_site: dict[str, dict[str, float]], *, sample_steps: int, seconds: float, curve: list[dict[str, float]]
) -> dict[str, Any]:
    mean, worst = summarize_sites(per_site)
    return {
        "per_site": per_site,
        "mean": mean,
        "worst": worst,
        "curve": curve,
        "sample_steps": int(sample_steps),
        "seconds": seconds,
    }


def _federated_config(
    cfg: RunConfig, method: str, out: Path, *, sites_root: Path | None = None, sites: int | None = None
) -> RunConfig:
    root = cfg.sim.root if sites_root is None else str(sites_root)
    return replace(
        cfg,
        strategy=replace(cfg.strategy, name=method, min_sites=min(cfg.strategy.min_sites, sites or cfg.sim.sites)),
        sim=replace(cfg.sim, sites=sites or cfg.sim.sites, root=root),
        output=replace(cfg.output, dir=str(out)),
    )


def check_plan(methods: Sequence[str], unseen: Sequence[str], sites: int) -> None:
    """Check the study's methods and site count before any work starts.

    Raises:
        ValueError: If a method is unknown, an unseen-site method is not federated, or there are
            fewer than 2 sites (3 with ``unseen``: leave-one-site-out federates the other n-1).
    """
    unknown = [m for m in (*methods, *unseen) if m not in FULL_METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(FULL_METHODS)}")
    bad_unseen = [m for m in unseen if m not in FEDERATED]
    if bad_unseen:
        raise ValueError(f"unseen-site runs are for federated methods ({', '.join(FEDERATED)}), not {bad_unseen[0]!r}")
    if not methods and not unseen:
        raise ValueError("no methods to run; name at least one")
    if sites < 2 or (unseen and sites < 3):
        need = 3 if unseen else 2
        hint = (
            "use --sites 3 or more, or --unseen none to skip leave-one-site-out" if unseen else "use --sites 2 or more"
        )
        raise ValueError(f"the shift study needs at least {need} sites, got {sites}: {hint}")


def shift_study(
    base: RunConfig,
    out: Path,
    *,
    methods: Sequence[str] = QUICK_METHODS,
    unseen: Sequence[str] = ("fedavg",),
    quick: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the shift study and write ``out/shift.json`` and ``out/report.md`` (+ figures).

    Args:
        base: The run config every method shares (sites, rounds, seed, model, task, data).
        out: The study folder; federated runs go to ``out/runs/<method>/``.
        methods: Among ``"local-only"``, ``"pooled"`` and :data:`FEDERATED`.
        unseen: Federated methods to run leave-one-site-out (one more federation per site each).
        quick: Recorded in the results (the caller picked quick settings).
        progress: Called with a line of text per step.

    Returns:
        The content of ``shift.json``.

    Raises:
        ValueError: If a method is unknown, or fewer than 2 sites (3 with ``unseen``) are configured.
    """
    check_plan(methods, unseen, base.sim.sites)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    server_log = logging.getLogger("fedsite.server")
    level = server_log.level
    server_log.setLevel(logging.WARNING)  # one line per method here instead of each run's tables
    try:
        return _study(base, out, methods=methods, unseen=unseen, quick=quick, progress=progress)
    finally:
        server_log.setLevel(level)


def _study(
    base: RunConfig,
    out: Path,
    *,
    methods: Sequence[str],
    unseen: Sequence[str],
    quick: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from client.layout import sim_site_name
    from common.model import build_model
    from common.task import class_weights
    from simulations.report import write_report
    from simulations.runner import prepare, simulate
    from simulations.shift_measure import distance_matrix, intensity_histogram, spearman

    n = base.sim.sites
    started = time.perf_counter()
    metric = base.task.metric
    cfg = prepare(base, out / "runs", progress=progress)
    sites_root = Path(cfg.sim.root)
    torch.set_num_threads(os.cpu_count() or 1)
    progress(f"reading {n} sites under {sites_root}")
    sites = _load_sites(cfg)
    names = [s.name for s in sites]
    vals = {s.name: s.val for s in sites}
    num_classes = len(cfg.task.class_names)

    def weights_of(train: Any) -> torch.Tensor | None:
        if cfg.task.name != "classification" or not cfg.task.class_weighted:
            return None
        return class_weights(train.labels, num_classes)

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)  # the server's initial model: the same for every method
        return build_model(cfg.model, cfg.task)

    method_entries: dict[str, dict[str, Any]] = {}
    matrix_models: dict[str, torch.nn.Module] = {}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    if "local-only" in methods:
        t0 = time.perf_counter()
        steps_total = 0
        per_site: dict[str, dict[str, float]] = {}
        curves: list[list[dict[str, float]]] = []
        for s in sites:
            progress(
                f"local-only: {s.name} trains alone ({len(s.train)} samples, "
                f"{cfg.num_server_rounds} x {cfg.train.local_epochs} epochs)"
            )
            model = fresh_model()
            steps, curve = train_rounds(
                model, s.train, cfg, seed_name=s.name, evaluate_on={s.name: s.val}, weights=weights_of(s.train)
            )
            steps_total += steps
            curves.append(curve)
            matrix_models[f"local:{s.name}"] = model
        rows.update(cross_site_matrix(matrix_models, vals, cfg))
        for s in sites:
            per_site[s.name] = rows[f"local:{s.name}"][s.name]
        curve = [
            {
                "round": c[0]["round"],
                "mean": float(np.mean([x["mean"] for x in c])),
                "worst": float(np.min([x["worst"] for x in c])),
            }
            for c in zip(*curves, strict=True)
        ]
        method_entries["local-only"] = _method_entry(
            per_site, sample_steps=steps_total, seconds=time.perf_counter() - t0, curve=curve
        )
        _say(progress, "local-only", method_entries["local-only"], metric)
    if "pooled" in methods:
        from common.task import Batchable

        t0 = time.perf_counter()
        progress(f"pooled: one model on all {sum(len(s.train) for s in sites)} training samples")
        pooled = Batchable(torch.cat([s.train.images for s in sites]), torch.cat([s.train.labels for s in sites]))
        model = fresh_model()
        steps, curve = train_rounds(
            model, pooled, cfg, seed_name="pooled", evaluate_on=vals, weights=weights_of(pooled)
        )
        rows.update(cross_site_matrix({"pooled": model}, vals, cfg))
        method_entries["pooled"] = _method_entry(
            dict(rows["pooled"]), sample_steps=steps, seconds=time.perf_counter() - t0, curve=curve
        )
        _say(progress, "pooled", method_entries["pooled"], metric)
    for method in [m for m in methods if m in FEDERATED]:
        t0 = time.perf_counter()
        progress(f"{method}: federation of {n} sites, {cfg.num_server_rounds} rounds (Flower simulation)")
        run_out = out / "runs" / method
        results = simulate(_federated_config(cfg, method, run_out), run_out, quiet=True)
        per_site = {
            site: {k: v for k, v in m.items() if k != "num-examples"}
            for site, m in results["final"]["per_site"].items()
        }
        rows[method] = per_site
        entry = _method_entry(
            per_site,
            sample_steps=federated_budget(results),
            seconds=time.perf_counter() - t0,
            curve=_curve(results, metric),
        )
        if results["final"]["per_site"].keys() != set(names):
            entry["missing_sites"] = sorted(set(names) - set(results["final"]["per_site"]))
        method_entries[method] = entry
        _say(progress, method, entry, metric)
    for method in unseen:
        t0 = time.perf_counter()
        held: dict[str, dict[str, float]] = {}
        for k, name in enumerate(names):
            progress(f"{method}, unseen scanner: federation without {name} ({n - 1} sites), evaluated on {name}")
            root = _loso_root(out / "loso", sites_root, names, k)
            run_out = out / "runs" / f"{method}-without-{name}"
            run_cfg = _federated_config(cfg, method, run_out, sites_root=root, sites=n - 1)
            simulate(run_cfg, run_out, quiet=True, synthesize=False)
            model = build_model(cfg.model, cfg.task)
            model.load_state_dict(torch.load(run_out / "final_model.pt", map_location="cpu", weights_only=True))
            held[name] = _evaluate(model, vals[name], cfg)
        entry = method_entries.setdefault(method, {})
        entry["unseen"] = held
        entry["unseen_mean"], entry["unseen_worst"] = summarize_sites(held)
        entry["unseen_seconds"] = time.perf_counter() - t0
        progress(f"    {method} on unseen scanners: mean {metric} {entry['unseen_mean'].get(metric, math.nan):.3f}")

    # The shift measure: what each site may share (a histogram of its model inputs).
    hists = {s.name: intensity_histogram(s.train.images, bins=64) for s in sites}
    distances = distance_matrix(hists)
    pairs = shift_pairs(rows, distances, metric)
    edges = np.linspace(0.0, 1.0, 65)
    shift = {
        "measure": "Jensen-Shannon distance (base 2) between the sites' histograms of model-input intensities "
        "(64 bins on [0, 1])",
        "distances": distances,
        "pairs": pairs,
        "spearman": spearman([p["distance"] for p in pairs], [p["loss"] for p in pairs])
        if len(pairs) >= 3
        else math.nan,
        "histograms": {site: {"edges": edges.tolist(), "density": h.tolist()} for site, h in hists.items()},
        "home": home_advantage(rows, names, metric),
    }
    doc: dict[str, Any] = {
        "task": cfg.task.name,
        "metric": metric,
        "sites": names,
        "profiles": {s.name: s.profile for s in sites},
        "quick": quick,
        "rounds": cfg.num_server_rounds,
        "local_epochs": cfg.train.local_epochs,
        "samples": {s.name: {"train": len(s.train), "val": len(s.val)} for s in sites},
        "methods": method_entries,
        "cross_site": {
            "metric": metric,
            "rows": {row: {site: v.get(metric, math.nan) for site, v in cells.items()} for row, cells in rows.items()},
        },
        "cross_site_all": rows,
        "shift": shift,
        "goals": goals(method_entries, metric),
        "config": {k: v for k, v in flatten(cfg).items() if not k.startswith("output.")},
    }
    doc["seconds"] = time.perf_counter() - started
    (out / "shift.json").write_text(json.dumps(_finite(doc), indent=2) + "\n")
    examples = {
        s.name: img
        for s in sites
        if (img := _example_image(sites_root / sim_site_name(names.index(s.name)))) is not None
    }
    report = write_report(out, _finite(doc), examples=examples)
    progress(f"wrote {out / 'shift.json'} and {report} in {doc['seconds']:.0f}s")
    return doc


def goals(methods: Mapping[str, Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """The issue's quality goals, measured: FedAvg vs pooled, best worst site vs local, unseen vs seen.

    Returns:
        ``fedavg_over_pooled`` (mean metric ratio, goal >= 0.98); ``best_method`` (federated method
        with the highest worst-site metric), its worst site, that site's metric and the site's
        local-only model on it (goal: not below); ``unseen_over_seen`` per method with unseen runs
        (mean metric on left-out sites / the same method's mean in distribution, goal >= 0.95).
    """
    out: dict[str, Any] = {}
    fedavg, pooled, local = methods.get("fedavg", {}), methods.get("pooled", {}), methods.get("local-only", {})
    if metric in fedavg.get("mean", {}) and pooled.get("mean", {}).get(metric):
        out["fedavg_over_pooled"] = fedavg["mean"][metric] / pooled["mean"][metric]
    federated = {m: e for m, e in methods.items() if m in FEDERATED and metric in e.get("worst", {})}
    if federated:
        best = max(federated, key=lambda m: federated[m]["worst"][metric])
        per_site = federated[best]["per_site"]
        worst_site = min((s for s in per_site if metric in per_site[s]), key=lambda s: per_site[s][metric])
        entry = {"method": best, "worst_site": worst_site, "value": per_site[worst_site][metric]}
        own = local.get("per_site", {}).get(worst_site, {}).get(metric)
        if own is not None:
            entry["local_only_on_that_site"] = own
            entry["at_least_local"] = per_site[worst_site][metric] >= own
        out["best_worst_site"] = entry
    ratios = {}
    for m, e in methods.items():
        seen, unseen = e.get("mean", {}).get(metric), e.get("unseen_mean", {}).get(metric)
        if seen and unseen is not None:
            ratios[m] = unseen / seen
    if ratios:
        out["unseen_over_seen"] = ratios
    out["targets"] = {"fedavg_over_pooled": 0.98, "unseen_over_seen": 0.95}
    return out


def _say(progress: Callable[[str], None], name: str, entry: Mapping[str, Any], metric: str) -> None:
    progress(
        f"    {name}: mean {metric} {entry['mean'].get(metric, math.nan):.3f}, "
        f"worst {entry['worst'].get(metric, math.nan):.3f}, "
        f"{entry['sample_steps']} sample-steps, {entry['seconds']:.0f}s"
    )


def _finite(obj: Any) -> Any:
    """JSON has no NaN: non-finite numbers become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _finite(obj.item())
    return obj
