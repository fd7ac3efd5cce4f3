"""No patient data leaves a site: planted identifiers never reach replies, logs, metrics, MLflow or reports.

Each patient of two small sites gets planted identifiers in every header a PACS export carries (name,
ID, birth date, accession number, institution), its own study, series, instance and frame-of-reference
UIDs, and a folder named after the patient, as hospital exports often are. Then:

- the site's handlers run in this process and every byte of their replies (serialised as Flower sends
  them) and every log line of the site is searched;
- a real simulation runs, with Flower's and Ray's logs forwarded (``--verbose``) so the site processes'
  own output reaches this process' file descriptors, and everything printed and written is searched.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pydicom
import pytest

PLANTED = {
    "PatientName": "Plantedname^Johanna{n}",
    "PatientID": "PHIID778899{n}",
    "PatientBirthDate": "1971020{n}",
    "AccessionNumber": "ACC5544332{n}",
    "InstitutionName": "Planted Memorial Hospital",
}
#: A UID root no generator uses: every planted UID starts with it.
UID_ROOT = "1.2.826.0.1.3680043.8.498.3141592653"
NEEDLES = [
    v.encode()
    for v in (
        "Plantedname",
        "Johanna",
        "PHIID778899",
        "1971020",
        "ACC5544332",
        "Planted Memorial",
        "1971-02-0",
        "3141592653",
    )
]


def _plant(site: Path) -> None:
    """Give each patient identifiers, UIDs of its own and a folder named after it; keep masks linked."""
    patients = sorted(p for p in (site / "dicom").iterdir() if p.is_dir())
    for n, patient in enumerate(patients):
        uids = {"StudyInstanceUID": f"{UID_ROOT}.{n}.1", "FrameOfReferenceUID": f"{UID_ROOT}.{n}.2"}
        for series_no, series in enumerate(sorted(p for p in patient.iterdir() if p.is_dir())):
            new_series = f"{UID_ROOT}.{n}.3.{series_no}"
            for i, path in enumerate(sorted(series.rglob("*.dcm"))):
                ds = pydicom.dcmread(path)
                old_series = str(ds.SeriesInstanceUID)
                for key, value in PLANTED.items():
                    setattr(ds, key, value.format(n=n))
                for key, value in uids.items():
                    setattr(ds, key, value)
                ds.SeriesInstanceUID = new_series
                ds.SOPInstanceUID = f"{UID_ROOT}.{n}.4.{series_no}.{i}"
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(path)
            mask = site / "labels" / f"{old_series}.nii.gz"
            if mask.is_file():
                mask.rename(site / "labels" / f"{new_series}.nii.gz")
        patient.rename(patient.with_name(f"{PLANTED['PatientID'].format(n=n)}_Plantedname"))


@pytest.fixture()
def planted_sites(small_sites: Path, tmp_path: Path) -> Path:
    root = tmp_path / "sites"
    for name in ("site-01", "site-02"):
        shutil.copytree(small_sites / name, root / name, ignore=shutil.ignore_patterns(".fedsite-*"))
        _plant(root / name)
    first = next((root / "site-01" / "dicom").rglob("*.dcm"))
    # the planted values are really in the site's files and paths, so the searches below can fail
    assert (
        b"PHIID778899" in first.read_bytes() and "PHIID778899" in str(first) and UID_ROOT.encode() in first.read_bytes()
    )
    return root


def _assert_clean(texts: dict[str, bytes]) -> None:
    for needle in NEEDLES:
        for where, text in texts.items():
            assert needle not in text, f"{needle!r} in {where}"


@pytest.mark.parametrize("dp", [False, True], ids=["dp-off", "dp-on"])
def test_replies_and_site_logs_carry_no_planted_identifier(
    dp: bool, planted_sites: Path, caplog: pytest.LogCaptureFixture, task_identity: None
) -> None:
    """Every byte a site sends (train and evaluate replies as serialised) and every line it logs is clean."""
    from flwr.common.serde import message_to_proto

    from client.app import evaluate, train
    from common.config import parse_run_config
    from common.model import build_model
    from common.records import to_arrays
    from tests.flower_helpers import site_context, site_message

    config = {
        "data.image-size": 32,
        "data.spacing-mm": 7.5,
        "model.channels": "8,16,32",
        "train.local-epochs": 1,
        "privacy.dp": dp,
        "privacy.noise-multiplier": 1.0 if dp else 0.0,
        "privacy.audit": True,
    }
    cfg = parse_run_config(config)
    arrays = to_arrays(build_model(cfg.model, cfg.task))
    caplog.set_level(logging.DEBUG)
    texts: dict[str, bytes] = {}
    context = site_context(planted_sites / "site-01", config)
    for kind, handler in (("train", train), ("evaluate", evaluate)):
        reply = handler(site_message(arrays, kind, **{"server-round": 1}), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        texts[f"{kind} reply"] = message_to_proto(reply).SerializeToString()
    texts["site log"] = caplog.text.encode()
    assert len(texts["train reply"]) > 10_000  # the weights are in it: the search covers a real reply
    _assert_clean(texts)


@pytest.mark.slow
def test_planted_identifiers_never_leave_the_site_in_a_simulation(
    planted_sites: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A whole simulated run with DP on: printed output (site processes' too), logs, MLflow and files."""
    from fedsite.cli import main

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
            "--verbose",
            "--out",
            str(out),
            "--data-root",
            str(planted_sites),
            "--run-config",
            "data.image-size=32 data.spacing-mm=7.5 model.channels='8,16,32'",
            "--run-config",
            "privacy.dp=true privacy.noise-multiplier=1.0 privacy.audit=true",
        ]
    )
    printed = capfd.readouterr()
    assert code == 0, printed.err[-2000:]
    written = [p for p in out.rglob("*") if p.is_file()] + list(planted_sites.rglob("ledger.json"))
    assert {"mlflow.db", "results.json", "final_model.pt", "ledger.json"} <= {p.name for p in written}
    # the site processes' own log lines reached this process (so their content was searched)
    assert "train" in printed.out + printed.err and len(printed.out + printed.err) > 1000
    texts = {"stdout": printed.out.encode(), "stderr": printed.err.encode(), "log": caplog.text.encode()}
    texts.update({str(p.relative_to(tmp_path)): p.read_bytes() for p in written})
    _assert_clean(texts)
