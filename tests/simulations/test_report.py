"""The shift study's report (simulations/report.py) renders figures and Markdown from a study document."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulations.report import format_table, write_report

SITES = ["site-01", "site-02", "site-03"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["montage.png", "histograms.png", "cross_site.png", "curves.png", "shift.png", "methods.png"]


def _doc() -> dict[str, Any]:
    """A complete small study document: 3 sites, 4 methods, every optional piece present."""
    rng = np.random.default_rng(0)
    edges = np.linspace(0.0, 1.0, 17)
    hists = {}
    for k, s in enumerate(SITES):
        d = np.exp(-0.5 * ((edges[:-1] - (0.3 + 0.2 * k)) / 0.1) ** 2)
        hists[s] = {"edges": edges.tolist(), "density": (d / d.sum()).tolist()}
    methods: dict[str, Any] = {}
    for j, name in enumerate(["local-only", "pooled", "fedavg", "fedprox"]):
        per_site = {s: {"dice": 0.6 + 0.05 * j + 0.02 * k} for k, s in enumerate(SITES)}
        vals = [v["dice"] for v in per_site.values()]
        methods[name] = {
            "per_site": per_site,
            "mean": {"dice": float(np.mean(vals))},
            "worst": {"dice": float(np.min(vals))},
            "curve": [{"round": r, "mean": 0.3 + 0.1 * r + 0.01 * j, "worst": 0.2 + 0.1 * r} for r in range(1, 5)],
            "sample_steps": 1200 + 10 * j,
            "seconds": 12.5 + j,
        }
        if name in ("fedavg", "fedprox"):
            methods[name]["unseen"] = {s: {"dice": 0.5 + 0.01 * k} for k, s in enumerate(SITES)}
    rows = {f"local:{s}": {t: (0.81 if s == t else 0.4 + 0.05 * k) for k, t in enumerate(SITES)} for s in SITES}
    rows["pooled"] = {s: 0.75 for s in SITES}
    rows["fedavg"] = {s: 0.7 + 0.01 * k for k, s in enumerate(SITES)}
    pairs = [
        {"train_site": a, "test_site": b, "distance": float(rng.random()), "loss": float(rng.random() * 0.4)}
        for a in SITES
        for b in SITES
        if a != b
    ]
    return {
        "task": "segmentation",
        "metric": "dice",
        "sites": SITES,
        "profiles": {"site-01": "ge-3T", "site-02": "siemens-1.5T", "site-03": "philips-3T"},
        "quick": True,
        "seconds": 123.4,
        "rounds": 4,
        "local_epochs": 2,
        "methods": methods,
        "cross_site": {"metric": "dice", "rows": rows},
        "shift": {
            "measure": "Jensen-Shannon distance",
            "distances": {a: {b: 0.1 for b in SITES} for a in SITES},
            "pairs": pairs,
            "spearman": 0.4321,
            "histograms": hists,
        },
    }


def _examples() -> dict[str, np.ndarray]:
    """Smooth phantoms in raw units with per-site contrast and noise, like three scanners."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[-1:1:96j, -1:1:96j]
    disk = (xx**2 + yy**2 < 0.6).astype(float)
    return {s: (100 + 400 * k) * disk + 50 * xx + rng.normal(0, 5 + 10 * k, disk.shape) for k, s in enumerate(SITES)}


def _assert_valid_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert path.exists(), f"{path.name} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size < 200_000, f"{path.name} is {path.stat().st_size} bytes"
    pixels = plt.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert float(pixels.std()) > 0.0, f"{path.name} is a blank image"


def _image_links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.md of the complete document with examples, rendered once for the tests that read it."""
    out = tmp_path_factory.mktemp("full")
    path = write_report(out, _doc(), examples=_examples())
    assert path == out / "report.md"
    return path


def test_a_complete_document_renders_every_figure_as_a_valid_png(full_report: Path) -> None:
    for name in ALL_FIGURES:
        _assert_valid_png(full_report.parent / name)


def test_report_markdown_embeds_every_figure_it_wrote_and_names_every_method(full_report: Path) -> None:
    md = full_report.read_text()
    links = _image_links(md)
    assert sorted(links) == sorted(ALL_FIGURES)
    assert all((full_report.parent / link).exists() for link in links)
    for name in ["local-only", "pooled", "fedavg", "fedprox"]:
        assert f"| {name} |" in md
    assert md.startswith("# ")
    assert "segmentation" in md and "3 simulated scanner sites" in md and "4 rounds × 2 local epochs" in md
    assert "2 min 3 s" in md and "quick run" in md
    assert "ge-3T" in md


def test_report_tables_show_cross_site_values_to_three_decimals_and_the_spearman_rho(full_report: Path) -> None:
    md = full_report.read_text()
    assert "| local:site-01 | 0.810 | 0.450 | 0.500 |" in md
    assert "| pooled | 0.750 | 0.750 | 0.750 |" in md
    assert "| fedavg | 0.700 | 0.710 | 0.720 |" in md
    assert "ρ = 0.432" in md
    assert "| site-01 | site-02 |" in md  # a shift pair row
    # the methods table: mean, worst, unseen mean (only fedavg/fedprox have it), sample-steps, seconds
    assert "| local-only | 0.620 | 0.600 | – | 1200 | 12.5 |" in md
    assert "| fedavg | 0.720 | 0.700 | 0.510 | 1220 | 14.5 |" in md


def test_without_examples_the_montage_is_skipped_and_not_linked(tmp_path: Path) -> None:
    md = write_report(tmp_path, _doc()).read_text()
    assert not (tmp_path / "montage.png").exists()
    assert "montage.png" not in md
    for name in ALL_FIGURES[1:]:
        _assert_valid_png(tmp_path / name)


def test_a_document_with_nan_values_and_no_optional_parts_still_renders(tmp_path: Path) -> None:
    doc = _doc()
    for entry in doc["methods"].values():
        entry.pop("curve", None)
        entry.pop("unseen", None)
        entry.pop("sample_steps", None)
    doc["methods"]["fedavg"]["mean"]["dice"] = float("nan")
    doc["methods"]["fedprox"]["worst"] = {}
    doc["cross_site"]["rows"]["pooled"]["site-02"] = float("nan")
    doc["shift"] = {
        "pairs": [{"train_site": "site-01", "test_site": "site-02", "distance": 0.2, "loss": float("nan")}],
        "spearman": float("nan"),
    }
    for key in ("profiles", "quick", "seconds", "rounds", "local_epochs"):
        doc.pop(key)
    # NaN survives a JSON round trip as the study writes it
    doc = json.loads(json.dumps(doc))
    md = write_report(tmp_path, doc).read_text()
    assert "| fedavg | – | 0.700 |" in md
    assert "| fedprox | 0.770 | – |" in md
    assert "| pooled | 0.750 | – | 0.750 |" in md
    assert "ρ = –" in md
    assert "| method | mean dice | worst dice | sample-steps | seconds |" in md  # no unseen column
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "shift.png").exists()
    assert not (tmp_path / "histograms.png").exists()
    for link in _image_links(md):
        _assert_valid_png(tmp_path / link)
    assert sorted(_image_links(md)) == ["cross_site.png", "methods.png"]


def test_a_minimal_document_renders_a_report_without_figures(tmp_path: Path) -> None:
    md = write_report(
        tmp_path / "new" / "folder", {"task": "classification", "metric": "auc", "methods": {}}
    ).read_text()
    assert "classification" in md and "No methods" in md
    assert _image_links(md) == []


def test_a_classification_document_uses_its_metric_name(tmp_path: Path) -> None:
    doc = copy.deepcopy(_doc())
    doc["task"], doc["metric"] = "classification", "auc"
    for entry in doc["methods"].values():
        for part in ("mean", "worst"):
            entry[part] = {"auc": entry[part]["dice"], "sensitivity": 0.8, "specificity": 0.7, "ece": 0.05}
        entry["curve"] = entry["curve"][:2]
        entry.pop("unseen", None)
    md = write_report(tmp_path, doc).read_text()
    assert "mean auc" in md and "worst auc" in md
    # the other classification metrics get their own table: mean (worst)
    assert "| method | sensitivity | specificity | ece |" in md and "0.800 (0.800)" in md and "0.050 (0.050)" in md
    _assert_valid_png(tmp_path / "curves.png")


def test_an_example_that_is_not_two_dimensional_raises_with_its_site_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="site-02"):
        write_report(tmp_path, _doc(), examples={"site-02": np.zeros((2, 4, 4))})


def test_format_table_lists_methods_with_mean_worst_and_unseen() -> None:
    text = format_table(_doc())
    lines = text.splitlines()
    assert lines[0].split() == ["method", "mean", "dice", "worst", "dice", "unseen", "dice", "(mean)"]
    assert len(lines) == 2 + 4
    by_name = {ln.split()[0]: ln.split()[1:] for ln in lines[2:]}
    assert by_name["local-only"] == ["0.620", "0.600", "–"]
    assert by_name["fedavg"] == ["0.720", "0.700", "0.510"]
    assert all(not math.isnan(float(v)) for v in by_name["pooled"][:2])


def test_format_table_shows_missing_values_as_a_dash() -> None:
    doc = {"metric": "dice", "methods": {"fedbn": {"mean": {"dice": float("nan")}, "worst": {}}}}
    assert format_table(doc).splitlines()[2].split() == ["fedbn", "–", "–"]
