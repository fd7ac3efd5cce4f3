"""Discovery: every file under a folder given to the first reader that can read it; series from headers only.

Discovery (:func:`scan_images`, :func:`discover_series`) walks a folder tree (hidden files and
folders too) and gives each file to the first reader of :func:`default_readers` whose
``can_read`` says yes: NIfTI/NRRD volumes (``.nii``, ``.nii.gz``, ``.nrrd``;
:class:`~client.volumes.VolumeReader`, one series per file), else DICOM
(:class:`~client.dicom.DicomReader`). Each reader reads its files' headers and forms its series
(:mod:`client.reader` describes the seam). Every file is either used or rejected with a reason.
Identifying values are never put into a reason or a public field: patients and series are named
by salted hashes, and a reported path has every part that contains a patient value seen in a
header replaced by its hash (:class:`~client.phi.PathRedactor`).

:func:`read_series` decodes a series with the reader that found it. Nothing here leaves the site.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from client.dicom import DicomReader
from client.errors import DicomError
from client.phi import PathRedactor
from client.reader import FileHeader, ImageReader
from client.records import Rejection, Scan, SeriesRecord
from client.volumes import VolumeReader

__all__ = ["default_readers", "discover_series", "read_series", "read_usable", "scan_images"]


def default_readers(*, sop_classes: dict[str, str] | None = None, volume: str = "first") -> tuple[ImageReader, ...]:
    """The readers discovery tries, in order: NIfTI/NRRD volumes by name, then DICOM (any other file).

    Args:
        sop_classes: For the DICOM reader: SOP class UID -> ``"volume"`` or ``"projection"``;
            default :data:`client.dicom_header.IMAGE_SOP_CLASSES`.
        volume: The ``data.volume`` policy for multi-volume series (:mod:`client.volume_split`).
    """
    return (VolumeReader(), DicomReader(sop_classes, volume=volume))


def _iter_files(root: Path, skip: set[str]) -> Iterator[Path]:
    """Every file under ``root`` (hidden ones too), except the top-level names in ``skip``."""
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if not (top and d in skip))
        for name in sorted(filenames):
            if top and name in skip:
                continue
            yield Path(dirpath) / name


def scan_images(
    root: Path,
    *,
    modalities: Iterable[str] | None = None,
    sop_classes: dict[str, str] | None = None,
    skip: Iterable[str] = (),
    relative_to: Path | None = None,
    readers: Sequence[ImageReader] | None = None,
    volume: str = "first",
) -> Scan:
    """Index the images under ``root`` from headers only; every file is used or rejected.

    Args:
        root: The folder to walk (hidden files and folders too: every file is counted).
        modalities: Keep only DICOM series of these Modality values, e.g. ``("MR",)``; ``None``
            keeps all. NIfTI/NRRD volumes have no modality and are always kept.
        sop_classes: SOP class UID -> ``"volume"`` or ``"projection"``; default
            :data:`client.dicom_header.IMAGE_SOP_CLASSES`.
        skip: Names of top-level files or folders of ``root`` not to walk (e.g. ``"labels"``).
        relative_to: Report paths relative to this folder (default ``root``).
        readers: The readers to try, in order; default :func:`default_readers`.
        volume: The ``data.volume`` policy of the default readers.

    Returns:
        The usable series (sorted by hash, so splits are deterministic), the rejected files with
        their reasons (paths redacted), the number of files seen and the path redactor.

    Raises:
        DicomError: If ``root`` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise DicomError(f"image folder {root} does not exist or is not a folder")
    base = Path(relative_to) if relative_to is not None else root
    wanted = None if modalities is None else {m.upper() for m in modalities}
    readers = default_readers(sop_classes=sop_classes, volume=volume) if readers is None else tuple(readers)
    redactor = PathRedactor()
    raw_rejected: list[tuple[Path, str]] = []
    headers: dict[int, list[FileHeader]] = {i: [] for i in range(len(readers))}
    files_total = 0

    def rel(path: Path) -> str:
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            return path.name

    for path in _iter_files(root, set(skip)):
        files_total += 1
        index = next((i for i, r in enumerate(readers) if r.can_read(path)), None)
        if index is None:
            raw_rejected.append((path, "no reader for this file (not DICOM, NIfTI or NRRD)"))
            continue
        try:
            header = readers[index].read_header(path, rel=rel(path))
        except DicomError as exc:
            hidden = " (a hidden file: its name starts with a dot)" if path.name.startswith(".") else ""
            raw_rejected.append((path, f"{exc}{hidden}"))
            continue
        except Exception as exc:
            raw_rejected.append((path, f"unexpected error while reading the header ({type(exc).__name__})"))
            continue
        redactor.add(header.identifiers)
        if wanted is not None and header.modality is not None and header.modality.upper() not in wanted:
            raw_rejected.append(
                (path, f"modality {header.modality} not used by this task (wants {', '.join(sorted(wanted))})")
            )
            continue
        headers[index].append(header)

    series: list[SeriesRecord] = []
    for index, reader in enumerate(readers):
        found, problems = reader.series(headers[index])
        series.extend(found)
        raw_rejected.extend(problems)
    series = [replace(s, first_file=redactor.redact(rel(s.slices[0].path))) for s in series]
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
        sop_classes: SOP class UID -> kind; default :data:`client.dicom_header.IMAGE_SOP_CLASSES`.
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


def read_series(series: SeriesRecord, *, readers: Sequence[ImageReader] | None = None) -> np.ndarray:
    """Decode a series' pixels with the reader of its kind.

    Args:
        series: A record from :func:`discover_series`.
        readers: The readers to choose from; default :func:`default_readers`.

    Returns:
        A ``(Z, Y, X)`` float32 volume, slices in position order (:mod:`client.geometry`): modality
        units (RescaleSlope/Intercept or Modality LUT applied, MONOCHROME1 inverted to MONOCHROME2),
        or display values ``0..1`` for display-referred images with a VOI (:mod:`client.dicom_pixels`).

    Raises:
        DicomError: If a slice's pixel data cannot be decoded or has the wrong shape; its
            ``file`` attribute names the file.
    """
    for reader in default_readers() if readers is None else readers:
        if series.kind in reader.kinds:
            return reader.read(series)
    raise DicomError(f"series {series.series_hash}: no reader decodes series of kind {series.kind!r}")


def read_usable(
    series: SeriesRecord, *, readers: Sequence[ImageReader] | None = None
) -> tuple[np.ndarray, SeriesRecord, list[tuple[Path, str]]]:
    """Decode what can be decoded of a series: damaged files are dropped, each named with its own reason.

    Returns:
        ``(array, series of the decoded slices, [(file, reason) for each dropped file])``; the array
        is empty along Z when no file decodes.
    """
    for reader in default_readers() if readers is None else readers:
        if series.kind in reader.kinds:
            return reader.read_usable(series)
    raise DicomError(f"series {series.series_hash}: no reader decodes series of kind {series.kind!r}")
