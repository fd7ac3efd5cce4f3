"""Studies: several federations on the same simulated sites and seeds, compared in one report.

``privacy_study`` runs the same sites and seeds at several privacy settings (no DP, clipping
without noise, and target epsilons 8, 3, 1), each with a fresh privacy ledger of its own (each
setting is a separate hypothetical history of the sites), and writes ``privacy.json`` and a
privacy-utility plot.

Privacy is each site's own decision (``client/policy.py``): for every setting the study, as the
operator of its simulated sites, writes each site's ``privacy.json`` (DP on with the setting's
lifetime budget, the setting's ledger folder, the audit allowed) and removes it afterwards, so the
shared simulated sites are left as they were.

The study, which may see everything, also runs the *calibrated* membership attack
(:func:`client.membership.calibrated_attack`) on each setting's final model: members are the sites'
training slices, non-members their audit slices (held out of training, same patients), as many of
each; the reference model is trained, with the run's recipe, on the sites' validation patients, which
the target never saw. Each AUC comes with a bootstrap 95% interval. An extra *over-fit* arm (no DP,
many epochs on few training slices, outside the federation) shows that the attack sees membership
where there is some to see.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.config import RunConfig

__all__ = [
    "PRIVACY_SETTINGS",
    "AttackGame",
    "OverfitArm",
    "PrivacySetting",
    "attack_game",
    "calibrated_audit",
    "overfit_audit",
    "plot_privacy",
    "privacy_study",
    "summarize_privacy_run",
    "train_reference",
]

log = logging.getLogger("fedsite.sim")


@dataclass(frozen=True)
class PrivacySetting:
    """One arm of the privacy study."""

    name: str
    dp: bool
    target_epsilon: float | None
    """None: no DP at all ("no-dp") or clipping without noise ("clip-only")."""
    unit: str = "patient"
    """What the setting's epsilon protects (the simulated sites' policy): ``"patient"`` or ``"slice"``."""


PRIVACY_SETTINGS: tuple[PrivacySetting, ...] = (
    PrivacySetting("no-dp", False, None),
    PrivacySetting("clip-only", True, None),
    PrivacySetting("eps-8", True, 8.0),
    PrivacySetting("eps-3", True, 3.0),
    PrivacySetting("eps-1", True, 1.0),
)
"""The quick study's arms (and the first five of the full study's)."""

FULL_SETTINGS: tuple[PrivacySetting, ...] = (
    *PRIVACY_SETTINGS,
    PrivacySetting("eps-8-slice", True, 8.0, unit="slice"),
)
"""The full study adds epsilon 8 *per slice*: the same number as eps-8, a far weaker guarantee per patient."""


def patients_for_site_size(cfg: RunConfig, train_slices: int) -> int:
    """Patients per simulated site so that each site has at least ``train_slices`` training slices.

    A site's training slices are its training patients' slices (``1 - data.val-fraction`` of the
    patients) less the audit's share (``privacy.audit-fraction``, the study always audits). Phantom
    patients have ``sim.slices`` slices; an X-ray patient (``sim.source``) one image. Two patients'
    margin covers the rounding of the split.
    """
    import math

    if train_slices < 1:
        raise ValueError(f"site size must be at least 1 training slice, got {train_slices}")
    per_patient = 1 if cfg.sim.source else cfg.sim.slices
    kept = (1.0 - cfg.data.val_fraction) * (1.0 - cfg.privacy.audit_fraction)
    return math.ceil(train_slices / (per_patient * kept)) + 2


@dataclass(frozen=True)
class OverfitArm:
    """The over-fit arm: a model trained without DP for many epochs on few training slices."""

    slices: int = 48
    epochs: int = 100
    dp_epsilon: float | None = 8.0
    """Also train the same model on the same slices under DP-SGD at this epsilon (per slice); None: don't."""


@dataclass(frozen=True)
class AttackGame:
    """Every site's slices pooled: members (training), non-members (audit), reference data (validation)."""

    members: Any
    non_members: Any
    reference_data: Any


def attack_game(cfg: RunConfig) -> AttackGame:
    """The sites' slices as the attack sees them, split as each site splits them (:func:`client.runtime.loaded_site`).

    Args:
        cfg: A setting's run config (``sim.root`` set, ``privacy.audit`` on).

    Returns:
        The pooled training slices (members), audit slices (non-members) and validation slices (the
        reference model's data: other patients, seen by no target).
    """
    import torch

    from client.layout import sim_site_name
    from client.runtime import loaded_site
    from common.task import Batchable, stack_samples

    members, others, reference = [], [], []
    for i in range(cfg.sim.sites):
        site = loaded_site(Path(cfg.sim.root) / sim_site_name(i), cfg)
        members.append(site.train)
        reference.append(site.val)
        if site.audit is not None:
            others.append(site.audit)

    def pool(parts: list[Batchable]) -> Batchable:
        parts = [b for b in parts if len(b)]
        if not parts:
            return stack_samples([])
        return Batchable(torch.cat([b.images for b in parts]), torch.cat([b.labels for b in parts]))

    return AttackGame(members=pool(members), non_members=pool(others), reference_data=pool(reference))


def _fresh_model(cfg: RunConfig) -> Any:
    """The run's round-0 model: its architecture, from ``model.init`` when the run starts from one."""
    import torch

    from common.model import build_model, load_start_weights

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.task)
    if cfg.model.init:
        load_start_weights(model, cfg.model.init)
    return model


def train_reference(cfg: RunConfig, data: Any, *, epochs: int) -> Any:
    """The attacker's reference model: the run's model and recipe, trained on ``data`` (no target saw it)."""
    from common.task import train

    model = _fresh_model(cfg)
    train(
        model,
        data,
        epochs=epochs,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        optimizer=cfg.train.optimizer,
        seed=cfg.seed,
        task=cfg.task.name,
    )
    return model


def calibrated_audit(cfg: RunConfig, model_path: Path, reference: Any, game: AttackGame) -> dict[str, Any]:
    """The calibrated attack on a run's final model (members vs non-members, as many of each), as a dict.

    Returns:
        :meth:`client.membership.AttackResult.as_dict`.
    """
    import torch

    from client.membership import calibrated_attack

    model = _fresh_model(cfg)
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    return calibrated_attack(model, reference, game.members, game.non_members, seed=cfg.seed).as_dict()


def overfit_audit(cfg: RunConfig, game: AttackGame, arm: OverfitArm = OverfitArm()) -> dict[str, Any]:
    """The calibrated attack where there is membership to see: ``arm.epochs`` epochs on ``arm.slices`` slices.

    The target is trained without DP (outside the federation) on ``arm.slices`` training slices
    drawn at random; the reference with the same recipe on as many validation slices; the
    non-members are as many audit slices. With ``arm.dp_epsilon``, a twin of the target is trained on
    the same slices with the same recipe under DP-SGD (:func:`client.dpsgd.train_private`, noise for
    that epsilon per slice over the arm's steps, clipping at ``privacy.max-grad-norm``) and attacked
    the same way.

    Returns:
        :meth:`client.membership.AttackResult.as_dict` plus ``slices`` and ``epochs``; with
        ``arm.dp_epsilon``, ``dp``: the twin's result plus its ``epsilon``, ``delta`` and ``noise_multiplier``.
    """
    import numpy as np

    from client.dpsgd import default_delta, noise_for_target, train_private
    from client.membership import calibrated_attack
    from common.task import Batchable, train

    rng = np.random.default_rng(cfg.seed)
    n = min(arm.slices, len(game.members), len(game.non_members), len(game.reference_data))

    def draw(data: Batchable) -> Batchable:
        idx = np.sort(rng.choice(len(data), size=n, replace=False))
        return Batchable(data.images[idx], data.labels[idx])

    members, others, ref_data = draw(game.members), draw(game.non_members), draw(game.reference_data)
    recipe = {
        "epochs": arm.epochs,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "optimizer": cfg.train.optimizer,
        "seed": cfg.seed,
        "task": cfg.task.name,
    }
    models = []
    for data in (members, ref_data):
        model = _fresh_model(cfg)
        train(model, data, **recipe)
        models.append(model)
    target, reference = models
    out: dict[str, Any] = {"slices": n, "epochs": arm.epochs}
    out.update(calibrated_attack(target, reference, members, others, seed=cfg.seed).as_dict())
    if arm.dp_epsilon:
        batch = min(cfg.train.batch_size, n)
        delta = default_delta(n)
        sigma = noise_for_target(
            arm.dp_epsilon, delta=delta, sample_rate=batch / n, steps=arm.epochs * max(1, round(n / batch))
        )
        twin = _fresh_model(cfg)
        train_private(twin, members, noise_multiplier=sigma, max_grad_norm=cfg.privacy.max_grad_norm, **recipe)
        out["dp"] = {
            "epsilon": arm.dp_epsilon,
            "delta": delta,
            "noise_multiplier": sigma,
            **calibrated_attack(twin, reference, members, others, seed=cfg.seed).as_dict(),
        }
    return out


def _setting_config(base: RunConfig, setting: PrivacySetting) -> RunConfig:
    privacy = replace(
        base.privacy,
        dp=setting.dp,
        target_epsilon=setting.target_epsilon or 0.0,
        noise_multiplier=0.0,
        max_epsilon=0.0,
        audit=True,
    )
    model = base.model if base.model.norm != "batch" else replace(base.model, norm="instance")
    return replace(base, privacy=privacy, model=model)


def setting_policy(setting: PrivacySetting, ledger_dir: Path) -> Any:
    """The privacy policy each simulated site holds for ``setting`` (the study is the sites' operator).

    DP settings with a target: DP required, the target as lifetime budget. No DP and clipping
    without noise: DP left to the run (clip-only has no budget: its epsilon is unbounded).
    """
    from client.policy import SitePolicy

    if setting.dp and setting.target_epsilon:
        return SitePolicy(
            dp=True, unit=setting.unit, max_epsilon=setting.target_epsilon, ledger_dir=str(ledger_dir), audit=True
        )
    return SitePolicy(unit=setting.unit, ledger_dir=str(ledger_dir), audit=True)


def _write_policies(root: Path, sites: int, policy: Any) -> list[Path]:
    from client.layout import POLICY_FILE, sim_site_name
    from client.policy import write_policy

    paths = [root / sim_site_name(i) / POLICY_FILE for i in range(sites)]
    for path in paths:
        write_policy(path, policy)
    return paths


def summarize_privacy_run(setting: PrivacySetting, results: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``privacy.json["settings"]`` from a run's ``results.json``."""
    final = results["final"]
    utility_keys = ("dice", "auc", "accuracy", "loss")
    attack = {site: m["mia-auc"] for site, m in final["per_site"].items() if "mia-auc" in m}
    if attack:
        attack["mean"] = sum(attack.values()) / len(attack)
    initial = {site: m["mia-auc-initial"] for site, m in final["per_site"].items() if "mia-auc-initial" in m}
    if initial:
        initial["mean"] = sum(initial.values()) / len(initial)
    spent = {site: p.get("epsilon") for site, p in final.get("privacy", {}).items()}
    return {
        "name": setting.name,
        "target_epsilon": setting.target_epsilon,
        "utility": {
            "mean": {k: v for k, v in final["mean"].items() if k in utility_keys},
            "worst": {k: v for k, v in final["worst"].items() if k in utility_keys},
        },
        "epsilon_spent": spent,
        "delta": {site: p.get("delta") for site, p in final.get("privacy", {}).items()},
        "unit": {site: p.get("unit") for site, p in final.get("privacy", {}).items()},
        "attack_auc": attack,
        "attack_auc_initial_model": initial,
        "seconds": results["timing"]["total_s"],
    }


def entry_metric(entries: list[dict[str, Any]]) -> str:
    """The utility metric the study's entries carry: ``"dice"`` (segmentation) or ``"auc"`` (classification)."""
    return "dice" if any("dice" in e["utility"]["mean"] for e in entries) else "auc"


_METRIC_LABEL = {"dice": "Dice", "auc": "ROC AUC"}


def plot_privacy(settings: list[dict[str, Any]], path: Path) -> None:
    """Privacy-utility plot: mean and worst-site utility and attack AUC per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = entry_metric(settings)
    label = _METRIC_LABEL[key]
    names = [s["name"] for s in settings]
    dice = [s["utility"]["mean"].get(key, float("nan")) for s in settings]
    worst = [s["utility"]["worst"].get(key, float("nan")) for s in settings]
    auc = [s["attack_auc"].get("mean", float("nan")) for s in settings]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(names))
    ax[0].plot(xs, dice, "o-", label=f"mean {label}")
    ax[0].plot(xs, worst, "s--", label=f"worst-site {label}")
    ax[0].set_xticks(list(xs), names, rotation=20)
    ax[0].set_ylabel(f"{label} (validation patients)")
    ax[0].set_title("utility")
    ax[0].legend()
    ax[1].plot(xs, auc, "o-", color="tab:red", label="membership attack AUC")
    base = [s["attack_auc_initial_model"].get("mean", float("nan")) for s in settings]
    ax[1].plot(xs, base, "x:", color="gray", label="same attack, initial model")
    cal = [s.get("calibrated_attack") for s in settings]
    cal_x = [x for x, c in zip(xs, cal, strict=True) if c]
    if cal_x:
        mid = [c["auc"] for c in cal if c]
        err = [[c["auc"] - c["interval"][0] for c in cal if c], [c["interval"][1] - c["auc"] for c in cal if c]]
        ax[1].errorbar(cal_x, mid, yerr=err, fmt="D", color="tab:purple", capsize=4, label="calibrated attack, 95% CI")
        auc = auc + [c["interval"][k] for c in cal if c for k in (0, 1)]
    ax[1].axhline(0.5, color="gray", lw=0.8, ls=":", label="chance (0.5)")
    finite = [v for v in auc + base if v == v]
    ax[1].set_ylim(min([0.3, *finite]) - 0.02, max([0.7, *finite]) + 0.02)
    ax[1].set_xticks(list(xs), names, rotation=20)
    ax[1].set_ylabel("attack AUC")
    ax[1].set_title("what an attacker learns")
    ax[1].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle("privacy-utility trade-off (epsilon spent per site at the end of the run)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def privacy_study(
    base: RunConfig,
    out: Path,
    *,
    settings: tuple[PrivacySetting, ...] = PRIVACY_SETTINGS,
    overfit: OverfitArm | None = OverfitArm(),
    site_sizes: tuple[int, ...] = (),
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every setting on the same sites and seeds; write ``privacy.json`` and ``privacy.png``.

    Each setting's final model also faces the calibrated membership attack (``calibrated_attack`` in
    its entry); the over-fit arm's attack is ``overfit_attack``.

    Args:
        base: The run config shared by all settings (sites, rounds, seed, model, ...).
        out: The study folder; each setting's run goes to ``out/<name>/``.
        settings: The arms to run.
        overfit: The over-fit arm (no DP, outside the federation); None to skip it.
        site_sizes: Utility against site size: for each size (training slices per site), sites of
            that size (:func:`patients_for_site_size`) are written and no DP and epsilon 8 per
            patient are run on them (``site_size`` in the report; runs in ``out/size-<n>/``).
        progress: Called with a line per setting.

    Returns:
        The content of ``privacy.json``.
    """
    from simulations.runner import prepare

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # The simulated sites, written once; the study then writes their privacy policies.
    base = replace(base, sim=replace(base.sim, root=prepare(base, out).sim.root))
    game = attack_game(_setting_config(base, settings[0])) if settings else None
    reference = None
    if game is not None and len(game.non_members):
        progress(f"reference model for the calibrated attack: {len(game.reference_data)} validation slices")
        reference = train_reference(
            _setting_config(base, settings[0]),
            game.reference_data,
            epochs=base.num_server_rounds * base.train.local_epochs,
        )
    start = start_utility(base)
    progress(f"start model ({start['init']}): mean {start['mean']}, worst {start['worst']}")
    entries = _run_settings(base, out, settings, progress, game=game, reference=reference)
    over = None
    if overfit is not None and game is not None and len(game.non_members):
        progress(f"over-fit arm: no DP, {overfit.epochs} epochs on {overfit.slices} training slices")
        over = overfit_audit(_setting_config(base, PRIVACY_SETTINGS[0]), game, overfit)
        progress(f"    calibrated attack AUC {_interval_text(over)}")
        if "dp" in over:
            progress(f"    same, DP-SGD at epsilon {over['dp']['epsilon']:g}: AUC {_interval_text(over['dp'])}")
    sizes = [{"train_slices": train_slices(base), "entries": entries}]
    pair = tuple(s for s in PRIVACY_SETTINGS if s.name in ("no-dp", "eps-8"))
    for size in site_sizes:
        # sites of this size, written (once) where simulated sites are cached by their generator settings
        cfg = replace(base, sim=replace(base.sim, root="", patients=patients_for_site_size(base, size)))
        progress(f"site size {size}: {cfg.sim.patients} patients per site")
        cfg = replace(cfg, sim=replace(cfg.sim, root=prepare(cfg, out / f"size-{size}").sim.root))
        sized = _run_settings(cfg, out / f"size-{size}", pair, progress)
        sizes.append({"train_slices": train_slices(cfg), "entries": sized})
    return _finish(entries, out, started, over, sizes=sizes, start=start)


def start_utility(cfg: RunConfig) -> dict[str, Any]:
    """The round-0 model's scores on every site's validation patients (``model.init``, or the random start).

    With a pre-trained start, the federation's gain (and DP's cost) is measured against this.
    """
    from client.layout import sim_site_name
    from client.runtime import loaded_site
    from common.metrics import summarize_sites
    from common.task import evaluate

    cfg = _setting_config(cfg, PRIVACY_SETTINGS[0])
    model = _fresh_model(cfg)
    per_site = {}
    for i in range(cfg.sim.sites):
        site = loaded_site(Path(cfg.sim.root) / sim_site_name(i), cfg)
        per_site[site.name] = evaluate(model, site.val, task=cfg.task.name)
    mean, worst = summarize_sites(per_site)
    key = "dice" if cfg.task.name == "segmentation" else "auc"
    return {"init": cfg.model.init or "random", "mean": {key: mean[key]}, "worst": {key: worst[key]}}


def train_slices(cfg: RunConfig) -> dict[str, int]:
    """Training slices per simulated site (after the validation and audit splits), as the sites load them."""
    from client.layout import sim_site_name
    from client.runtime import loaded_site

    cfg = _setting_config(cfg, PRIVACY_SETTINGS[0])
    return {
        sim_site_name(i): len(loaded_site(Path(cfg.sim.root) / sim_site_name(i), cfg).train)
        for i in range(cfg.sim.sites)
    }


def _run_settings(
    base: RunConfig,
    out: Path,
    settings: tuple[PrivacySetting, ...],
    progress: Callable[[str], None],
    *,
    game: AttackGame | None = None,
    reference: Any = None,
) -> list[dict[str, Any]]:
    """Run ``settings`` on the sites under ``base.sim.root`` (policies written, then restored); their entries."""
    from client.layout import POLICY_FILE, sim_site_name
    from simulations.runner import simulate

    root = Path(base.sim.root)
    kept = {}
    for i in range(base.sim.sites):
        path = root / sim_site_name(i) / POLICY_FILE
        if path.is_file():
            kept[path] = path.read_text()
    entries = []
    try:
        for i, setting in enumerate(settings, 1):
            progress(
                f"[{i}/{len(settings)}] {setting.name}: running {base.num_server_rounds} rounds on "
                f"{base.sim.sites} sites"
            )
            _write_policies(root, base.sim.sites, setting_policy(setting, out / setting.name / "ledger"))
            cfg = _setting_config(base, setting)
            results = simulate(cfg, out / setting.name, quiet=True)
            calibrated = None
            if reference is not None and game is not None and (out / setting.name / "final_model.pt").is_file():
                calibrated = calibrated_audit(cfg, out / setting.name / "final_model.pt", reference, game)
            entries.append(_report_setting(setting, results, progress, calibrated))
    finally:
        for i in range(base.sim.sites):  # leave the shared simulated sites as they were
            path = root / sim_site_name(i) / POLICY_FILE
            if path in kept:
                path.write_text(kept[path])
            else:
                path.unlink(missing_ok=True)
    return entries


def _interval_text(attack: dict[str, Any]) -> str:
    low, high = attack["interval"]
    return f"{attack['auc']:.3f} [{low:.3f}, {high:.3f}] ({attack['members']}+{attack['non_members']} slices)"


def _report_setting(
    setting: PrivacySetting,
    results: dict[str, Any],
    progress: Callable[[str], None],
    calibrated: dict[str, Any] | None = None,
) -> dict:
    """Summarize one setting's run and print its line."""
    entry = summarize_privacy_run(setting, results)
    if calibrated is not None:
        entry["calibrated_attack"] = calibrated
    eps = [e for e in entry["epsilon_spent"].values() if e is not None]
    if not setting.dp:
        eps_txt = "-"
    elif not entry["epsilon_spent"]:
        eps_txt = "not reported"
    else:
        eps_txt = "unbounded" if len(eps) < len(entry["epsilon_spent"]) else f"{max(eps):.3g}"
    key = entry_metric([entry])
    progress(
        f"    mean {key} {entry['utility']['mean'].get(key, float('nan')):.3f}, "
        f"worst {entry['utility']['worst'].get(key, float('nan')):.3f}, "
        f"attack AUC {entry['attack_auc'].get('mean', float('nan')):.3f}, max epsilon {eps_txt}"
    )
    if calibrated is not None:
        progress(f"    calibrated attack AUC {_interval_text(calibrated)}")
    return entry


def _finish(
    entries: list[dict[str, Any]],
    out: Path,
    started: float,
    overfit: dict[str, Any] | None = None,
    *,
    sizes: list[dict[str, Any]] | None = None,
    start: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``privacy.json`` and ``privacy.png``: the settings, DP's cost at epsilon 8, utility against site size."""
    report: dict[str, Any] = {"settings": entries, "seconds": time.perf_counter() - started}
    if start is not None:
        report["start_model"] = start
    if overfit is not None:
        report["overfit_attack"] = overfit
    cost = eps8_cost(entries)
    if cost is not None:
        report["utility_cost_eps8"] = cost
    if sizes:
        report["site_size"] = [
            {"train_slices": s["train_slices"], "min_train_slices": min(s["train_slices"].values(), default=0)}
            | (eps8_cost(s["entries"]) or {})
            for s in sorted(sizes, key=lambda s: min(s["train_slices"].values(), default=0))
        ]
    (out / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_privacy(entries, out / "privacy.png")
    return report


def eps8_cost(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Utility without DP and at epsilon 8 per patient, the drop and the share kept (None without both arms)."""
    by_name = {e["name"]: e for e in entries}
    if "no-dp" not in by_name or "eps-8" not in by_name:
        return None
    key = entry_metric(entries)
    out: dict[str, Any] = {"metric": key}
    for name, tag in (("no-dp", "no_dp"), ("eps-8", "eps8")):
        for stat in ("mean", "worst"):
            out[f"{stat}_{tag}"] = by_name[name]["utility"][stat].get(key)
    if out["mean_no_dp"] is None or out["mean_eps8"] is None:
        return None
    out["drop"] = out["mean_no_dp"] - out["mean_eps8"]
    out["kept"] = out["mean_eps8"] / out["mean_no_dp"] if out["mean_no_dp"] else None
    return out
