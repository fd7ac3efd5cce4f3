"""The NIfTI/NRRD reader: image volumes as series (sites often hold converted data). Read with SimpleITK.

A volume file (``.nii``, ``.nii.gz``, ``.nrrd``) anywhere in the site's image folders is one
series. Its geometry comes from the file (SimpleITK reports it in LPS, like DICOM), so it goes
through the same canonical orientation as a DICOM series. A volume carries no patient identity:
each file counts as one patient (its file name without the suffix); its mask in ``labels/`` has
the same file name stem (``images/case01.nii.gz`` -> ``labels/case01.nii.gz``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.errors import DicomError
from client.phi import hash_id
from client.reader import FileHeader, ImageReader
from client.records import SeriesRecord, SliceRef

__all__ = [
    "VOLUME_SUFFIXES",
    "VolumeReader",
    "image_affine",
    "is_volume_file",
    "read_volume",
    "read_volume_header",
    "volume_stem",
]

#: File name endings read as image volumes with SimpleITK.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd")

# ITK prints warnings (with file paths, which may hold patient names) straight to stderr.
sitk.ProcessObject.SetGlobalWarningDisplay(False)


def is_volume_file(path: Path) -> bool:
    """Whether ``path`` is named like a NIfTI or NRRD volume."""
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def volume_stem(path: Path | str) -> str:
    """The file name without its volume suffix: ``case01.nii.gz`` -> ``case01``."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _geometry(
    size: tuple[int, ...], spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]
):
    """3-D (size, spacing, origin, direction 3x3) of a 2-D or 3-D image."""
    if len(size) == 2:
        d = np.eye(3)
        d[:2, :2] = np.asarray(direction, dtype=float).reshape(2, 2)
        return (size[0], size[1], 1), (spacing[0], spacing[1], 1.0), (origin[0], origin[1], 0.0), d
    return tuple(size), tuple(spacing), tuple(origin), np.asarray(direction, dtype=float).reshape(3, 3)


def image_affine(img_or_reader) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(4x4 affine from voxel indices ``(x, y, z)`` to LPS mm, size ``(x, y, z)``) of a SimpleITK image."""
    size, spacing, origin, d = _geometry(
        img_or_reader.GetSize(), img_or_reader.GetSpacing(), img_or_reader.GetOrigin(), img_or_reader.GetDirection()
    )
    affine = np.eye(4)
    affine[:3, :3] = d * np.asarray(spacing, dtype=float)[None, :]
    affine[:3, 3] = origin
    return affine, size  # type: ignore[return-value]


def read_volume_header(path: Path, rel: str) -> SeriesRecord:
    """A volume file's series record, from its header only.

    Args:
        path: The file.
        rel: Its path relative to the site folder (the record's ``first_file`` before redaction).

    Returns:
        A record with ``kind == "file"``, slices in increasing position along the slice normal.

    Raises:
        DicomError: If the file cannot be read, is not a 2-D/3-D scalar image, or its grid is sheared.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DicomError("volume file cannot be read (damaged, or not NIfTI/NRRD despite its name)") from None
    dim = reader.GetDimension()
    if dim not in (2, 3):
        raise DicomError(f"{dim}-D volume (time series or several channels); the task reads 2-D or 3-D volumes")
    if reader.GetNumberOfComponents() != 1:
        raise DicomError(
            f"volume with {reader.GetNumberOfComponents()} components per voxel (colour or vector); "
            "the task reads scalar images"
        )
    size, spacing, origin, d = _geometry(
        reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    )
    if min(size) < 1 or min(spacing) <= 0:
        raise DicomError("volume with an empty size or a non-positive spacing")
    row_dir, col_dir, slice_dir = d[:, 0], d[:, 1], d[:, 2]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3) or abs(float(np.dot(slice_dir, normal))) < 0.999:
        raise DicomError(
            "volume grid is sheared or its directions are not orthonormal; resample it to an orthogonal grid"
        )
    ipps = [np.asarray(origin) + k * spacing[2] * slice_dir for k in range(size[2])]
    refs = sorted(
        (SliceRef(path, float(np.dot(p, normal)), None, k, tuple(float(v) for v in p)) for k, p in enumerate(ipps)),  # type: ignore[arg-type]
        key=lambda s: s.position,
    )
    stem = volume_stem(path)
    kind = "NRRD volume" if path.name.lower().endswith(".nrrd") else "NIfTI volume"
    uid = f"file:{rel}"
    return SeriesRecord(
        series_hash=hash_id(uid),
        series_uid=uid,
        patient_hash=hash_id(f"file:{stem}"),
        modality="OT",
        manufacturer="unknown",
        rows=int(size[1]),
        columns=int(size[0]),
        pixel_spacing=(float(spacing[1]), float(spacing[0])),
        orientation=tuple(float(v) for v in (*row_dir, *col_dir)),
        slices=tuple(refs),
        kind="file",
        sop_class=kind,
        transfer_syntaxes=(kind,),
        thickness=float(spacing[2]),
        first_file=rel,
        label_key=stem,
    )


def read_volume(series: SeriesRecord) -> np.ndarray:
    """Decode a volume file's voxels as a ``(Z, Y, X)`` float32 array in the record's slice order.

    Raises:
        DicomError: If the file cannot be read or no longer matches its header.
    """
    path = series.slices[0].path
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise DicomError(f"series {series.series_hash}: volume file cannot be read (damaged)", file=path) from None
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[1:] != (series.rows, series.columns) or arr.shape[0] < len(series.slices):
        raise DicomError(
            f"series {series.series_hash}: volume has shape {arr.shape}, its header said otherwise", file=path
        )
    out = arr[[s.frame or 0 for s in series.slices]].astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise DicomError(f"series {series.series_hash}: volume holds NaN or infinite values", file=path)
    return out


class VolumeReader(ImageReader):
    """NIfTI and NRRD volume files (by name: :data:`VOLUME_SUFFIXES`); each file is one series."""

    name = "volume"
    kinds = ("file",)

    def can_read(self, path: Path) -> bool:
        """Whether ``path`` is named like a NIfTI or NRRD volume."""
        return is_volume_file(path)

    def read_header(self, path: Path, *, rel: str) -> FileHeader:
        """The file's series record (:func:`read_volume_header`); a volume has no modality to filter on."""
        return FileHeader(path=path, rel=rel, modality=None, facts=read_volume_header(path, rel))

    def series(self, headers: list[FileHeader]) -> tuple[list[SeriesRecord], list[tuple[Path, str]]]:
        """One series per file, as its header gave it."""
        return [h.facts for h in headers], []

    def read(self, series: SeriesRecord) -> np.ndarray:
        """The file's voxels (:func:`read_volume`)."""
        return read_volume(series)
