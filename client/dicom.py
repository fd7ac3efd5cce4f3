"""DICOM series discovery and pixel reading at the site. Nothing here leaves the site.

Discovery (:func:`discover_series`, :func:`scan_images`) reads headers only
(``stop_before_pixels``). It walks a folder tree and keeps the files whose SOP class is an image
storage class the task uses (:data:`IMAGE_SOP_CLASSES`: CT, MR, PET, CR, DX, MG, US, SC, ...);
structured reports, presentation states, RT objects, segmentations, documents, waveforms and
DICOMDIRs are rejected with a reason, as are colour images (the task reads grayscale). Files are
grouped by SeriesInstanceUID and slices are ordered by their position along the slice normal
(``ImagePositionPatient`` . normal of ``ImageOrientationPatient``), never by InstanceNumber. A
multi-frame file gives one slice per frame: an enhanced multi-frame file takes each frame's
position, orientation and pixel spacing from its functional groups, a Siemens mosaic is cut into
its tiles. NIfTI and NRRD volumes (``.nii``, ``.nii.gz``, ``.nrrd``, read with SimpleITK, see
:mod:`client.volumes`) are series too, one per file. A series is checked for consistency (same
orientation, Rows/Columns and spacing; slices stacked along the normal; no duplicate or missing
positions) and rejected as a whole, with the reason, when it is not.

Every file is either used or rejected with a reason. Identifying values are never put into a
reason or a public field: patients and series are named by salted hashes (:func:`hash_id`), and a
reported path has every folder or file name that contains a patient value (name, ID, birth date,
accession number, institution, a UID) replaced by its hash (:class:`PathRedactor`).

Pixels (:func:`read_series`): every transfer syntax pydicom decodes with the installed plugins
(implicit/explicit little endian, big endian, deflated, RLE, JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000); BitsStored masking and signed PixelRepresentation (pydicom); then

* volume classes (CT, MR, PET): RescaleSlope/RescaleIntercept or the Modality LUT, per frame
  for enhanced objects, so CT is in HU; MONOCHROME1 is inverted inside the stored range first;
* projection classes (CR, DX, MG, ...): the same, and for display-referred modalities
  (:data:`DISPLAY_REFERRED`) with a VOI LUT or window, that VOI (first window) scaled to
  ``0..1``, MONOCHROME1 inverted after it, as a viewer shows the image.

Geometry: :func:`read_series` returns a ``(Z, Y, X)`` array as stored, Z in increasing position
along the slice normal, Y down the rows (column direction of ``ImageOrientationPatient``), X along
a row; the array order SimpleITK's ``GetArrayFromImage`` gives for the same series.
:func:`series_affine` maps voxel indices ``(x, y, z)`` to DICOM patient coordinates (LPS, mm).
The training samples are put in one canonical orientation, RAS, by :mod:`client.dataset`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, UID_dictionary

from client.errors import DicomError

__all__ = [
    "DISPLAY_REFERRED",
    "IMAGE_SOP_CLASSES",
    "VOLUME_SUFFIXES",
    "DicomError",
    "PathRedactor",
    "Rejection",
    "Scan",
    "SeriesRecord",
    "SliceRef",
    "discover_series",
    "hash_id",
    "quiet_dicom",
    "read_series",
    "scan_images",
    "series_affine",
]

_HASH_SALT = b"fedsite-v1"

#: Image storage SOP classes read by default: UID -> ``"volume"`` (needs patient geometry:
#: ImageOrientationPatient/ImagePositionPatient or enhanced functional groups) or
#: ``"projection"`` (2D images without patient coordinates, kept in stored display order).
IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "volume",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1": "volume",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2": "volume",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4": "volume",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1": "volume",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.4": "volume",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128": "volume",  # Positron Emission Tomography Image
    "1.2.840.10008.5.1.4.1.1.128.1": "volume",  # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.130": "volume",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.1": "projection",  # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1": "projection",  # Digital X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "projection",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2": "projection",  # Digital Mammography X-Ray - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1": "projection",  # Digital Mammography X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3": "projection",  # Digital Intra-Oral X-Ray - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.3.1": "projection",  # Digital Intra-Oral X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.6.1": "projection",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.6": "projection",  # Ultrasound Image (retired UID, still written)
    "1.2.840.10008.5.1.4.1.1.3.1": "projection",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.3": "projection",  # Ultrasound Multi-frame Image (retired UID)
    "1.2.840.10008.5.1.4.1.1.7": "projection",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2": "projection",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3": "projection",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.12.1": "projection",  # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.12.2": "projection",  # X-Ray Radiofluoroscopic Image
    "1.2.840.10008.5.1.4.1.1.20": "projection",  # Nuclear Medicine Image
}

#: Modalities whose pixel values are meant for display: their VOI LUT or window is applied.
DISPLAY_REFERRED: tuple[str, ...] = ("CR", "DX", "MG", "IO", "PX", "RF", "XA")

#: File name endings read as image volumes with SimpleITK.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd")

# Non-image SOP classes (by UID prefix) and why they are not used.
_NOT_IMAGE: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.1.3.10", "a DICOMDIR (an index of a DICOM medium), not an image"),
    ("1.2.840.10008.5.1.4.1.1.88.", "a structured report (SR), not an image"),
    ("1.2.840.10008.5.1.4.1.1.11.", "a presentation state (PR), not an image"),
    (
        "1.2.840.10008.5.1.4.1.1.481.",
        "a radiotherapy object (RT plan, dose, structure set or image), not used by this task",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.66.4",
        "a segmentation (SEG): a label, not an image; put it in the site's labels/ folder",
    ),
    ("1.2.840.10008.5.1.4.1.1.66", "a raw data, registration or fiducials object, not an image"),
    ("1.2.840.10008.5.1.4.1.1.104.", "an encapsulated document (PDF, CDA, 3D model), not an image"),
    ("1.2.840.10008.5.1.4.1.1.9.", "a waveform (ECG, audio, ...), not an image"),
    ("1.2.840.10008.5.1.4.1.1.59", "a key object selection document, not an image"),
    ("1.2.840.10008.5.1.4.1.1.30", "a parametric map (float pixel data), not used by this task"),
)

_COLOUR_PHOTOMETRICS = (
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "PALETTE COLOR",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
    "HSV",
    "ARGB",
    "CMYK",
    "XYB",
)

_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)


def hash_id(value: str) -> str:
    """A short, salted SHA-256 of an identifier (UID, PatientID, a path part) that is safe to log."""
    return hashlib.sha256(_HASH_SALT + value.encode("utf-8", "replace")).hexdigest()[:12]


@dataclass(frozen=True)
class Rejection:
    """A file or series that was not used, and why."""

    file: str
    """Path relative to the site folder (a series is named by its first file), identifying parts hashed."""
    reason: str


@dataclass(frozen=True)
class SliceRef:
    """One 2D image of a series: a file, or one frame or mosaic tile of a file."""

    path: Path
    position: float
    """Position along the slice normal, mm (the image's index for projection series)."""
    instance_number: int | None
    frame: int | None = None
    """0-based frame (or mosaic tile, or volume slice) in the file; None for a single-image file."""
    ipp: tuple[float, float, float] | None = None
    """ImagePositionPatient of this image (LPS, mm); None for projection images."""


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
    study_hash: str = ""
    kind: str = "volume"
    """``"volume"`` (patient geometry), ``"projection"`` (2D images, no patient coordinates) or
    ``"file"`` (a NIfTI/NRRD volume)."""
    sop_class: str = ""
    """SOP class name, e.g. ``"MR Image Storage"``, or ``"NIfTI volume"``."""
    transfer_syntaxes: tuple[str, ...] = ()
    photometric: str = "MONOCHROME2"
    thickness: float | None = None
    """SliceThickness (or SpacingBetweenSlices), mm; the slice spacing of a one-slice series."""
    mosaic: int = 0
    """Tiles per side of a Siemens mosaic (0 = not a mosaic)."""
    first_file: str = ""
    """The first slice's file, relative to the site folder, identifying parts hashed (for reports)."""
    label_key: str = ""
    """The name of this series' mask in ``labels/``: the SeriesInstanceUID, or a volume's file stem."""

    @property
    def slice_spacing(self) -> float:
        """Distance between consecutive slice centres, mm (median gap; the thickness for one slice)."""
        if len(self.slices) < 2:
            return float(self.thickness) if self.thickness else 1.0
        gaps = np.diff([s.position for s in self.slices])
        return float(np.median(gaps))

    @property
    def origin(self) -> tuple[float, float, float]:
        """ImagePositionPatient of the first slice (lowest position along the normal)."""
        first = self.slices[0]
        if first.ipp is not None:
            return first.ipp
        if self.kind == "projection":
            return (0.0, 0.0, 0.0)
        with quiet_dicom():
            ds = _read_dataset(first.path, pixels=False)
        return tuple(float(v) for v in ds.ImagePositionPatient)  # type: ignore[return-value]

    @property
    def files(self) -> tuple[Path, ...]:
        """The distinct files of the series, in slice order."""
        return tuple(dict.fromkeys(s.path for s in self.slices))


@dataclass
class Scan:
    """Everything :func:`scan_images` found under a folder."""

    series: list[SeriesRecord]
    rejected: list[Rejection]
    files_total: int
    redactor: PathRedactor


# --------------------------------------------------------------------------------------------
# Quiet, identifier-free reading


@contextlib.contextmanager
def quiet_dicom() -> Iterator[None]:
    """Read DICOM without pydicom's or ITK's warnings: they quote header values (patient data)."""
    from pydicom import config

    old_mode = config.settings.reading_validation_mode
    logger = logging.getLogger("pydicom")
    old_level = logger.level
    config.settings.reading_validation_mode = config.IGNORE
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = old_mode
        logger.setLevel(old_level)


_ENCODING_TS = {
    (True, True): pydicom.uid.ImplicitVRLittleEndian,
    (False, True): pydicom.uid.ExplicitVRLittleEndian,
    (False, False): pydicom.uid.ExplicitVRBigEndian,
}


def _read_dataset(path: Path, *, pixels: bool) -> Dataset:
    """dcmread that also accepts a bare dataset without the Part-10 header (native pixels only)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        pass
    ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    if "SOPClassUID" not in ds or "Rows" not in ds:
        raise DicomError("not a DICOM file (no 'DICM' marker or file meta, and not a bare DICOM image dataset either)")
    encoding = getattr(ds, "original_encoding", (None, None))
    ts = _ENCODING_TS.get(tuple(encoding))  # type: ignore[arg-type]
    if ts is None:
        raise DicomError("DICOM dataset without file meta whose encoding cannot be told; re-save it as a Part-10 file")
    if not isinstance(getattr(ds, "file_meta", None), FileMetaDataset):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def _uid_name(uid: str | None, what: str) -> str:
    """A standard UID's name; an unknown UID is only ever shown hashed."""
    if not uid:
        return f"no {what}"
    if uid in UID_dictionary:
        return UID(uid).name
    return f"unknown {what} ({hash_id(uid)})"


def _scrub(text: str, values: Iterable[str]) -> str:
    """Remove identifying ``values`` from a library's error message and keep it short."""
    out = str(text)
    for v in sorted({v for v in values if v and len(v) >= 2}, key=len, reverse=True):
        out = re.sub(re.escape(v), "<redacted>", out, flags=re.IGNORECASE)
    out = re.sub(r"(/|[A-Za-z]:\\)[^\s'\"]+", "<path>", out)  # file paths may hold patient names
    out = " ".join(out.split())
    return out[:200] + ("..." if len(out) > 200 else "")


def _identifiers(ds: Dataset) -> set[str]:
    """Identifying values of a header, as strings (for redaction of paths and messages)."""
    values: set[str] = set()
    for key in _IDENTIFYING_KEYWORDS:
        try:
            elem = ds.get(key)
        except Exception:
            continue
        if elem in (None, ""):
            continue
        items = list(elem) if isinstance(elem, (list, tuple, pydicom.multival.MultiValue)) else [elem]
        for item in items:
            text = str(item).strip()
            if text:
                values.add(text)
                if key.endswith("Name"):
                    values.update(p.strip() for p in re.split(r"[\^=]", text) if p.strip())
    return values


_TOKEN = re.compile(r"[^0-9A-Za-z.]+")
_RESERVED_PARTS = {"dicom", "images", "labels"}


def _strip_suffixes(name: str) -> str:
    low = name.lower()
    for suffix in (".nii.gz", ".dcm", ".dicom", ".ima", ".img", ".nii", ".nrrd", ".gz"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


class PathRedactor:
    """Hashes every part of a relative path that contains an identifying value seen in the headers.

    A part is identifying when it equals an identifying value, or when one of its tokens
    (characters other than letters, digits and ``.`` separate tokens) equals a token of at least
    three characters of one. ``dicom``, ``images`` and ``labels`` are never hashed.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._whole: set[str] = set()
        self._tokens: set[str] = set()
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        """Learn more identifying values."""
        for v in values:
            v = v.strip().lower()
            if not v:
                continue
            self._whole.add(v)
            self._tokens.update(t for t in _TOKEN.split(v) if len(t) >= 3)

    def identifying(self, part: str) -> bool:
        """Whether a file or folder name contains an identifying value."""
        low = part.lower()
        stem = _strip_suffixes(low)
        if low in self._whole or stem in self._whole:
            return True
        tokens = set(_TOKEN.split(stem)) | set(_TOKEN.split(low))
        tokens |= {t for tok in list(tokens) for t in tok.split(".")}
        return any(t in self._tokens for t in tokens if t)

    def redact(self, rel: str | Path) -> str:
        """``rel`` with each identifying part replaced by ``~<hash>`` (file suffix kept)."""
        parts = PurePosixPath(Path(rel).as_posix()).parts
        out = []
        for part in parts:
            if part.lower() in _RESERVED_PARTS or not self.identifying(part):
                out.append(part)
                continue
            stem = _strip_suffixes(part)
            out.append(f"~{hash_id(part)}{part[len(stem) :]}")
        return "/".join(out)


# --------------------------------------------------------------------------------------------
# Headers


@dataclass
class _Frame:
    """One 2D image of a file, as the headers describe it."""

    path: Path
    frame: int | None
    rows: int
    columns: int
    spacing: tuple[float, float]
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    instance: int | None


@dataclass
class _FileInfo:
    path: Path
    series_uid: str
    study_uid: str
    sop_uid: str
    patient: str
    modality: str
    manufacturer: str
    sop_class: str
    kind: str
    transfer_syntax: str
    photometric: str
    thickness: float | None
    mosaic: int
    frames: list[_Frame]


def _f(value: object) -> float:
    out = float(value)  # type: ignore[arg-type]
    if not math.isfinite(out):
        raise ValueError("not finite")
    return out


def _floats(value: object, n: int) -> tuple[float, ...]:
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    out = tuple(_f(v) for v in items)
    if len(out) != n:
        raise ValueError(f"expected {n} values")
    return out


def _text(ds: Dataset, key: str, default: str = "") -> str:
    try:
        value = ds.get(key)
    except Exception:
        return default
    if value is None:
        return default
    text = str(value).strip()
    return text or default


def _safe_label(text: str) -> str:
    """A header string (Modality, Manufacturer) safe to print: printable, short."""
    clean = re.sub(r"[^0-9A-Za-z ._()+/-]", "", text).strip()[:48]
    return clean or "unknown"


def _sop_reason(uid: str, name: str) -> str:
    for prefix, why in _NOT_IMAGE:
        if uid == prefix or uid.startswith(prefix):
            return f"SOP class {name!r} is {why}"
    return (
        f"SOP class {name!r} is not an image storage class this task reads "
        "(CT, MR, PET, CR, DX, MG, IO, US, SC, XA, RF, NM); pass sop_classes= to read it"
    )


def _functional(ds: Dataset, index: int, seq: str) -> Dataset | None:
    """The first item of functional group ``seq`` for frame ``index`` (per-frame, else shared)."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > i and seq in items[i] and len(items[i][seq].value) > 0:
            return items[i][seq].value[0]
    return None


def _frame_count(ds: Dataset) -> int:
    raw = ds.get("NumberOfFrames", 1)
    try:
        n = int(raw) if raw not in (None, "") else 1
    except (TypeError, ValueError):
        raise DicomError("malformed NumberOfFrames (not an integer)") from None
    if n < 1:
        raise DicomError(f"NumberOfFrames is {n}; it must be at least 1")
    return n


def _mosaic_tiles(ds: Dataset) -> tuple[int, np.ndarray | None]:
    """(images in a Siemens mosaic, CSA slice normal) or (0, None) for a normal image."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" not in image_type:
        return 0, None
    n = 0
    normal = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader

            csa = csareader.get_csa_header(ds, "image")
        if csa:
            n = int(csareader.get_n_mosaic(csa) or 0)
            vec = csareader.get_slice_normal(csa)
            if vec is not None:
                normal = np.asarray(vec, dtype=float)
    except Exception:
        n = 0
    if not n:
        try:
            creator_block = ds.private_block(0x0019, "SIEMENS MR HEADER")
            n = int(creator_block[0x0A].value)
        except Exception:
            n = 0
    if n <= 0:
        raise DicomError("Siemens mosaic without NumberOfImagesInMosaic; convert it to single slices (e.g. dcm2niix)")
    return n, normal


def _volume_frames(ds: Dataset, path: Path, n_frames: int, instance: int | None) -> tuple[list[_Frame], int]:
    """Per-frame geometry of a volume-class image (classic, enhanced or mosaic); (frames, mosaic)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if enhanced:
        per = ds.get("PerFrameFunctionalGroupsSequence")
        if per is not None and len(per) != n_frames:
            raise DicomError(f"PerFrameFunctionalGroupsSequence has {len(per)} items for {n_frames} frames")
        frames = []
        for i in range(n_frames):
            pos, ori, meas = (
                _functional(ds, i, s)
                for s in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
            )
            missing = [
                n
                for n, v in (
                    ("PlanePositionSequence", pos),
                    ("PlaneOrientationSequence", ori),
                    ("PixelMeasuresSequence", meas),
                )
                if v is None
            ]
            if missing:
                raise DicomError(
                    f"enhanced multi-frame image without {', '.join(missing)} for frame {i + 1} in its functional groups"
                )
            try:
                frames.append(
                    _Frame(
                        path,
                        i,
                        rows,
                        cols,
                        _floats(meas.PixelSpacing, 2),
                        _floats(ori.ImageOrientationPatient, 6),  # type: ignore[union-attr]
                        _floats(pos.ImagePositionPatient, 3),
                        instance,
                    )  # type: ignore[arg-type, union-attr]
                )
            except (AttributeError, TypeError, ValueError):
                raise DicomError(f"malformed geometry in the functional groups of frame {i + 1}") from None
            if min(frames[-1].spacing) <= 0:
                raise DicomError(f"PixelSpacing of frame {i + 1} is not positive")
        return frames, 0

    missing = [k for k in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient") if k not in ds]
    if missing:
        raise DicomError(f"missing required attribute(s): {', '.join(missing)}")
    try:
        iop = _floats(ds.ImageOrientationPatient, 6)
        ipp = _floats(ds.ImagePositionPatient, 3)
        spacing = _floats(ds.PixelSpacing, 2)
    except (TypeError, ValueError):
        raise DicomError(
            "malformed geometry attributes (PixelSpacing, ImageOrientationPatient or ImagePositionPatient)"
        ) from None
    if min(spacing) <= 0:
        raise DicomError(f"PixelSpacing {spacing[0]:g}\\{spacing[1]:g} is not positive")
    n_mosaic, csa_normal = _mosaic_tiles(ds)
    if n_mosaic:
        side = math.ceil(math.sqrt(n_mosaic))
        if rows % side or cols % side:
            raise DicomError(f"Siemens mosaic of {n_mosaic} images does not tile its {rows}x{cols} matrix")
        tr, tc = rows // side, cols // side
        row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
        # The mosaic's position is that of the whole mosaic's corner; move it to the first tile's
        # (the correction nibabel and dcm2niix apply).
        first = np.asarray(ipp) + col_dir * spacing[0] * (rows - tr) / 2.0 + row_dir * spacing[1] * (cols - tc) / 2.0
        normal = csa_normal if csa_normal is not None else np.cross(row_dir, col_dir)
        gap = _f(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 0.0)
        if gap <= 0:
            raise DicomError("Siemens mosaic without SpacingBetweenSlices or SliceThickness; convert it with dcm2niix")
        frames = [
            _Frame(path, k, tr, tc, spacing, iop, tuple(float(v) for v in first + k * gap * normal), instance)  # type: ignore[arg-type]
            for k in range(n_mosaic)
        ]
        return frames, side
    if n_frames > 1:
        raise DicomError(
            f"classic multi-frame {n_frames}-frame image without per-frame positions; "
            "convert it to single-frame or enhanced multi-frame DICOM"
        )
    return [_Frame(path, None, rows, cols, spacing, iop, ipp, instance)], 0  # type: ignore[arg-type]


def _projection_frames(ds: Dataset, path: Path, n_frames: int, instance: int | None) -> list[_Frame]:
    rows, cols = int(ds.Rows), int(ds.Columns)
    spacing = (1.0, 1.0)  # unknown: 1 mm (the image is then resampled as if it were)
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        if key in ds and ds[key].value not in (None, ""):
            try:
                value = _floats(ds[key].value, 2)
            except (TypeError, ValueError):
                raise DicomError(f"malformed {key} (expected two numbers)") from None
            if min(value) > 0:  # 0\0 is written by some CR readers for "not calibrated"
                spacing = value  # type: ignore[assignment]
                break
    return [
        _Frame(path, i if n_frames > 1 else None, rows, cols, spacing, None, None, instance) for i in range(n_frames)
    ]


def _read_header(path: Path, *, sop_classes: dict[str, str]) -> tuple[_FileInfo, set[str]]:
    """A file's usable header facts and its identifying values; raises DicomError with the reason."""
    try:
        ds = _read_dataset(path, pixels=False)
    except DicomError:
        raise
    except InvalidDicomError:
        raise DicomError("not a DICOM file (no 'DICM' marker or file meta)") from None
    except MemoryError:
        raise DicomError("unreadable DICOM header (an element length is larger than the file)") from None
    except Exception as exc:
        raise DicomError(f"unreadable DICOM header ({type(exc).__name__}); the file is damaged or truncated") from None
    ids = _identifiers(ds)
    try:
        return _header_info(ds, path, sop_classes), ids
    except DicomError:
        raise
    except Exception as exc:
        raise DicomError(f"malformed DICOM header value ({type(exc).__name__}); the file is damaged") from None


def _header_info(ds: Dataset, path: Path, sop_classes: dict[str, str]) -> _FileInfo:
    meta = getattr(ds, "file_meta", None)
    sop = _text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta is not None else "")
    if not sop:
        raise DicomError("no SOPClassUID: not an image object (or a damaged header)")
    kind = sop_classes.get(sop)
    sop_name = _uid_name(sop, "SOP class")
    if kind is None:
        raise DicomError(_sop_reason(sop, sop_name))
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    ts_name = _uid_name(ts, "transfer syntax")
    if ts and ts in UID_dictionary and UID(ts).is_transfer_syntax is False:
        raise DicomError(f"file meta names {ts_name!r} as its transfer syntax")
    series_uid = _text(ds, "SeriesInstanceUID")
    if not series_uid:
        raise DicomError("missing required attribute(s): SeriesInstanceUID")
    missing = [k for k in ("Rows", "Columns") if k not in ds]
    if missing:
        raise DicomError(f"missing required attribute(s): {', '.join(missing)} (no image in this object)")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1:
        raise DicomError(f"image of {rows}x{cols} pixels")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = _text(ds, "PhotometricInterpretation", "MONOCHROME2").upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if photometric not in _COLOUR_PHOTOMETRICS:
            raise DicomError(
                "unknown PhotometricInterpretation (a damaged header?); the task reads MONOCHROME1/MONOCHROME2 images"
            )
        raise DicomError(
            f"colour image ({photometric}, {samples} samples per pixel); the task reads grayscale "
            "(MONOCHROME1/MONOCHROME2) images"
        )
    n_frames = _frame_count(ds)
    inst = ds.get("InstanceNumber")
    try:
        instance = int(inst) if inst not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    thickness = None
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = ds.get(key)
            if value not in (None, "") and _f(value) > 0:
                thickness = _f(value)
                break
        except (TypeError, ValueError):
            continue
    if kind == "volume":
        frames, mosaic = _volume_frames(ds, path, n_frames, instance)
    else:
        frames, mosaic = _projection_frames(ds, path, n_frames, instance), 0
    study_uid = _text(ds, "StudyInstanceUID")
    return _FileInfo(
        path=path,
        series_uid=series_uid,
        study_uid=study_uid,
        sop_uid=_text(ds, "SOPInstanceUID") or str(path),
        patient=_text(ds, "PatientID") or study_uid or series_uid,
        modality=_safe_label(_text(ds, "Modality", "OT")),
        manufacturer=_safe_label(_text(ds, "Manufacturer", "unknown")),
        sop_class=sop_name,
        kind=kind,
        transfer_syntax=ts_name,
        photometric=photometric,
        thickness=thickness,
        mosaic=mosaic,
        frames=frames,
    )


# --------------------------------------------------------------------------------------------
# Series


def _iter_files(root: Path, skip: set[str]) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in skip))
        for name in sorted(filenames):
            if name.startswith(".") or (top and name in skip):
                continue
            yield Path(dirpath) / name


def _normal(iop: tuple[float, ...]) -> np.ndarray:
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    return np.cross(row, col)


def _check_volume(frames: list[_Frame]) -> str | None:
    """Why a volume series' frames do not form one regular stack, or None."""
    first = frames[0]
    assert first.iop is not None and first.ipp is not None
    for h in frames[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            return "slices differ in Rows/Columns"
        if not np.allclose(h.iop, first.iop, atol=1e-3):  # type: ignore[arg-type]
            return "slices differ in ImageOrientationPatient (mixed orientations, e.g. a localizer)"
        if not np.allclose(h.spacing, first.spacing, rtol=1e-3, atol=1e-4):
            return "slices differ in PixelSpacing"
    normal = _normal(first.iop)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        return "ImageOrientationPatient is not two orthogonal unit vectors"
    if len(frames) > 1:
        pos = np.sort([float(np.dot(h.ipp, normal)) for h in frames])  # type: ignore[arg-type]
        gaps = np.diff(pos)
        if np.any(gaps < 1e-3):
            return "duplicate slice positions (several echoes, time points or copies in one series)"
        if np.any(gaps > 1.5 * float(gaps.min())):  # the smallest gap is the stack's spacing
            return "missing slice(s): uneven gaps between slice positions"
        origin = np.asarray(first.ipp)
        tolerance = 0.1 * min(first.spacing)
        for h in frames[1:]:
            d = np.asarray(h.ipp) - origin
            if np.linalg.norm(d - np.dot(d, normal) * normal) > tolerance + 1e-3 * abs(float(np.dot(d, normal))):
                return "slices are not stacked along the slice normal (gantry tilt or shear); resample the series first"
    return None


def _record(uid: str, infos: list[_FileInfo], frames: list[_Frame], rel: str) -> SeriesRecord:
    first_info = infos[0]
    first = frames[0]
    if first_info.kind == "volume":
        normal = _normal(first.iop)  # type: ignore[arg-type]
        slices = tuple(
            SliceRef(f.path, float(np.dot(f.ipp, normal)), f.instance, f.frame, f.ipp)
            for f in frames  # type: ignore[arg-type]
        )
        orientation = first.iop
    else:
        slices = tuple(SliceRef(f.path, float(i), f.instance, f.frame, None) for i, f in enumerate(frames))
        orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    return SeriesRecord(
        series_hash=hash_id(uid),
        series_uid=uid,
        patient_hash=hash_id(first_info.patient),
        modality=first_info.modality,
        manufacturer=first_info.manufacturer,
        rows=first.rows,
        columns=first.columns,
        pixel_spacing=first.spacing,
        orientation=orientation,  # type: ignore[arg-type]
        slices=slices,
        study_hash=hash_id(first_info.study_uid) if first_info.study_uid else "",
        kind=first_info.kind,
        sop_class=first_info.sop_class,
        transfer_syntaxes=tuple(sorted({i.transfer_syntax for i in infos})),
        photometric=first_info.photometric,
        thickness=first_info.thickness,
        mosaic=first_info.mosaic,
        first_file=rel,
        label_key=uid,
    )


def _series_of(uid: str, infos: list[_FileInfo]) -> tuple[SeriesRecord | None, str | None]:
    """Order a series' images and check it; (record, None) or (None, reason)."""
    first = infos[0]
    for info in infos[1:]:
        if info.kind != first.kind:
            return None, "series mixes volume images (CT/MR/PET) with projection images"
        if info.mosaic != first.mosaic:
            return None, "series mixes mosaic and non-mosaic images"
    frames = [f for info in infos for f in info.frames]
    if first.kind == "volume":
        problem = _check_volume(frames)
        if problem:
            return None, problem
        normal = _normal(frames[0].iop)  # type: ignore[arg-type]
        frames.sort(key=lambda f: float(np.dot(f.ipp, normal)))  # type: ignore[arg-type]
    else:
        if any((f.rows, f.columns) != (frames[0].rows, frames[0].columns) for f in frames):
            return None, "images of the series differ in Rows/Columns"
        frames.sort(key=lambda f: (f.instance if f.instance is not None else 1 << 30, str(f.path), f.frame or 0))
    return _record(uid, infos, frames, ""), None


def scan_images(
    root: Path,
    *,
    modalities: Iterable[str] | None = None,
    sop_classes: dict[str, str] | None = None,
    skip: Iterable[str] = (),
    relative_to: Path | None = None,
) -> Scan:
    """Index the images under ``root`` from headers only; every file is used or rejected.

    Args:
        root: The folder to walk (hidden files and folders are ignored).
        modalities: Keep only DICOM series of these Modality values, e.g. ``("MR",)``; ``None``
            keeps all. NIfTI/NRRD volumes have no modality and are always kept.
        sop_classes: SOP class UID -> ``"volume"`` or ``"projection"``; default
            :data:`IMAGE_SOP_CLASSES`.
        skip: Names of top-level files or folders of ``root`` not to walk (e.g. ``"labels"``).
        relative_to: Report paths relative to this folder (default ``root``).

    Returns:
        The usable series (sorted by hash, so splits are deterministic), the rejected files with
        their reasons (paths redacted), the number of files seen and the path redactor.

    Raises:
        DicomError: If ``root`` does not exist.
    """
    from client.volumes import is_volume_file, read_volume_header

    root = Path(root)
    if not root.is_dir():
        raise DicomError(f"image folder {root} does not exist or is not a folder")
    base = Path(relative_to) if relative_to is not None else root
    wanted = None if modalities is None else {m.upper() for m in modalities}
    sop_classes = IMAGE_SOP_CLASSES if sop_classes is None else sop_classes
    redactor = PathRedactor()
    raw_rejected: list[tuple[Path, str]] = []
    groups: dict[str, list[_FileInfo]] = {}
    volumes: list[SeriesRecord] = []
    seen_sop: set[str] = set()
    files_total = 0

    def rel(path: Path) -> str:
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            return path.name

    with quiet_dicom():
        for path in _iter_files(root, set(skip)):
            files_total += 1
            try:
                if is_volume_file(path):
                    volumes.append(read_volume_header(path, rel(path)))
                    continue
                info, ids = _read_header(path, sop_classes=sop_classes)
            except DicomError as exc:
                raw_rejected.append((path, str(exc)))
                continue
            except Exception as exc:
                raw_rejected.append((path, f"unexpected error while reading the header ({type(exc).__name__})"))
                continue
            redactor.add(ids)
            if wanted is not None and info.modality.upper() not in wanted:
                raw_rejected.append(
                    (path, f"modality {info.modality} not used by this task (wants {', '.join(sorted(wanted))})")
                )
                continue
            if info.sop_uid in seen_sop:
                raw_rejected.append(
                    (path, "duplicate of another file of the same image (same SOPInstanceUID); only the first is used")
                )
                continue
            seen_sop.add(info.sop_uid)
            groups.setdefault(info.series_uid, []).append(info)

    series: list[SeriesRecord] = []
    for uid, infos in groups.items():
        infos.sort(key=lambda i: str(i.path))
        record, problem = _series_of(uid, infos)
        if record is None:
            for info in infos:
                raw_rejected.append((info.path, f"series {hash_id(uid)}: {problem}"))
            continue
        series.append(record)
    series = [replace(s, first_file=redactor.redact(rel(s.slices[0].path))) for s in series]
    series.extend(replace(v, first_file=redactor.redact(v.first_file)) for v in volumes)
    series.sort(key=lambda s: s.series_hash)
    rejected = [
        Rejection(redactor.redact(rel(p)), reason) for p, reason in sorted(raw_rejected, key=lambda r: str(r[0]))
    ]
    return Scan(series=series, rejected=rejected, files_total=files_total, redactor=redactor)


def discover_series(
    root: Path,
    *,
    modalities: Iterable[str] | None = None,
    sop_classes: dict[str, str] | None = None,
    skip: Iterable[str] = (),
    relative_to: Path | None = None,
) -> tuple[list[SeriesRecord], list[Rejection]]:
    """Index the series under ``root`` from headers only (:func:`scan_images` without the counts).

    Args:
        root: The site's image folder.
        modalities: Keep only series of these Modality values, e.g. ``("MR",)``; ``None`` keeps all.
        sop_classes: SOP class UID -> kind; default :data:`IMAGE_SOP_CLASSES`.
        skip: Top-level names under ``root`` not to walk.
        relative_to: Report paths relative to this folder (default ``root``).

    Returns:
        ``(series, rejected)``: one record per usable series, sorted by its hash so that splits
        are deterministic, and the files not used with their reasons.

    Raises:
        DicomError: If ``root`` does not exist.
    """
    scan = scan_images(root, modalities=modalities, sop_classes=sop_classes, skip=skip, relative_to=relative_to)
    return scan.series, scan.rejected


# --------------------------------------------------------------------------------------------
# Pixels


def _rescale(ds: Dataset, frame: int | None) -> tuple[float, float]:
    """(slope, intercept) of a frame: per-frame or shared functional groups, else the top level."""
    item = _functional(ds, frame or 0, "PixelValueTransformationSequence")
    source = item if item is not None else ds
    slope = source.get("RescaleSlope", 1.0)
    intercept = source.get("RescaleIntercept", 0.0)
    slope = 1.0 if slope in (None, "") else _f(slope)
    intercept = 0.0 if intercept in (None, "") else _f(intercept)
    if slope == 0.0:
        raise DicomError("RescaleSlope is 0")
    return slope, intercept


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _has_voi(ds: Dataset) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def _to_values(ds: Dataset, arr: np.ndarray, frame: int | None, *, modality: str) -> np.ndarray:
    """Stored pixels of one image -> float32, bright = high (see the module docstring)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    mono1 = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1"
    if modality in DISPLAY_REFERRED and _has_voi(ds):
        modality_values = apply_modality_lut(arr, ds)
        voi = np.asarray(apply_voi_lut(modality_values, ds, index=0), dtype=np.float64)
        lo, hi = _voi_range(ds)
        out = (voi - lo) / max(hi - lo, 1e-9)
        if mono1:
            out = 1.0 - out
        return out.astype(np.float32)
    values = arr.astype(np.float64)
    if mono1:
        lo, hi = _stored_range(ds)
        values = (lo + hi) - values
    if "ModalityLUTSequence" in ds and ds.ModalityLUTSequence:
        return np.asarray(apply_modality_lut(values.astype(np.int64), ds), dtype=np.float32)
    slope, intercept = _rescale(ds, frame)
    return (values * slope + intercept).astype(np.float32)


def _voi_range(ds: Dataset) -> tuple[float, float]:
    """The output range of the VOI step, as pydicom's apply_voi_lut produces it."""
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    lo, hi = _stored_range(ds)
    slope, intercept = _rescale(ds, None)
    a, b = lo * slope + intercept, hi * slope + intercept
    return float(min(a, b)), float(max(a, b))


def _decode_file(path: Path, series: SeriesRecord, items: list[tuple[int, SliceRef]], out: np.ndarray) -> None:
    ds = _read_dataset(path, pixels=True)
    ids = _identifiers(ds)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DicomError(
            f"pixel data cannot be decoded ({type(exc).__name__}: {_scrub(str(exc), ids)})", file=path
        ) from None
    n_frames = _frame_count(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if n_frames > 1:
        if arr.shape[:3] != (n_frames, rows, cols):
            raise DicomError(f"decoded pixel data has shape {arr.shape}, expected {(n_frames, rows, cols)}", file=path)
    elif arr.shape[:2] != (rows, cols) or arr.ndim != 2:
        raise DicomError(f"decoded pixel data has shape {arr.shape}, expected {(rows, cols)}", file=path)
    for i, ref in items:
        if series.mosaic:
            side = series.mosaic
            k = ref.frame or 0
            r0, c0 = (k // side) * series.rows, (k % side) * series.columns
            image = arr[r0 : r0 + series.rows, c0 : c0 + series.columns]
            values = _to_values(ds, image, None, modality=series.modality)
        else:
            image = arr[ref.frame] if (n_frames > 1 and ref.frame is not None) else arr
            values = _to_values(ds, image, ref.frame, modality=series.modality)
        if values.shape != (series.rows, series.columns):
            raise DicomError(f"image has shape {values.shape}, expected {(series.rows, series.columns)}", file=path)
        if not np.all(np.isfinite(values)):
            raise DicomError("pixel values are not finite (NaN or infinity after rescaling)", file=path)
        out[i] = values


def read_series(series: SeriesRecord) -> np.ndarray:
    """Decode a series' pixels.

    Args:
        series: A record from :func:`discover_series`.

    Returns:
        A ``(Z, Y, X)`` float32 volume, slices in position order: modality units
        (RescaleSlope/Intercept or Modality LUT applied, MONOCHROME1 inverted to MONOCHROME2),
        or display values ``0..1`` for display-referred images with a VOI (see the module docstring).

    Raises:
        DicomError: If a slice's pixel data cannot be decoded or has the wrong shape; its
            ``file`` attribute names the file.
    """
    if series.kind == "file":
        from client.volumes import read_volume

        return read_volume(series)
    out = np.empty((len(series.slices), series.rows, series.columns), dtype=np.float32)
    by_file: dict[Path, list[tuple[int, SliceRef]]] = {}
    for i, ref in enumerate(series.slices):
        by_file.setdefault(ref.path, []).append((i, ref))
    with quiet_dicom():
        for path, items in by_file.items():
            try:
                _decode_file(path, series, items, out)
            except DicomError as exc:
                raise DicomError(f"series {series.series_hash}: {exc}", file=path) from None
            except Exception as exc:
                raise DicomError(
                    f"series {series.series_hash}: pixel data cannot be read ({type(exc).__name__}); the file is damaged",
                    file=path,
                ) from None
    return out


def series_affine(series: SeriesRecord) -> np.ndarray:
    """The 4x4 affine from voxel indices ``(x, y, z)`` of :func:`read_series`'s array to LPS mm.

    Columns: the row direction times the column spacing, the column direction times the row
    spacing, the slice normal times the slice spacing, and the first slice's position. A
    projection series (no patient coordinates) gets ``diag(column spacing, row spacing, 1)``.
    """
    affine = np.eye(4)
    row_spacing, col_spacing = series.pixel_spacing
    if series.kind == "projection":
        affine[0, 0], affine[1, 1] = col_spacing, row_spacing
        return affine
    iop = np.asarray(series.orientation, dtype=float)
    affine[:3, 0] = iop[:3] * col_spacing
    affine[:3, 1] = iop[3:] * row_spacing
    affine[:3, 2] = np.cross(iop[:3], iop[3:]) * series.slice_spacing
    affine[:3, 3] = series.origin
    return affine
