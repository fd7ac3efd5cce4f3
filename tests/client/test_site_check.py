"""``fedsite site check``: every file accepted or rejected with a reason, damaged files, and no patient value out."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.discovery import discover_series, read_usable
from client.errors import DicomError
from client.geometry import grid_problem
from client.phi import hash_id
from fedsite.cli import main
from tests.dicom_fixtures import pydicom_file, pydicom_test_files, pydicom_tree
from tests.paths import REPO

REPORT_KEYS = (
    "files_total",
    "files_accepted",
    "files_rejected",
    "series_total",
    "series_usable",
    "by_modality",
    "by_manufacturer",
    "rejected",
)
FAST = {"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32", "train.batch-size": 8}


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_every_pydicom_and_pydicom_data_file_is_accepted_or_rejected_with_a_reason(tmp_path: Path) -> None:
    """All of pydicom's test files and pydicom-data in one tree; the real command, in its own process."""
    pytest.importorskip("data_store", reason="pydicom-data is not installed: pip install -e '.[test]'")
    tree = pydicom_tree(tmp_path / "tree")
    files = _files(tree)
    assert len(files) == len(pydicom_test_files()) > 200
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsite", "site", "check", str(tree), "--json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert all(key in report for key in REPORT_KEYS)
    assert report["files_total"] == len(files) == report["files_accepted"] + report["files_rejected"]
    rejected = report["rejected"]
    assert len(rejected) == report["files_rejected"] == len({r["file"] for r in rejected})  # each file once
    assert all(r["reason"].strip() and r["file"] for r in rejected)
    plain = {r["file"] for r in rejected if "~" not in r["file"]}
    assert plain <= set(files)  # paths relative to DIR
    assert report["series_usable"] >= 15 and report["files_accepted"] >= 25
    assert {"CT", "MR", "CR"} <= set(report["by_modality"])
    assert "rejected files by reason:" in proc.stdout and f"{report['files_total']} files" in proc.stdout


def test_a_folder_without_usable_series_exits_non_zero_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    shutil.copy(pydicom_file("reportsi.dcm"), tmp_path / "report.dcm")
    assert main(["site", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no usable series" in err and ("not a DICOM file" in err or "structured report" in err)
    assert main(["site", "check", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_report_counts_series_labels_and_the_split_of_a_site(
    small_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "r.json"
    assert main(["site", "check", str(small_sites / "site-03"), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert (report["files_total"], report["files_accepted"], report["files_rejected"]) == (24, 24, 0)
    assert report["series_usable"] == report["series_total"] == 4
    assert report["by_modality"] == {"MR": {"series": 4, "slices": 24, "files": 24}}
    assert list(report["by_manufacturer"]) == ["Philips"]  # "Philips Medical Systems", grouped
    assert report["by_transfer_syntax"] == {"RLE Lossless": {"series": 4, "slices": 24, "files": 24}}
    assert report["labels"]["segmentation"]["coverage"] == 1.0
    split = report["split"]
    assert split["train_patients"] + split["val_patients"] == 4 and split["val_patients"] >= 1
    out = capsys.readouterr().out
    assert "4 of 4 usable series have a mask" in out and "-> 3 train" in out


# ------------------------------------------------------------------------------------------
# fuzz: damaged copies of valid files


def _strip_meta(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.preamble = None
    del ds.file_meta
    ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)


def _pixel_offset(path: Path) -> int:
    raw = path.read_bytes()
    return raw.rfind(b"\xe0\x7f\x10\x00")


def _flip_header_bytes(path: Path, rng: np.random.Generator, n: int) -> None:
    raw = bytearray(path.read_bytes())
    end = _pixel_offset(path)
    for at in rng.integers(132, end, size=n):
        raw[at] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(raw))


def _wrong_vr(path: Path) -> None:
    raw = path.read_bytes()
    tag = b"\x20\x00\x32\x00DS"  # ImagePositionPatient, explicit VR little endian
    assert tag in raw
    path.write_bytes(raw.replace(tag, b"\x20\x00\x32\x00FD", 1))


def _set_orientation(path: Path, iop: list[str]) -> None:
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = iop
    ds.save_as(path)


def _decoded_by_file(site: Path) -> dict[str, np.ndarray]:
    series, _ = discover_series(site / "dicom", relative_to=site)
    out = {}
    for s in series:
        try:
            volume, s, _ = read_usable(s)  # damaged files dropped: the rest of the series is read
        except DicomError:
            continue  # a series that cannot be read is not "read correctly"
        for ref, image in zip(s.slices, volume, strict=True):
            out[ref.path.relative_to(site).as_posix()] = image
    return out


def _redact(rel: str) -> str:
    """How the report names a path of a simulated site: the PatientID folder hashed."""
    return "/".join(f"~{hash_id(p)}" if p.startswith("S01-P") else p for p in rel.split("/"))


def test_damaged_files_are_rejected_with_a_reason_or_read_correctly_and_the_rest_still_trains(tmp_path: Path) -> None:
    from client.audit import check_site
    from client.dataset import load_site
    from common.config import parse_run_config
    from simulations.synth import write_site

    pristine = write_site(tmp_path / "pristine", 0, seed=11, patients=8, slices=4)
    site = tmp_path / "site"
    shutil.copytree(pristine, site)
    original = _decoded_by_file(pristine)
    patients = sorted(p for p in (site / "dicom").iterdir())

    def slices(k: int) -> list[Path]:
        return sorted(patients[k].rglob("*.dcm"))

    rng = np.random.default_rng(2024)
    damaged: dict[str, str] = {}
    f = slices(0)[1]  # truncated pixel data
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * 0.6)])
    damaged[f.relative_to(site).as_posix()] = "truncated"
    f = slices(1)[2]  # wrong VR
    _wrong_vr(f)
    damaged[f.relative_to(site).as_posix()] = "wrong VR"
    for f in slices(2):  # missing file meta: a bare dataset
        _strip_meta(f)
        damaged[f.relative_to(site).as_posix()] = "no meta"
    for f in slices(3):  # random byte flips in the header
        _flip_header_bytes(f, rng, 3)
        damaged[f.relative_to(site).as_posix()] = "byte flips"
    gone = slices(4)[1]  # a series with a missing slice: a 2D slice task uses the rest
    gone.unlink()
    for f in slices(4):
        damaged[f.relative_to(site).as_posix()] = "series with a missing slice"
    with_gap = [f.relative_to(site).as_posix() for f in slices(4)]
    f = slices(5)[2]  # mixed orientations in one series
    _set_orientation(f, ["0", "1", "0", "0", "0", "-1"])
    damaged[f.relative_to(site).as_posix()] = "mixed orientation"
    (site / "dicom" / "empty.dcm").write_bytes(b"")
    damaged["dicom/empty.dcm"] = "empty file"

    report = check_site(site)
    assert report.files_total == report.files_accepted + report.files_rejected == len(_files(site / "dicom"))
    rejected = {r["file"]: r["reason"] for r in report.rejected}
    now = _decoded_by_file(site)
    for rel, kind in damaged.items():
        if _redact(rel) in rejected:
            assert rejected[_redact(rel)].strip(), (kind, rel)
        else:
            assert rel in now, f"{kind}: {rel} neither rejected nor read"
            np.testing.assert_array_equal(now[rel], original[rel], err_msg=f"{kind}: {rel} read wrongly")
    assert any("cannot be decoded" in r or "damaged" in r for r in rejected.values())
    assert all(rel in now for rel in with_gap)  # uneven gaps do not matter to 2D slices
    (gap_series,) = [s for s in discover_series(site / "dicom")[0] if slices(4)[0] in s.files]
    assert "3D task needs an even grid" in (grid_problem(gap_series) or "")
    assert [rel for rel in damaged if _redact(rel) in rejected and damaged[rel] == "truncated"]  # named alone
    assert sum(damaged[rel] == "truncated" for rel in damaged) == 1
    assert any("ImageOrientationPatient" in r for r in rejected.values())
    assert all(rel in now for rel, kind in damaged.items() if kind == "no meta")  # read correctly

    cfg = parse_run_config(FAST)
    data = load_site(site, cfg.data, seed=1, use_cache=False)
    assert data.train and data.val and data.train_patients + data.val_patients >= 3
    assert data.series_used == report.labels["segmentation"]["series_with_mask"]


# ------------------------------------------------------------------------------------------
# privacy: planted identifiers never leave the site


PLANTED_NAME = "Zorbaplant"


def _plant(site: Path) -> list[str]:
    """Plant identifying values in every file; move files under folders named by them. Returns the needles."""
    needles = ["19710203", "1971-02-03", "Johannaplant", "Planted Memorial Hospital", "Memorial"]
    for k, patient in enumerate(sorted((site / "dicom").iterdir())):
        pid, name, acc = f"PHIID77{k}88991", f"{PLANTED_NAME}{k}^Johannaplant", f"ACC5544{k}3322"
        needles += [pid, f"{PLANTED_NAME}{k}", acc]
        target = site / "dicom" / pid / f"{PLANTED_NAME}{k}_Johannaplant"
        for path in sorted(patient.rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, "19710203"
            ds.AccessionNumber, ds.InstitutionName = acc, "Planted Memorial Hospital"
            needles += [str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)]
            dest = target / path.relative_to(patient)
            dest.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(dest)
        shutil.rmtree(patient)
        (target / f"notes-{pid}.txt").write_text("a file the client rejects, in an identifying folder")
    return sorted(set(needles))


def _record_texts(content) -> list[str]:
    from flwr.app import ArrayRecord

    out = []
    for key, record in content.items():
        out.append(key)
        out.append(" ".join(record.keys()) if isinstance(record, ArrayRecord) else repr(dict(record)))
    return out


def test_planted_patient_values_appear_nowhere_the_site_prints_logs_sends_or_writes(
    small_sites: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    task_identity: None,
) -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from client.app import evaluate, train
    from common.config import flatten, parse_run_config
    from common.model import build_model
    from common.records import to_arrays

    site = tmp_path / "site-01"
    shutil.copytree(small_sites / "site-01", site, ignore=shutil.ignore_patterns(".fedsite-*"))
    needles = _plant(site)
    before = {p: p.stat().st_mtime_ns for p in site.rglob("*") if p.is_file()}
    caplog.set_level(logging.DEBUG)

    report_path = tmp_path / "out" / "report.json"
    assert main(["site", "check", str(site), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["series_usable"] == 4 and report["files_rejected"] == 4  # the notes files, paths hashed

    cfg = parse_run_config(FAST)
    ctx = Context(run_id=1, node_id=7, node_config={"data-dir": str(site)}, state=RecordDict(), run_config=flatten(cfg))
    arrays = to_arrays(build_model(cfg.model))
    replies = [
        train(
            Message(
                content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "local-epochs": 1})}),
                dst_node_id=7,
                message_type=MessageType.TRAIN,
            ),
            ctx,
        ),
        evaluate(
            Message(
                content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                dst_node_id=7,
                message_type=MessageType.EVALUATE,
            ),
            ctx,
        ),
    ]
    assert replies[0].content["metrics"]["num-examples"] > 0

    printed = capfd.readouterr()
    texts = {"stdout": printed.out, "stderr": printed.err, "log": caplog.text}
    for i, reply in enumerate(replies):
        texts[f"reply {i}"] = "\n".join(_record_texts(reply.content))
    written = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and ".fedsite-cache" not in p.parts and before.get(p) != p.stat().st_mtime_ns
    ]
    written = [p for p in written if p not in before]  # inputs that were not touched are not output
    assert report_path in written
    for p in written:
        texts[f"file {p.relative_to(tmp_path)}"] = p.read_bytes().decode("utf-8", "replace")
    texts["written paths"] = "\n".join(os.fspath(p.relative_to(site)) for p in written if p.is_relative_to(site))
    for where, text in texts.items():
        for needle in needles:
            assert needle.lower() not in text.lower(), f"{needle!r} found in {where}"
