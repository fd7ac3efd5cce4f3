"""DICOM series discovery and pixel reading at the site. Nothing here leaves the site.

Discovery reads headers only (``stop_before_pixels``), groups files by SeriesInstanceUID and
orders slices by their position along the slice normal (``ImagePositionPatient`` . normal of
``ImageOrientationPatient``), never by InstanceNumber. A file or series that cannot be used is
rejected with a reason; identifying values are never put into a reason or a record: patients and
series are referred to by salted hashes only.

Geometry convention: volumes are ``(Z, Y, X)`` arrays, Z in increasing position along the slice
normal, Y along the column direction of ``ImageOrientationPatient`` (rows of the image), X along
the row direction; this is the array order SimpleITK's ``GetArrayFromImage`` gives for the same
series, so masks written on the series' grid line up voxel for voxel.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

__all__ = [
    "DicomError",
    "Rejection",
    "SliceRef",
    "SeriesRecord",
    "hash_id",
    "discover_series",
    "read_series",
]

_HASH_SALT = b"fedsite-v1"


class DicomError(Exception):
    """A DICOM file or series cannot be used; the message says why (without patient values)."""


def hash_id(value: str) -> str:
    """A short, salted SHA-256 of an identifier (UID, PatientID) that is safe to log."""
    return hashlib.sha256(_HASH_SALT + value.encode("utf-8", "replace")).hexdigest()[:12]


@dataclass(frozen=True)
class Rejection:
    """A file or series that was not used, and why."""

    file: str
    """Path relative to the site folder (a series is named by its first file)."""
    reason: str


@dataclass(frozen=True)
class SliceRef:
    """One image file of a series."""

    path: Path
    position: float
    """Position along the slice normal, mm."""
    instance_number: int | None


@dataclass(frozen=True)
class SeriesRecord:
    """A usable series: where its slices are and what the headers say, no patient values."""

    series_hash: str
    series_uid: str
    """Kept at the site to find the series' mask; never logged or sent."""
    patient_hash: str
    modality: str
    manufacturer: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    """(row spacing, column spacing) in mm, as DICOM PixelSpacing."""
    orientation: tuple[float, ...]
    slices: tuple[SliceRef, ...] = field(repr=False)

    @property
    def slice_spacing(self) -> float:
        """Distance between consecutive slice centres, mm (the median gap; 1.0 for one slice)."""
        if len(self.slices) < 2:
            return 1.0
        gaps = np.diff([s.position for s in self.slices])
        return float(np.median(gaps))

    @property
    def origin(self) -> tuple[float, float, float]:
        """ImagePositionPatient of the first slice (lowest position along the normal)."""
        ds = pydicom.dcmread(self.slices[0].path, stop_before_pixels=True)
        return tuple(float(v) for v in ds.ImagePositionPatient)  # type: ignore[return-value]


def _iter_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            yield Path(dirpath) / name


def _normal(iop: tuple[float, ...]) -> np.ndarray:
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    return np.cross(row, col)


@dataclass
class _Header:
    path: Path
    series_uid: str
    patient: str
    modality: str
    manufacturer: str
    rows: int
    columns: int
    spacing: tuple[float, float]
    iop: tuple[float, ...]
    ipp: tuple[float, float, float]
    instance: int | None


def _read_header(path: Path) -> _Header:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise DicomError("not a DICOM file (no DICM preamble or file meta)") from None
    except Exception as exc:  # pydicom raises many types on broken files
        raise DicomError(f"unreadable DICOM header ({type(exc).__name__})") from None
    required = ("SeriesInstanceUID", "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
    missing = [k for k in required if k not in ds]
    if missing:
        raise DicomError(f"missing required attribute(s): {', '.join(missing)}")
    try:
        iop = tuple(float(v) for v in ds.ImageOrientationPatient)
        ipp = tuple(float(v) for v in ds.ImagePositionPatient)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
        if len(iop) != 6 or len(ipp) != 3 or len(spacing) != 2:
            raise ValueError
        inst = ds.get("InstanceNumber")
        return _Header(
            path=path,
            series_uid=str(ds.SeriesInstanceUID),
            patient=str(ds.get("PatientID", "") or ds.get("StudyInstanceUID", "")),
            modality=str(ds.get("Modality", "OT")),
            manufacturer=str(ds.get("Manufacturer", "unknown")) or "unknown",
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            spacing=spacing,  # type: ignore[arg-type]
            iop=iop,
            ipp=ipp,  # type: ignore[arg-type]
            instance=int(inst) if inst not in (None, "") else None,
        )
    except (ValueError, TypeError):
        raise DicomError("malformed geometry attributes (PixelSpacing, ImageOrientationPatient or ImagePositionPatient)") from None


def _check_series(headers: list[_Header]) -> str | None:
    first = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            return "slices differ in Rows/Columns"
        if not np.allclose(h.iop, first.iop, atol=1e-3):
            return "slices differ in ImageOrientationPatient"
        if not np.allclose(h.spacing, first.spacing, atol=1e-3):
            return "slices differ in PixelSpacing"
    if len(headers) > 1:
        normal = _normal(first.iop)
        pos = np.sort([float(np.dot(h.ipp, normal)) for h in headers])
        gaps = np.diff(pos)
        if np.any(gaps < 1e-3):
            return "duplicate slice positions"
        median = float(np.median(gaps))
        if np.any(gaps > 1.5 * median):
            return "missing slice(s): uneven gaps between slice positions"
    return None


def discover_series(root: Path, *, modalities: tuple[str, ...] | None = None) -> tuple[list[SeriesRecord], list[Rejection]]:
    """Index the DICOM series under ``root`` from headers only.

    Args:
        root: The site's DICOM folder.
        modalities: Keep only series of these Modality values, e.g. ``("MR",)``; ``None`` keeps all.

    Returns:
        ``(series, rejected)``: one record per usable SeriesInstanceUID, sorted by its hash so
        that splits are deterministic, and the files or series not used with their reasons.

    Raises:
        DicomError: If ``root`` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise DicomError(f"DICOM folder {root} does not exist or is not a folder")
    rejected: list[Rejection] = []
    groups: dict[str, list[_Header]] = {}
    for path in _iter_files(root):
        rel = str(path.relative_to(root))
        try:
            h = _read_header(path)
        except DicomError as exc:
            rejected.append(Rejection(rel, str(exc)))
            continue
        if modalities is not None and h.modality not in modalities:
            rejected.append(Rejection(rel, f"modality {h.modality} not used by this task (wants {', '.join(modalities)})"))
            continue
        groups.setdefault(h.series_uid, []).append(h)
    series: list[SeriesRecord] = []
    for uid, headers in groups.items():
        problem = _check_series(headers)
        normal = _normal(headers[0].iop)
        headers.sort(key=lambda h: float(np.dot(h.ipp, normal)))
        if problem:
            for h in headers:
                rejected.append(Rejection(str(h.path.relative_to(root)), f"series {hash_id(uid)}: {problem}"))
            continue
        first = headers[0]
        series.append(
            SeriesRecord(
                series_hash=hash_id(uid),
                series_uid=uid,
                patient_hash=hash_id(first.patient),
                modality=first.modality,
                manufacturer=first.manufacturer,
                rows=first.rows,
                columns=first.columns,
                pixel_spacing=first.spacing,
                orientation=first.iop,
                slices=tuple(SliceRef(h.path, float(np.dot(h.ipp, normal)), h.instance) for h in headers),
            )
        )
    series.sort(key=lambda s: s.series_hash)
    return series, rejected


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixels -> float32 in modality units, MONOCHROME2 (bright = high)."""
    arr = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16))
        if int(ds.get("PixelRepresentation", 0)) == 1:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
        arr = (lo + hi) - arr
    return arr * slope + intercept


def read_series(series: SeriesRecord) -> np.ndarray:
    """Decode a series' pixels.

    Args:
        series: A record from :func:`discover_series`.

    Returns:
        A ``(Z, Y, X)`` float32 volume in modality units (RescaleSlope/Intercept applied,
        MONOCHROME1 inverted to MONOCHROME2), slices in position order.

    Raises:
        DicomError: If a slice's pixel data cannot be decoded or has the wrong shape.
    """
    out = np.empty((len(series.slices), series.rows, series.columns), dtype=np.float32)
    for i, ref in enumerate(series.slices):
        try:
            ds = pydicom.dcmread(ref.path)
            arr = _pixels(ds)
        except Exception as exc:
            raise DicomError(f"series {series.series_hash}: pixel data of slice {i + 1} cannot be decoded ({type(exc).__name__})") from None
        if arr.shape != (series.rows, series.columns):
            raise DicomError(f"series {series.series_hash}: slice {i + 1} has shape {arr.shape}, expected {(series.rows, series.columns)}")
        out[i] = arr
    return out
