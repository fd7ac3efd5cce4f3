"""Geometry of a series: slice normals, slice order, whether images form one stack, and affines.

Conventions, stated once: a series' array (:func:`client.discovery.read_series`) is ``(Z, Y, X)``
as stored, Z in increasing position along the slice normal (``ImagePositionPatient`` . normal of
``ImageOrientationPatient``, never InstanceNumber), Y down the rows (the column direction of
``ImageOrientationPatient``), X along a row: the array order SimpleITK's ``GetArrayFromImage``
gives for the same series. :func:`series_affine` maps voxel indices ``(x, y, z)`` to DICOM patient
coordinates (LPS, mm); :func:`ras_affine` to RAS, the canonical orientation of the training
samples (:mod:`client.dataset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.records import SeriesRecord

__all__ = [
    "LPS_TO_RAS",
    "Frame",
    "grid_problem",
    "ras_affine",
    "series_affine",
    "slice_normal",
    "sort_along_normal",
    "stack_problem",
]

#: LPS (DICOM patient coordinates) -> RAS, as a 4x4 affine.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Frame:
    """One 2D image of a file, as its header describes it."""

    path: Path
    frame: int | None
    """0-based frame (or mosaic tile) in the file; None for a single-image file."""
    rows: int
    columns: int
    spacing: tuple[float, float]
    """(row spacing, column spacing), mm."""
    iop: tuple[float, ...] | None
    """ImageOrientationPatient (row direction, column direction); None without patient geometry."""
    ipp: tuple[float, float, float] | None
    """ImagePositionPatient (LPS, mm); None without patient geometry."""
    instance: int | None
    keys: dict[str, str] = field(default_factory=dict)
    """Header values that tell the volumes of a multi-volume series apart (:mod:`client.volume_split`)."""


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """The slice normal of an ImageOrientationPatient: row direction x column direction."""
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    return np.cross(row, col)


def stack_problem(frames: Sequence[Frame], *, even: bool = False) -> str | None:
    """Why images with patient geometry do not form one stack, or None if they do.

    One stack: same Rows/Columns, orientation and pixel spacing; distinct positions along the
    normal; every image on the line through the first along the normal. With ``even`` the gaps
    must also be even (no slice missing): what a 3D task, which needs a regular grid, asks for;
    2D slice tasks take uneven gaps (:func:`grid_problem` tells them apart afterwards).
    """
    first = frames[0]
    assert first.iop is not None and first.ipp is not None
    for h in frames[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            return "slices differ in Rows/Columns"
        if not np.allclose(h.iop, first.iop, atol=1e-3):  # type: ignore[arg-type]
            return "slices differ in ImageOrientationPatient (mixed orientations, e.g. a localizer)"
        if not np.allclose(h.spacing, first.spacing, rtol=1e-3, atol=1e-4):
            return "slices differ in PixelSpacing"
    normal = slice_normal(first.iop)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        return "ImageOrientationPatient is not two orthogonal unit vectors"
    if len(frames) > 1:
        pos = np.sort([float(np.dot(h.ipp, normal)) for h in frames])  # type: ignore[arg-type]
        gaps = np.diff(pos)
        if np.any(gaps < 1e-3):
            return "duplicate slice positions (several echoes, time points or copies in one series)"
        if even:
            problem = _gap_problem(pos)
            if problem:
                return problem
        origin = np.asarray(first.ipp)
        tolerance = 0.1 * min(first.spacing)
        for h in frames[1:]:
            d = np.asarray(h.ipp) - origin
            if np.linalg.norm(d - np.dot(d, normal) * normal) > tolerance + 1e-3 * abs(float(np.dot(d, normal))):
                return "slices are not stacked along the slice normal (gantry tilt or shear); resample the series first"
    return None


def _gap_problem(positions: Sequence[float]) -> str | None:
    gaps = np.diff(np.sort(np.asarray(positions, dtype=float)))
    if len(gaps) and np.any(gaps > 1.5 * float(gaps.min())):  # the smallest gap is the stack's spacing
        return "missing slice(s): uneven gaps between slice positions"
    return None


def grid_problem(series: SeriesRecord) -> str | None:
    """Why a series' slices are not an even 3D grid (a slice missing, uneven gaps), or None.

    2D slice tasks use such series as they are; a 3D task (which resamples the stack as one grid)
    must reject them with this reason.
    """
    if series.kind != "volume" or len(series.slices) < 3:
        return None
    problem = _gap_problem([s.position for s in series.slices])
    return f"{problem}; a 3D task needs an even grid (2D slice tasks use the series)" if problem else None


def sort_along_normal(frames: list[Frame]) -> None:
    """Sort images with patient geometry in place by their position along the first image's slice normal."""
    normal = slice_normal(frames[0].iop)  # type: ignore[arg-type]
    frames.sort(key=lambda f: float(np.dot(f.ipp, normal)))  # type: ignore[arg-type]


def series_affine(series: SeriesRecord) -> np.ndarray:
    """The 4x4 affine from voxel indices ``(x, y, z)`` of the series' array to LPS mm.

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


def ras_affine(series: SeriesRecord) -> np.ndarray:
    """The 4x4 affine from voxel indices ``(x, y, z)`` of the series' array to RAS mm."""
    return LPS_TO_RAS @ series_affine(series)
