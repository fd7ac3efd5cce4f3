"""Helpers for the site-data tests: write small DICOM series with a chosen geometry, collect test files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    spacing: tuple[float, float] = (1.0, 1.0),
    gap: float = 2.0,
    series_uid: str | None = None,
    patient_id: str = "P1",
    modality: str = "MR",
    sop_class: str = MRImageStorage,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    signed: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
    instance_numbers: list[int] | None = None,
    extra: dict[str, object] | None = None,
    study_uid: str | None = None,
    prefix: str = "IM",
    positions: list[float] | None = None,
) -> list[Path]:
    """Write a ``(Z, Y, X)`` volume as single-frame files; slice k sits at ``origin + k * gap * normal``
    (or at ``positions[k]`` along the normal when given: uneven gaps).

    ``spacing`` is DICOM PixelSpacing (row spacing, column spacing); files are ``<prefix>0001.dcm``, ...
    Returns the files in slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    paths = []
    for k, image in enumerate(volume):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = patient_id
        ds.PatientName = f"Test^{patient_id}"
        ds.Modality = modality
        ds.Manufacturer = "TESTVENDOR"
        ds.InstanceNumber = (instance_numbers or list(range(1, len(volume) + 1)))[k]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        along = positions[k] if positions is not None else k * gap
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + along * normal]
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.SliceThickness = f"{gap:g}"
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.PixelData = np.ascontiguousarray(image).astype("<i2" if signed else "<u2").tobytes()
        path = folder / f"{prefix}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multivolume(
    folder: Path, volumes: list[tuple[dict[str, object], np.ndarray]], **kwargs: object
) -> tuple[str, list[list[Path]]]:
    """Write several volumes at the same slice positions as one series (one SeriesInstanceUID): diffusion,
    fMRI time points, echoes. Each volume is ``(header values that tell it apart, (Z, Y, X) pixels)``;
    volume i's files are ``V<i>_0001.dcm``, ... Returns the SeriesInstanceUID and each volume's files.
    """
    series_uid, study_uid = generate_uid(), generate_uid()
    files = []
    common = dict(kwargs.pop("extra", {}) or {})  # type: ignore[call-overload]
    first = 1
    for i, (tags, pixels) in enumerate(volumes):
        numbers = list(range(first, first + len(pixels)))  # InstanceNumber runs on across volumes
        first += len(pixels)
        files.append(
            write_series(
                folder,
                pixels,
                series_uid=series_uid,
                study_uid=study_uid,
                prefix=f"V{i}_",
                extra={**common, **tags},
                instance_numbers=numbers,
                **kwargs,  # type: ignore[arg-type]
            )
        )
    return series_uid, files


def damage_pixels(path: Path) -> None:
    """Cut a file inside its pixel data (the header stays readable; decoding fails)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8])


def pydicom_test_files() -> list[Path]:
    """Every file shipped by pydicom's test data and pydicom-data (``get_testdata_files``)."""
    from pydicom.data import get_testdata_files

    return sorted(Path(f) for f in get_testdata_files() if Path(f).is_file())


def pydicom_tree(out: Path) -> Path:
    """Put every pydicom / pydicom-data test file in one tree under ``out`` (``pydicom/...``, ``pydicom-data/...``)."""
    for src in pydicom_test_files():
        if "data_store" in src.parts:
            dst = out / "pydicom-data" / src.name
        else:
            dst = out / "pydicom" / Path(*src.parts[src.parts.index("test_files") + 1 :])
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return out


def one_file_folder(src: Path, tmp: Path) -> Path:
    """A folder holding only ``src`` (so that it is read on its own, not with its duplicates)."""
    folder = tmp / src.name.replace(".", "_")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, folder / src.name)
    return folder


def pydicom_file(name: str) -> Path:
    """A pydicom or pydicom-data test file by name."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} not found; pip install pydicom-data (the test extra)"
    return Path(path)


def dataset(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def write_enhanced(path: Path, volumes: list[np.ndarray], *, gap: float = 2.0) -> Path:
    """One Enhanced MR file holding several ``(Z, Y, X)`` volumes at the same positions, told apart only by
    the frames' DimensionIndexValues (volume index, in-stack position), as scanners write multi-echo or
    dynamic series."""
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage

    z, rows, cols = volumes[0].shape
    ds = Dataset()
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.Manufacturer = "P1", "MR", "TESTVENDOR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, z * len(volumes)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    dim_volume, dim_slice = Dataset(), Dataset()
    dim_volume.DimensionIndexPointer = 0x00209128  # TemporalPositionIndex
    dim_slice.DimensionIndexPointer = 0x00209057  # InStackPositionNumber
    ds.DimensionIndexSequence = Sequence([dim_volume, dim_slice])
    measures, orientation, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [1.0, 1.0], gap
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for v in range(len(volumes)):
        for k in range(z):
            item, position, content = Dataset(), Dataset(), Dataset()
            position.ImagePositionPatient = [0.0, 0.0, k * gap]
            content.DimensionIndexValues = [v + 1, k + 1]
            item.PlanePositionSequence = Sequence([position])
            item.FrameContentSequence = Sequence([content])
            frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.PixelData = np.ascontiguousarray(np.concatenate(volumes)).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
