"""X-ray sites from a labelled image set (simulations.xray): partition, labels, physics, DICOM read back by the client.

The real source, PneumoniaMNIST, is read from ../shared/data beside the repository (never copied);
tests that need it are skipped when it is absent. The physics tests use a small synthetic npz in
MedMNIST's layout with flat regions and edges, so that every effect is measurable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from client.discovery import discover_series, read_series
from client.labels import class_labels
from client.layout import sim_site_name as site_name
from client.phi import hash_id
from fedsite.cli import main as fedsite
from simulations import sitefolder, xray
from simulations.cli import synth_main
from simulations.profiles import (
    XRAY_FOV_MM,
    XRAY_PROFILES,
    ScannerProfile,
    profile_for_site,
)
from simulations.sitefolder import GENERATOR_VERSION, INDEX_FILE
from simulations.synth import write_site, write_sites
from tests.paths import SHARED_DATA

PNEUMONIA = SHARED_DATA / "pneumoniamnist" / "pneumoniamnist_merged.npz"
needs_pneumonia = pytest.mark.skipif(
    not PNEUMONIA.is_file(),
    reason=f"PneumoniaMNIST not found at {PNEUMONIA} (the repository's ../shared/data/pneumoniamnist)",
)
FLAT = 128  # object value of the flat background of the synthetic images (0.502)
# One physics profile: DX, 64 x 3.75 mm, no blur, no detector noise, linear display.
BASE = dataclasses.replace(
    XRAY_PROFILES[1],
    matrix=64,
    pixel_spacing_mm=3.75,
    blur_mm=0.0,
    noise_level=0.0,
    contrast_gamma=1.0,
    exposure=1.0,
    transfer_syntax="ExplicitVRLittleEndian",
)


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """42 images (30/6/6), 28 x 28: flat background 128 with a bright 12 x 12 square; labels 0, 1, 2."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 30), ("val", 6), ("test", 6)):
        images = np.full((n, 28, 28), FLAT, dtype=np.uint8)
        for i in range(n):
            r, c = rng.integers(9, 13, 2)
            images[i, r : r + 12, c : c + 12] = 230
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = rng.integers(0, 3, (n, 1)).astype(np.uint8)
    path = tmp_path_factory.mktemp("npz") / "toymnist.npz"
    np.savez(path, **arrays)
    return path


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _decoded(site: Path) -> list[np.ndarray]:
    """The site's images as the client reads them (display values 0..1), in PatientID order."""
    series, rejected = discover_series(site / "dicom")
    assert not rejected
    return [read_series(s)[0] for s in sorted(series, key=lambda s: s.slices[0].path.parts[-3])]


def _toy_site(tmp: Path, toy: Path, profile: ScannerProfile, *, tag: str, patients: int = 4, **kw: object) -> Path:
    return write_site(tmp / tag, 0, seed=1, patients=patients, sites=1, source=toy, profile=profile, **kw)


def _flat(image: np.ndarray) -> np.ndarray:
    """The top band of the image: flat background in the source, away from the square."""
    m = image.shape[0]
    return image[1 : int(m * 6 / 28), 1:-1]


# ------------------------------------------------------------------------------------------
# the real source: partition and labels


@needs_pneumonia
def test_pneumoniamnist_sites_read_back_with_the_labels_of_their_npz_images(tmp_path: Path) -> None:
    """Every series the client discovers gets a class from labels.csv equal to the npz label of the image it shows."""
    paths = write_sites(tmp_path, sites=3, seed=5, patients=10, source=PNEUMONIA)
    src = xray.load_source(PNEUMONIA)
    assert src.class_names == ("normal", "pneumonia") and len(src.labels) == 4682 + 524 + 624
    parts = xray.allocate(src.labels, seed=5, sites=3, patients=10)
    for index, site in enumerate(paths):
        assert (site / "labels.csv").read_text().splitlines()[0] == "PatientID,label"
        series, rejected = discover_series(site / "dicom")
        assert len(series) == 10 and not rejected
        assert {s.kind for s in series} == {"projection"} and {s.modality for s in series} == {
            profile_for_site(index, "auto").modality
        }
        found = class_labels(site / "labels.csv", series)
        assert not found.unlabelled and not found.ambiguous and found.unmatched_rows == 0
        by_patient = {s.patient_hash: s for s in series}
        for j, k in enumerate(parts[index]):
            s = by_patient[hash_id(f"S{index + 1:02d}-P{j + 1:04d}")]
            assert found.labels[s.series_hash] == src.class_names[src.labels[k]]
            # ... and the image is that npz image: back on the 28 x 28 grid it correlates strongly.
            image = read_series(s)[0]
            m = image.shape[0]
            small = xray._resample_matrix(m, 28) @ image @ xray._resample_matrix(m, 28).T
            assert np.corrcoef(small.ravel(), src.images[k].ravel().astype(float))[0, 1] > 0.8
        doc = json.loads((site / "site.json").read_text())
        assert (
            doc["source"] == PNEUMONIA.name
            and doc["source_sha256"] == hashlib.sha256(PNEUMONIA.read_bytes()).hexdigest()
        )
        assert (
            doc["images"] == 10
            and sum(doc["class_counts"].values()) == 10
            and found.classes == {k: v for k, v in doc["class_counts"].items() if v}
        )
        assert (
            str(tmp_path) not in (site / "site.json").read_text()
            and str(PNEUMONIA.parent) not in (site / "site.json").read_text()
        )


@needs_pneumonia
def test_partition_is_disjoint_deterministic_and_independent_of_later_sites() -> None:
    """No image is on two sites; the same seed gives the same partition, another seed another; more sites keep the first
    ones.
    """
    labels = xray.load_source(PNEUMONIA).labels
    parts = xray.allocate(labels, seed=3, sites=8, patients=200, label_skew=0.5, quantity_skew=0.5)
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything.tolist()))
    again = xray.allocate(labels, seed=3, sites=8, patients=200, label_skew=0.5, quantity_skew=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = xray.allocate(labels, seed=4, sites=8, patients=200, label_skew=0.5, quantity_skew=0.5)
    assert not np.array_equal(parts[0], other[0])
    fewer = xray.allocate(labels, seed=3, sites=3, patients=200, label_skew=0.5, quantity_skew=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(fewer, parts[:3], strict=True))


@needs_pneumonia
def test_label_skew_spreads_the_class_mix_and_zero_keeps_the_global_mix() -> None:
    """label_skew 0: every site within one image of the pooled 26/74 mix; label_skew 2: sites range from mostly one
    class to mostly the other.
    """
    labels = xray.load_source(PNEUMONIA).labels
    global_share = labels.mean()
    plain = [labels[p].mean() for p in xray.allocate(labels, seed=1, sites=8, patients=50)]
    assert all(abs(s - global_share) <= 1 / 50 + 1e-9 for s in plain)
    skewed = [labels[p].mean() for p in xray.allocate(labels, seed=1, sites=8, patients=50, label_skew=2.0)]
    assert max(skewed) - min(skewed) > 0.4
    assert np.std(skewed) > 5 * np.std(plain)


@needs_pneumonia
def test_quantity_skew_varies_site_sizes_and_writes_them(tmp_path: Path) -> None:
    """quantity_skew > 0: sites of different sizes (at least 4 images), recorded in site.json and the index."""
    sizes = [
        len(p)
        for p in xray.allocate(xray.load_source(PNEUMONIA).labels, seed=2, sites=10, patients=30, quantity_skew=1.0)
    ]
    assert len(set(sizes)) >= 5 and min(sizes) >= 4 and max(sizes) > 2 * min(sizes)
    paths = write_sites(tmp_path, sites=3, seed=2, patients=8, source=PNEUMONIA, quantity_skew=1.0, label_skew=1.0)
    for index, site in enumerate(paths):
        doc = json.loads((site / "site.json").read_text())
        n = len(list((site / "dicom").rglob("*.dcm")))
        assert doc["images"] == n == sitefolder.site_patients(index, seed=2, patients=8, quantity_skew=1.0)
        assert (doc["label_skew"], doc["quantity_skew"]) == (1.0, 1.0)
        assert len((site / "labels.csv").read_text().splitlines()) == n + 1
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert (index["label_skew"], index["quantity_skew"], index["task"], index["modality"]) == (
        1.0,
        1.0,
        "classification",
        "auto",
    )


# ------------------------------------------------------------------------------------------
# physics, measured on what the client decodes


@needs_pneumonia
def test_default_sites_stay_different_after_the_clients_resampling_and_normalisation(tmp_path: Path) -> None:
    """After the client's 3.75 mm / 64 x 64 resampling and 1st..99th percentile scaling, noise and gamma still tell the
    sites apart.
    """
    from client.dataset import canonical_slices, sample_pipeline
    from common.config import DataConfig

    pipeline = sample_pipeline(DataConfig(), with_mask=False)
    energy, brightness = [], []
    for site in write_sites(tmp_path, sites=4, seed=1, patients=12, source=PNEUMONIA):
        series, _ = discover_series(site / "dicom")
        e, b = [], []
        for s in series:
            volume = read_series(s)
            (item,) = canonical_slices(volume, np.zeros(volume.shape, np.uint8), s)
            x = pipeline({"image": item["image"]})["image"].numpy()[0]
            assert x.shape == (64, 64)
            e.append(np.log(np.mean(np.diff(x, axis=1) ** 2)))
            b.append(x.mean())
        energy.append(np.array(e))
        brightness.append(np.array(b))
    medians = [float(np.median(e)) for e in energy]
    noisy, clean = energy[int(np.argmax(medians))], energy[int(np.argmin(medians))]
    assert np.percentile(noisy, 25) > np.percentile(clean, 75)  # the noisiest and the cleanest scanner hardly overlap
    gammas = [profile_for_site(i, "auto").contrast_gamma for i in range(4)]
    steep, flat = int(np.argmax(gammas)), int(np.argmin(gammas))
    assert brightness[steep].mean() < brightness[flat].mean() - 0.05  # display gamma survives the percentile scaling


def test_lower_exposure_and_detector_noise_raise_the_noise(toy_npz: Path, tmp_path: Path) -> None:
    """Quantum noise grows as exposure drops (about 1/sqrt(dose)); detector noise adds to it."""

    def noise(profile: ScannerProfile, tag: str) -> float:
        return float(np.mean([_flat(im).std() for im in _decoded(_toy_site(tmp_path, toy_npz, profile, tag=tag))]))

    high, low = (
        noise(dataclasses.replace(BASE, exposure=4.0), "high"),
        noise(dataclasses.replace(BASE, exposure=0.25), "low"),
    )
    assert 2.5 < low / high < 6.0  # sqrt(16) = 4
    assert noise(dataclasses.replace(BASE, exposure=4.0, noise_level=0.02), "detector") > 1.5 * high


def test_display_gamma_bends_the_values(toy_npz: Path, tmp_path: Path) -> None:
    """The flat background (object 0.502) reads back as 0.502 ** gamma: a curve, not a scale."""
    for gamma in (0.5, 1.0, 2.0):
        profile = dataclasses.replace(BASE, exposure=20.0, contrast_gamma=gamma)
        for image in _decoded(_toy_site(tmp_path, toy_npz, profile, tag=f"g{gamma}", patients=2)):
            assert abs(float(_flat(image).mean()) - (FLAT / 255) ** gamma) < 0.03


def test_detector_blur_removes_high_frequencies(toy_npz: Path, tmp_path: Path) -> None:
    """A wider detector blur (MTF) lowers the high-frequency energy of the same exposures."""

    def energy(blur: float) -> float:
        images = _decoded(
            _toy_site(
                tmp_path, toy_npz, dataclasses.replace(BASE, blur_mm=blur, exposure=20.0), tag=f"b{blur}", patients=2
            )
        )
        return float(np.mean([np.mean(np.diff(im, axis=1) ** 2) for im in images]))

    sharp, soft, softer = energy(0.0), energy(3.0), energy(8.0)
    assert sharp > soft > softer and sharp > 3 * softer


def test_vendor_edge_enhancement_steepens_edges_without_moving_flat_regions(toy_npz: Path, tmp_path: Path) -> None:
    """edge_enhance (unsharp mask): the same exposures get more edge energy; a flat region keeps its level."""

    def images(gain: float) -> list[np.ndarray]:
        profile = dataclasses.replace(BASE, edge_enhance=gain, exposure=20.0, contrast_gamma=1.0)
        return _decoded(_toy_site(tmp_path, toy_npz, profile, tag=f"e{gain}", patients=2))

    plain, enhanced = images(0.0), images(1.5)
    edge = [float(np.mean([np.mean(np.diff(im, axis=1) ** 2) for im in ims])) for ims in (plain, enhanced)]
    assert edge[1] > 1.5 * edge[0]
    assert float(np.mean([_flat(im).mean() for im in enhanced])) == pytest.approx(
        float(np.mean([_flat(im).mean() for im in plain])), abs=0.05
    )


@pytest.mark.parametrize("matrix", [48, 96])
def test_matrix_sets_rows_columns_and_spacing_over_a_fixed_field_of_view(
    toy_npz: Path, tmp_path: Path, matrix: int
) -> None:
    """Rows/Columns = matrix; CR writes PixelSpacing, DX ImagerPixelSpacing, both 240 / matrix, which
    the client uses.
    """
    for base in (XRAY_PROFILES[0], XRAY_PROFILES[1]):
        profile = dataclasses.replace(base, matrix=matrix, pixel_spacing_mm=XRAY_FOV_MM / matrix)
        site = _toy_site(tmp_path, toy_npz, profile, tag=f"{base.modality}{matrix}", patients=1)
        (series,), _ = discover_series(site / "dicom")
        assert (series.rows, series.columns) == (matrix, matrix)
        assert series.pixel_spacing == pytest.approx((240 / matrix, 240 / matrix))
        ds = pydicom.dcmread(series.slices[0].path, stop_before_pixels=True)
        key = "PixelSpacing" if base.modality == "CR" else "ImagerPixelSpacing"
        assert [float(v) for v in ds[key].value] == pytest.approx([240 / matrix] * 2)


def test_monochrome1_reads_back_like_monochrome2_through_the_client(toy_npz: Path, tmp_path: Path) -> None:
    """The same site stored MONOCHROME1 (inverted stored values) decodes to the same display values."""
    profile = dataclasses.replace(BASE, noise_level=0.01, bits_stored=12)
    plain = _toy_site(tmp_path, toy_npz, profile, tag="m2", photometric="MONOCHROME2")
    inverted = _toy_site(tmp_path, toy_npz, profile, tag="m1", photometric="MONOCHROME1")
    for a, b in zip(_decoded(plain), _decoded(inverted), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert a.min() >= 0.0 and a.max() <= 1.0
    fa, fb = min(plain.rglob("*.dcm")), min(inverted.rglob("*.dcm"))
    ra, rb = pydicom.dcmread(fa), pydicom.dcmread(fb)
    assert rb.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(rb.pixel_array, 4095 - ra.pixel_array.astype(np.int64))
    assert (ra.PixelIntensityRelationshipSign, rb.PixelIntensityRelationshipSign) == (-1, 1)


@pytest.mark.parametrize("syntax", ["rle", "jpeg-ls", "jpeg2000", "deflate"])
def test_every_lossless_transfer_syntax_decodes_to_the_same_values(toy_npz: Path, tmp_path: Path, syntax: str) -> None:
    """The storage override works for X-ray sites too: 10- to 16-bit CR/DX images round-trip through each codec."""
    plain = write_sites(tmp_path / "plain", sites=4, seed=1, patients=4, source=toy_npz)
    packed = write_sites(tmp_path / syntax, sites=4, seed=1, patients=4, source=toy_npz, transfer_syntax=syntax)
    for a, b in zip(plain, packed, strict=True):
        for x, y in zip(_decoded(a), _decoded(b), strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_headers_name_the_vendor_dose_and_storage(toy_npz: Path, tmp_path: Path) -> None:
    """CR/DX SOP classes, vendor values, KVP, exposure indices, bits, a full-range window, no patient geometry."""
    for profile in XRAY_PROFILES:
        site = _toy_site(tmp_path, toy_npz, profile, tag=profile.name, patients=1)
        path = next((site / "dicom").rglob("*.dcm"))
        assert path.relative_to(site).parts[2:] == ("SE0001", "IM0001.dcm")
        ds = pydicom.dcmread(path)
        assert (
            ds.SOPClassUID
            == {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}[profile.modality]
        )
        assert (ds.Modality, ds.Manufacturer, ds.ManufacturerModelName) == (
            profile.modality,
            profile.manufacturer,
            profile.model_name,
        )
        assert float(ds.KVP) == profile.kvp and ds.PhotometricInterpretation == profile.photometric
        assert (ds.BitsStored, ds.PixelRepresentation, ds.Rows) == (profile.bits_stored, 0, profile.matrix)
        assert int(ds.pixel_array.max()) <= 2**profile.bits_stored - 1
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (
            2 ** (profile.bits_stored - 1),
            2**profile.bits_stored,
        )
        assert "ImagePositionPatient" not in ds and "ImageOrientationPatient" not in ds
        if profile.modality == "DX":
            assert ds.PresentationIntentType == "FOR PRESENTATION" and float(ds.ExposureIndex) == pytest.approx(
                400 * profile.exposure
            )
        else:
            assert int(ds.RelativeXRayExposure) == round(1000 * profile.exposure)
        assert ds.PatientID == "S01-P0001" and str(ds.PatientName) == "SYNTH^S01P0001"


def test_cr_and_dx_modality_options_choose_the_storage_class(toy_npz: Path, tmp_path: Path) -> None:
    """modality='CR' or 'DX' stores every site as that modality; 'auto' (and the default) mixes them."""
    for modality, expected in (("CR", {"CR"}), ("DX", {"DX"}), ("auto", {"CR", "DX"}), ("MR", {"CR", "DX"})):
        paths = write_sites(tmp_path / modality, sites=2, seed=1, patients=4, source=toy_npz, modality=modality)
        assert {pydicom.dcmread(next(p.rglob("*.dcm"))).Modality for p in paths} == expected


# ------------------------------------------------------------------------------------------
# determinism, reuse, names, errors, command line


def test_same_seed_is_byte_identical_and_another_seed_differs(toy_npz: Path, tmp_path: Path) -> None:
    for tag, seed in (("a", 4), ("b", 4), ("c", 5)):
        write_sites(tmp_path / tag, sites=2, seed=seed, patients=5, source=toy_npz, label_skew=0.5)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    dicom_a = {v for k, v in _hashes(tmp_path / "a").items() if k.endswith(".dcm")}
    assert not dicom_a & set(_hashes(tmp_path / "c").values())


def test_an_identical_site_is_kept_and_other_settings_are_reported(toy_npz: Path, tmp_path: Path) -> None:
    site = write_site(tmp_path, 0, seed=1, patients=4, sites=2, source=toy_npz)
    stamp = {p: p.stat().st_mtime_ns for p in [site, *site.rglob("*")]}
    assert write_site(tmp_path, 0, seed=1, patients=4, sites=3, source=toy_npz) == site  # more sites: site 0 unchanged
    assert {p: p.stat().st_mtime_ns for p in [site, *site.rglob("*")]} == stamp
    with pytest.raises(FileExistsError, match=r"label_skew 0\.0 on disk, 1\.0 requested"):
        write_site(tmp_path, 0, seed=1, patients=4, sites=2, source=toy_npz, label_skew=1.0)
    with pytest.raises(FileExistsError, match="task 'classification' on disk, 'segmentation' requested"):
        write_site(tmp_path, 0, seed=1, patients=4)
    doc = json.loads((site / "site.json").read_text())
    assert (
        doc["generator_version"] == GENERATOR_VERSION
        and doc["task"] == "classification"
        and doc["name"] == site_name(0)
    )


def test_class_names_come_from_the_file_name_or_the_argument(toy_npz: Path, tmp_path: Path) -> None:
    """An unknown file gets its label numbers; class_names replaces them; the names land in labels.csv."""
    assert xray.load_source(toy_npz).class_names == ("0", "1", "2")
    assert xray.default_class_names("pneumoniamnist_128.npz", np.array([0, 1])) == ("normal", "pneumonia")
    site = write_site(tmp_path, 0, seed=1, patients=6, sites=1, source=toy_npz, class_names=["a", "b", "c"])
    assert {row.split(",")[1] for row in (site / "labels.csv").read_text().splitlines()[1:]} <= {"a", "b", "c"}
    with pytest.raises(ValueError, match="give 3 different names"):
        write_site(tmp_path / "x", 0, seed=1, sites=1, source=toy_npz, class_names=["a", "b"])


def test_bad_sources_and_arguments_name_the_value_and_the_fix(toy_npz: Path, tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"missing\.npz does not exist: pass the path of a MedMNIST-layout \.npz"
    ):
        write_sites(tmp_path / "s", sites=1, seed=1, source=tmp_path / "missing.npz")
    partial = tmp_path / "partial.npz"
    np.savez(partial, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(ValueError, match="lacks the keys val_images, val_labels, test_images, test_labels"):
        write_sites(tmp_path / "s", sites=1, seed=1, source=partial)
    colour = tmp_path / "colour.npz"
    np.savez(
        colour,
        **{
            f"{s}_{k}": (np.zeros((2, 28, 28, 3), np.uint8) if k == "images" else np.zeros((2, 1), np.uint8))
            for s in xray.SPLITS
            for k in ("images", "labels")
        },
    )
    with pytest.raises(ValueError, match=r"shape \(2, 28, 28, 3\).*grayscale"):
        write_sites(tmp_path / "s", sites=1, seed=1, source=colour)
    with pytest.raises(
        ValueError, match="the source has 42 images but 5 sites x patients=10 need 50: lower sites or patients"
    ):
        write_sites(tmp_path / "s", sites=5, seed=1, patients=10, source=toy_npz)
    with pytest.raises(ValueError, match="modality='CT' is invalid with source"):
        write_sites(tmp_path / "s", sites=1, seed=1, source=toy_npz, modality="CT")
    with pytest.raises(ValueError, match="pass sites=<the total number of sites>"):
        write_site(tmp_path / "s", 0, seed=1, source=toy_npz)
    with pytest.raises(ValueError, match="is a MR profile: an image source is written as CR or DX"):
        write_site(tmp_path / "s", 0, seed=1, sites=1, source=toy_npz, profile=profile_for_site(0))
    with pytest.raises(ValueError, match="index=3 is invalid"):
        write_site(tmp_path / "s", 3, seed=1, sites=2, source=toy_npz)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_command_line_writes_xray_sites_and_rejects_mismatched_options(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedsite data synth --source ...` writes classification sites; task/source/modality mismatches are argparse
    errors.
    """
    out = tmp_path / "cli"
    rc = fedsite(
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--sites",
            "2",
            "--patients",
            "4",
            "--source",
            str(toy_npz),
            "--modality",
            "DX",
            "--label-skew",
            "0.5",
            "--classes",
            "x,y,z",
        ]
    )
    assert rc == 0 and "site-02: wrote" in capsys.readouterr().out
    assert json.loads((out / INDEX_FILE).read_text())["class_names"] == ["x", "y", "z"]
    for argv, message in (
        (["--task", "classification"], "--task classification needs --source"),
        (["--source", str(toy_npz), "--task", "segmentation"], "drop --task segmentation or --source"),
        (["--modality", "CR"], "--modality CR needs --source"),
        (["--source", str(toy_npz), "--modality", "CT"], "--modality CT is for phantom sites"),
    ):
        with pytest.raises(SystemExit) as info:
            fedsite(["data", "synth", "--out", str(tmp_path / "bad"), *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert (
        synth_main(["--out", str(tmp_path / "mod"), "--sites", "1", "--patients", "4", "--source", str(toy_npz)]) == 0
    )
    assert (tmp_path / "mod" / "site-01" / "labels.csv").is_file()
