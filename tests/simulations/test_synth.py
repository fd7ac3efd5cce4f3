"""Tests of the synthetic scanner-site generator (simulations.synth and its modules, simulations.profiles)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless

from client.layout import sim_site_name as site_name
from simulations import synth
from simulations.profiles import (
    DEFAULT_PROFILES,
    ScannerProfile,
    profile_for_site,
    profile_from_dict,
    profile_to_dict,
    stored_limits,
)
from simulations.sitefolder import GENERATOR_VERSION, INDEX_FILE
from simulations.synth import REVERSED_PATIENT, write_site, write_sites
from tests.image_helpers import ring as _ring

SEED = 7
PATIENTS = 3
SLICES = 4
SITES = len(DEFAULT_PROFILES)  # one site per default profile

REQUIRED_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "SeriesDate",
    "StudyTime",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "InstitutionName",
    "BodyPartExamined",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "PixelData",
)


# ------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def sites_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four sites (one per default profile), 3 patients x 4 slices, written once per module."""
    root = tmp_path_factory.mktemp("sites")
    write_sites(root, sites=SITES, seed=SEED, patients=PATIENTS, slices=SLICES)
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _series_dirs(site: Path) -> list[Path]:
    return sorted(p for p in (site / "dicom").glob("*/*") if p.is_dir())


def _read_series(series_dir: Path) -> list[pydicom.Dataset]:
    """The series' datasets sorted by position along the slice normal (z for axial)."""
    dss = [pydicom.dcmread(p) for p in series_dir.glob("*.dcm")]
    return sorted(dss, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixels -> modality values, MONOCHROME1 undone (bright = high signal)."""
    arr = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        bits = int(ds.BitsStored)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation == 1 else (0, 2**bits - 1)
        arr = (lo + hi) - arr
    return arr * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _volume_and_mask(site: Path, series_dir: Path) -> tuple[np.ndarray, np.ndarray, list[pydicom.Dataset]]:
    dss = _read_series(series_dir)
    volume = np.stack([_decode(ds) for ds in dss])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(site / "labels" / f"{dss[0].SeriesInstanceUID}.nii.gz")))
    return volume, mask.astype(bool), dss


def _lesion_and_surround(site: Path, series_dir: Path, *, decode: bool = True) -> tuple[float, float]:
    """Median intensity inside the lesion and in a ~5 mm ring around it."""
    dss = _read_series(series_dir)
    if decode:
        volume = np.stack([_decode(ds) for ds in dss])
    else:
        volume = np.stack([ds.pixel_array.astype(np.float64) for ds in dss])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(site / "labels" / f"{dss[0].SeriesInstanceUID}.nii.gz"))) > 0
    ring = _ring(mask, max(1, round(5.0 / float(dss[0].PixelSpacing[0]))))
    return float(np.median(volume[mask])), float(np.median(volume[ring]))


# ------------------------------------------------------------------------------------------
# files and headers


def test_every_file_is_a_part10_mr_file_with_the_required_tags(sites_root: Path) -> None:
    """Each slice reads with dcmread, has valid file meta, the tags the client needs, and matrix-sized pixels."""
    for index in range(SITES):
        profile = profile_for_site(index)
        files = sorted((sites_root / site_name(index) / "dicom").rglob("*.dcm"))
        assert len(files) == PATIENTS * SLICES
        for path in files:
            raw = path.read_bytes()
            assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
            ds = pydicom.dcmread(path)
            meta = ds.file_meta
            assert meta.FileMetaInformationVersion == b"\x00\x01"
            assert meta.MediaStorageSOPClassUID == MRImageStorage == ds.SOPClassUID
            assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            expected_ts = RLELossless if profile.transfer_syntax == "RLELossless" else ExplicitVRLittleEndian
            assert meta.TransferSyntaxUID == expected_ts
            assert meta.ImplementationClassUID
            missing = [tag for tag in REQUIRED_TAGS if tag not in ds]
            assert not missing, f"{path} lacks {missing}"
            assert ds.Modality == "MR" and ds.Manufacturer == profile.manufacturer
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, profile.bits_stored, profile.bits_stored - 1)
            assert ds.pixel_array.shape == (profile.matrix, profile.matrix)
            assert path.name == f"IM{int(ds.InstanceNumber):04d}.dcm"
            assert path.parent.parent.name == ds.PatientID


def test_patients_are_fake_and_identified_by_site(sites_root: Path) -> None:
    """PatientID/Name and institution are synthetic and name the site; one study/series per patient."""
    for index in range(SITES):
        series = _series_dirs(sites_root / site_name(index))
        assert len(series) == PATIENTS
        for p, series_dir in enumerate(series):
            dss = _read_series(series_dir)
            assert {ds.PatientID for ds in dss} == {f"S{index + 1:02d}-P{p + 1:03d}"}
            assert str(dss[0].PatientName).startswith("SYNTH^")
            assert dss[0].InstitutionName == f"Synthetic Hospital {index + 1:02d}"
            assert len({ds.SeriesInstanceUID for ds in dss}) == 1
            assert len({ds.SOPInstanceUID for ds in dss}) == SLICES


def test_series_read_by_simpleitk_match_their_mask_grid(sites_root: Path) -> None:
    """The mask NIfTI has the size, spacing, origin and direction SimpleITK reads from the series."""
    for index in range(SITES):
        site = sites_root / site_name(index)
        for series_dir in _series_dirs(site):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir))
            assert len(files) == SLICES
            image = sitk.ReadImage(files)
            dss = _read_series(series_dir)
            mask = sitk.ReadImage(str(site / "labels" / f"{dss[0].SeriesInstanceUID}.nii.gz"))
            assert mask.GetPixelID() == sitk.sitkUInt8
            assert image.GetSize() == mask.GetSize()
            np.testing.assert_allclose(image.GetSpacing(), mask.GetSpacing(), atol=1e-4)
            np.testing.assert_allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(image.GetDirection(), mask.GetDirection(), atol=1e-4)
            np.testing.assert_allclose(mask.GetOrigin(), [float(v) for v in dss[0].ImagePositionPatient], atol=1e-4)
            profile = profile_for_site(index)
            np.testing.assert_allclose(
                mask.GetSpacing(),
                (profile.pixel_spacing_mm, profile.pixel_spacing_mm, profile.slice_thickness_mm),
                atol=1e-4,
            )
            assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


@pytest.mark.parametrize("slices", [1, 12, 16])
def test_most_slices_of_every_patient_show_lesion(tmp_path: Path, slices: int) -> None:
    """At least 60% of each patient's slices contain lesion voxels, also for long series."""
    site = write_site(tmp_path, 1, seed=3, patients=8, slices=slices)
    for series_dir in _series_dirs(site):
        _, mask, _ = _volume_and_mask(site, series_dir)
        per_slice = mask.any(axis=(1, 2))
        assert per_slice.mean() >= 0.6, f"{series_dir}: lesion on {per_slice.sum()}/{slices} slices"
        assert mask.sum() > 0


def test_instance_numbers_run_against_position_for_the_designated_patient(sites_root: Path) -> None:
    """Sorting by InstanceNumber reverses patient P002's volume; the others are in position order."""
    for index in range(SITES):
        for p, series_dir in enumerate(_series_dirs(sites_root / site_name(index))):
            instances = [int(ds.InstanceNumber) for ds in _read_series(series_dir)]
            if p == REVERSED_PATIENT:
                assert instances == sorted(instances, reverse=True)
            else:
                assert instances == sorted(instances)


# ------------------------------------------------------------------------------------------
# determinism and folder handling


def test_same_seed_writes_byte_identical_files(sites_root: Path, tmp_path: Path) -> None:
    """A second run with the same seed and parameters reproduces every file byte for byte."""
    write_sites(tmp_path, sites=SITES, seed=SEED, patients=PATIENTS, slices=SLICES)
    assert _hashes(tmp_path) == _hashes(sites_root)


def test_different_seed_writes_different_images_and_uids(sites_root: Path, tmp_path: Path) -> None:
    """Another seed changes the pixels, the UIDs and the dates."""
    other = write_site(tmp_path, 0, seed=SEED + 1, patients=PATIENTS, slices=SLICES)
    first = _hashes(sites_root / site_name(0))
    second = _hashes(other)
    assert not set(first.values()) & set(second.values())
    a = _read_series(_series_dirs(sites_root / site_name(0))[0])[0]
    b = _read_series(_series_dirs(other)[0])[0]
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.pixel_array.shape == b.pixel_array.shape and not np.array_equal(a.pixel_array, b.pixel_array)


def test_write_sites_records_the_sites_in_an_index(sites_root: Path, tmp_path: Path) -> None:
    """fedsite-sites.json lists the sites and parameters; site.json records the profile; progress is called per site."""
    doc = json.loads((sites_root / INDEX_FILE).read_text())
    assert doc == {
        "generator_version": GENERATOR_VERSION,
        "seed": SEED,
        "task": "segmentation",
        "modality": "MR",
        "patients": PATIENTS,
        "slices": SLICES,
        "label_skew": 0.0,
        "quantity_skew": 0.0,
        "sites": [site_name(i) for i in range(SITES)],
    }
    for index in range(SITES):
        site_doc = json.loads((sites_root / site_name(index) / "site.json").read_text())
        assert site_doc["name"] == site_name(index)
        assert profile_from_dict(site_doc["profile"]) == profile_for_site(index)
    messages: list[str] = []
    paths = write_sites(tmp_path, sites=2, seed=1, patients=2, slices=2, progress=messages.append)
    assert [p.name for p in paths] == ["site-01", "site-02"]
    assert len(messages) == 2 and "site-01" in messages[0] and "siemens-1.5T" in messages[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_site_twice_leaves_the_folder_untouched(tmp_path: Path) -> None:
    """A second call with the same parameters returns the folder without rewriting anything."""
    site = write_site(tmp_path, 0, seed=1, patients=2, slices=2)
    before = {p: p.stat().st_mtime_ns for p in [site, *site.rglob("*")]}
    assert write_site(tmp_path, 0, seed=1, patients=2, slices=2) == site
    assert {p: p.stat().st_mtime_ns for p in [site, *site.rglob("*")]} == before


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 2}, "seed"),
        ({"patients": 3}, "patients"),
        ({"profile": dataclasses.replace(DEFAULT_PROFILES[0], noise_level=0.05)}, "profile.noise_level"),
    ],
)
def test_write_site_with_other_parameters_raises_naming_folder_and_difference(
    tmp_path: Path, change: dict, named: str
) -> None:
    """An existing site written with other parameters is never silently reused or overwritten."""
    site = write_site(tmp_path, 0, seed=1, patients=2, slices=2)
    args = {"seed": 1, "patients": 2, "slices": 2} | change
    with pytest.raises(FileExistsError) as info:
        write_site(tmp_path, 0, **args)
    message = str(info.value)
    assert str(site) in message and named in message and "delete it" in message


def test_a_folder_without_site_json_is_not_taken_for_a_site(tmp_path: Path) -> None:
    """A half-made or foreign folder with the site's name raises instead of being reused."""
    (tmp_path / "site-01" / "dicom").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"site\.json"):
        write_site(tmp_path, 0, seed=1, patients=2, slices=2)


def test_losing_a_race_for_the_same_site_returns_the_winners_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another writer finishes the same site first, the late writer drops its copy and returns the winner's."""
    real_build = synth._build_site
    competitor: list[Path] = []
    started: list[bool] = []

    def build_then_lose(folder: Path, index: int, doc: dict, profile: ScannerProfile) -> None:
        real_build(folder, index, doc, profile)
        if not started:  # the competing writer renames its site into place just before we do
            started.append(True)
            competitor.append(write_site(tmp_path, index, seed=1, patients=2, slices=2))

    monkeypatch.setattr(synth, "_build_site", build_then_lose)
    path = write_site(tmp_path, 0, seed=1, patients=2, slices=2)
    assert competitor == [path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-01"]  # no temporary folder left
    assert (path / "site.json").is_file()
    assert len(list((path / "dicom").rglob("*.dcm"))) == 4


def test_concurrent_writers_of_different_and_same_sites_do_not_interfere(tmp_path: Path) -> None:
    """Threads writing sites 0, 1 and 1 again at once all succeed, and the result equals a serial write."""
    results: dict[int, Path] = {}
    errors: list[BaseException] = []

    def run(slot: int, index: int) -> None:
        try:
            results[slot] = write_site(tmp_path / "par", index, seed=5, patients=2, slices=2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(slot, index)) for slot, index in enumerate([0, 1, 1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[1] == results[2] == tmp_path / "par" / "site-02"
    write_site(tmp_path / "ser", 0, seed=5, patients=2, slices=2)
    write_site(tmp_path / "ser", 1, seed=5, patients=2, slices=2)
    assert _hashes(tmp_path / "par") == _hashes(tmp_path / "ser")


# ------------------------------------------------------------------------------------------
# intensities: scanner shift, MONOCHROME1, rescale, RLE


def _site_features(site: Path) -> list[np.ndarray]:
    """Per patient: log lesion-to-surround contrast and log relative background noise."""
    feats = []
    for series_dir in _series_dirs(site):
        volume, mask, dss = _volume_and_mask(site, series_dir)
        ring = _ring(mask, max(1, round(5.0 / float(dss[0].PixelSpacing[0]))))
        lesion, around = np.median(volume[mask]), np.median(volume[ring])
        corner = volume[:, :20, :20]  # air: the body never reaches the corners of the field of view
        feats.append(np.array([np.log(lesion / around), np.log(corner.std() / (lesion - corner.mean()))]))
    return feats


def test_different_scanners_differ_more_than_patients_of_one_scanner(sites_root: Path) -> None:
    """For every pair of profiles, image statistics differ between sites clearly more than within a site."""
    feats = {index: _site_features(sites_root / site_name(index)) for index in range(SITES)}
    scale = np.stack([f for fs in feats.values() for f in fs]).std(axis=0)

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm((a - b) / scale))

    for a, b in itertools.combinations(range(SITES), 2):
        inter = np.mean([dist(x, y) for x in feats[a] for y in feats[b]])
        intra = np.mean([dist(x, y) for s in (a, b) for x, y in itertools.combinations(feats[s], 2)])
        assert inter > 1.5 * intra, f"sites {a} and {b}: between {inter:.2f}, within {intra:.2f}"


def test_sites_differ_in_grid_and_vendor_headers(sites_root: Path) -> None:
    """Matrix, pixel spacing, manufacturer and stored-value encoding differ between the default sites."""
    headers = []
    for index in range(SITES):
        ds = _read_series(_series_dirs(sites_root / site_name(index))[0])[0]
        headers.append(
            (
                int(ds.Rows),
                float(ds.PixelSpacing[0]),
                str(ds.Manufacturer),
                str(ds.ManufacturerModelName),
                (
                    int(ds.BitsStored),
                    int(ds.PixelRepresentation),
                    str(ds.PhotometricInterpretation),
                    float(ds.RescaleSlope),
                    float(ds.RescaleIntercept),
                    str(ds.file_meta.TransferSyntaxUID),
                ),
            )
        )
    for column in zip(*headers, strict=True):
        assert len(set(column)) == SITES, column


def test_lesions_are_brighter_than_their_surround_on_every_site(sites_root: Path) -> None:
    """After rescale (and MONOCHROME1 inversion) the lesion is clearly brighter than the tissue around it."""
    for index in range(SITES):
        site = sites_root / site_name(index)
        for series_dir in _series_dirs(site):
            lesion, around = _lesion_and_surround(site, series_dir)
            assert lesion > 1.2 * around, (site.name, series_dir.parent.name, lesion, around)


def test_monochrome1_site_stores_inverted_values(sites_root: Path) -> None:
    """On the MONOCHROME1 site the raw stored lesion is darker than its surround; inverted it is brighter."""
    index = next(i for i in range(SITES) if profile_for_site(i).photometric == "MONOCHROME1")
    site = sites_root / site_name(index)
    for series_dir in _series_dirs(site):
        assert _read_series(series_dir)[0].PhotometricInterpretation == "MONOCHROME1"
        raw_lesion, raw_around = _lesion_and_surround(site, series_dir, decode=False)
        lesion, around = _lesion_and_surround(site, series_dir)
        assert raw_lesion < raw_around and lesion > around


def test_rescale_recovers_the_signal_in_profile_units(sites_root: Path) -> None:
    """stored * slope + intercept puts air near 0 and lesions near intensity_scale * 1000 on every site."""
    for index in range(SITES):
        profile = profile_for_site(index)
        full = profile.intensity_scale * 1000.0
        site = sites_root / site_name(index)
        for series_dir in _series_dirs(site):
            volume, mask, dss = _volume_and_mask(site, series_dir)
            lo, hi = stored_limits(profile)
            raw = np.stack([ds.pixel_array for ds in dss])
            assert lo <= raw.min() and raw.max() <= hi
            assert abs(np.median(volume[:, :20, :20])) < 0.15 * full
            assert 0.4 * full < np.median(volume[mask]) < 1.3 * full
    canon = next(i for i in range(SITES) if profile_for_site(i).pixel_representation == 1)
    ds = _read_series(_series_dirs(sites_root / site_name(canon))[0])[0]
    assert ds.pixel_array.dtype == np.int16 and ds.pixel_array.min() < 0


def test_rle_site_decodes_to_the_same_pixels_as_uncompressed(sites_root: Path, tmp_path: Path) -> None:
    """The RLE Lossless site round-trips: its pixels equal the same site written uncompressed."""
    index = next(i for i in range(SITES) if profile_for_site(i).transfer_syntax == "RLELossless")
    plain_profile = dataclasses.replace(profile_for_site(index), transfer_syntax="ExplicitVRLittleEndian")
    plain = write_site(tmp_path, index, seed=SEED, patients=PATIENTS, slices=SLICES, profile=plain_profile)
    rle = sites_root / site_name(index)
    rle_files = sorted(p.relative_to(rle) for p in (rle / "dicom").rglob("*.dcm"))
    assert rle_files == sorted(p.relative_to(plain) for p in (plain / "dicom").rglob("*.dcm"))
    for rel in rle_files:
        a, b = pydicom.dcmread(rle / rel), pydicom.dcmread(plain / rel)
        assert a.file_meta.TransferSyntaxUID == RLELossless and b.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(a.pixel_array, b.pixel_array)
    # pydicom's own RLE encoder gives the same bytes as the compiled plugin the generator prefers.
    b = pydicom.dcmread(plain / rle_files[0])
    b.compress(RLELossless, b.pixel_array, encoding_plugin="pydicom", generate_instance_uid=False)
    assert bytes(b.PixelData) == bytes(pydicom.dcmread(rle / rle_files[0]).PixelData)


# ------------------------------------------------------------------------------------------
# profiles


def test_default_profiles_are_four_distinct_valid_scanners() -> None:
    """Four defaults with distinct names and grids, each covering a field of view of 240-250 mm."""
    assert len(DEFAULT_PROFILES) == 4
    assert len({p.name for p in DEFAULT_PROFILES}) == 4
    assert len({p.matrix for p in DEFAULT_PROFILES}) == 4
    for p in DEFAULT_PROFILES:
        assert 239.0 <= p.matrix * p.pixel_spacing_mm <= 250.0
        assert json.loads(json.dumps(profile_to_dict(p))) == profile_to_dict(p)
        assert profile_from_dict(profile_to_dict(p)) == p


def test_profile_for_site_cycles_through_defaults_as_named_variants() -> None:
    """Indices past the defaults give deterministic variants with distinct names."""
    assert [profile_for_site(i) for i in range(4)] == list(DEFAULT_PROFILES)
    variants = [profile_for_site(i) for i in range(4, 12)]
    assert variants == [profile_for_site(i) for i in range(4, 12)]
    names = [p.name for p in DEFAULT_PROFILES] + [p.name for p in variants]
    assert len(set(names)) == len(names)
    assert variants[0].name == "siemens-1.5T-v2" and variants[0].matrix == DEFAULT_PROFILES[0].matrix
    assert variants[0] != DEFAULT_PROFILES[0]
    with pytest.raises(ValueError, match="-1"):
        profile_for_site(-1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_kind", "poisson"),
        ("bits_stored", 8),
        ("pixel_representation", 2),
        ("photometric", "RGB"),
        ("transfer_syntax", "JPEGBaseline8Bit"),
        ("noise_level", -0.1),
        ("contrast_gamma", 0.0),
        ("rescale_slope", 0.0),
        ("modality", "PET"),
        ("modality", "CT"),  # an MR profile's field strength does not apply to CT
        ("gibbs", 0.05),
    ],
)
def test_invalid_profile_field_raises_naming_field_and_value(field: str, value: object) -> None:
    """An invalid profile fails at construction with the field, the value and what is allowed."""
    with pytest.raises(ValueError) as info:
        dataclasses.replace(DEFAULT_PROFILES[0], **{field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_profile_whose_values_do_not_fit_the_stored_bits_is_rejected() -> None:
    """A scale that would clip the signal in 12 bits is refused with the fix."""
    with pytest.raises(ValueError, match="BitsStored range"):
        dataclasses.replace(DEFAULT_PROFILES[0], intensity_scale=5.0)
    with pytest.raises(ValueError, match="field of view"):
        dataclasses.replace(DEFAULT_PROFILES[0], matrix=128)


def test_bad_arguments_raise_value_error_naming_them(tmp_path: Path) -> None:
    """Negative seeds and zero patients are refused before anything is written."""
    with pytest.raises(ValueError, match="seed=-1"):
        write_site(tmp_path, 0, seed=-1)
    with pytest.raises(ValueError, match="patients=0"):
        write_site(tmp_path, 0, seed=1, patients=0)
    with pytest.raises(ValueError, match="sites=0"):
        write_sites(tmp_path, sites=0, seed=1)
    assert site_name(0) == "site-01" and site_name(11) == "site-12"
    assert not list(tmp_path.iterdir())
