"""Writing simulated images as files: DICOM headers and pixel data, NIfTI lesion masks.

Shared by the phantom sites (:mod:`simulations.synth`) and the X-ray sites (:mod:`simulations.xray`):
patient, study and series attributes (:func:`patient_dataset`, :func:`series_dataset`), one Part-10
file per image in the profile's transfer syntax (:func:`write_slice`), deterministic UIDs
(:func:`uid`) and dates (:func:`draw_meta`), and the mask file (:func:`write_mask`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from simulations.profiles import SIGNAL_UNITS, ScannerProfile
from simulations.sitefolder import GENERATOR_VERSION

__all__ = [
    "PatientMeta",
    "draw_meta",
    "ds_value",
    "patient_dataset",
    "series_dataset",
    "uid",
    "write_mask",
    "write_slice",
]

_TRANSFER_SYNTAX_UIDS = {
    "ExplicitVRLittleEndian": ExplicitVRLittleEndian,
    "RLELossless": RLELossless,
    "JPEGLSLossless": JPEGLSLossless,
    "JPEG2000Lossless": JPEG2000Lossless,
    "DeflatedExplicitVRLittleEndian": DeflatedExplicitVRLittleEndian,
}
_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class PatientMeta:
    """A synthetic patient's header facts: study date and time, birth date, sex, series number, slab centre (mm)."""

    study_date: dt.date
    study_time: str
    birth_date: dt.date
    sex: str
    series_number: int
    z_centre: float


def draw_meta(rng: np.random.Generator, seed: int, *, age_years: tuple[int, int] = (30, 80)) -> PatientMeta:
    """Draw one patient's :class:`PatientMeta` from the patient's ``rng`` (dates anchored on ``seed``)."""
    # Study dates spread over 2019-2023, anchored on the seed so a new seed moves them too.
    base = dt.date(2019, 1, 1) + dt.timedelta(days=int(seed % 997))
    study = base + dt.timedelta(days=int(rng.integers(0, 730)))
    hour, minute, second = int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    age_days = int(rng.integers(age_years[0] * 365, age_years[1] * 365))
    return PatientMeta(
        study_date=study,
        study_time=f"{hour:02d}{minute:02d}{second:02d}",
        birth_date=study - dt.timedelta(days=age_days),
        sex="F" if rng.random() < 0.5 else "M",
        series_number=int(rng.integers(2, 10)),
        z_centre=float(np.round(rng.uniform(-60.0, 60.0) * 2.0) / 2.0),
    )


def ds_value(value: float) -> str:
    """A DICOM DS string (<= 16 characters) for ``value``."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.10g}"
    return text


def uid(key: str, *parts: object) -> str:
    """A deterministic DICOM UID from ``key`` (the site's key) and ``parts`` (patient, role, ...)."""
    return generate_uid(entropy_srcs=[key, *map(str, parts)])


def patient_dataset(
    profile: ScannerProfile,
    meta: PatientMeta,
    *,
    sop_class: str,
    site_index: int,
    patient_index: int,
    patient_id: str,
    seed: int,
    study_uid: str,
    series_uid: str,
) -> Dataset:
    """Attributes every synthetic image has: patient, study, series, equipment and pixel format."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    date = meta.study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = meta.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = meta.study_time
    ds.AccessionNumber = f"SYN{site_index + 1:02d}{patient_index + 1:04d}{seed % 100000:05d}"[-16:]
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = f"Synthetic Hospital {site_index + 1:02d}"
    ds.ReferringPhysicianName = ""
    ds.ManufacturerModelName = profile.model_name
    ds.PatientName = "SYNTH^" + patient_id.replace("-", "")
    ds.PatientID = patient_id
    ds.PatientBirthDate = meta.birth_date.strftime("%Y%m%d")
    ds.PatientSex = meta.sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(patient_index + 1)
    ds.SeriesNumber = meta.series_number
    ds.AcquisitionNumber = 1
    ds.ImageComments = f"SYNTHETIC DATA (fedsite generator v{GENERATOR_VERSION}); not a real patient"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows = profile.matrix
    ds.Columns = profile.matrix
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = profile.pixel_representation
    return ds


def series_dataset(
    profile: ScannerProfile,
    meta: PatientMeta,
    *,
    site_index: int,
    patient_index: int,
    patient_id: str,
    seed: int,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
) -> Dataset:
    """The attributes shared by every slice of one MR or CT series."""
    ct = profile.modality == "CT"
    ds = patient_dataset(
        profile,
        meta,
        sop_class=CTImageStorage if ct else MRImageStorage,
        site_index=site_index,
        patient_index=patient_index,
        patient_id=patient_id,
        seed=seed,
        study_uid=study_uid,
        series_uid=series_uid,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = ds_value(profile.slice_thickness_mm)
    ds.PatientPosition = "HFS"
    if ct:
        ds.StudyDescription = "SYNTHETIC CT ABDOMEN"
        kernel = profile.convolution_kernel or "STANDARD"
        ds.SeriesDescription = f"ABDOMEN {profile.slice_thickness_mm:g}MM {kernel} SYNTHETIC"[:64]
        if profile.kvp is not None:
            ds.KVP = ds_value(profile.kvp)
        ds.ConvolutionKernel = kernel
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = ds_value(profile.matrix * profile.pixel_spacing_mm)
        ds.GantryDetectorTilt = "0"
        ds.RotationDirection = "CW"
        ds.XRayTubeCurrent = 200
        ds.ExposureTime = 500
    else:
        ds.StudyDescription = "SYNTHETIC MR ABDOMEN"
        ds.SeriesDescription = "T1 AX SYNTHETIC"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = 1
        if profile.field_strength is not None:
            ds.MagneticFieldStrength = ds_value(profile.field_strength)
            ds.ImagingFrequency = ds_value(42.577478 * profile.field_strength)
        ds.SpacingBetweenSlices = ds_value(profile.slice_thickness_mm)
    ds.ImageOrientationPatient = [ds_value(v) for v in _ORIENTATION]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [ds_value(profile.pixel_spacing_mm), ds_value(profile.pixel_spacing_mm)]
    if ct:
        ds.WindowCenter = "40"  # abdomen soft-tissue window
        ds.WindowWidth = "400"
    else:
        full = profile.intensity_scale * SIGNAL_UNITS
        ds.WindowCenter = ds_value(0.5 * full)
        ds.WindowWidth = ds_value(full)
    ds.RescaleIntercept = ds_value(profile.rescale_intercept)
    ds.RescaleSlope = ds_value(profile.rescale_slope)
    ds.RescaleType = "HU" if ct else "US"
    return ds


def _implementation_uid() -> str:
    return uid("fedsite-synth-implementation", GENERATOR_VERSION)


def write_slice(
    path: Path,
    common: Dataset,
    profile: ScannerProfile,
    *,
    sop_uid: str,
    instance: int,
    position: tuple[float, float, float] | None,
    pixels: np.ndarray,
) -> None:
    """Write one image file: ``common`` plus the instance's own attributes and pixels.

    ``position`` is the ImagePositionPatient of an axial slice, or None for a projection image.
    """
    ds = Dataset()
    for elem in common:  # shared, never mutated
        ds.add(elem)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [ds_value(v) for v in position]
        ds.SliceLocation = ds_value(position[2])

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = common.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _implementation_uid()
    meta.ImplementationVersionName = f"FEDSITE_SYNTH_{GENERATOR_VERSION}"
    ds.file_meta = meta

    arr = np.ascontiguousarray(pixels)
    ts = _TRANSFER_SYNTAX_UIDS[profile.transfer_syntax]
    if ts == RLELossless:
        # generate_instance_uid=False: pydicom 3 would otherwise replace the SOPInstanceUID with
        # a random one, breaking determinism and the file meta's MediaStorageSOPInstanceUID.
        ds.compress(RLELossless, arr, encoding_plugin=_rle_plugin(), generate_instance_uid=False)
    elif ts in (JPEGLSLossless, JPEG2000Lossless):
        ds.compress(ts, arr, generate_instance_uid=False)
    elif ts == DeflatedExplicitVRLittleEndian:
        ds.PixelData = arr.astype("<i2" if profile.pixel_representation == 1 else "<u2").tobytes()
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    else:
        ds.PixelData = arr.astype("<i2" if profile.pixel_representation == 1 else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


_RLE_PLUGIN: str | None = None


def _rle_plugin() -> str:
    """The RLE encoder to use: pylibjpeg-rle (fast, compiled) if installed, else pydicom's own.

    Both produce the same bytes (checked in the tests); pydicom's is ~15x slower.
    """
    global _RLE_PLUGIN
    if _RLE_PLUGIN is None:
        from pydicom.pixels.encoders import RLELosslessEncoder

        _RLE_PLUGIN = "pylibjpeg" if "pylibjpeg" in RLELosslessEncoder.available_plugins else "pydicom"
    return _RLE_PLUGIN


def write_mask(
    path: Path, mask: np.ndarray, *, origin: tuple[float, float, float], spacing: tuple[float, float, float]
) -> None:
    """Write a ``(Z, Y, X)`` lesion mask as a compressed uint8 NIfTI on an axial grid (identity direction)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))  # (Z, Y, X) -> (x, y, z)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)
