"""Segmentation masks of a site's series: NIfTI, NRRD or DICOM SEG, checked to lie on the image grid.

Where a series' mask is found, in the site's ``labels/`` folder:

* ``labels/<key>.nii.gz`` (or ``.nii``, ``.nrrd``), ``<key>`` being the series' SeriesInstanceUID
  (for a NIfTI/NRRD image volume: its file name stem);
* or any DICOM Segmentation (SEG) object in ``labels/`` (any file name) whose
  ReferencedSeriesSequence names the series; read with highdicom. A SEG must hold one segment
  (the lesion); it may omit empty frames.

A mask is accepted only if its voxels lie on the image's voxels: the same spacing and
orientation up to axis order and flips (a mask written in RAS or with its axes swapped is
re-indexed exactly, never interpolated) and an origin on the image grid. A NIfTI/NRRD mask must
cover the whole series; a SEG may cover some of its slices (the rest is background). Values must
be 0 and 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.dicom_header import quiet_dicom
from client.errors import DicomError
from client.geometry import series_affine
from client.layout import LABELS_DIR
from client.records import SeriesRecord
from client.volumes import VOLUME_SUFFIXES, image_affine, volume_stem

__all__ = ["SEG_SOP_CLASS", "MaskIndex", "index_masks", "place_on_grid", "read_mask"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

# Rounding tolerances: direction cosines and spacing ratios, and voxel offsets.
_AXIS_TOL = 1e-3
_VOXEL_TOL = 2e-2


@dataclass
class MaskIndex:
    """The mask files of a site's ``labels/`` folder, by the key of the series they label."""

    by_key: dict[str, list[Path]] = field(default_factory=dict)
    """Series key (SeriesInstanceUID or volume stem) -> mask files; site-local, never logged."""
    problems: list[tuple[Path, str]] = field(default_factory=list)
    """Files of ``labels/`` that are not masks, with the reason."""
    files_total: int = 0

    def masks_for(self, series: SeriesRecord) -> list[Path]:
        """The mask files that name this series."""
        return self.by_key.get(series.label_key, [])


def index_masks(labels_dir: Path) -> MaskIndex:
    """Find the masks in ``labels_dir`` (from file names and SEG headers only).

    Args:
        labels_dir: The site's ``labels/`` folder; a missing folder gives an empty index.

    Returns:
        The index; unreadable files and non-SEG DICOM files are listed in ``problems``.
    """
    import pydicom

    index = MaskIndex()
    if not labels_dir.is_dir():
        return index
    for path in sorted(p for p in labels_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        index.files_total += 1
        if path.name.lower().endswith(VOLUME_SUFFIXES):
            index.by_key.setdefault(volume_stem(path), []).append(path)
            continue
        try:
            with quiet_dicom():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                sop = str(ds.get("SOPClassUID", ""))
                refs = [
                    str(item.SeriesInstanceUID)
                    for item in ds.get("ReferencedSeriesSequence", [])
                    if "SeriesInstanceUID" in item
                ]
        except Exception:
            index.problems.append(
                (path, "not a mask: neither NIfTI/NRRD (.nii.gz, .nii, .nrrd) nor a readable DICOM SEG")
            )
            continue
        if sop != SEG_SOP_CLASS:
            index.problems.append((path, f"DICOM file in {LABELS_DIR}/ that is not a Segmentation (SEG)"))
            continue
        if not refs:
            index.problems.append(
                (path, "DICOM SEG without ReferencedSeriesSequence: it does not say which series it labels")
            )
            continue
        for uid in dict.fromkeys(refs):
            index.by_key.setdefault(uid, []).append(path)
    return index


def place_on_grid(
    mask_xyz: np.ndarray,
    mask_affine: np.ndarray,
    image_affine_: np.ndarray,
    image_shape_xyz: tuple[int, int, int],
    *,
    partial: bool,
) -> np.ndarray:
    """Re-index a mask onto an image grid, exactly (axis swaps and flips only).

    Args:
        mask_xyz: The mask, indexed ``(x, y, z)``.
        mask_affine: Its 4x4 affine from ``(x, y, z)`` to patient mm.
        image_affine_: The image's 4x4 affine (same patient coordinates).
        image_shape_xyz: The image's size ``(x, y, z)``.
        partial: Allow the mask to cover part of the image (the rest is 0).

    Returns:
        The mask on the image grid, indexed ``(x, y, z)``.

    Raises:
        DicomError: If the mask's voxels are not the image's voxels, naming the difference.
    """
    m = np.linalg.inv(image_affine_) @ mask_affine
    rot, shift = m[:3, :3], m[:3, 3]
    perm = np.round(rot)
    if (
        not np.allclose(rot, perm, atol=_AXIS_TOL)
        or sorted(np.abs(perm).sum(axis=0).tolist()) != [1, 1, 1]
        or sorted(np.abs(perm).sum(axis=1).tolist()) != [1, 1, 1]
    ):
        raise DicomError(
            "mask grid differs from the image's (other spacing or orientation); write the mask on the image's grid"
        )
    if not np.allclose(shift, np.round(shift), atol=_VOXEL_TOL):
        raise DicomError("mask voxels are shifted against the image's voxels (origin off the image grid)")
    out = np.zeros(image_shape_xyz, dtype=mask_xyz.dtype)
    axes = [int(np.argmax(np.abs(perm[j]))) for j in range(3)]
    signs = [int(perm[j, axes[j]]) for j in range(3)]
    moved = np.transpose(mask_xyz, axes)
    starts = []
    for j in range(3):
        n = moved.shape[j]
        if signs[j] < 0:
            moved = np.flip(moved, axis=j)
            start = round(shift[j]) - (n - 1)
        else:
            start = round(shift[j])
        if start < 0 or start + n > image_shape_xyz[j]:
            raise DicomError(
                f"mask extends beyond the image (axis {'xyz'[j]}: "
                f"voxels {start}..{start + n - 1} of 0..{image_shape_xyz[j] - 1})"
            )
        starts.append(start)
    if not partial and (any(starts) or moved.shape != tuple(image_shape_xyz)):
        raise DicomError(
            f"mask size {moved.shape[::-1]} does not match the series {tuple(image_shape_xyz)[::-1]} (Z, Y, X)"
        )
    out[
        starts[0] : starts[0] + moved.shape[0],
        starts[1] : starts[1] + moved.shape[1],
        starts[2] : starts[2] + moved.shape[2],
    ] = moved
    return out


def _binary(arr: np.ndarray) -> np.ndarray:
    values = np.unique(arr)
    if not set(values.tolist()) <= {0, 1}:
        raise DicomError(
            f"mask holds values other than 0 and 1 ({values[:5].tolist()}); the task reads binary lesion masks"
        )
    return arr.astype(np.uint8)


def _one_slice_fix(mask_affine: np.ndarray, image_aff: np.ndarray, mask_nz: int, image_nz: int) -> np.ndarray:
    """For one-slice image and mask, the slice spacing is not defined: use the image's."""
    if mask_nz == 1 and image_nz == 1:
        mask_affine = mask_affine.copy()
        mask_affine[:3, 2] = image_aff[:3, 2]
    return mask_affine


def _read_volume_mask(
    path: Path, series: SeriesRecord, image_aff: np.ndarray, shape_xyz: tuple[int, int, int]
) -> np.ndarray:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise DicomError("mask file cannot be read (damaged, or not NIfTI/NRRD)") from None
    if img.GetDimension() not in (2, 3) or img.GetNumberOfComponentsPerPixel() != 1:
        raise DicomError("mask is not a 2-D or 3-D scalar image")
    affine, size = image_affine(img)
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 2:
        arr = arr[None]
    mask_xyz = _binary(arr).transpose(2, 1, 0)
    affine = _one_slice_fix(affine, image_aff, size[2], shape_xyz[2])
    return place_on_grid(mask_xyz, affine, image_aff, shape_xyz, partial=False)


def _read_seg_mask(
    path: Path, series: SeriesRecord, image_aff: np.ndarray, shape_xyz: tuple[int, int, int]
) -> np.ndarray:
    import highdicom as hd

    try:
        with quiet_dicom():
            seg = hd.seg.segread(str(path))
            n = int(seg.number_of_segments)
            if n != 1:
                raise DicomError(
                    f"DICOM SEG holds {n} segments; the task reads one lesion segment per series (split it)"
                )
            volume = seg.get_volume(combine_segments=True)
    except DicomError:
        raise
    except Exception as exc:
        raise DicomError(
            f"DICOM SEG cannot be read as a volume ({type(exc).__name__}); its frames may not form a regular grid"
        ) from None
    arr = np.asarray(volume.array)  # (slices, rows, columns)
    affine = np.asarray(volume.affine, dtype=float)[:, [2, 1, 0, 3]]  # -> (x, y, z) index order
    mask_xyz = _binary(arr).transpose(2, 1, 0)
    affine = _one_slice_fix(affine, image_aff, mask_xyz.shape[2], shape_xyz[2])
    return place_on_grid(mask_xyz, affine, image_aff, shape_xyz, partial=True)


def read_mask(path: Path, series: SeriesRecord, shape: tuple[int, int, int]) -> np.ndarray:
    """Read a series' mask and put it on the series' grid.

    Args:
        path: A NIfTI/NRRD file or a DICOM SEG.
        series: The series it labels.
        shape: The series' ``(Z, Y, X)`` shape (from :func:`client.discovery.read_series`).

    Returns:
        A ``(Z, Y, X)`` uint8 array of 0 and 1, voxel for voxel on the series.

    Raises:
        DicomError: If the file cannot be read or does not lie on the series' grid (the message
            says what differs).
    """
    image_aff = series_affine(series)
    shape_xyz = (shape[2], shape[1], shape[0])
    if series.kind == "projection":
        # No patient coordinates to compare: the mask must have the image's size.
        if not path.name.lower().endswith(VOLUME_SUFFIXES):
            raise DicomError(
                "a DICOM SEG needs an image with patient geometry; give projection images NIfTI/NRRD masks"
            )
        try:
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except RuntimeError:
            raise DicomError("mask file cannot be read (damaged, or not NIfTI/NRRD)") from None
        arr = arr[None] if arr.ndim == 2 else arr
        if arr.shape != tuple(shape):
            raise DicomError(f"mask size {arr.shape} does not match the images {tuple(shape)} (Z, Y, X)")
        return _binary(arr)
    if path.name.lower().endswith(VOLUME_SUFFIXES):
        mask_xyz = _read_volume_mask(path, series, image_aff, shape_xyz)
    else:
        mask_xyz = _read_seg_mask(path, series, image_aff, shape_xyz)
    return np.ascontiguousarray(mask_xyz.transpose(2, 1, 0))
