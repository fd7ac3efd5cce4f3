"""Scanner profiles of the phantom sites (MR and CT): each parameter does what it says, on the written pixels.

Most tests write one small site (64 x 64 matrix, 2-3 patients x 3 slices) per profile variant and
compare the decoded values (the site's DICOM reader: rescale applied, MONOCHROME1 undone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import CTImageStorage

from client.discovery import discover_series, read_series
from client.layout import sim_site_name as site_name
from simulations.profiles import (
    CT_PROFILES,
    MR_PROFILES,
    SITE_MODALITIES,
    XRAY_FOV_MM,
    XRAY_PROFILES,
    ScannerProfile,
    default_profiles,
    profile_for_site,
    profile_from_dict,
    profile_to_dict,
)
from simulations.sitefolder import GENERATOR_VERSION, INDEX_FILE, MIN_SKEWED_PATIENTS, lesion_burden, site_patients
from simulations.synth import write_site, write_sites
from tests.image_helpers import ring as _ring

SEED = 3
# Small, noise-free grids: 64 x 3.5 mm = 224 mm holds the body.
MR_SMALL = dataclasses.replace(
    MR_PROFILES[0], matrix=64, pixel_spacing_mm=3.5, noise_level=0.0, bias_field=0.0, gibbs=0.0, contrast_gamma=1.0
)
CT_SMALL = dataclasses.replace(CT_PROFILES[0], matrix=64, pixel_spacing_mm=3.5, noise_level=0.0, kernel_sharpness=0.0)


def _site(
    tmp: Path, profile: ScannerProfile, *, tag: str, seed: int = SEED, patients: int = 2, slices: int = 3, **kw: object
) -> Path:
    return write_site(
        tmp / tag, 0, seed=seed, patients=patients, slices=slices, profile=profile, modality=profile.modality, **kw
    )


def _volumes(site: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per patient (PatientID order): decoded volume (Z, Y, X) and its lesion mask."""
    series, rejected = discover_series(site / "dicom")
    assert not rejected
    out = []
    for s in sorted(series, key=lambda s: s.slices[0].path.parts[-3]):
        uid = pydicom.dcmread(s.slices[0].path, stop_before_pixels=True).SeriesInstanceUID
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(site / "labels" / f"{uid}.nii.gz"))) > 0
        out.append((read_series(s), mask))
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _high_freq(volume: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian: the image's high-frequency energy."""
    lap = (
        4 * volume[:, 1:-1, 1:-1]
        - volume[:, :-2, 1:-1]
        - volume[:, 2:, 1:-1]
        - volume[:, 1:-1, :-2]
        - volume[:, 1:-1, 2:]
    )
    return float(np.mean(lap.astype(np.float64) ** 2))


# ------------------------------------------------------------------------------------------
# MR physics


def test_mr_noise_level_raises_the_noise_in_air(tmp_path: Path) -> None:
    """Air (the corners of the field of view) gets noisier as noise_level grows."""
    stds = []
    for level in (0.01, 0.04, 0.12):
        (volume, _), *_ = _volumes(_site(tmp_path, dataclasses.replace(MR_SMALL, noise_level=level), tag=f"n{level}"))
        stds.append(float(volume[:, :6, :6].std()))
    assert stds[0] < stds[1] < stds[2]
    assert stds[2] > 5 * stds[0]


def test_mr_bias_field_adds_smooth_low_frequency_variation(tmp_path: Path) -> None:
    """With a bias field the same anatomy is multiplied by a smooth field: large spread, tiny pixel-to-pixel change."""
    (flat, _), *_ = _volumes(_site(tmp_path, MR_SMALL, tag="flat"))
    (biased, _), *_ = _volumes(_site(tmp_path, dataclasses.replace(MR_SMALL, bias_field=0.6), tag="bias"))
    body = flat > 50.0
    ratio = np.where(body, biased / np.where(body, flat, 1.0), np.nan)
    assert np.nanstd(ratio) > 0.05  # the field varies by tens of percent over the body ...
    step = np.nanmean(np.abs(np.diff(ratio, axis=2)))
    assert step < 0.15 * np.nanstd(ratio)  # ... but slowly: neighbouring pixels almost agree
    assert np.nanstd(flat[body] / flat[body]) == 0.0


def test_mr_lesion_contrast_scales_the_lesions_excess_over_the_organ_and_nothing_else(tmp_path: Path) -> None:
    """lesion_contrast 0.5 halves (lesion - organ); the mask and every other tissue stay as they are."""
    quiet = dataclasses.replace(MR_SMALL, noise_level=0.0, bias_field=0.0, gibbs=0.0, contrast_gamma=1.0)
    (full, full_mask), *_ = _volumes(_site(tmp_path, quiet, tag="lc1"))
    (half, half_mask), *_ = _volumes(_site(tmp_path, dataclasses.replace(quiet, lesion_contrast=0.5), tag="lc05"))
    np.testing.assert_array_equal(full_mask, half_mask)
    core = full_mask & ~(_ring(~full_mask, 1))  # lesion voxels away from its partial-volume edge
    organ_level = np.median(full[_ring(full_mask, 2) & ~full_mask])  # organ right around the lesion
    excess_full = np.median(full[core]) - organ_level
    excess_half = np.median(half[core]) - organ_level
    assert excess_full > 100.0
    assert excess_half == pytest.approx(0.5 * excess_full, rel=0.1)
    np.testing.assert_array_equal(full[~_ring(full_mask, 2) & ~full_mask], half[~_ring(full_mask, 2) & ~full_mask])


def test_mr_gibbs_truncation_rings_next_to_edges_and_leaves_the_mask_alone(tmp_path: Path) -> None:
    """Keeping 40% of k-space puts ripples into the air next to the body; the lesion mask is unchanged."""
    (clean, clean_mask), *_ = _volumes(_site(tmp_path, MR_SMALL, tag="full"))
    (ringing, ring_mask), *_ = _volumes(_site(tmp_path, dataclasses.replace(MR_SMALL, gibbs=0.4), tag="gibbs"))
    np.testing.assert_array_equal(clean_mask, ring_mask)
    body = clean > 0
    band = _ring(body, 3)  # air within ~10 mm of the body surface
    assert float(np.abs(clean[band]).max()) == 0.0
    assert float(np.abs(ringing[band]).max()) > 20.0  # > 2% of the 1000-unit signal scale
    # Inside the body next to its edge the truncated image over- and undershoots the full one.
    inner = _ring(~body, 2) & body
    diff = ringing[inner] - clean[inner]
    assert diff.max() > 20.0 and diff.min() < -20.0


def test_mr_contrast_gamma_changes_lesion_to_surround_contrast(tmp_path: Path) -> None:
    """signal ** gamma: gamma < 1 compresses the lesion-to-organ contrast, gamma > 1 expands it."""
    ratios = []
    for gamma in (0.6, 1.0, 1.6):
        volume, mask = _volumes(_site(tmp_path, dataclasses.replace(MR_SMALL, contrast_gamma=gamma), tag=f"g{gamma}"))[
            0
        ]
        ring = _ring(mask, 1) & (volume > 0)
        ratios.append(float(np.median(volume[mask]) / np.median(volume[ring])))
    assert ratios[0] < ratios[1] < ratios[2]


# ------------------------------------------------------------------------------------------
# CT physics and storage


def test_ct_tissues_are_plausible_hu_in_ct_image_storage(tmp_path: Path) -> None:
    """Air -1000, fat about -100, hypodense lesions 30-60 HU below the organ, bone several hundred HU."""
    site = _site(tmp_path, CT_SMALL, tag="ct")
    ds = pydicom.dcmread(next((site / "dicom").rglob("*.dcm")))
    assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT" and ds.RescaleType == "HU"
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    assert (ds.Manufacturer, ds.ManufacturerModelName) == ("SIEMENS", "SOMATOM Definition AS+")
    assert float(ds.KVP) == 120.0 and ds.ConvolutionKernel == "B30f" and float(ds.SliceThickness) == 5.0
    for volume, mask in _volumes(site):
        assert abs(float(np.median(volume[:, :6, :6])) + 1000.0) < 2.0
        values, counts = np.unique(np.round(volume), return_counts=True)
        common = values[np.argsort(-counts)[:10]]
        assert any(abs(v + 100.0) < 3 for v in common) and any(abs(v - 40.0) < 3 for v in common)  # fat, soft tissue
        organ = np.median(volume[_ring(mask, 1) & (volume > 45)])
        assert 30.0 <= organ - np.median(volume[mask]) <= 65.0
        assert volume.max() > 400.0


def test_ct_hu_offset_and_scale_recalibrate_every_tissue(tmp_path: Path) -> None:
    """hu_offset shifts a tissue's mean HU by the offset; hu_scale scales it (HU' = offset + scale * HU)."""
    signed = dataclasses.replace(CT_SMALL, bits_stored=16, pixel_representation=1)
    (base, mask), *_ = _volumes(_site(tmp_path, signed, tag="base"))
    (shifted, _), *_ = _volumes(_site(tmp_path, dataclasses.replace(signed, hu_offset=50.0), tag="offset"))
    (scaled, _), *_ = _volumes(_site(tmp_path, dataclasses.replace(signed, hu_scale=1.1), tag="scale"))
    assert abs(float(shifted[mask].mean() - base[mask].mean()) - 50.0) < 1.0
    air = (slice(None), slice(0, 6), slice(0, 6))
    assert abs(float(shifted[air].mean() - base[air].mean()) - 50.0) < 1.0
    assert abs(float(scaled[air].mean()) - 1.1 * float(base[air].mean())) < 2.0


def test_ct_sharp_kernel_enhances_edges_and_noise_smooth_kernel_blurs_them(tmp_path: Path) -> None:
    """kernel_sharpness: high-frequency energy and noise rise from smooth (-1) over standard (0) to sharp (+1)."""
    noisy = dataclasses.replace(CT_PROFILES[0], matrix=128, pixel_spacing_mm=2.0, noise_level=0.01)
    energy, noise = [], []
    for k in (-1.0, 0.0, 1.0):
        (volume, _), *_ = _volumes(
            _site(tmp_path, dataclasses.replace(noisy, kernel_sharpness=k), tag=f"k{k}", patients=1)
        )
        energy.append(_high_freq(volume))
        noise.append(float(volume[:, :10, :10].std()))
    assert energy[0] < energy[1] < energy[2]
    assert noise[0] < noise[1] < noise[2]
    assert 7.0 < noise[1] < 13.0  # noise_level 0.01 = 10 HU at the standard kernel


def test_ct_slice_thickness_sets_spacing_and_averages_across_the_slice(tmp_path: Path) -> None:
    """Slices are SliceThickness apart; a thick slice averages lesion and organ at the lesion's ends
    (partial volume).
    """
    thin = dataclasses.replace(CT_SMALL, slice_thickness_mm=1.0)
    thick = dataclasses.replace(CT_SMALL, slice_thickness_mm=8.0)
    for profile in (thin, thick):
        site = _site(tmp_path, profile, tag=f"t{profile.slice_thickness_mm}", patients=1, slices=4)
        (series,), _ = discover_series(site / "dicom")
        assert series.slice_spacing == pytest.approx(profile.slice_thickness_mm)
        ds = pydicom.dcmread(series.slices[0].path, stop_before_pixels=True)
        assert float(ds.SliceThickness) == profile.slice_thickness_mm
    (volume, mask), *_ = _volumes(tmp_path / "t8.0" / site_name(0))
    values = np.unique(np.round(volume[mask]))
    assert len(values) > 3  # mixtures of lesion and organ, not one lesion value


def test_ct_sites_are_deterministic_per_seed(tmp_path: Path) -> None:
    """The same seed rewrites CT sites byte for byte; another seed changes them."""
    write_sites(tmp_path / "a", sites=2, seed=SEED, patients=2, slices=2, modality="CT")
    write_sites(tmp_path / "b", sites=2, seed=SEED, patients=2, slices=2, modality="CT")
    write_sites(tmp_path / "c", sites=2, seed=SEED + 1, patients=2, slices=2, modality="CT")
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    first = _hashes(tmp_path / "a" / site_name(0))
    assert not {v for k, v in first.items() if k.endswith(".dcm")} & set(
        _hashes(tmp_path / "c" / site_name(0)).values()
    )
    index = json.loads((tmp_path / "a" / INDEX_FILE).read_text())
    assert index["modality"] == "CT" and index["generator_version"] == GENERATOR_VERSION


def test_matrix_sets_rows_columns_and_pixel_spacing(tmp_path: Path) -> None:
    """Rows/Columns are the matrix and PixelSpacing the profile's spacing, for MR and CT."""
    for profile in (
        dataclasses.replace(MR_SMALL, matrix=80, pixel_spacing_mm=3.0),
        dataclasses.replace(CT_SMALL, matrix=96, pixel_spacing_mm=2.5),
    ):
        site = _site(tmp_path, profile, tag=profile.modality, patients=1, slices=1)
        (series,), _ = discover_series(site / "dicom")
        assert (series.rows, series.columns) == (profile.matrix, profile.matrix)
        assert series.pixel_spacing == (profile.pixel_spacing_mm, profile.pixel_spacing_mm)


def test_vendor_headers_are_written_per_modality(tmp_path: Path) -> None:
    """MR: MagneticFieldStrength; CT: KVP and ConvolutionKernel; both Manufacturer and ManufacturerModelName."""
    mr = _site(tmp_path, dataclasses.replace(MR_SMALL, field_strength=3.0), tag="mr", patients=1, slices=1)
    ds = pydicom.dcmread(next((mr / "dicom").rglob("*.dcm")))
    assert float(ds.MagneticFieldStrength) == 3.0 and "KVP" not in ds and "ConvolutionKernel" not in ds
    for profile in CT_PROFILES:
        small = dataclasses.replace(profile, matrix=64, pixel_spacing_mm=3.5)
        ds = pydicom.dcmread(
            next((_site(tmp_path, small, tag=profile.name, patients=1, slices=1) / "dicom").rglob("*.dcm"))
        )
        assert (ds.Manufacturer, ds.ManufacturerModelName, ds.ConvolutionKernel) == (
            profile.manufacturer,
            profile.model_name,
            profile.convolution_kernel,
        )
        assert float(ds.KVP) == profile.kvp and "MagneticFieldStrength" not in ds


# ------------------------------------------------------------------------------------------
# skew on phantom sites


def test_phantom_label_skew_varies_lesion_burden_between_sites(tmp_path: Path) -> None:
    """label_skew > 0: burden factors differ, low-burden sites have lesion-free patients and less lesion; 0 keeps all
    equal.
    """
    fractions, free = [], []
    for index in range(4):
        site = write_site(tmp_path / "skew", index, seed=1, patients=6, slices=3, profile=MR_SMALL, label_skew=1.5)
        doc = json.loads((site / "site.json").read_text())
        assert doc["label_skew"] == 1.5 and doc["lesion_burden"] == pytest.approx(
            lesion_burden(index, seed=1, label_skew=1.5), rel=1e-5
        )
        volumes = _volumes(site)
        empty = [
            v
            for v, (_, mask) in zip(sorted(p.name for p in (site / "dicom").iterdir()), volumes, strict=True)
            if not mask.any()
        ]
        assert empty == doc["lesion_free_patients"]
        assert len(empty) < 6  # at least one patient keeps lesions
        free.append(len(empty))
        fractions.append(np.mean([mask.mean() for _, mask in volumes]))
    assert max(free) >= 2 and min(free) == 0
    assert max(fractions) > 4 * min(fractions)
    for index in range(4):
        doc = json.loads(
            (
                write_site(tmp_path / "plain", index, seed=1, patients=6, slices=3, profile=MR_SMALL) / "site.json"
            ).read_text()
        )
        assert doc["lesion_burden"] == 1.0 and doc["lesion_free_patients"] == []


def test_phantom_quantity_skew_varies_patients_per_site(tmp_path: Path) -> None:
    """quantity_skew > 0: sites hold different numbers of patients (at least 4), as site.json records; 0 = equal."""
    sizes = []
    for index in range(5):
        site = write_site(tmp_path, index, seed=2, patients=6, slices=1, profile=MR_SMALL, quantity_skew=0.8)
        n = len(list((site / "dicom").iterdir()))
        assert (
            n
            == json.loads((site / "site.json").read_text())["site_patients"]
            == site_patients(index, seed=2, patients=6, quantity_skew=0.8)
        )
        sizes.append(n)
    assert len(set(sizes)) >= 3 and min(sizes) >= MIN_SKEWED_PATIENTS
    assert {site_patients(i, seed=2, patients=6) for i in range(20)} == {6}


def test_other_skew_or_generator_version_on_disk_is_reported_not_reused(tmp_path: Path) -> None:
    """A site written with other skew settings, or by an older generator, raises FileExistsError naming
    the difference.
    """
    site = write_site(tmp_path, 0, seed=1, patients=2, slices=1, profile=MR_SMALL)
    with pytest.raises(FileExistsError, match=r"label_skew 0\.0 on disk, 0\.5 requested.*delete it"):
        write_site(tmp_path, 0, seed=1, patients=2, slices=1, profile=MR_SMALL, label_skew=0.5)
    with pytest.raises(FileExistsError, match="quantity_skew"):
        write_site(tmp_path, 0, seed=1, patients=2, slices=1, profile=MR_SMALL, quantity_skew=0.5)
    doc = json.loads((site / "site.json").read_text())
    (site / "site.json").write_text(json.dumps({**doc, "generator_version": 1}))
    with pytest.raises(FileExistsError, match=f"generator_version 1 on disk, {GENERATOR_VERSION} requested"):
        write_site(tmp_path, 0, seed=1, patients=2, slices=1, profile=MR_SMALL)


# ------------------------------------------------------------------------------------------
# profile sets, lookup and validation


@pytest.mark.parametrize("modality", SITE_MODALITIES)
def test_default_profiles_per_modality_are_distinct_valid_and_round_trip(modality: str) -> None:
    """3-4 defaults per modality with distinct names and vendors; JSON round trip; variants cycle deterministically."""
    defaults = default_profiles(modality)
    assert 3 <= len(defaults) <= 4
    assert len({p.name for p in defaults}) == len(defaults) and len({p.manufacturer for p in defaults}) == len(defaults)
    for i in range(2 * len(defaults)):
        p = profile_for_site(i, modality)
        assert p == profile_for_site(i, modality)
        assert profile_from_dict(json.loads(json.dumps(profile_to_dict(p)))) == p
        assert p.modality == ({"auto": defaults[i % len(defaults)].modality}.get(modality, modality))
    variant = profile_for_site(len(defaults), modality)
    assert variant.name.endswith("-v2") and variant != defaults[0]


def test_profile_sets_differ_in_the_physics_they_model() -> None:
    """MR: two with Gibbs; CT: smooth and sharp kernels, calibrations; X-ray: both CR and DX,
    MONOCHROME1, 10-16 bits.
    """
    assert sum(p.gibbs > 0 for p in MR_PROFILES) == 2
    assert min(p.kernel_sharpness for p in CT_PROFILES) < 0 < max(p.kernel_sharpness for p in CT_PROFILES)
    assert len({p.hu_offset for p in CT_PROFILES}) >= 3 and len({p.convolution_kernel for p in CT_PROFILES}) == 4
    assert {p.modality for p in XRAY_PROFILES} == {"CR", "DX"} and {p.photometric for p in XRAY_PROFILES} == {
        "MONOCHROME1",
        "MONOCHROME2",
    }
    assert {p.bits_stored for p in XRAY_PROFILES} == {10, 12, 14, 16}
    for p in XRAY_PROFILES:
        assert 48 <= p.matrix <= 96 and p.matrix * p.pixel_spacing_mm == pytest.approx(XRAY_FOV_MM)
    assert [profile_for_site(i) for i in range(4)] == list(MR_PROFILES)  # the MR default is unchanged


@pytest.mark.parametrize(
    ("base", "change", "named"),
    [
        (CT_PROFILES[0], {"field_strength": 1.5}, "field_strength=1.5 is invalid for modality='CT'"),
        (CT_PROFILES[0], {"noise_kind": "rician"}, "noise_kind='rician' is invalid for modality='CT'"),
        (CT_PROFILES[0], {"kernel_sharpness": 2.0}, "kernel_sharpness=2.0"),
        (CT_PROFILES[0], {"bits_stored": 10}, "bits_stored=10 is invalid for modality='CT'"),
        (CT_PROFILES[0], {"rescale_intercept": 0.0}, "HU -1024..3071"),
        (MR_PROFILES[0], {"hu_offset": 10.0}, "hu_offset=10.0 is invalid for modality='MR'"),
        (MR_PROFILES[0], {"exposure": 2.0}, "exposure=2.0 is invalid for modality='MR'"),
        (XRAY_PROFILES[0], {"matrix": 100}, "pixel_spacing_mm = 240 / 100 = 2.4000"),
        (XRAY_PROFILES[0], {"gibbs": 0.5}, "gibbs=0.5 is invalid for modality='CR'"),
        (XRAY_PROFILES[0], {"pixel_representation": 1}, "X-ray presentation images are unsigned"),
        (XRAY_PROFILES[0], {"rescale_slope": 2.0}, "use the identity"),
    ],
)
def test_invalid_profile_values_name_the_field_and_the_fix(base: ScannerProfile, change: dict, named: str) -> None:
    with pytest.raises(ValueError) as info:
        dataclasses.replace(base, **change)
    assert named in str(info.value)


def test_bad_site_arguments_name_the_value_and_the_fix(tmp_path: Path) -> None:
    """Unknown modality, X-ray modality without a source, mismatched profile, negative skew: ValueError
    before writing.
    """
    with pytest.raises(ValueError, match="modality='PET' is invalid"):
        write_sites(tmp_path, sites=1, seed=1, modality="PET")
    with pytest.raises(ValueError, match="modality='CR' needs source="):
        write_sites(tmp_path, sites=1, seed=1, modality="CR")
    with pytest.raises(ValueError, match="pass modality='CT'"):
        write_site(tmp_path, 0, seed=1, profile=CT_PROFILES[0])
    with pytest.raises(ValueError, match=r"label_skew=-0\.5 is invalid"):
        write_sites(tmp_path, sites=1, seed=1, label_skew=-0.5)
    with pytest.raises(ValueError, match="quantity_skew=nan is invalid"):
        write_site(tmp_path, 0, seed=1, quantity_skew=float("nan"))
    with pytest.raises(ValueError, match="modality='PET' is invalid"):
        profile_for_site(0, "PET")
    assert not list(tmp_path.iterdir())
