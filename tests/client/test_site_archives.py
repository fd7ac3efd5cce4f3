"""Real archives: every file accounted, duplicates, localizers, damaged slices, multi-volume series, vendor names."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.audit import check_site
from client.discovery import read_series, scan_images
from client.geometry import grid_problem
from client.layout import CACHE_DIR, LEDGER_DIR
from tests.dicom_fixtures import damage_pixels, write_enhanced, write_multivolume, write_series


def _ramp(z: int, base: int = 0) -> np.ndarray:
    """A (z, 6, 6) volume whose slice k holds base + k (so the slice and volume read are known)."""
    return np.stack([np.full((6, 6), base + k, np.uint16) for k in range(z)])


def _reasons(report) -> dict[str, str]:
    return {r["file"]: r["reason"] for r in report.rejected}


# ------------------------------------------------------------------------------------------
# every file accounted


def test_hidden_and_gzip_files_are_counted_and_read_or_rejected_and_fedsite_folders_are_not(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_series(site / "dicom" / "a", _ramp(3))
    hidden = write_series(site / "dicom" / "b", _ramp(2, base=10), prefix=".IM")  # valid DICOM, hidden names
    (site / "dicom" / ".DS_Store").write_bytes(b"Bud1\0\0junk")
    plain = write_series(tmp_path / "gz", _ramp(4, base=20))
    for p in plain:
        with gzip.open(site / "dicom" / f"{p.name}.gz", "wb") as fh:
            fh.write(p.read_bytes())
    (site / "dicom" / "broken.dcm.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    for reserved in (CACHE_DIR, LEDGER_DIR):
        (site / reserved).mkdir()
        (site / reserved / "x.bin").write_bytes(b"not an image")

    report = check_site(site)
    in_folder = [p for p in (site / "dicom").rglob("*") if p.is_file()]
    assert report.files_total == len(in_folder) == 3 + 2 + 1 + 4 + 1
    assert report.files_accepted + report.files_rejected == report.files_total
    reasons = _reasons(report)
    assert set(reasons) == {"dicom/.DS_Store", "dicom/broken.dcm.gz"}
    assert "hidden file" in reasons["dicom/.DS_Store"] and "gzip" in reasons["dicom/broken.dcm.gz"]
    assert report.series_usable == 3 and report.slices_usable == 9
    scan = scan_images(site / "dicom")
    by_first = {s.slices[0].path.name: s for s in scan.series}
    np.testing.assert_array_equal(read_series(by_first["IM0001.dcm.gz"])[:, 0, 0], [20, 21, 22, 23])
    np.testing.assert_array_equal(read_series(by_first[hidden[0].name])[:, 0, 0], [10, 11])


# ------------------------------------------------------------------------------------------
# duplicates


def test_of_two_copies_of_one_image_the_one_that_decodes_is_kept_and_the_other_named(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "dicom", _ramp(3))
    broken = tmp_path / "dicom" / "A_copy.dcm"  # sorts before IM0002.dcm: the first copy by path
    shutil.copy(paths[1], broken)
    damage_pixels(broken)
    report = check_site(tmp_path)
    assert _reasons(report) == {
        "dicom/A_copy.dcm": "duplicate of another file of the same image (same SOPInstanceUID); "
        "the first copy whose pixel data decodes is used"
    }
    assert report.series_usable == 1 and report.slices_usable == 3 and report.files_accepted == 3
    (series,) = scan_images(tmp_path / "dicom").series
    assert paths[1] in series.files and broken not in series.files
    np.testing.assert_array_equal(read_series(series)[:, 0, 0], [0, 1, 2])


# ------------------------------------------------------------------------------------------
# keep what is usable


def test_a_localizer_is_dropped_from_its_series_with_its_own_reason_and_the_stack_is_used(tmp_path: Path) -> None:
    uid = pydicom.uid.generate_uid()
    write_series(tmp_path / "dicom", _ramp(5), series_uid=uid)
    (loc,) = write_series(tmp_path / "dicom", _ramp(1, base=99), series_uid=uid, iop=(0, 1, 0, 0, 0, -1), prefix="LOC")
    report = check_site(tmp_path)
    reasons = _reasons(report)
    assert list(reasons) == ["dicom/LOC0001.dcm"] and "localizer" in reasons["dicom/LOC0001.dcm"]
    assert "ImageOrientationPatient" in reasons["dicom/LOC0001.dcm"]
    assert report.series_usable == 1 and report.slices_usable == 5
    (series,) = scan_images(tmp_path / "dicom").series
    assert loc not in series.files
    np.testing.assert_array_equal(read_series(series)[:, 0, 0], [0, 1, 2, 3, 4])


def test_two_stacks_of_equal_size_in_other_orientations_are_not_guessed_apart(tmp_path: Path) -> None:
    uid = pydicom.uid.generate_uid()
    write_series(tmp_path / "dicom", _ramp(3), series_uid=uid)
    write_series(tmp_path / "dicom", _ramp(3), series_uid=uid, iop=(0, 1, 0, 0, 0, -1), prefix="SAG")
    report = check_site(tmp_path)
    assert report.series_usable == 0 and report.files_rejected == 6
    assert all("mixed orientations" in r for r in _reasons(report).values())


def test_each_damaged_slice_is_named_with_its_own_reason_and_the_rest_of_the_series_is_used(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "dicom", _ramp(6))
    for p in (paths[1], paths[4]):
        damage_pixels(p)
    report = check_site(tmp_path)
    reasons = _reasons(report)
    assert sorted(reasons) == ["dicom/IM0002.dcm", "dicom/IM0005.dcm"]
    assert all("cannot be" in r and "another file" not in r for r in reasons.values())
    assert report.series_usable == 1 and report.slices_usable == 4 and report.files_accepted == 4


def test_uneven_gaps_are_used_by_2d_slice_tasks_and_named_as_a_3d_grid_problem(tmp_path: Path) -> None:
    write_series(tmp_path / "dicom", _ramp(4), positions=[0.0, 2.0, 6.0, 8.0])  # slice at 4 mm missing
    report = check_site(tmp_path)
    assert report.series_usable == 1 and report.slices_usable == 4 and report.files_rejected == 0
    (series,) = scan_images(tmp_path / "dicom").series
    problem = grid_problem(series)
    assert problem is not None and "missing slice" in problem and "3D task needs an even grid" in problem
    (even,) = scan_images(write_series(tmp_path / "even", _ramp(4))[0].parent).series
    assert grid_problem(even) is None


# ------------------------------------------------------------------------------------------
# volumes within a series


def _diffusion(folder: Path) -> str:
    uid, _ = write_multivolume(
        folder,
        [
            ({"DiffusionBValue": 1000, "DiffusionGradientOrientation": [1, 0, 0]}, _ramp(4, base=100)),
            ({"DiffusionBValue": 0}, _ramp(4, base=0)),
            ({"DiffusionBValue": 1000, "DiffusionGradientOrientation": [0, 1, 0]}, _ramp(4, base=200)),
        ],
    )
    return uid


@pytest.mark.parametrize(
    ("policy", "usable", "firsts"),
    [("first", 1, [0]), ("all", 3, [0, 100, 200]), ("b-value=1000", 2, [100, 200]), ("b=0", 1, [0])],
)
def test_a_diffusion_series_is_split_into_volumes_and_the_policy_chooses_which_are_used(
    tmp_path: Path, policy: str, usable: int, firsts: list[int]
) -> None:
    _diffusion(tmp_path / "dicom")
    report = check_site(tmp_path, volume=policy)
    assert report.series_usable == usable and report.slices_usable == 4 * usable
    assert report.files_accepted == 4 * usable and report.files_rejected == 12 - 4 * usable
    assert report.volumes["series_split"] == 1 and report.volumes["split_by"] == {"b-value + direction": 1}
    assert all("split by b-value + direction into 3 volumes" in r for r in _reasons(report).values())
    series = scan_images(tmp_path / "dicom", volume=policy).series
    got = sorted(int(read_series(s)[0, 0, 0]) for s in series)
    assert got == firsts
    assert all(
        np.array_equal(read_series(s)[:, 0, 0], got_first + np.arange(4))
        for s, got_first in zip(sorted(series, key=lambda s: read_series(s)[0, 0, 0]), firsts, strict=True)
    )


@pytest.mark.parametrize(
    ("tag", "values", "how"),
    [
        ("TemporalPositionIdentifier", [1, 2, 3], "temporal position"),  # fMRI / perfusion
        ("EchoNumbers", [1, 2], "echo"),  # multi-echo
        ("AcquisitionNumber", [1, 2], "acquisition"),
    ],
)
def test_time_points_echoes_and_acquisitions_split_a_series_into_volumes(
    tmp_path: Path, tag: str, values: list[int], how: str
) -> None:
    write_multivolume(tmp_path / "dicom", [({tag: v}, _ramp(3, base=10 * v)) for v in reversed(values)])
    report = check_site(tmp_path, volume="all")
    assert report.series_usable == len(values) and report.files_rejected == 0
    assert report.volumes["split_by"] == {how: 1}
    first = check_site(tmp_path)  # the default uses the first (lowest) value only
    assert first.series_usable == 1 and first.files_rejected == 3 * (len(values) - 1)
    (series,) = scan_images(tmp_path / "dicom").series
    np.testing.assert_array_equal(read_series(series)[:, 0, 0], 10 * values[0] + np.arange(3))


def test_copies_at_one_position_without_a_header_value_to_split_them_stay_rejected(tmp_path: Path) -> None:
    write_multivolume(tmp_path / "dicom", [({}, _ramp(3)), ({}, _ramp(3))])
    report = check_site(tmp_path)
    assert report.series_usable == 0 and all("duplicate slice positions" in r for r in _reasons(report).values())


def test_an_unknown_volume_policy_is_refused_with_the_accepted_forms(tmp_path: Path) -> None:
    from client.errors import SiteDataError

    write_series(tmp_path / "dicom", _ramp(2))
    with pytest.raises(SiteDataError, match=r"'first'.*'all'.*b-value=0"):
        check_site(tmp_path, volume="latest")


# ------------------------------------------------------------------------------------------
# vendor names


def test_one_vendor_spelled_differently_is_grouped_in_the_report_and_the_raw_name_is_kept(tmp_path: Path) -> None:
    write_series(tmp_path / "dicom" / "a", _ramp(2), extra={"Manufacturer": "GE MEDICAL SYSTEMS"})
    write_series(tmp_path / "dicom" / "b", _ramp(2), extra={"Manufacturer": "GE Medical Systems"})
    write_series(
        tmp_path / "dicom" / "c",
        _ramp(2),
        extra={"Manufacturer": "SIEMENS", "ManufacturerModelName": "Skyra"},
    )
    report = check_site(tmp_path)
    assert report.by_manufacturer == {
        "GE": {"series": 2, "slices": 4, "files": 4},
        "Siemens": {"series": 1, "slices": 2, "files": 2},
    }
    assert "Siemens SKYRA" in report.by_model
    raw = sorted(s.manufacturer_raw for s in scan_images(tmp_path / "dicom").series)
    assert raw == ["GE MEDICAL SYSTEMS", "GE Medical Systems", "SIEMENS"]


# ------------------------------------------------------------------------------------------
# redaction follows the values seen in headers


def test_folders_named_by_header_values_are_hashed_and_site_or_project_folders_are_kept(tmp_path: Path) -> None:
    site = tmp_path / "hospital-site"  # shares one word with the institution's name: not a patient value
    folder = site / "dicom" / "hospital-project" / "PID4455" / "Planted_Memorial" / "doe"
    write_series(
        folder,
        _ramp(2),
        patient_id="PID4455",
        extra={"InstitutionName": "Planted Memorial Hospital", "PatientName": "Jane Doe"},
    )
    (folder / "notes.txt").write_text("rejected, so its path is reported")
    report = check_site(site)
    assert report.site == "hospital-site"
    (reported,) = _reasons(report)
    parts = reported.split("/")
    assert parts[:2] == ["dicom", "hospital-project"] and parts[-1] == "notes.txt"
    assert all(p.startswith("~") for p in parts[2:5])  # the PatientID, the institution, a name component
    assert "PID4455" not in reported and "Memorial" not in reported and "doe" not in reported


# ------------------------------------------------------------------------------------------
# all together: a small multi-vendor archive


def build_archive(root: Path) -> int:
    """A multi-vendor archive with every case above; returns the number of volumes a radiologist would use."""
    dicom = root / "dicom"
    write_series(dicom / "ge" / "t1", _ramp(5), extra={"Manufacturer": "GE MEDICAL SYSTEMS"})  # 1
    uid = pydicom.uid.generate_uid()  # a localizer inside a Siemens stack: 1
    write_series(dicom / "siemens" / "t2", _ramp(6), series_uid=uid, extra={"Manufacturer": "SIEMENS"})
    write_series(dicom / "siemens" / "t2", _ramp(1), series_uid=uid, iop=(0, 1, 0, 0, 0, -1), prefix="LOC")
    _diffusion(dicom / "philips" / "dwi")  # 3
    write_multivolume(dicom / "canon" / "me", [({"EchoNumbers": e}, _ramp(3, 10 * e)) for e in (1, 2, 3)])  # 3
    write_multivolume(dicom / "agfa" / "fmri", [({"TemporalPositionIdentifier": t}, _ramp(3)) for t in (1, 2)])  # 2
    damaged = write_series(dicom / "nih" / "ct", _ramp(4), modality="CT", extra={"Manufacturer": "GE Medical Systems"})
    damage_pixels(damaged[2])  # 1 (three slices)
    good = write_series(dicom / "dup", _ramp(2))  # 1, with a broken copy of its first file
    shutil.copy(good[0], dicom / "dup" / "A_copy.dcm")
    damage_pixels(dicom / "dup" / "A_copy.dcm")
    for p in write_series(root / "tmp-gz", _ramp(3)):  # 1, gzip-compressed
        (dicom / "gz").mkdir(parents=True, exist_ok=True)
        (dicom / "gz" / f"{p.name}.gz").write_bytes(gzip.compress(p.read_bytes()))
    shutil.rmtree(root / "tmp-gz")
    write_series(dicom / "hidden", _ramp(2), prefix=".IM")  # 1
    (dicom / ".DS_Store").write_bytes(b"junk")
    return 1 + 1 + 3 + 3 + 2 + 1 + 1 + 1 + 1


def test_on_a_multi_vendor_archive_every_file_is_reported_and_every_usable_volume_is_used(tmp_path: Path) -> None:
    expected = build_archive(tmp_path)
    report = check_site(tmp_path, volume="all")
    files = [p for p in (tmp_path / "dicom").rglob("*") if p.is_file()]
    assert report.files_total == len(files) == report.files_accepted + report.files_rejected
    assert report.series_usable == expected
    reasons = sorted(_reasons(report).values())
    assert len(reasons) == 4  # the localizer, the damaged slice, the broken copy, .DS_Store
    assert {"GE", "Siemens"} <= set(report.by_manufacturer) and report.by_manufacturer["GE"]["series"] == 2
    assert report.volumes["series_split"] == 3 and report.volumes["volumes_used"] == 8


def test_an_enhanced_file_with_two_volumes_is_split_by_its_frames_dimension_index(tmp_path: Path) -> None:
    write_enhanced(tmp_path / "dicom" / "enh.dcm", [_ramp(3, base=0), _ramp(3, base=50)])
    report = check_site(tmp_path, volume="all")
    assert report.series_usable == 2 and report.slices_usable == 6 and report.files_rejected == 0
    assert report.volumes["split_by"] == {"dimension": 1}
    series = sorted(scan_images(tmp_path / "dicom", volume="all").series, key=lambda s: s.volume)
    assert [s.volume for s in series] == ["dimension 1", "dimension 2"]
    np.testing.assert_array_equal(read_series(series[0])[:, 0, 0], [0, 1, 2])
    np.testing.assert_array_equal(read_series(series[1])[:, 0, 0], [50, 51, 52])
