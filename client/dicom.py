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

from dataclasses import replace
from pathlib import Path

import numpy as np

from client.dicom_header import IMAGE_SOP_CLASSES, DicomFile, quiet_dicom, read_dataset, read_header
from client.dicom_pixels import decode_series, decode_usable
from client.geometry import Frame, slice_normal, sort_along_normal, stack_problem
from client.phi import hash_id
from client.reader import FileHeader, ImageReader
from client.records import SeriesRecord, SliceRef
from client.volume_split import parse_policy, select_volumes, split_volumes

__all__ = ["DicomReader"]

_DUPLICATE = (
    "duplicate of another file of the same image (same SOPInstanceUID); the first copy whose pixel data decodes is used"
)
_LOCALIZER = (
    "localizer: ImageOrientationPatient differs from the rest of the series (mixed orientations); "
    "dropped, the series' main stack is used"
)


class DicomReader(ImageReader):
    """DICOM image files (any name; Part-10, a bare dataset with native pixels, or either gzip-compressed).

    Args:
        sop_classes: SOP class UID -> ``"volume"`` or ``"projection"``; default
            :data:`~client.dicom_header.IMAGE_SOP_CLASSES`.
        volume: The ``data.volume`` policy for multi-volume series (:func:`client.volume_split.select_volumes`).
    """

    name = "dicom"
    kinds = ("volume", "projection")

    def __init__(self, sop_classes: dict[str, str] | None = None, *, volume: str = "first") -> None:
        self.sop_classes = IMAGE_SOP_CLASSES if sop_classes is None else sop_classes
        parse_policy(volume)  # fail early, with the accepted forms
        self.volume = volume

    def can_read(self, path: Path) -> bool:
        """Any file: DICOM files often have no suffix, so this reader takes what no other reader did."""
        return True

    def read_header(self, path: Path, *, rel: str) -> FileHeader:
        """A DICOM file's header facts (:class:`~client.dicom_header.DicomFile`) and identifying values."""
        with quiet_dicom():
            info, ids = read_header(path, sop_classes=self.sop_classes)
        return FileHeader(path=path, rel=rel, modality=info.modality, identifiers=frozenset(ids), facts=info)

    def series(self, headers: list[FileHeader]) -> tuple[list[SeriesRecord], list[tuple[Path, str]]]:
        """One series per SeriesInstanceUID (one per volume of a multi-volume series); duplicates, localizers,
        volumes the policy does not use and inconsistent series rejected, each file with its own reason."""
        rejected: list[tuple[Path, str]] = []
        infos = _unique_images([h.facts for h in headers], rejected)
        groups: dict[str, list[DicomFile]] = {}
        for info in infos:
            groups.setdefault(info.series_uid, []).append(info)
        found: list[SeriesRecord] = []
        for uid, members in groups.items():
            members.sort(key=lambda i: str(i.path))
            records, problems = _series_of(uid, members, self.volume)
            rejected.extend((path, f"series {hash_id(uid)}: {why}") for path, why in problems)
            found.extend(records)
        return found, rejected

    def read(self, series: SeriesRecord) -> np.ndarray:
        """Decode the series' pixels (:func:`client.dicom_pixels.decode_series`)."""
        return decode_series(series)

    def read_usable(self, series: SeriesRecord) -> tuple[np.ndarray, SeriesRecord, list[tuple[Path, str]]]:
        """Decode the series, dropping each file that fails (named with its own reason)."""
        return decode_usable(series)


def _decodes(path: Path) -> bool:
    try:
        with quiet_dicom():
            _ = read_dataset(path, pixels=True).pixel_array
        return True
    except Exception:
        return False


def _unique_images(infos: list[DicomFile], rejected: list[tuple[Path, str]]) -> list[DicomFile]:
    """One file per SOPInstanceUID: of several copies the first (in path order) whose pixel data decodes."""
    by_sop: dict[str, list[DicomFile]] = {}
    for info in infos:
        by_sop.setdefault(info.sop_uid, []).append(info)
    kept: list[DicomFile] = []
    for copies in by_sop.values():
        if len(copies) == 1:
            kept.append(copies[0])
            continue
        copies = sorted(copies, key=lambda i: str(i.path))
        best = next((c for c in copies if _decodes(c.path)), copies[0])
        kept.append(best)
        rejected.extend((c.path, _DUPLICATE) for c in copies if c is not best)
    return kept


def _orientation_key(info: DicomFile) -> tuple[float, ...] | None:
    iops = {tuple(round(v, 3) for v in f.iop) for f in info.frames if f.iop is not None}
    return next(iter(iops)) if len(iops) == 1 else None


def _drop_localizers(infos: list[DicomFile], dropped: list[tuple[Path, str]]) -> list[DicomFile]:
    """The files of the series' main orientation, when one orientation holds most images; the others
    (localizers, scouts) are named in ``dropped``. Unchanged when no orientation clearly dominates."""
    keys = [_orientation_key(i) for i in infos]
    if None in keys or len(set(keys)) < 2:
        return infos
    counts: dict[tuple[float, ...], int] = {}
    for info, key in zip(infos, keys, strict=True):
        counts[key] = counts.get(key, 0) + len(info.frames)  # type: ignore[index]
    ranked = sorted(counts.values(), reverse=True)
    main = max(counts, key=lambda k: counts[k])
    if ranked[0] < 2 or ranked[0] <= ranked[1]:
        return infos
    for info, key in zip(infos, keys, strict=True):
        if key != main:
            dropped.append((info.path, _LOCALIZER))
    return [i for i, k in zip(infos, keys, strict=True) if k == main]


def _series_of(uid: str, infos: list[DicomFile], policy: str) -> tuple[list[SeriesRecord], list[tuple[Path, str]]]:
    """Order a series' images and check it; (records, [(file, reason) for files not used])."""
    first = infos[0]
    for info in infos[1:]:
        if info.kind != first.kind:
            return [], [(i.path, "series mixes volume images (CT/MR/PET) with projection images") for i in infos]
        if info.mosaic != first.mosaic:
            return [], [(i.path, "series mixes mosaic and non-mosaic images") for i in infos]
    dropped: list[tuple[Path, str]] = []
    if first.kind != "volume":
        frames = [f for info in infos for f in info.frames]
        if any((f.rows, f.columns) != (frames[0].rows, frames[0].columns) for f in frames):
            return [], [(i.path, "images of the series differ in Rows/Columns") for i in infos]
        frames.sort(key=lambda f: (f.instance if f.instance is not None else 1 << 30, str(f.path), f.frame or 0))
        return [_record(uid, infos, frames)], []
    infos = _drop_localizers(infos, dropped)
    frames = [f for info in infos for f in info.frames]
    problem = stack_problem(frames)
    if problem is None:
        sort_along_normal(frames)
        return [_record(uid, infos, frames)], dropped
    split = None
    if problem.startswith("duplicate slice positions"):
        split = split_volumes(frames, lambda g: stack_problem(g) is None)
    if split is None:
        return [], dropped + [(i.path, problem) for i in infos]
    how, volumes = split
    chosen = set(select_volumes(volumes, policy))
    records = []
    used_files: set[Path] = set()
    for index, (name, members) in enumerate(volumes):
        if index not in chosen:
            continue
        members = list(members)
        sort_along_normal(members)
        files = {f.path for f in members}
        used_files |= files
        part = [i for i in infos if i.path in files]
        records.append(
            replace(
                _record(uid, part, members),
                series_hash=hash_id(f"{uid}|{name}"),
                volume=name,
                split_by=f"{how} ({len(volumes)} volumes)",
            )
        )
    reason = (
        f"multi-volume series split by {how} into {len(volumes)} volumes; this file's volume is not used "
        f"(data.volume={policy})"
    )
    dropped += [(i.path, reason) for i in infos if i.path not in used_files]
    return records, dropped


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
        manufacturer_raw=first_info.manufacturer_raw,
        model=first_info.model,
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
