"""The shift study's report: figures and a Markdown page rendered from ``shift.json``.

``write_report(out, doc)`` renders whatever the study document holds: every optional piece
(leave-one-site-out "unseen" scores, learning curves, the cross-site matrix, the shift pairs,
histograms, example images) may be absent, and missing or NaN values are shown as "–".

Figures use matplotlib's Agg backend, 100 dpi, and are kept under ~200 KB each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["format_table", "write_report"]

DASH = "–"
MAX_PNG_BYTES = 200_000
_BOUNDED = {"dice", "auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "iou"}


# --------------------------------------------------------------------------------------- values


#: Further metrics tabulated per method when present (classification reports all of them).
_OTHER_METRICS = ("accuracy", "sensitivity", "specificity", "balanced-accuracy", "ece", "loss")
_LOWER_IS_BETTER = ("ece", "loss")


def _num(v: Any) -> float:
    """A float, or nan for None / non-numbers."""
    if isinstance(v, bool) or v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(v: Any, digits: int = 3) -> str:
    x = _num(v)
    if math.isnan(x):
        return DASH
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if not math.isfinite(s):
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def _metric(doc: Mapping[str, Any]) -> str:
    return str(doc.get("metric") or "dice")


def _methods(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): (v or {}) for k, v in (doc.get("methods") or {}).items()}


def _unseen_mean(entry: Mapping[str, Any], metric: str) -> float:
    unseen = entry.get("unseen") or {}
    return _nanmean([_num((v or {}).get(metric)) for v in unseen.values()])


def _summary_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]], bool]:
    """Method rows of (mean, worst[, unseen mean]); the flag says whether any method has unseen."""
    metric = _metric(doc)
    methods = _methods(doc)
    has_unseen = any(e.get("unseen") for e in methods.values())
    header = ["method", f"mean {metric}", f"worst {metric}"] + ([f"unseen {metric} (mean)"] if has_unseen else [])
    rows = []
    for name, e in methods.items():
        row = [name, _fmt((e.get("mean") or {}).get(metric)), _fmt((e.get("worst") or {}).get(metric))]
        if has_unseen:
            row.append(_fmt(_unseen_mean(e, metric)))
        rows.append(row)
    return header, rows, has_unseen


def format_table(doc: Mapping[str, Any]) -> str:
    """A plain-text table of methods x (mean, worst, unseen) of the primary metric, for a terminal.

    Args:
        doc: The shift study document (the content of ``shift.json``).

    Returns:
        Aligned lines joined by newlines; missing or NaN values shown as "–". The "unseen" column
        (mean over sites of the leave-one-site-out score) appears only when some method has it.
    """
    header, rows, _ = _summary_rows(doc)
    if not rows:
        return "(no methods)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]], *, left: int = 1) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join([":---"] * left + ["---:"] * (len(header) - left)) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    """Save at 100 dpi; step the resolution down if the PNG would exceed MAX_PNG_BYTES."""
    import matplotlib.pyplot as plt

    try:
        for dpi in (100, 80, 60, 45):
            fig.savefig(path, dpi=dpi)
            if path.stat().st_size <= MAX_PNG_BYTES:
                break
    finally:
        plt.close(fig)


def _site_title(site: str, profiles: Mapping[str, Any]) -> str:
    prof = profiles.get(site)
    return f"{site}\n{prof}" if prof else site


def _plot_montage(path: Path, sites: list[str], examples: Mapping[str, Any], profiles: Mapping[str, Any]) -> bool:
    import matplotlib.pyplot as plt

    shown = [s for s in sites if s in examples] + [s for s in examples if s not in sites]
    if not shown:
        return False
    ncols = min(len(shown), 6)
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, site in zip(axes.ravel(), shown, strict=False):  # the grid may have more cells than sites
        img = np.asarray(examples[site], dtype=np.float64)
        img = np.squeeze(img)
        if img.ndim != 2:
            raise ValueError(
                f"examples[{site!r}] must be a 2-D image (H, W), got shape {np.shape(examples[site])}; pass one slice"
            )
        finite = img[np.isfinite(img)]
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="antialiased")
        ax.set_title(_site_title(site, profiles), fontsize=9)
    fig.suptitle("one example per site, each in its own 1–99th percentile window", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def _plot_histograms(path: Path, sites: list[str], hists: Mapping[str, Any], profiles: Mapping[str, Any]) -> bool:
    import matplotlib.pyplot as plt

    shown = [s for s in sites if s in hists] + [s for s in hists if s not in sites]
    if not shown:
        return False
    curves = []
    for site in shown:
        h = hists[site] or {}
        density = np.asarray([_num(v) for v in h.get("density") or []], dtype=np.float64)
        edges = h.get("edges")
        edges = (
            np.asarray([_num(v) for v in edges], dtype=np.float64) if edges else np.linspace(0.0, 1.0, density.size + 1)
        )
        if density.size and edges.size == density.size + 1 and np.isfinite(edges).all():
            curves.append((site, density, edges))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for site, density, edges in curves:
        label = f"{site} ({profiles[site]})" if profiles.get(site) else site
        ax.stairs(density, edges, label=label, linewidth=1.4)
    ax.set_xlabel("model-input intensity")
    ax.set_ylabel("fraction of voxels")
    ax.set_title("intensity histograms the sites share (model inputs)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def _plot_cross_site(path: Path, cross: Mapping[str, Any], sites: list[str]) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = cross.get("rows") or {}
    if not rows:
        return False
    cols = [s for s in sites if any(s in (r or {}) for r in rows.values())]
    cols += [s for r in rows.values() for s in (r or {}) if s not in cols]
    if not cols:
        return False
    names = list(rows)
    values = np.array([[_num((rows[n] or {}).get(c)) for c in cols] for n in names], dtype=np.float64)
    metric = str(cross.get("metric") or "")
    finite = values[np.isfinite(values)]
    if metric in _BOUNDED or not finite.size:
        vmin, vmax = 0.0, 1.0
    else:
        vmin, vmax = float(finite.min()), float(finite.max())
        if vmax <= vmin:
            vmin, vmax = vmin - 0.5, vmax + 0.5
    fig, ax = plt.subplots(figsize=(1.6 + 1.0 * len(cols), 1.4 + 0.45 * len(names)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for i in range(len(names)):
        for j in range(len(cols)):
            v = values[i, j]
            text = DASH if math.isnan(v) else f"{v:.2f}"
            dark = math.isfinite(v) and (v - vmin) / (vmax - vmin) < 0.55
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
            if names[i] == f"local:{cols[j]}":
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("model")
    ax.set_title(f"cross-site {metric} (red: a local model on its own site)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.03)
    fig.tight_layout()
    _save(fig, path)
    return True


def _plot_curves(path: Path, methods: Mapping[str, Mapping[str, Any]], metric: str) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_curves = {n: e["curve"] for n, e in methods.items() if e.get("curve")}
    if not with_curves:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, curve) in enumerate(with_curves.items()):
        color = colors[k % len(colors)]
        pts = [p for p in curve if isinstance(p, Mapping)]
        xs = [_num(p.get("round")) for p in pts]
        ax.plot(xs, [_num(p.get("mean")) for p in pts], "-", marker=".", color=color, label=f"{name} mean")
        worst = [_num(p.get("worst")) for p in pts]
        if any(math.isfinite(w) for w in worst):
            ax.plot(xs, worst, "--", color=color, alpha=0.8, label=f"{name} worst site")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"learning curves: mean (solid) and worst site (dashed) {metric}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return True


def _plot_shift(path: Path, shift: Mapping[str, Any], metric: str) -> bool:
    import matplotlib.pyplot as plt

    pairs = [p for p in (shift.get("pairs") or []) if isinstance(p, Mapping)]
    xs = np.array([_num(p.get("distance")) for p in pairs])
    ys = np.array([_num(p.get("loss")) for p in pairs])
    ok = np.isfinite(xs) & np.isfinite(ys)
    if not ok.any():
        return False
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    ax.scatter(xs[ok], ys[ok], s=30, color="tab:blue", zorder=3)
    if ok.sum() <= 16:
        for p, x, y, good in zip(pairs, xs, ys, ok, strict=True):
            if good:
                ax.annotate(
                    f"{p.get('train_site')}→{p.get('test_site')}",
                    (x, y),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.axhline(0.0, color="gray", lw=0.8, ls=":")
    measure = str(shift.get("measure") or "histogram distance")
    ax.set_xlabel(measure)
    ax.set_ylabel(f"{metric} lost (own site − other site)")
    ax.set_title(
        f"does the shared-histogram distance predict the loss?  Spearman ρ = {_fmt(shift.get('spearman'), 2)}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def _plot_methods(path: Path, methods: Mapping[str, Mapping[str, Any]], metric: str) -> bool:
    import matplotlib.pyplot as plt

    names = list(methods)
    mean = np.array([_num((methods[n].get("mean") or {}).get(metric)) for n in names])
    worst = np.array([_num((methods[n].get("worst") or {}).get(metric)) for n in names])
    if not (np.isfinite(mean).any() or np.isfinite(worst).any()):
        return False
    xs = np.arange(len(names))
    w = 0.38
    fig, ax = plt.subplots(figsize=(1.2 + 1.0 * len(names), 3.8))
    ax.bar(xs - w / 2, np.nan_to_num(mean, nan=0.0), w, label="mean over sites", color="tab:blue")
    ax.bar(xs + w / 2, np.nan_to_num(worst, nan=0.0), w, label="worst site", color="tab:orange")
    for x, m, v in zip(xs, mean, worst, strict=True):
        for dx, val in ((-w / 2, m), (w / 2, v)):
            ax.text(x + dx, (val if math.isfinite(val) else 0.0), _fmt(val, 2), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    if metric in _BOUNDED:
        ax.set_ylim(0.0, 1.08)
    ax.set_title(f"{metric} per method", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


# --------------------------------------------------------------------------------------- report

_CAPTIONS = {
    "montage.png": "One image per site (the middle slice of its first series), each in its own intensity window: "
    "look at contrast, noise and field of view, the scanner differences the federation has to bridge.",
    "histograms.png": "The intensity histograms the sites share: sites whose curves sit apart are the ones the "
    "shift measure calls far.",
    "cross_site.png": "Rows are models, columns the site they are evaluated on; look at how far each local model "
    "(red cell: its own site) drops on the other sites, and whether federated rows stay even across columns.",
    "curves.png": "Learning curves: the gap between a method's solid (mean) and dashed (worst site) line is how "
    "unevenly it serves the sites.",
    "shift.png": "Each point is a (train site, test site) pair: if the histogram distance predicts the loss, the "
    "points rise to the right (Spearman ρ in the title).",
    "methods.png": "Mean and worst-site score per method: a good federated method lifts the worst site, not only "
    "the mean.",
}


def write_report(out: Path, doc: Mapping[str, Any], *, examples: Mapping[str, Any] | None = None) -> Path:
    """Render the shift study into ``out``: figures (PNG) and ``report.md`` that embeds them.

    Figures written when their data is present: ``montage.png`` (needs ``examples``),
    ``histograms.png`` (``shift.histograms``), ``cross_site.png`` (``cross_site.rows``),
    ``curves.png`` (some method's ``curve``), ``shift.png`` (``shift.pairs``) and ``methods.png``
    (methods' mean/worst). A missing optional piece is skipped, not an error; missing or NaN
    values are shown as "–".

    Args:
        out: Folder to write into; created if missing. Existing files of the same names are
            overwritten.
        doc: The shift study document (the content of ``shift.json``); see the study for the
            schema. Keys used: ``task``, ``metric``, ``sites``, ``profiles``, ``quick``,
            ``seconds``, ``rounds``, ``local_epochs``, ``methods``, ``cross_site``, ``shift``.
        examples: Optional site name -> one example image, a 2-D float array ``(H, W)`` in raw
            modality values (e.g. HU or MR signal); each is shown in its own 1st-99th
            percentile window.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: If an example image is not 2-D (after squeezing singleton axes).
    """
    import matplotlib

    matplotlib.use("Agg")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = _metric(doc)
    sites = [str(s) for s in (doc.get("sites") or [])]
    profiles = dict(doc.get("profiles") or {})
    methods = _methods(doc)
    cross = doc.get("cross_site") or {}
    shift = doc.get("shift") or {}

    figures: list[str] = []
    if examples and _plot_montage(out / "montage.png", sites, examples, profiles):
        figures.append("montage.png")
    if shift.get("histograms") and _plot_histograms(out / "histograms.png", sites, shift["histograms"], profiles):
        figures.append("histograms.png")
    if _plot_cross_site(out / "cross_site.png", cross, sites):
        figures.append("cross_site.png")
    if _plot_curves(out / "curves.png", methods, metric):
        figures.append("curves.png")
    if _plot_shift(out / "shift.png", shift, metric):
        figures.append("shift.png")
    if methods and _plot_methods(out / "methods.png", methods, metric):
        figures.append("methods.png")

    md: list[str] = []
    task = str(doc.get("task") or "unknown task")
    md.append(f"# Scanner shift study: {task}")
    md.append("")
    md.append(_paragraph(doc, sites, profiles, metric, task))
    md.append("")

    def figure(name: str, alt: str) -> None:
        if name in figures:
            md.extend([f"![{alt}]({name})", "", f"*{_CAPTIONS[name]}*", ""])

    if "montage.png" in figures or "histograms.png" in figures:
        md.extend(["## The sites", ""])
        figure("montage.png", "one example image per site")
        figure("histograms.png", "intensity histograms per site")

    md.extend(["## Methods", ""])
    if methods:
        header, rows, has_unseen = _summary_rows(doc)
        header = [*header, "sample-steps", "seconds"]
        for row, e in zip(rows, methods.values(), strict=True):
            steps = _num(e.get("sample_steps"))
            row += [DASH if not math.isfinite(steps) else f"{int(steps):d}", _fmt(e.get("seconds"), 1)]
        md.append(_md_table(header, rows))
        md.append("")
        md.append(
            f"Mean: average of the per-site validation {metric}; worst: the lowest site."
            + (
                " Unseen: each site scored by a model trained without it (leave-one-site-out), averaged."
                if has_unseen
                else ""
            )
        )
        md.append("")
        others = [k for k in _OTHER_METRICS if any(k in (e.get("mean") or {}) for e in methods.values())]
        if others:
            md.append(
                "Every metric, mean over sites (worst site in brackets; "
                f"for {', '.join(k for k in others if k in _LOWER_IS_BETTER) or 'none'} lower is better):"
            )
            md.append("")
            md.append(
                _md_table(
                    ["method", *others],
                    [
                        [name]
                        + [
                            f"{_fmt((e.get('mean') or {}).get(k))} ({_fmt((e.get('worst') or {}).get(k))})"
                            for k in others
                        ]
                        for name, e in methods.items()
                    ],
                )
            )
            md.append("")
    else:
        md.extend(["No methods were recorded.", ""])
    figure("methods.png", "mean and worst-site score per method")
    figure("curves.png", "learning curves per method")

    rows_cs = cross.get("rows") or {}
    if rows_cs:
        cmetric = str(cross.get("metric") or metric)
        cols = [s for s in sites if any(s in (r or {}) for r in rows_cs.values())]
        cols += [s for r in rows_cs.values() for s in (r or {}) if s not in cols]
        md.extend([f"## Cross-site {cmetric}", "", "Rows: the model; columns: the site it is evaluated on.", ""])
        md.append(
            _md_table(
                ["model", *cols], [[name] + [_fmt((r or {}).get(c)) for c in cols] for name, r in rows_cs.items()]
            )
        )
        md.append("")
        figure("cross_site.png", "cross-site heatmap")

    home = shift.get("home") or {}
    if home.get("per_site"):
        md.extend(["## Is the shift real?", ""])
        md.append(
            "Each site's local-only model at home (own), the same model on the other sites (away), and the other "
            "sites' local models on this site's images (visitors). A positive column gap means the site's own model "
            "beats models trained on other scanners on the same images: shift, not just a harder site."
        )
        md.append("")
        md.append(
            _md_table(
                ["site", "own", "away", "visitors", "row gap", "column gap"],
                [
                    [
                        site,
                        _fmt(v.get("own")),
                        _fmt(v.get("away")),
                        _fmt(v.get("visitors")),
                        _fmt(v.get("row_gap")),
                        _fmt(v.get("column_gap")),
                    ]
                    for site, v in home["per_site"].items()
                ],
            )
        )
        md.append("")
        md.append(
            f"The own model beats every visitor on {home.get('columns_home_best', DASH)} "
            f"of {home.get('sites', DASH)} sites, "
            "and does better at home than on every other site "
            f"for {home.get('rows_home_best', DASH)} of {home.get('sites', DASH)}."
        )
        md.append("")

    pairs = [p for p in (shift.get("pairs") or []) if isinstance(p, Mapping)]
    if pairs or shift.get("distances"):
        measure = str(shift.get("measure") or "histogram distance")
        md.extend(["## Does the shift measure predict the loss?", ""])
        md.append(
            f"Distance: {measure} between the sites' shared intensity histograms. Loss: the local model's "
            f"{metric} on its own site minus its {metric} on the test site."
        )
        md.append("")
        if pairs:
            md.append(
                _md_table(
                    ["train site", "test site", "distance", f"{metric} loss"],
                    [
                        [
                            str(p.get("train_site", DASH)),
                            str(p.get("test_site", DASH)),
                            _fmt(p.get("distance")),
                            _fmt(p.get("loss")),
                        ]
                        for p in pairs
                    ],
                    left=2,
                )
            )
            md.append("")
        md.append(
            f"Spearman rank correlation between distance and loss: **ρ = {_fmt(shift.get('spearman'))}** "
            f"({len(pairs)} pairs)."
        )
        md.append("")
        figure("shift.png", "distance versus loss")

    path = out / "report.md"
    path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    return path


def _paragraph(doc: Mapping[str, Any], sites: list[str], profiles: Mapping[str, Any], metric: str, task: str) -> str:
    n = len(sites) if sites else len({s for e in _methods(doc).values() for s in (e.get("per_site") or {})})
    site_list = ", ".join(f"{s} ({profiles[s]})" if profiles.get(s) else s for s in sites)
    rounds, epochs = doc.get("rounds"), doc.get("local_epochs")
    schedule = (
        f"{_fmt(rounds, 0)} rounds × {_fmt(epochs, 0)} local epochs"
        if rounds is not None or epochs is not None
        else "schedule not recorded"
    )
    quick = doc.get("quick")
    mode = (
        "a quick run (reduced sizes; numbers are indicative only)"
        if quick
        else ("a full run" if quick is not None else "run size not recorded")
    )
    return (
        f"Task: {task}, primary metric {metric} (higher is better). "
        f"{n} simulated scanner sites{': ' + site_list if site_list else ''}. "
        f"Federated methods train for {schedule}. The study took {_duration(doc.get('seconds'))}; this is {mode}."
    )
