"""Labels of a site: classification labels from a CSV manifest, masks as NIfTI, NRRD or DICOM SEG on the image grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from client.discovery import discover_series, read_series
from client.errors import DicomError
from client.labels import LabelManifestError, class_labels
from client.masks import read_mask
from client.phi import hash_id
from client.records import SeriesRecord

FAST = {"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32", "train.batch-size": 8}


@pytest.fixture(scope="module")
def site_series(small_sites: Path) -> list[SeriesRecord]:
    series, _ = discover_series(small_sites / "site-01" / "dicom")
    return series


def _ids(series: SeriesRecord) -> tuple[str, str, str]:
    ds = pydicom.dcmread(series.slices[0].path, stop_before_pixels=True)
    return str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


# ------------------------------------------------------------------------------------------
# classification manifest


def test_labels_by_patient_study_or_series_with_the_most_specific_row_winning(
    site_series: list[SeriesRecord], tmp_path: Path
) -> None:
    a, b, c, d = site_series
    (pa, _, _), (_, sb, _), (pc, _, uc), (pd, _, _) = (_ids(s) for s in (a, b, c, d))
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "PatientID,StudyInstanceUID,SeriesInstanceUID,label\n"
        f"{pa},,,lesion\n"
        f",{sb},,normal\n"
        f"{pc},,,normal\n"
        f",,{uc},lesion\n"  # series row beats the patient row above
        "NOBODY,,,normal\n"
        f"{pd},,,\n"  # no label: ignored
    )
    got = class_labels(csv, site_series)
    assert got.labels == {a.series_hash: "lesion", b.series_hash: "normal", c.series_hash: "lesion"}
    assert got.unlabelled == [d.series_hash] and got.ambiguous == []
    assert got.unmatched_rows == 1 and got.rows_without_label == 1
    assert got.classes == {"lesion": 2, "normal": 1}


def test_rows_that_disagree_make_a_series_ambiguous(site_series: list[SeriesRecord], tmp_path: Path) -> None:
    a = site_series[0]
    pid = _ids(a)[0]
    csv = tmp_path / "labels.csv"
    csv.write_text(
        f"\ufeffpatient_id;Label\n{pid};lesion\n{pid};normal\n", encoding="utf-8"
    )  # BOM, ';', other spelling
    got = class_labels(csv, site_series)
    assert got.ambiguous == [a.series_hash] and a.series_hash not in got.labels
    assert len(got.unlabelled) == len(site_series) - 1


def test_a_manifest_without_label_or_key_column_says_which_columns_it_has(
    site_series: list[SeriesRecord], tmp_path: Path
) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("PatientID,diagnosis\nP1,x\n")
    with pytest.raises(LabelManifestError, match=r"no 'label' column \(columns: PatientID, diagnosis\)"):
        class_labels(csv, site_series)
    csv.write_text("mrn,label\nP1,x\n")
    with pytest.raises(
        LabelManifestError, match="no key column; name one of SeriesInstanceUID, StudyInstanceUID, PatientID"
    ):
        class_labels(csv, site_series)


def test_an_unreadable_manifest_is_a_site_data_error_whose_message_the_coordinator_may_see(tmp_path: Path) -> None:
    """A manifest problem is caught with every other site data error (its message names columns, never values)."""
    from client.errors import SiteDataError
    from common.errors import FedsiteError

    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"PatientID,label\n\xff\xfeP1,x\n")  # not UTF-8
    with pytest.raises(SiteDataError, match="save it as UTF-8 CSV") as caught:
        class_labels(csv, [])
    assert isinstance(caught.value, FedsiteError) and "P1" not in str(caught.value)


def test_the_site_check_reports_classification_label_coverage(small_sites: Path, tmp_path: Path) -> None:
    from client.audit import check_site

    site = tmp_path / "site"
    shutil.copytree(small_sites / "site-02", site, ignore=shutil.ignore_patterns(".fedsite-*"))
    series, _ = discover_series(site / "dicom")
    pid = _ids(series[0])[0]
    (site / "labels.csv").write_text(f"PatientID,label\n{pid},lesion\nZZ,normal\n")
    report = check_site(site, decode=False)
    cls = report.labels["classification"]
    assert (cls["labelled"], cls["unlabelled"], cls["unmatched_rows"], cls["classes"]) == (1, 3, 1, {"lesion": 1})
    assert pid not in str(report.to_json())


# ------------------------------------------------------------------------------------------
# masks on the image grid


def _nifti_mask(site: Path, series: SeriesRecord) -> sitk.Image:
    return sitk.ReadImage(str(site / "labels" / f"{series.series_uid}.nii.gz"))


def test_a_nrrd_mask_and_a_nifti_mask_written_in_ras_are_reindexed_exactly(
    small_sites: Path, site_series: list[SeriesRecord], tmp_path: Path
) -> None:
    s = site_series[0]
    shape = (len(s.slices), s.rows, s.columns)
    img = _nifti_mask(small_sites / "site-01", s)
    truth = read_mask(small_sites / "site-01" / "labels" / f"{s.series_uid}.nii.gz", s, shape)
    assert truth.any()
    sitk.WriteImage(img, str(tmp_path / "m.nrrd"))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.nrrd", s, shape), truth)
    arr = sitk.GetArrayFromImage(img)
    ras = sitk.GetImageFromArray(np.ascontiguousarray(arr[:, ::-1, ::-1]))  # x and y flipped, as RAS writers store it
    size, spacing, origin = img.GetSize(), img.GetSpacing(), img.GetOrigin()
    ras.SetSpacing(spacing)
    ras.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    ras.SetOrigin((origin[0] + (size[0] - 1) * spacing[0], origin[1] + (size[1] - 1) * spacing[1], origin[2]))
    sitk.WriteImage(ras, str(tmp_path / "ras.nii.gz"))
    np.testing.assert_array_equal(read_mask(tmp_path / "ras.nii.gz", s, shape), truth)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("half-voxel", "shifted against the image's voxels"),
        ("spacing", "grid differs from the image's"),
        ("values", "values other than 0 and 1"),
        ("size", "does not match the series"),
    ],
)
def test_a_mask_off_the_image_grid_is_refused_with_what_differs(
    small_sites: Path, site_series: list[SeriesRecord], tmp_path: Path, change: str, reason: str
) -> None:
    s = site_series[0]
    img = _nifti_mask(small_sites / "site-01", s)
    if change == "half-voxel":
        o = img.GetOrigin()
        img.SetOrigin((o[0] + img.GetSpacing()[0] / 2, o[1], o[2]))
    elif change == "spacing":
        img.SetSpacing((img.GetSpacing()[0] * 2, img.GetSpacing()[1], img.GetSpacing()[2]))
    elif change == "values":
        img = img * 2
    else:
        img = img[:-1, :, :]
    sitk.WriteImage(img, str(tmp_path / "m.nii.gz"))
    with pytest.raises(DicomError, match=reason):
        read_mask(tmp_path / "m.nii.gz", s, (len(s.slices), s.rows, s.columns))


def _write_seg(series: SeriesRecord, mask: np.ndarray, path: Path, *, segments: int = 1) -> None:
    import highdicom as hd

    sources = [pydicom.dcmread(p) for p in series.files]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"lesion {i + 1}",
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
            segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i in range(segments)
    ]
    pixels = mask.astype(bool) if segments == 1 else np.stack([mask.astype(bool)] * segments, axis=-1)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fedsite-tests",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(path)


def test_dicom_seg_masks_are_read_on_their_series_and_a_site_trains_on_them(small_sites: Path, tmp_path: Path) -> None:
    from client.audit import check_site
    from client.dataset import load_site
    from common.config import parse_run_config

    site = tmp_path / "site"
    shutil.copytree(small_sites / "site-01", site, ignore=shutil.ignore_patterns(".fedsite-*"))
    series, _ = discover_series(site / "dicom")
    for k, s in enumerate(series):
        nifti = site / "labels" / f"{s.series_uid}.nii.gz"
        truth = read_mask(nifti, s, (len(s.slices), s.rows, s.columns))
        # the source images in file order (not position order): the SEG carries its own geometry
        order = [next(i for i, sl in enumerate(s.slices) if sl.path == f) for f in s.files]
        _write_seg(s, truth[order], site / "labels" / f"seg-{k}.dcm")
        nifti.unlink()
        seg_mask = read_mask(site / "labels" / f"seg-{k}.dcm", s, truth.shape)
        np.testing.assert_array_equal(seg_mask, truth)
    report = check_site(site, decode=False)
    assert report.labels["segmentation"]["series_with_mask"] == 4 and not report.labels["segmentation"]["problems"]
    data = load_site(site, parse_run_config(FAST).data, seed=1, use_cache=False)
    assert data.series_used == 4 and data.train and data.val


def test_a_seg_with_several_segments_is_refused(
    small_sites: Path, site_series: list[SeriesRecord], tmp_path: Path
) -> None:
    s = site_series[0]
    truth = read_mask(
        small_sites / "site-01" / "labels" / f"{s.series_uid}.nii.gz", s, (len(s.slices), s.rows, s.columns)
    )
    order = [next(i for i, sl in enumerate(s.slices) if sl.path == f) for f in s.files]
    _write_seg(s, truth[order], tmp_path / "two.dcm", segments=2)
    with pytest.raises(DicomError, match="holds 2 segments"):
        read_mask(tmp_path / "two.dcm", s, truth.shape)


def test_the_site_check_lists_mask_problems_and_orphans_with_hashed_names(small_sites: Path, tmp_path: Path) -> None:
    from client.audit import check_site

    site = tmp_path / "site"
    shutil.copytree(small_sites / "site-03", site, ignore=shutil.ignore_patterns(".fedsite-*"))
    series, _ = discover_series(site / "dicom")
    bad = site / "labels" / f"{series[0].series_uid}.nii.gz"
    img = sitk.ReadImage(str(bad))
    img.SetSpacing((9.0, 9.0, 9.0))
    sitk.WriteImage(img, str(bad))
    shutil.copy(site / "labels" / f"{series[1].series_uid}.nii.gz", site / "labels" / "1.2.3.4.nii.gz")
    (site / "labels" / "readme.txt").write_text("notes")
    report = check_site(site, decode=False)
    seg = report.labels["segmentation"]
    assert seg["series_with_mask"] == 3 and seg["coverage"] == 0.75
    reasons = {p["file"]: p["reason"] for p in seg["problems"]}
    assert reasons[f"labels/~{hash_id(bad.name)}.nii.gz"].endswith(
        "grid differs from the image's (other spacing or orientation); write the mask on the image's grid"
    )
    assert "names no usable series" in reasons["labels/1.2.3.4.nii.gz"]
    assert "not a mask" in reasons["labels/readme.txt"]
    assert not any(s.series_uid in str(report.to_json()) for s in series)


def test_decoded_images_and_masks_of_a_site_share_one_grid(small_sites: Path, site_series: list[SeriesRecord]) -> None:
    for s in site_series:
        volume = read_series(s)
        mask = read_mask(small_sites / "site-01" / "labels" / f"{s.series_uid}.nii.gz", s, volume.shape)
        assert mask.shape == volume.shape
        assert volume[mask == 1].mean() > volume[mask == 0].mean()  # lesions are bright in the phantom
