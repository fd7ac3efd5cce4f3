"""No patient data leaves a site: planted identifiers never reach messages, metrics, logs, MLflow or reports."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pydicom
import pytest

from common.cli import main

PLANTED = {
    "PatientName": "Plantedname^Johanna{n}",
    "PatientID": "PHIID778899{n}",
    "PatientBirthDate": "1971020{n}",
    "AccessionNumber": "ACC5544332{n}",
    "InstitutionName": "Planted Memorial Hospital",
}


def _plant(site: Path) -> None:
    """Every file gets identifiers; each patient (folder) its own, so the site still has patients."""
    for n, patient in enumerate(sorted(p for p in (site / "dicom").iterdir() if p.is_dir())):
        for path in patient.rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            for key, value in PLANTED.items():
                setattr(ds, key, value.format(n=n))
            ds.save_as(path)


def _needles() -> list[bytes]:
    return [
        v.encode()
        for v in ("Plantedname", "Johanna", "PHIID778899", "1971020", "ACC5544332", "Planted Memorial", "1971-02-0")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("dp", [False, True], ids=["dp-off", "dp-on"])
def test_planted_identifiers_never_leave_the_site(
    dp: bool, small_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "sites"
    for name in ("site-01", "site-02"):
        shutil.copytree(
            small_sites / name, root / name, ignore=shutil.ignore_patterns(".fedsite-cache", ".fedsite-privacy")
        )
        _plant(root / name)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO)
    code = main(
        [
            "simulate",
            "--sites",
            "2",
            "--rounds",
            "1",
            "--local-epochs",
            "1",
            "--seed",
            "7",
            "--out",
            str(out),
            "--data-root",
            str(root),
            "--run-config",
            "data.image-size=32 data.spacing-mm=7.5 sim.patients=4 sim.slices=6 model.channels='8,16,32'",
            "--run-config",
            f"privacy.dp={'true' if dp else 'false'} privacy.noise-multiplier=1.0",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    texts = [printed.out.encode(), printed.err.encode(), caplog.text.encode()]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written) and any(p.name == "results.json" for p in written)
    if dp:
        written += [p for p in root.rglob("ledger.json")]
        assert any(p.name == "ledger.json" for p in written)
    for needle in _needles():
        for i, text in enumerate(texts):
            assert needle not in text, f"{needle!r} in captured output #{i}"
        for path in written:
            assert needle not in path.read_bytes(), f"{needle!r} in {path.relative_to(tmp_path)}"
    # sanity: the planted values are really in the site's DICOM, so the test can fail
    first = next((root / "site-01" / "dicom").rglob("*.dcm"))
    assert b"PHIID778899" in first.read_bytes()
