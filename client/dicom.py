"""The DICOM reader: files grouped into series by SeriesInstanceUID, checked, ordered and decoded.

Headers are read by :mod:`client.dicom_header`, pixels decoded by :mod:`client.dicom_pixels`,
stacks checked and ordered by :mod:`client.geometry`. Files are grouped by SeriesInstanceUID;
of several files with one SOPInstanceUID the first (in path order) is used and the others are
rejected as duplicates. A series is checked for consistency (one kind of image; for images with
patient geometry: same orientation, Rows/Columns and spacing, slices stacked along the normal,
no duplicate or missing positions) and rejected as a whole, with the reason, when it is not.
Slices are ordered by their position along the slice normal, never by InstanceNumber;
projection images (no patient coordinates) by InstanceNumber, then path and frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.dicom_header import IMAGE_SOP_CLASSES, DicomFile, quiet_dicom, read_header
from client.dicom_pixels import decode_series
from client.geometry import Frame, slice_normal, sort_along_normal, stack_problem
from client.phi import hash_id
from client.reader import FileHeader, ImageReader
from client.records import SeriesRecord, SliceRef

__all__ = ["DicomReader"]

_DUPLICATE = "duplicate of another file of the same image (same SOPInstanceUID); only the first is used"


class DicomReader(ImageReader):
    """DICOM image files (any name; Part-10, or a bare dataset with native pixels).

    Args:
        sop_classes: SOP class UID -> ``"volume"`` or ``"projection"``; default
            :data:`~client.dicom_header.IMAGE_SOP_CLASSES`.
    """

    name = "dicom"
    kinds = ("volume", "projection")

    def __init__(self, sop_classes: dict[str, str] | None = None) -> None:
        self.sop_classes = IMAGE_SOP_CLASSES if sop_classes is None else sop_classes

    def can_read(self, path: Path) -> bool:
        """Any file: DICOM files often have no suffix, so this reader takes what no other reader did."""
        return True

    def read_header(self, path: Path, *, rel: str) -> FileHeader:
        """A DICOM file's header facts (:class:`~client.dicom_header.DicomFile`) and identifying values."""
        with quiet_dicom():
            info, ids = read_header(path, sop_classes=self.sop_classes)
        return FileHeader(path=path, rel=rel, modality=info.modality, identifiers=frozenset(ids), facts=info)

    def series(self, headers: list[FileHeader]) -> tuple[list[SeriesRecord], list[tuple[Path, str]]]:
        """One series per SeriesInstanceUID; duplicates (same SOPInstanceUID) and inconsistent series rejected."""
        rejected: list[tuple[Path, str]] = []
        groups: dict[str, list[DicomFile]] = {}
        seen_sop: set[str] = set()
        for header in headers:
            info: DicomFile = header.facts
            if info.sop_uid in seen_sop:
                rejected.append((info.path, _DUPLICATE))
                continue
            seen_sop.add(info.sop_uid)
            groups.setdefault(info.series_uid, []).append(info)
        found: list[SeriesRecord] = []
        for uid, infos in groups.items():
            infos.sort(key=lambda i: str(i.path))
            record, problem = _series_of(uid, infos)
            if record is None:
                rejected.extend((info.path, f"series {hash_id(uid)}: {problem}") for info in infos)
                continue
            found.append(record)
        return found, rejected

    def read(self, series: SeriesRecord) -> np.ndarray:
        """Decode the series' pixels (:func:`client.dicom_pixels.decode_series`)."""
        return decode_series(series)


def _series_of(uid: str, infos: list[DicomFile]) -> tuple[SeriesRecord | None, str | None]:
    """Order a series' images and check it; (record, None) or (None, reason)."""
    first = infos[0]
    for info in infos[1:]:
        if info.kind != first.kind:
            return None, "series mixes volume images (CT/MR/PET) with projection images"
        if info.mosaic != first.mosaic:
            return None, "series mixes mosaic and non-mosaic images"
    frames = [f for info in infos for f in info.frames]
    if first.kind == "volume":
        problem = stack_problem(frames)
        if problem:
            return None, problem
        sort_along_normal(frames)
    else:
        if any((f.rows, f.columns) != (frames[0].rows, frames[0].columns) for f in frames):
            return None, "images of the series differ in Rows/Columns"
        frames.sort(key=lambda f: (f.instance if f.instance is not None else 1 << 30, str(f.path), f.frame or 0))
    return _record(uid, infos, frames), None


def _record(uid: str, infos: list[DicomFile], frames: list[Frame]) -> SeriesRecord:
    first_info = infos[0]
    first = frames[0]
    if first_info.kind == "volume":
        normal = slice_normal(first.iop)  # type: ignore[arg-type]
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
        first_file="",
        label_key=uid,
    )
