"""Classification end to end at a site: chest X-ray DICOM + labels.csv -> samples -> train/evaluate replies."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context, MessageType

from common.config import ConfigError, parse_run_config
from common.model import build_model
from common.records import to_arrays
from tests.flower_helpers import site_context, site_message
from tests.paths import SHARED_DATA

NPZ = SHARED_DATA / "pneumoniamnist" / "pneumoniamnist_merged.npz"
pytestmark = pytest.mark.skipif(not NPZ.is_file(), reason=f"the chest X-ray source {NPZ} is not beside the repository")

CLS = {
    "task.name": "classification",
    "sim.source": str(NPZ),
    "sim.modality": "auto",
    "data.image-size": 32,
    "data.spacing-mm": 7.5,
    "model.channels": "4,8,8,16",
    "train.local-epochs": 1,
    "train.batch-size": 8,
}


@pytest.fixture(scope="module")
def xray_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three chest X-ray sites of 24 images each, from the real PneumoniaMNIST source."""
    from simulations.synth import write_sites

    root = tmp_path_factory.mktemp("xray")
    write_sites(root, sites=3, seed=11, patients=24, source=NPZ, modality="auto")
    return root


def _manifest(site: Path) -> dict[str, str]:
    with open(site / "labels.csv", newline="") as fh:
        return {row["PatientID"]: row["label"] for row in csv.DictReader(fh)}


def test_a_classification_site_gives_one_class_index_per_image(xray_sites: Path) -> None:
    from client.dataset import load_site

    cfg = parse_run_config(CLS)
    site = load_site(xray_sites / "site-01", cfg.data, seed=cfg.seed, task=cfg.task, use_cache=False)
    samples = site.train + site.val
    assert len(samples) == 24 and not site.rejected
    assert all(s["image"].shape == (1, 32, 32) and s["label"].dim() == 0 for s in samples)
    names = cfg.task.class_names
    counts = {name: 0 for name in names}
    for s in samples:
        counts[names[int(s["label"])]] += 1
    manifest = _manifest(xray_sites / "site-01")
    assert counts == {name: sum(1 for v in manifest.values() if v == name) for name in names}
    assert not {s["patient"] for s in site.train} & {s["patient"] for s in site.val}


def test_a_site_without_labels_csv_is_told_what_to_add(xray_sites: Path, tmp_path: Path) -> None:
    from client.dataset import load_site
    from client.errors import DicomError

    site = tmp_path / "site"
    shutil.copytree(xray_sites / "site-02", site, ignore=shutil.ignore_patterns("labels.csv", ".fedsite-cache"))
    cfg = parse_run_config(CLS)
    with pytest.raises(DicomError, match=r"labels\.csv.*PatientID,label"):
        load_site(site, cfg.data, seed=cfg.seed, task=cfg.task, use_cache=False)


def test_an_image_whose_label_is_not_a_configured_class_is_rejected_with_the_reason(
    xray_sites: Path, tmp_path: Path
) -> None:
    from client.dataset import load_site

    site = tmp_path / "site"
    shutil.copytree(xray_sites / "site-02", site, ignore=shutil.ignore_patterns(".fedsite-cache"))
    rows = list(_manifest(site).items())
    rows[0] = (rows[0][0], "covid")
    (site / "labels.csv").write_text("PatientID,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    cfg = parse_run_config(CLS)
    data = load_site(site, cfg.data, seed=cfg.seed, task=cfg.task, use_cache=False)
    assert len(data.train) + len(data.val) == 23
    assert (
        len(data.rejected) == 1 and "'covid'" in data.rejected[0].reason and "task.classes" in data.rejected[0].reason
    )
    assert rows[0][0] not in data.rejected[0].reason  # the PatientID is not reported


def _context(site: Path, **overrides: object) -> Context:
    return site_context(site, {**CLS, **overrides})


_message = site_message


def test_classification_handlers_train_and_report_auc_sensitivity_specificity_and_calibration(
    xray_sites: Path, task_identity: None
) -> None:
    from client.app import evaluate, train

    cfg = parse_run_config(CLS)
    model = build_model(cfg.model, cfg.task)
    ctx = _context(xray_sites / "site-03")
    reply = train(_message(to_arrays(model), MessageType.TRAIN, **{"server-round": 1, "local-epochs": 2}), ctx)
    m = reply.content["metrics"]
    assert m["samples-seen"] == 2 * m["num-examples"]
    trained = reply.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())
    scores = evaluate(_message(reply.content["arrays"], MessageType.EVALUATE), ctx).content["metrics"]
    for key in ("accuracy", "sensitivity", "specificity", "balanced-accuracy", "ece", "loss"):
        assert key in scores
    for key in ("accuracy", "sensitivity", "specificity", "ece"):
        assert 0.0 <= scores[key] <= 1.0
    if "auc" in scores:  # absent only when the validation split holds one class
        assert 0.0 <= scores["auc"] <= 1.0


def test_class_weights_balance_an_imbalanced_split() -> None:
    from common.task import class_weights

    w = class_weights(torch.tensor([1, 1, 1, 0]), 2)
    assert w.tolist() == pytest.approx([2.0, 2.0 / 3.0])
    assert class_weights(torch.tensor([1, 1]), 2).tolist() == pytest.approx([1.0, 1.0])  # an absent class keeps 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.name": "unet"}, "segmentation network"),
        ({"task.classes": "normal"}, "at least two different classes"),
        ({"model.channels": "8,16,32"}, "4 stages"),
        ({"data.image-size": 16}, "at least 32"),
        ({"task.name": "segmentation", "sim.modality": "MR"}, "set 'task.name' = 'classification'"),
    ],
)
def test_a_classification_config_that_cannot_work_fails_at_start_with_the_fix(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config({**CLS, **overrides})


def test_an_existing_folder_of_xray_sites_is_used_as_it_is(xray_sites: Path, tmp_path: Path) -> None:
    """`fedsite simulate --data-root <sites written with --source>` reuses them instead of fighting their settings."""
    from simulations.runner import prepare

    before = sorted((p.name, p.stat().st_mtime_ns) for p in (xray_sites / "site-01").rglob("*.dcm"))
    cfg = parse_run_config({**{k: v for k, v in CLS.items() if k != "sim.source"}, "sim.root": str(xray_sites)})
    assert prepare(cfg, tmp_path / "run").sim.root == str(xray_sites.resolve())
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (xray_sites / "site-01").rglob("*.dcm")) == before


@pytest.mark.slow
def test_a_classification_federation_runs_end_to_end_in_flower(
    xray_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """X-ray DICOM sites -> Flower simulation -> per-site AUC, sensitivity, specificity and ECE in results.json."""
    import json

    from fedsite.cli import main

    out = tmp_path / "run"
    overrides = " ".join(
        f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in CLS.items() if k != "sim.source"
    )
    code = main(
        [
            "simulate",
            "--sites",
            "3",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--data-root",
            str(xray_sites),
            "--run-config",
            overrides,
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    final = results["final"]["per_site"]
    assert set(final) == {"site-01", "site-02", "site-03"}
    for m in final.values():
        assert {"accuracy", "sensitivity", "specificity", "ece", "loss"} <= set(m)
    assert all(site["samples-seen"] == site["num-examples"] for site in results["rounds"][0]["train"].values())
    assert "round 2/2: mean auc" in capsys.readouterr().out
