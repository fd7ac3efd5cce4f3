"""DICOM pixel decoding: stored pixels to values, the way the modality and a viewer mean them.

Every transfer syntax pydicom decodes with the installed plugins (implicit/explicit little
endian, big endian, deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000);
BitsStored masking and signed PixelRepresentation (pydicom); then

* volume classes (CT, MR, PET): RescaleSlope/RescaleIntercept or the Modality LUT, per frame
  for enhanced objects, so CT is in HU; MONOCHROME1 is inverted inside the stored range first;
* projection classes (CR, DX, MG, ...): the same, and for display-referred modalities
  (:data:`DISPLAY_REFERRED`) with a VOI LUT or window, that VOI (first window) scaled to
  ``0..1``, MONOCHROME1 inverted after it, as a viewer shows the image.

A Siemens mosaic is cut into its tiles; frames are taken in the record's slice order.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from client.dicom_header import finite, frame_count, functional_group, quiet_dicom, read_dataset
from client.errors import DicomError
from client.phi import identifiers, scrub
from client.records import SeriesRecord, SliceRef

__all__ = ["DISPLAY_REFERRED", "decode_series", "decode_usable"]

#: Modalities whose pixel values are meant for display: their VOI LUT or window is applied.
DISPLAY_REFERRED: tuple[str, ...] = ("CR", "DX", "MG", "IO", "PX", "RF", "XA")


def _rescale(ds: Dataset, frame: int | None) -> tuple[float, float]:
    """(slope, intercept) of a frame: per-frame or shared functional groups, else the top level."""
    item = functional_group(ds, frame or 0, "PixelValueTransformationSequence")
    source = item if item is not None else ds
    slope = source.get("RescaleSlope", 1.0)
    intercept = source.get("RescaleIntercept", 0.0)
    slope = 1.0 if slope in (None, "") else finite(slope)
    intercept = 0.0 if intercept in (None, "") else finite(intercept)
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
    ds = read_dataset(path, pixels=True)
    ids = identifiers(ds)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DicomError(
            f"pixel data cannot be decoded ({type(exc).__name__}: {scrub(str(exc), ids)})", file=path
        ) from None
    n_frames = frame_count(ds)
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


def decode_series(series: SeriesRecord) -> np.ndarray:
    """Decode a DICOM series' pixels as a ``(Z, Y, X)`` float32 array in the record's slice order.

    Returns:
        Modality units (RescaleSlope/Intercept or Modality LUT applied, MONOCHROME1 inverted to
        MONOCHROME2), or display values ``0..1`` for display-referred images with a VOI.

    Raises:
        DicomError: If a file's pixel data cannot be decoded or has the wrong shape; its ``file``
            attribute names the file.
    """
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
                    f"series {series.series_hash}: pixel data cannot be read ({type(exc).__name__}); "
                    "the file is damaged",
                    file=path,
                ) from None
    return out


def decode_usable(series: SeriesRecord) -> tuple[np.ndarray, SeriesRecord, list[tuple[Path, str]]]:
    """Decode a DICOM series' pixels, dropping the files that cannot be decoded.

    Returns:
        ``(array, series of the decoded slices, [(file, reason) for each file that failed]``: every
        damaged file is named with its own reason; the rest of the series is used (a 2D slice task
        does not need the missing slices; :func:`client.geometry.grid_problem` says when a 3D task would).
    """
    out = np.empty((len(series.slices), series.rows, series.columns), dtype=np.float32)
    by_file: dict[Path, list[tuple[int, SliceRef]]] = {}
    for i, ref in enumerate(series.slices):
        by_file.setdefault(ref.path, []).append((i, ref))
    failed: list[tuple[Path, str]] = []
    with quiet_dicom():
        for path, items in by_file.items():
            try:
                _decode_file(path, series, items, out)
            except DicomError as exc:
                failed.append((path, f"series {series.series_hash}: {exc}"))
            except Exception as exc:
                failed.append(
                    (
                        path,
                        f"series {series.series_hash}: pixel data cannot be read ({type(exc).__name__}); "
                        "the file is damaged",
                    )
                )
    if not failed:
        return out, series, []
    bad = {path for path, _ in failed}
    keep = [i for i, ref in enumerate(series.slices) if ref.path not in bad]
    return out[keep], replace(series, slices=tuple(series.slices[i] for i in keep)), failed
