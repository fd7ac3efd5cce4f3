"""The run's results: ``results.json``, the per-site table, and the metrics sent to tracking."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from common.metrics import summarize_sites as summarize
from server.recording import RoundRecord

__all__ = ["build_results", "network_entry", "network_line", "round_entry", "round_metrics", "site_table", "write_json"]


def network_entry(rec: RoundRecord) -> dict[str, Any]:
    """A round's ``network``: per site and phase the bytes sent and received and the reply's records; totals."""
    phases = [p for site in rec.network.values() for p in site.values()]
    return {
        "per_site": rec.network,
        "sent_bytes": sum(p["sent_bytes"] for p in phases),
        "received_bytes": sum(p["received_bytes"] for p in phases),
    }


def round_entry(rec: RoundRecord) -> dict[str, Any]:
    """One element of ``results["rounds"]``."""
    mean, worst = summarize(rec.per_site)
    return {
        "round": rec.round,
        "per_site": rec.per_site,
        "mean": mean,
        "worst": worst,
        "train": rec.train,
        "evaluate_timing": rec.eval_timing,
        "privacy": rec.privacy,
        **({"central_privacy": rec.central_privacy} if rec.central_privacy else {}),
        **({"skipped": rec.skipped} if rec.skipped else {}),
        **({"selected": rec.selected} if rec.selected else {}),
        "rejected": rec.rejected,
        "missing": rec.missing,
        **({"retried": rec.retried} if rec.retried else {}),
        "network": network_entry(rec),
        "seconds": rec.seconds,
    }


def build_results(
    config: dict[str, Any], records: list[RoundRecord], *, total_s: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Assemble ``results.json``: config, rounds, final (last evaluated round) and timing."""
    rounds = [round_entry(r) for r in records]
    last = next((r for r in reversed(records) if r.per_site), None)
    final_sites = {
        s: {k: v for k, v in m.items() if k != "num-examples"} for s, m in (last.per_site if last else {}).items()
    }
    mean, worst = summarize(final_sites)
    privacy: dict[str, Any] = {}
    for r in records:  # each site's latest epsilon, whether it trained or refused
        privacy.update(r.privacy)
    final: dict[str, Any] = {
        "round": last.round if last else None,
        "per_site": final_sites,
        "mean": mean,
        "worst": worst,
    }
    if privacy:
        final["privacy"] = privacy
    central = [r.central_privacy for r in records if r.central_privacy]
    if central:
        final["central_privacy"] = central[-1]
    results: dict[str, Any] = {
        "config": config,
        "rounds": rounds,
        "final": final,
        "timing": {"total_s": total_s, "round_s": [r.seconds for r in records]},
    }
    if extra:
        results.update(extra)
    return results


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def round_metrics(rec: RoundRecord) -> dict[str, float]:
    """Flat metric names for tracking: ``dice.mean``, ``dice.worst``, ``dice.site-01``, ..."""
    mean, worst = summarize(rec.per_site)
    out: dict[str, float] = {}
    for k, v in mean.items():
        if k != "num-examples":
            out[f"{k}.mean"] = v
            out[f"{k}.worst"] = worst[k]
    for site, m in rec.per_site.items():
        for k, v in m.items():
            if k != "num-examples":
                out[f"{k}.{site}"] = v
    for site, m in rec.train.items():
        if "train-loss" in m:
            out[f"train-loss.{site}"] = m["train-loss"]
    for site, p in rec.privacy.items():
        if p.get("epsilon") is not None:
            out[f"epsilon.{site}"] = float(p["epsilon"])
    if rec.central_privacy:
        out["central-epsilon"] = rec.central_privacy["epsilon"]
    out["round-s"] = rec.seconds
    out["rejected"] = float(len(rec.rejected))
    return out


def network_line(results: dict[str, Any]) -> str:
    """One line: the bytes sent to and received from a site in a round (train and evaluate), mean over both."""
    pairs = [
        (sum(p["sent_bytes"] for p in site.values()), sum(p["received_bytes"] for p in site.values()))
        for r in results["rounds"]
        for site in r.get("network", {}).get("per_site", {}).values()
    ]
    if not pairs:
        return "network: nothing measured"
    sent = sum(p[0] for p in pairs) / len(pairs)
    received = sum(p[1] for p in pairs) / len(pairs)
    return (
        f"network per site per round (mean of {len(pairs)}): "
        f"sent {sent / 1e6:.3f} MB, received {received / 1e6:.3f} MB "
        "(Flower's serialised messages, train + evaluate; results.json rounds[].network)"
    )


def _epsilon_cell(p: dict[str, Any] | None) -> str:
    """A site's epsilon with its unit, e.g. ``4.68 per patient``; ``unbounded`` without noise."""
    if not p:
        return "-"
    value = "unbounded" if p.get("epsilon") is None else f"{p['epsilon']:.3g}"
    return f"{value} per {p['unit']}" if p.get("unit") else value


def site_table(results: dict[str, Any], *, metric: str = "dice") -> str:
    """A plain-text table: one row per site, first and final ``metric``, final loss; then mean and worst.

    Under site DP a last column gives each site's epsilon with its unit (``per patient`` or ``per slice``).
    """
    rounds = [r for r in results["rounds"] if r["per_site"]]
    if not rounds:
        return "no site reported evaluation results"
    first, final = rounds[0], results["final"]
    spent = final.get("privacy", {})
    rows = [("site", f"{metric} r{first['round']}", f"{metric} r{final['round']}", "loss", "val samples")]
    if spent:
        rows[0] += ("epsilon",)
    for site in sorted(final["per_site"]):
        f = first["per_site"].get(site, {})
        last_round = rounds[-1]["per_site"].get(site, {})
        row: tuple[str, ...] = (
            site,
            f"{f[metric]:.3f}" if metric in f else "-",
            f"{final['per_site'][site].get(metric, float('nan')):.3f}",
            f"{final['per_site'][site].get('loss', float('nan')):.3f}",
            f"{int(last_round.get('num-examples', 0))}",
        )
        if spent:
            row += (_epsilon_cell(spent.get(site)),)
        rows.append(row)
    for label in ("mean", "worst"):
        fv = first[label].get(metric)
        rows.append(
            (
                label,
                f"{fv:.3f}" if fv is not None else "-",
                f"{final[label].get(metric, float('nan')):.3f}",
                f"{final[label].get('loss', float('nan')):.3f}",
                "",
            )
            + (("",) if spent else ())
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
