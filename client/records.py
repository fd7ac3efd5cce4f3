"""What discovery finds: series records, their slices, rejected files, and the scan of a folder.

Plain data, no reading: every reader (:mod:`client.dicom`, :mod:`client.volumes`) fills these in,
and everything downstream (samples, masks, labels, the site check) reads them. No field holds a
patient value except :attr:`SeriesRecord.series_uid` (kept at the site to find the series' mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from client.phi import PathRedactor

__all__ = ["Rejection", "Scan", "SeriesRecord", "SliceRef"]


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
    ``"file"`` (a NIfTI/NRRD volume). The reader that found the series reads its pixels."""
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
    volume: str = ""
    """For one volume of a multi-volume series: its name, e.g. ``"b-value 1000, direction 0/0/1"``."""
    split_by: str = ""
    """For one volume of a multi-volume series: how the series was split, e.g. ``"echo (3 volumes)"``."""
    manufacturer_raw: str = ""
    """The Manufacturer as the header spells it (:attr:`manufacturer` is normalised for grouping)."""
    model: str = ""
    """The ManufacturerModelName, normalised for grouping."""

    @property
    def slice_spacing(self) -> float:
        """Distance between consecutive slice centres, mm (median gap; the thickness for one slice)."""
        if len(self.slices) < 2:
            return float(self.thickness) if self.thickness else 1.0
        gaps = np.diff([s.position for s in self.slices])
        return float(np.median(gaps))

    @property
    def origin(self) -> tuple[float, float, float]:
        """ImagePositionPatient of the first slice (lowest position along the normal); zeros for
        images without patient coordinates (projection series)."""
        first = self.slices[0]
        return first.ipp if first.ipp is not None else (0.0, 0.0, 0.0)

    @property
    def files(self) -> tuple[Path, ...]:
        """The distinct files of the series, in slice order."""
        return tuple(dict.fromkeys(s.path for s in self.slices))


@dataclass
class Scan:
    """Everything :func:`client.discovery.scan_images` found under a folder."""

    series: list[SeriesRecord]
    rejected: list[Rejection]
    files_total: int
    redactor: PathRedactor
