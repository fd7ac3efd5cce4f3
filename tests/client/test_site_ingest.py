"""Site ingestion: transfer syntaxes, pixel values, multi-frame, SOP classes, volumes and the canonical orientation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from client.dataset import CANONICAL_AXCODES, canonical_slices, canonical_volume
from client.dicom_header import IMAGE_SOP_CLASSES
from client.discovery import discover_series, read_series
from client.geometry import series_affine
from tests.dicom_fixtures import one_file_folder, pydicom_file, write_series
from tests.paths import SHARED_DATA

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _only_series(folder: Path, **kwargs: object):
    series, rejected = discover_series(folder, **kwargs)
    assert len(series) == 1, f"expected one usable series, got {len(series)}; rejected: {rejected}"
    return series[0]


def _read_alone(path: Path, tmp: Path, **kwargs: object) -> np.ndarray:
    return read_series(_only_series(one_file_folder(path, tmp), **kwargs))


def _canonical(volume: np.ndarray, series) -> tuple[np.ndarray, np.ndarray]:
    out = canonical_volume(volume, np.zeros(volume.shape, np.uint8), series)
    return out["image"].numpy()[0], out["image"].affine.numpy()


# ------------------------------------------------------------------------------------------
# transfer syntaxes and reference images


QA_TS = SHARED_DATA / "dcm_qa_ts"


@pytest.mark.parametrize("n", range(1, 10))
def test_each_transfer_syntax_of_dcm_qa_ts_decodes_to_its_reference(n: int, tmp_path: Path) -> None:
    """The same Siemens mosaic in 9 transfer syntaxes gives dcm2niix's reference volume, voxel for voxel, in RAS."""
    if not (QA_TS / "In" / f"{n}.dcm").is_file():
        pytest.skip(f"shared test data not found at {QA_TS} (the repository's ../shared/data/dcm_qa_ts)")
    series = _only_series(one_file_folder(QA_TS / "In" / f"{n}.dcm", tmp_path))
    assert series.mosaic == 6 and len(series.slices) == 35 and (series.rows, series.columns) == (64, 64)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    shutil.copy(QA_TS / "Ref" / f"{n}.nii", ref_dir / "ref.nii")
    ref = _only_series(ref_dir)
    ours, our_affine = _canonical(read_series(series), series)
    theirs, their_affine = _canonical(read_series(ref), ref)
    assert ours.shape == theirs.shape == (64, 64, 35)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(our_affine, their_affine, atol=1e-3)


LOSSLESS_PAIRS = [
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("MR_small_bigendian.dcm", "MR_small.dcm"),
    ("MR_small_expb.dcm", "MR_small.dcm"),
    ("MR_small_implicit.dcm", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("MR_small_padded.dcm", "MR_small.dcm"),
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ("693_J2KR.dcm", "693_UNCR.dcm"),
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
]
LOSSY_PAIRS = [
    ("MR2_J2KI.dcm", "MR2_UNCI.dcm"),
    ("693_J2KI.dcm", "693_UNCI.dcm"),
    ("RG1_J2KI.dcm", "RG1_UNCI.dcm"),
    ("RG3_J2KI.dcm", "RG3_UNCI.dcm"),
]


@pytest.mark.parametrize(("compressed", "reference"), LOSSLESS_PAIRS, ids=[p[0] for p in LOSSLESS_PAIRS])
def test_losslessly_compressed_files_decode_exactly_like_their_reference(
    compressed: str, reference: str, tmp_path: Path
) -> None:
    pytest.importorskip("data_store", reason="pydicom-data is not installed: pip install -e '.[test]'")
    a = _read_alone(pydicom_file(compressed), tmp_path / "a")
    b = _read_alone(pydicom_file(reference), tmp_path / "b")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("compressed", "reference"), LOSSY_PAIRS, ids=[p[0] for p in LOSSY_PAIRS])
def test_lossy_files_decode_close_to_their_reference(compressed: str, reference: str, tmp_path: Path) -> None:
    pytest.importorskip("data_store", reason="pydicom-data is not installed: pip install -e '.[test]'")
    a = _read_alone(pydicom_file(compressed), tmp_path / "a")
    b = _read_alone(pydicom_file(reference), tmp_path / "b")
    spread = float(b.max() - b.min())
    assert float(np.mean(np.abs(a - b))) < 0.01 * spread
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_RLE.dcm",
        "emri_small_big_endian.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ],
)
def test_multi_frame_files_decode_every_frame_like_the_uncompressed_file(name: str, tmp_path: Path) -> None:
    """emri_small has no functional groups, so it is read as a stack of frames (projection kind) here."""
    pytest.importorskip("data_store", reason="pydicom-data is not installed: pip install -e '.[test]'")
    as_frames = {**IMAGE_SOP_CLASSES, ENHANCED_MR: "projection"}
    a = _read_alone(pydicom_file(name), tmp_path / "a", sop_classes=as_frames)
    b = _read_alone(pydicom_file("emri_small.dcm"), tmp_path / "b", sop_classes=as_frames)
    assert a.shape == (10, 64, 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, pydicom.dcmread(pydicom_file("emri_small.dcm")).pixel_array.astype(np.float32))


def test_truncated_multi_frame_pixel_data_is_rejected_not_read(tmp_path: Path) -> None:
    from client.errors import DicomError

    as_frames = {**IMAGE_SOP_CLASSES, ENHANCED_MR: "projection"}
    series = _only_series(
        one_file_folder(pydicom_file("emri_small_jpeg_2k_lossless_too_short.dcm"), tmp_path), sop_classes=as_frames
    )
    with pytest.raises(DicomError, match=r"cannot be decoded|shape"):
        read_series(series)


# ------------------------------------------------------------------------------------------
# pixel values


def test_enhanced_ct_frames_become_slices_with_their_own_positions_and_rescale(tmp_path: Path) -> None:
    path = pydicom_file("eCT_Supplemental.dcm")
    series = _only_series(one_file_folder(path, tmp_path))
    ds = pydicom.dcmread(path)
    iop = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    ipps = [
        np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in ds.PerFrameFunctionalGroupsSequence
    ]
    positions = [float(np.dot(p, normal)) for p in ipps]
    assert [s.position for s in series.slices] == sorted(positions)
    assert [s.ipp for s in series.slices] == [tuple(ipps[i]) for i in np.argsort(positions)]
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    expected = ds.pixel_array * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
    np.testing.assert_allclose(read_series(series), expected[np.argsort(positions)], rtol=0, atol=1e-3)
    assert series.slice_spacing == pytest.approx(10.0)


def test_ct_is_in_hounsfield_units(tmp_path: Path) -> None:
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    got = _read_alone(path, tmp_path)[0]
    np.testing.assert_array_equal(got, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert got.min() < -800 and got.max() > 0  # air around the phantom, tissue: Hounsfield units


def test_cr_gets_its_window_and_monochrome1_is_inverted_after_it(tmp_path: Path) -> None:
    path = pydicom_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    got = _read_alone(path, tmp_path)[0]
    display = apply_voi_lut(ds.pixel_array, ds) / (2**15 - 1)  # window 15000/30000 into the 15-bit range
    np.testing.assert_allclose(got, 1.0 - display, atol=1e-6)
    assert got.min() >= 0.0 and got.max() <= 1.0
    stored = ds.pixel_array
    assert got[stored == stored.max()].mean() < got[stored == stored.min()].mean()  # MONOCHROME1: high stored = dark


def test_a_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    path = pydicom_file("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(
        _read_alone(path, tmp_path)[0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    )


def test_bits_above_bits_stored_are_masked_and_signed_values_sign_extended(tmp_path: Path) -> None:
    raw = np.array([[0xF123, 0x0FFF, 0x1001, 0x0800]], dtype=np.uint16)[None]
    write_series(tmp_path / "u", raw, bits_stored=12)
    np.testing.assert_array_equal(read_series(_only_series(tmp_path / "u")), [[[0x123, 0xFFF, 0x001, 0x800]]])
    write_series(tmp_path / "s", raw.view(np.int16), bits_stored=12, signed=True)
    np.testing.assert_array_equal(read_series(_only_series(tmp_path / "s")), [[[0x123, -1, 1, -2048]]])


def test_monochrome1_and_rescale_give_modality_values_where_bright_is_high(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.float64).reshape(1, 3, 4) * 10 + 100  # modality values
    slope, intercept, bits = 2.0, -50.0, 12
    stored = (values - intercept) / slope
    write_series(
        tmp_path,
        ((2**bits - 1) - stored).astype(np.uint16),
        photometric="MONOCHROME1",
        bits_stored=bits,
        slope=slope,
        intercept=intercept,
    )
    np.testing.assert_allclose(read_series(_only_series(tmp_path)), values)


# ------------------------------------------------------------------------------------------
# what is accepted and why the rest is not


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("reportsi.dcm", "structured report"),
        ("rtdose.dcm", "radiotherapy"),
        ("liver.dcm", "segmentation (SEG)"),
        ("dicomdirtests/DICOMDIR", "DICOMDIR"),
        ("SC_rgb.dcm", "colour image (RGB"),
        ("OBXXXX1A.dcm", "colour image (PALETTE COLOR"),
        ("waveform_ecg.dcm", "waveform"),
        ("README.txt", "not a DICOM file"),
        ("MR_truncated.dcm", "cannot be decoded"),
        ("emri_small.dcm", "missing required attribute"),
    ],
)
def test_what_the_task_cannot_use_is_rejected_with_its_reason(name: str, reason: str, tmp_path: Path) -> None:
    from client.audit import check_site

    if name.startswith("dicomdirtests"):
        from pydicom.data import get_testdata_file

        src = Path(get_testdata_file("DICOMDIR"))
    else:
        src = pydicom_file(name)
    folder = one_file_folder(src, tmp_path)
    report = check_site(folder)
    assert report.series_usable == 0 and report.files_rejected == 1
    (rej,) = report.rejected
    assert rej["file"] == src.name and reason in rej["reason"]


def test_a_dataset_without_file_meta_is_read_like_the_full_file(tmp_path: Path) -> None:
    vol = np.arange(2 * 4 * 5, dtype=np.uint16).reshape(2, 4, 5)
    paths = write_series(tmp_path / "full", vol)
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.preamble = None
        del ds.file_meta
        ds.save_as(bare / p.name, enforce_file_format=False, implicit_vr=False, little_endian=True)
        assert (bare / p.name).read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_series(_only_series(bare)), read_series(_only_series(tmp_path / "full")))


def test_two_copies_of_one_image_are_used_once_with_a_reason_for_the_other(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "a", np.zeros((3, 4, 4), np.uint16))
    shutil.copy(paths[1], tmp_path / "a" / "copy.dcm")
    series, rejected = discover_series(tmp_path)
    assert len(series) == 1 and len(series[0].slices) == 3
    assert [r.reason for r in rejected] == [
        "duplicate of another file of the same image (same SOPInstanceUID); the first copy whose pixel data "
        "decodes is used"
    ]


def test_slices_are_ordered_by_position_along_the_normal_even_when_it_points_down(tmp_path: Path) -> None:
    vol = np.stack([np.full((4, 4), k, np.uint16) for k in range(5)])
    write_series(tmp_path, vol, iop=(1, 0, 0, 0, -1, 0), instance_numbers=[3, 1, 5, 2, 4])  # normal (0, 0, -1)
    series = _only_series(tmp_path)
    got = read_series(series)
    assert [s.position for s in series.slices] == sorted(s.position for s in series.slices)
    assert list(got[:, 0, 0]) == [0, 1, 2, 3, 4]  # written along the normal, so position order = k


# ------------------------------------------------------------------------------------------
# NIfTI / NRRD volumes and the canonical orientation


def _phantom() -> np.ndarray:
    """(Z, Y, X) = (5, 6, 7) volume, every voxel distinct."""
    return np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7) + 100


def _variants(root: Path) -> dict[str, Path]:
    """One phantom on one physical grid (LPS x -3..3, y -2.5..2.5 mm, z 0..8 mm), stored five ways."""
    vol = _phantom()  # voxel (z, y, x) centre at LPS (x - 3, y - 2.5, 2 z)
    sp = (1.0, 1.0)
    folders = {}
    # 1. axial, rows along +y (posterior), columns along +x (left): DICOM's usual identity orientation
    write_series(root / "identity", vol, iop=(1, 0, 0, 0, 1, 0), origin=(-3.0, -2.5, 0.0), spacing=sp, gap=2.0)
    # 2. rows stored bottom-up (column direction -y, so the normal is -z: slices stack downwards)
    write_series(
        root / "rows-flipped", vol[::-1, ::-1, :], iop=(1, 0, 0, 0, -1, 0), origin=(-3.0, 2.5, 8.0), spacing=sp, gap=2.0
    )
    # 3. transposed: rows along x, columns along y (normal -z, so slices stack downwards)
    write_series(
        root / "transposed",
        np.ascontiguousarray(vol.transpose(0, 2, 1))[::-1],
        iop=(0, 1, 0, 1, 0, 0),
        origin=(-3.0, -2.5, 8.0),
        spacing=sp,
        gap=2.0,
    )
    # 4. NIfTI written in RAS orientation (x and y flipped against LPS), as nibabel-based tools do
    img = sitk.GetImageFromArray(vol[:, ::-1, ::-1].copy())
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    img.SetOrigin((3.0, 2.5, 0.0))
    img.SetSpacing((1.0, 1.0, 2.0))
    (root / "nifti").mkdir()
    sitk.WriteImage(img, str(root / "nifti" / "case.nii.gz"))
    # 5. NRRD with the identity direction
    img = sitk.GetImageFromArray(vol)
    img.SetOrigin((-3.0, -2.5, 0.0))
    img.SetSpacing((1.0, 1.0, 2.0))
    (root / "nrrd").mkdir()
    sitk.WriteImage(img, str(root / "nrrd" / "case.nrrd"))
    for name in ("identity", "rows-flipped", "transposed", "nifti", "nrrd"):
        folders[name] = root / name
    return folders


def test_every_stored_orientation_gives_the_same_ras_samples(tmp_path: Path) -> None:
    """Five storages of one phantom (flipped rows, transposed, NIfTI in RAS, NRRD) -> identical canonical slices."""
    assert CANONICAL_AXCODES == "RAS"
    results = {}
    for name, folder in _variants(tmp_path).items():
        series = _only_series(folder)
        vol = read_series(series)
        mask = (vol % 3 == 0).astype(np.uint8)  # a label that moves with the image
        items = canonical_slices(vol, mask, series)
        results[name] = (np.stack([i["image"].numpy() for i in items]), np.stack([i["label"].numpy() for i in items]))
        image, affine = _canonical(vol, series)
        assert np.allclose(affine[:3, :3], np.diag([1.0, 1.0, 2.0]))  # axes point R, A, S
        assert np.allclose(affine[:3, 3], [-3.0, -2.5, 0.0])  # RAS of the voxel nearest to right-posterior-inferior
    first_image, first_label = results["identity"]
    assert first_image.shape == (5, 1, 7, 6)  # axial slices, (R, A) in-plane
    for name, (image, label) in results.items():
        np.testing.assert_array_equal(image, first_image, err_msg=name)
        np.testing.assert_array_equal(label, first_label, err_msg=name)


def test_ras_puts_the_patients_right_and_front_at_high_indices(tmp_path: Path) -> None:
    """A bright voxel at the patient's right-anterior corner (LPS x < 0, y < 0) ends at high R and A indices."""
    vol = np.zeros((3, 8, 8), np.uint16)
    vol[1, 0, 0] = 1000  # row 0 = most anterior (y = -3.5), column 0 = most right (x = -3.5)
    write_series(tmp_path, vol, origin=(-3.5, -3.5, 0.0))
    series = _only_series(tmp_path)
    items = canonical_slices(read_series(series), np.zeros(vol.shape, np.uint8), series)
    image = items[1]["image"].numpy()[0]
    assert np.unravel_index(np.argmax(image), image.shape) == (7, 7)


def test_a_volume_file_is_one_series_with_its_geometry(tmp_path: Path) -> None:
    folder = _variants(tmp_path)["nifti"]
    series = _only_series(folder)
    assert series.kind == "file" and series.sop_class == "NIfTI volume" and series.label_key == "case"
    assert (series.rows, series.columns, len(series.slices)) == (6, 7, 5)
    np.testing.assert_allclose(series_affine(series)[:3, :3], np.diag([-1.0, -1.0, 2.0]))


# ------------------------------------------------------------------------------------------
# simulated sites stored compressed


TS_NAMES = {
    "jpeg-ls": "JPEG-LS Lossless Image Compression",
    "jpeg2000": "JPEG 2000 Image Compression (Lossless Only)",
    "deflate": "Deflated Explicit VR Little Endian",
}


@pytest.mark.parametrize("syntax", sorted(TS_NAMES))
def test_simulated_sites_written_compressed_and_monochrome1_decode_to_the_same_values(
    syntax: str, tmp_path: Path
) -> None:
    from simulations.synth import write_sites

    plain = write_sites(tmp_path / "plain", sites=4, seed=5, patients=2, slices=2)
    packed = write_sites(
        tmp_path / "packed", sites=4, seed=5, patients=2, slices=2, transfer_syntax=syntax, photometric="MONOCHROME1"
    )
    for a, b in zip(plain, packed, strict=True):  # includes the 16-bit signed scanner
        sa, _ = discover_series(a / "dicom")
        sb, _ = discover_series(b / "dicom")
        assert {s.photometric for s in sb} == {"MONOCHROME1"}
        assert {s.transfer_syntaxes for s in sb} == {(TS_NAMES[syntax],)}
        for x, y in zip(
            sorted(sa, key=lambda s: s.slices[0].path.parts[-3]),
            sorted(sb, key=lambda s: s.slices[0].path.parts[-3]),
            strict=True,
        ):
            np.testing.assert_array_equal(read_series(x), read_series(y))


def test_a_compressed_sites_folder_is_reused_by_later_calls_without_the_option(tmp_path: Path) -> None:
    """What `fedsite simulate --data-root` does on a folder written with --transfer-syntax: reuse, no error."""
    import json

    from simulations.sitefolder import INDEX_FILE
    from simulations.synth import write_site, write_sites

    first = write_sites(tmp_path, sites=2, seed=3, patients=2, slices=2, transfer_syntax="jpeg-ls")
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.dcm")}
    again = write_sites(tmp_path, sites=3, seed=3, patients=2, slices=2)  # as simulations.runner.prepare calls it
    assert again[:2] == first and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.dcm") if p in stamp} == stamp
    assert json.loads((tmp_path / INDEX_FILE).read_text())["storage"] == {"transfer_syntax": "JPEGLSLossless"}
    assert (
        pydicom.dcmread(next((again[2] / "dicom").rglob("*.dcm"))).file_meta.TransferSyntaxUID
        == pydicom.uid.JPEGLSLossless
    )
    assert write_site(tmp_path, 1, seed=3, patients=2, slices=2) == first[1]
    with pytest.raises(ValueError, match="use one of explicit, rle, jpeg-ls, jpeg2000, deflate"):
        write_sites(tmp_path / "x", sites=1, seed=3, transfer_syntax="jpeg-lossy")


# ------------------------------------------------------------------------------------------
# The reader seam: each file goes to the first reader that can read it


def test_discovery_gives_each_file_to_the_first_reader_that_claims_it(tmp_path: Path) -> None:
    """A reader placed before the default ones takes the files it claims; the others still read theirs."""
    from client.discovery import default_readers, scan_images
    from client.errors import DicomError
    from client.volumes import VolumeReader

    class GzipReader(VolumeReader):  # claims .gz files that are not NIfTI, and says what they are
        def can_read(self, path: Path) -> bool:
            return path.name.endswith(".gz") and not path.name.endswith(".nii.gz")

        def read_header(self, path: Path, *, rel: str):
            raise DicomError("gzip-compressed file; unpack it first")

    write_series(tmp_path / "dicom", np.arange(3 * 4 * 4, dtype=np.uint16).reshape(3, 4, 4))
    (tmp_path / "dicom" / "export.dcm.gz").write_bytes(b"\x1f\x8b\x08\x00")
    default = scan_images(tmp_path)
    custom = scan_images(tmp_path, readers=(GzipReader(), *default_readers()))
    damaged_gzip = "gzip-compressed file that cannot be decompressed (damaged or truncated gzip)"
    assert [r.reason for r in default.rejected] == [damaged_gzip]
    assert [(r.file, r.reason) for r in custom.rejected] == [
        ("dicom/export.dcm.gz", "gzip-compressed file; unpack it first")
    ]
    assert len(custom.series) == len(default.series) == 1 and len(custom.series[0].slices) == 3
    assert custom.files_total == default.files_total == 4
    np.testing.assert_array_equal(read_series(custom.series[0])[:, 0, 0], [0, 16, 32])
