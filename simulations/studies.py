"""Studies: several federations on the same simulated sites and seeds, compared in one report.

``privacy_study`` runs the same sites and seeds at several privacy settings (no DP, clipping
without noise, and target epsilons 8, 3, 1), each with a fresh privacy ledger of its own (each
setting is a separate hypothetical history of the sites), and writes ``privacy.json`` and a
privacy-utility plot.

Privacy is each site's own decision (``client/policy.py``): for every setting the study, as the
operator of its simulated sites, writes each site's ``privacy.json`` (DP on with the setting's
lifetime budget, the setting's ledger folder, the audit allowed) and removes it afterwards, so the
shared simulated sites are left as they were.
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

__all__ = ["PRIVACY_SETTINGS", "PrivacySetting", "plot_privacy", "privacy_study", "summarize_privacy_run"]

log = logging.getLogger("fedsite.sim")


@dataclass(frozen=True)
class PrivacySetting:
    """One arm of the privacy study."""

    name: str
    dp: bool
    target_epsilon: float | None
    """None: no DP at all ("no-dp") or clipping without noise ("clip-only")."""


PRIVACY_SETTINGS: tuple[PrivacySetting, ...] = (
    PrivacySetting("no-dp", False, None),
    PrivacySetting("clip-only", True, None),
    PrivacySetting("eps-8", True, 8.0),
    PrivacySetting("eps-3", True, 3.0),
    PrivacySetting("eps-1", True, 1.0),
)


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
        return SitePolicy(dp=True, max_epsilon=setting.target_epsilon, ledger_dir=str(ledger_dir), audit=True)
    return SitePolicy(ledger_dir=str(ledger_dir), audit=True)


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
    utility_keys = ("dice", "loss")
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


def plot_privacy(settings: list[dict[str, Any]], path: Path) -> None:
    """Privacy-utility plot: mean Dice and attack AUC per setting, epsilon on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in settings]
    dice = [s["utility"]["mean"].get("dice", float("nan")) for s in settings]
    worst = [s["utility"]["worst"].get("dice", float("nan")) for s in settings]
    auc = [s["attack_auc"].get("mean", float("nan")) for s in settings]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(names))
    ax[0].plot(xs, dice, "o-", label="mean Dice")
    ax[0].plot(xs, worst, "s--", label="worst-site Dice")
    ax[0].set_xticks(list(xs), names)
    ax[0].set_ylabel("Dice (validation)")
    ax[0].set_title("utility")
    ax[0].legend()
    ax[1].plot(xs, auc, "o-", color="tab:red", label="membership attack AUC")
    base = [s["attack_auc_initial_model"].get("mean", float("nan")) for s in settings]
    ax[1].plot(xs, base, "x:", color="gray", label="same attack, initial model")
    ax[1].axhline(0.5, color="gray", lw=0.8, ls=":", label="chance (0.5)")
    finite = [v for v in auc + base if v == v]
    ax[1].set_ylim(min([0.3, *finite]) - 0.02, max([0.7, *finite]) + 0.02)
    ax[1].set_xticks(list(xs), names)
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
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every setting on the same sites and seeds; write ``privacy.json`` and ``privacy.png``.

    Args:
        base: The run config shared by all settings (sites, rounds, seed, model, ...).
        out: The study folder; each setting's run goes to ``out/<name>/``.
        settings: The arms to run.
        progress: Called with a line per setting.

    Returns:
        The content of ``privacy.json``.
    """
    from client.layout import POLICY_FILE, sim_site_name
    from simulations.runner import prepare, simulate

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    entries = []
    # The simulated sites, written once; the study then writes their privacy policies.
    base = replace(base, sim=replace(base.sim, root=prepare(base, out).sim.root))
    root = Path(base.sim.root)
    kept = {}
    for i in range(base.sim.sites):
        path = root / sim_site_name(i) / POLICY_FILE
        if path.is_file():
            kept[path] = path.read_text()
    try:
        for i, setting in enumerate(settings, 1):
            progress(
                f"[{i}/{len(settings)}] {setting.name}: running {base.num_server_rounds} rounds on "
                f"{base.sim.sites} sites"
            )
            _write_policies(root, base.sim.sites, setting_policy(setting, out / setting.name / "ledger"))
            results = simulate(_setting_config(base, setting), out / setting.name, quiet=True)
            entries.append(_report_setting(setting, results, progress))
    finally:
        for i in range(base.sim.sites):  # leave the shared simulated sites as they were
            path = root / sim_site_name(i) / POLICY_FILE
            if path in kept:
                path.write_text(kept[path])
            else:
                path.unlink(missing_ok=True)
    return _finish(entries, out, started)


def _report_setting(setting: PrivacySetting, results: dict[str, Any], progress: Callable[[str], None]) -> dict:
    """Summarize one setting's run and print its line."""
    entry = summarize_privacy_run(setting, results)
    eps = [e for e in entry["epsilon_spent"].values() if e is not None]
    if not setting.dp:
        eps_txt = "-"
    elif not entry["epsilon_spent"]:
        eps_txt = "not reported"
    else:
        eps_txt = "unbounded" if len(eps) < len(entry["epsilon_spent"]) else f"{max(eps):.3g}"
    progress(
        f"    mean dice {entry['utility']['mean'].get('dice', float('nan')):.3f}, "
        f"attack AUC {entry['attack_auc'].get('mean', float('nan')):.3f}, max epsilon {eps_txt}"
    )
    return entry


def _finish(entries: list[dict[str, Any]], out: Path, started: float) -> dict[str, Any]:
    by_name = {e["name"]: e for e in entries}
    report: dict[str, Any] = {"settings": entries, "seconds": time.perf_counter() - started}
    if "no-dp" in by_name and "eps-8" in by_name:
        base_dice = by_name["no-dp"]["utility"]["mean"].get("dice")
        dp_dice = by_name["eps-8"]["utility"]["mean"].get("dice")
        if base_dice is not None and dp_dice is not None:
            report["utility_cost_eps8"] = {
                "dice_no_dp": base_dice,
                "dice_eps8": dp_dice,
                "dice_drop": base_dice - dp_dice,
            }
    (out / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_privacy(entries, out / "privacy.png")
    return report
