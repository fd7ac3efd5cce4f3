"""What a DICOM file's header says: its SOP class, its series, its images and their geometry.

Headers are read without pixels (``stop_before_pixels``) and quietly (:func:`quiet_dicom`: pydicom's
warnings quote header values). A file is used only if its SOP class is an image storage class
the task reads (:data:`IMAGE_SOP_CLASSES`: CT, MR, PET, CR, DX, MG, US, SC, ...); structured
reports, presentation states, RT objects, segmentations, documents, waveforms and DICOMDIRs are
rejected with a reason, as are colour images (the task reads grayscale). A multi-frame file gives
one image per frame: an enhanced multi-frame file takes each frame's position, orientation and
pixel spacing from its functional groups, a Siemens mosaic is cut into its tiles. Every problem
is a :class:`~client.errors.DicomError` whose message holds no patient value.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, UID_dictionary

from client.errors import DicomError
from client.geometry import Frame
from client.layout import LABELS_DIR
from client.phi import hash_id, identifiers
from client.volume_split import volume_keys

__all__ = [
    "IMAGE_SOP_CLASSES",
    "DicomFile",
    "finite",
    "frame_count",
    "functional_group",
    "is_gzip",
    "model_name",
    "quiet_dicom",
    "read_dataset",
    "read_header",
    "vendor_name",
]

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
        f"a segmentation (SEG): a label, not an image; put it in the site's {LABELS_DIR}/ folder",
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


#: The first bytes of a gzip stream.
GZIP_MAGIC = b"\x1f\x8b"
_GZIP_LIMIT = 2 << 30  # bytes after decompression: beyond this a .gz is not read


def is_gzip(path: Path) -> bool:
    """Whether a file is gzip-compressed (by its first bytes, whatever its name)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == GZIP_MAGIC
    except OSError:
        return False


def _gunzip(path: Path) -> io.BytesIO:
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read(_GZIP_LIMIT + 1)
    except (OSError, EOFError, zlib.error):
        raise DicomError("gzip-compressed file that cannot be decompressed (damaged or truncated gzip)") from None
    if len(data) > _GZIP_LIMIT:
        raise DicomError("gzip-compressed file larger than 2 GiB once decompressed; decompress it first")
    return io.BytesIO(data)


def read_dataset(path: Path, *, pixels: bool) -> Dataset:
    """dcmread that also accepts a bare dataset without the Part-10 header (native pixels only),
    and a gzip-compressed file (``.dcm.gz``), decompressed in memory."""
    gz = is_gzip(path)
    source: Any = _gunzip(path) if gz else path
    try:
        return pydicom.dcmread(source, stop_before_pixels=not pixels)
    except InvalidDicomError:
        if gz:
            raise DicomError("gzip-compressed file that holds no DICOM file") from None
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


@dataclass
class DicomFile:
    """The usable facts of one DICOM image file's header (site-local: it holds UIDs and the PatientID)."""

    path: Path
    series_uid: str
    study_uid: str
    sop_uid: str
    patient: str
    modality: str
    manufacturer: str
    """Normalised for grouping (:func:`vendor_name`)."""
    sop_class: str
    kind: str
    transfer_syntax: str
    photometric: str
    thickness: float | None
    mosaic: int
    frames: list[Frame]
    manufacturer_raw: str = ""
    """The Manufacturer as spelled in the header (printable, short)."""
    model: str = ""
    """ManufacturerModelName, normalised for grouping (:func:`model_name`)."""


def finite(value: object) -> float:
    """``float(value)``; raises ValueError if it is not finite."""
    out = float(value)  # type: ignore[arg-type]
    if not math.isfinite(out):
        raise ValueError("not finite")
    return out


def _floats(value: object, n: int) -> tuple[float, ...]:
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    out = tuple(finite(v) for v in items)
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


# Vendor spellings -> one name for grouping (first match of a leading word wins).
_VENDORS = (
    (("GE", "GEMS", "GE MEDICAL", "GE HEALTHCARE", "GENERAL ELECTRIC"), "GE"),
    (("SIEMENS",), "Siemens"),
    (("PHILIPS",), "Philips"),
    (("TOSHIBA",), "Toshiba"),
    (("CANON",), "Canon"),
    (("HITACHI",), "Hitachi"),
    (("AGFA",), "Agfa"),
    (("FUJI", "FUJIFILM"), "Fujifilm"),
    (("KODAK", "CARESTREAM"), "Carestream (Kodak)"),
    (("HOLOGIC",), "Hologic"),
    (("UIH", "UNITED IMAGING"), "United Imaging"),
    (("ESAOTE",), "Esaote"),
    (("BRUKER",), "Bruker"),
)
_COMPANY_WORDS = re.compile(
    r"\b(MEDICAL|SYSTEMS?|HEALTHCARE|HEALTHINEERS|HEALTH|AG|GMBH|INC|CORPORATION|CORP|LTD|CO|NV|BV|SA|LLC)\b"
)


def vendor_name(text: str) -> str:
    """A Manufacturer spelling normalised for grouping: ``"GE MEDICAL SYSTEMS"`` and ``"GE Medical Systems"``
    are both ``"GE"``; an unknown vendor loses case, punctuation and company words (``"Acme Imaging Inc."`` ->
    ``"ACME IMAGING"``)."""
    words = " ".join(re.sub(r"[^0-9A-Za-z]+", " ", text).upper().split())
    if not words:
        return "unknown"
    for spellings, name in _VENDORS:
        if any(words == sp or words.startswith(sp + " ") for sp in spellings):
            return name
    short = " ".join(_COMPANY_WORDS.sub(" ", words).split())
    return short or words


def model_name(text: str) -> str:
    """A ManufacturerModelName normalised for grouping (upper case, single spaces, no punctuation)."""
    return " ".join(re.sub(r"[^0-9A-Za-z.+]+", " ", text).upper().split())[:48]


def _sop_reason(uid: str, name: str) -> str:
    for prefix, why in _NOT_IMAGE:
        if uid == prefix or uid.startswith(prefix):
            return f"SOP class {name!r} is {why}"
    return (
        f"SOP class {name!r} is not an image storage class this task reads "
        "(CT, MR, PET, CR, DX, MG, IO, US, SC, XA, RF, NM); pass sop_classes= to read it"
    )


def functional_group(ds: Dataset, index: int, seq: str) -> Dataset | None:
    """The first item of functional group ``seq`` for frame ``index`` (per-frame, else shared)."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > i and seq in items[i] and len(items[i][seq].value) > 0:
            return items[i][seq].value[0]
    return None


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent); raises DicomError if it is malformed or below 1."""
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


def _volume_frames(ds: Dataset, path: Path, n_frames: int, instance: int | None) -> tuple[list[Frame], int]:
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
                functional_group(ds, i, s)
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
                    f"enhanced multi-frame image without {', '.join(missing)} "
                    f"for frame {i + 1} in its functional groups"
                )
            try:
                frames.append(
                    Frame(
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
        gap = finite(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 0.0)
        if gap <= 0:
            raise DicomError("Siemens mosaic without SpacingBetweenSlices or SliceThickness; convert it with dcm2niix")
        frames = [
            Frame(path, k, tr, tc, spacing, iop, tuple(float(v) for v in first + k * gap * normal), instance)  # type: ignore[arg-type]
            for k in range(n_mosaic)
        ]
        return frames, side
    if n_frames > 1:
        raise DicomError(
            f"classic multi-frame {n_frames}-frame image without per-frame positions; "
            "convert it to single-frame or enhanced multi-frame DICOM"
        )
    return [Frame(path, None, rows, cols, spacing, iop, ipp, instance)], 0  # type: ignore[arg-type]


def _projection_frames(ds: Dataset, path: Path, n_frames: int, instance: int | None) -> list[Frame]:
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
        Frame(path, i if n_frames > 1 else None, rows, cols, spacing, None, None, instance) for i in range(n_frames)
    ]


def read_header(path: Path, *, sop_classes: dict[str, str]) -> tuple[DicomFile, set[str]]:
    """A file's usable header facts and its identifying values; raises DicomError with the reason."""
    try:
        ds = read_dataset(path, pixels=False)
    except DicomError:
        raise
    except InvalidDicomError:
        raise DicomError("not a DICOM file (no 'DICM' marker or file meta)") from None
    except MemoryError:
        raise DicomError("unreadable DICOM header (an element length is larger than the file)") from None
    except Exception as exc:
        raise DicomError(f"unreadable DICOM header ({type(exc).__name__}); the file is damaged or truncated") from None
    ids = identifiers(ds)
    try:
        return _header_info(ds, path, sop_classes), ids
    except DicomError:
        raise
    except Exception as exc:
        raise DicomError(f"malformed DICOM header value ({type(exc).__name__}); the file is damaged") from None


def _header_info(ds: Dataset, path: Path, sop_classes: dict[str, str]) -> DicomFile:
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
    n_frames = frame_count(ds)
    inst = ds.get("InstanceNumber")
    try:
        instance = int(inst) if inst not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    thickness = None
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = ds.get(key)
            if value not in (None, "") and finite(value) > 0:
                thickness = finite(value)
                break
        except (TypeError, ValueError):
            continue
    if kind == "volume":
        frames, mosaic = _volume_frames(ds, path, n_frames, instance)
        enhanced = "PerFrameFunctionalGroupsSequence" in ds
        for f in frames:
            f.keys = volume_keys(ds, f.frame if enhanced else None)
    else:
        frames, mosaic = _projection_frames(ds, path, n_frames, instance), 0
    study_uid = _text(ds, "StudyInstanceUID")
    return DicomFile(
        path=path,
        series_uid=series_uid,
        study_uid=study_uid,
        sop_uid=_text(ds, "SOPInstanceUID") or str(path),
        patient=_text(ds, "PatientID") or study_uid or series_uid,
        modality=_safe_label(_text(ds, "Modality", "OT")),
        manufacturer=vendor_name(_text(ds, "Manufacturer", "unknown")),
        manufacturer_raw=_safe_label(_text(ds, "Manufacturer", "unknown")),
        model=model_name(_safe_label(_text(ds, "ManufacturerModelName", "")))
        if _text(ds, "ManufacturerModelName")
        else "",
        sop_class=sop_name,
        kind=kind,
        transfer_syntax=ts_name,
        photometric=photometric,
        thickness=thickness,
        mosaic=mosaic,
        frames=frames,
    )
