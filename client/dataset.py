"""A site's folder -> training and validation samples, split by patient.

Site folder layout (what ``fedsite data synth`` writes and what a site prepares)::

    <site>/dicom/...                       DICOM files, any folder structure
    <site>/labels/<SeriesInstanceUID>.nii.gz   lesion mask (0/1) on the series' grid
    <site>/site.json                       optional; {"name": ...} sets the site's public name

Every slice of a labelled series becomes one sample dict ``{"image", "label", "patient",
"series", "slice"}`` where patient and series are hashes. Samples go through one MONAI
dictionary pipeline: resample to ``data.spacing-mm`` (image bilinear, label nearest), pad or
crop to ``data.image-size``, scale the image's 1st..99th percentile to 0..1.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, ResizeWithPadOrCropd, ScaleIntensityRangePercentilesd, Spacingd

from client.cache import cached
from client.dicom import DicomError, Rejection, SeriesRecord, discover_series, read_series
from common.config import DataConfig

__all__ = ["SiteData", "load_site", "split_by_patient", "site_name_of", "sample_pipeline"]

log = logging.getLogger("fedsite.client")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class SiteData:
    """A site's samples, ready to train on, and what was left out."""

    name: str
    train: list[dict] = field(repr=False)
    val: list[dict] = field(repr=False)
    train_patients: int
    val_patients: int
    series_used: int
    rejected: list[Rejection] = field(repr=False)


def site_name_of(site_dir: Path) -> str:
    """The site's public name: ``name`` in ``site.json`` if valid, else the folder name."""
    meta = site_dir / "site.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("name")
            if isinstance(name, str) and _SAFE_NAME.match(name):
                return name
        except (OSError, ValueError):
            log.warning("site.json in the site folder is not valid JSON; using the folder name")
    return site_dir.name


def split_by_patient(patients: list[str], *, val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Split patient keys into train and validation sets; no patient is on both sides.

    Args:
        patients: Patient keys (hashes); duplicates are ignored.
        val_fraction: Share of patients for validation; at least one when there are two or more.
        seed: Makes the split repeatable.

    Returns:
        ``(train, val)`` sets of patient keys.

    Raises:
        DicomError: With fewer than two patients (nothing to validate on).
    """
    unique = sorted(set(patients))
    if len(unique) < 2:
        raise DicomError(f"the site has {len(unique)} labelled patient(s); at least 2 are needed to split train/validation")
    rng = random.Random(seed)
    rng.shuffle(unique)
    n_val = min(max(1, math.ceil(val_fraction * len(unique))), len(unique) - 1)
    return set(unique[n_val:]), set(unique[:n_val])


def sample_pipeline(cfg: DataConfig) -> Compose:
    """The MONAI dictionary pipeline applied to every slice sample."""
    keys = ["image", "label"]
    return Compose(
        [
            Spacingd(keys=keys, pixdim=(cfg.spacing_mm, cfg.spacing_mm), mode=("bilinear", "nearest")),
            ResizeWithPadOrCropd(keys=keys, spatial_size=(cfg.image_size, cfg.image_size)),
            ScaleIntensityRangePercentilesd(keys="image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True),
            EnsureTyped(keys=keys, data_type="tensor", track_meta=False),
        ]
    )


def _read_mask(path: Path, series: SeriesRecord, shape: tuple[int, int, int]) -> np.ndarray:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise DicomError("mask file cannot be read") from None
    size = img.GetSize()  # (X, Y, Z)
    if (size[2], size[1], size[0]) != shape:
        raise DicomError(f"mask size {size[::-1]} does not match the series {shape}")
    want_spacing = (series.pixel_spacing[1], series.pixel_spacing[0], series.slice_spacing)
    if not np.allclose(img.GetSpacing(), want_spacing, rtol=1e-3, atol=1e-3):
        raise DicomError("mask spacing does not match the series")
    if not np.allclose(img.GetOrigin(), series.origin, atol=1e-2):
        raise DicomError("mask origin does not match the series' first slice")
    arr = sitk.GetArrayFromImage(img)
    values = np.unique(arr)
    if not set(values.tolist()) <= {0, 1}:
        raise DicomError(f"mask holds values other than 0 and 1 ({values[:5].tolist()})")
    return arr.astype(np.uint8)


PIPELINE_VERSION = 1
"""Bump when the sample pipeline changes: it invalidates every site's sample cache."""


def _read_samples(site_dir: Path, cfg: DataConfig) -> dict:
    """Decode and preprocess every labelled series of the site (the slow, cached part)."""
    dicom_dir = site_dir / "dicom" if (site_dir / "dicom").is_dir() else site_dir
    series, rejected = discover_series(dicom_dir)
    labels_dir = site_dir / "labels"
    pipeline = sample_pipeline(cfg)
    samples: list[dict] = []
    used = 0
    for s in series:
        first = str(s.slices[0].path.relative_to(dicom_dir))
        mask_path = labels_dir / f"{s.series_uid}.nii.gz"
        if not mask_path.is_file():
            rejected.append(Rejection(first, f"series {s.series_hash}: no mask in labels/ for this series"))
            continue
        try:
            volume = read_series(s)
            mask = _read_mask(mask_path, s, volume.shape)
        except DicomError as exc:
            rejected.append(Rejection(first, f"series {s.series_hash}: {exc}"))
            continue
        used += 1
        affine = torch.diag(torch.tensor([s.pixel_spacing[0], s.pixel_spacing[1], 1.0], dtype=torch.float64))
        for z in range(volume.shape[0]):
            item = {
                "image": MetaTensor(torch.from_numpy(volume[z][None].copy()), affine=affine),
                "label": MetaTensor(torch.from_numpy(mask[z][None].astype(np.float32)), affine=affine),
            }
            out = pipeline(item)
            samples.append(
                {
                    "image": out["image"].float().contiguous(),
                    "label": out["label"].round().to(torch.uint8).contiguous(),
                    "patient": s.patient_hash,
                    "series": s.series_hash,
                    "slice": z,
                }
            )
    return {
        "samples": samples,
        "rejected": [{"file": r.file, "reason": r.reason} for r in rejected],
        "series_found": len(series),
        "series_used": used,
    }


def load_site(site_dir: Path, cfg: DataConfig, *, seed: int, use_cache: bool = True) -> SiteData:
    """Read a site's labelled DICOM series and make its train/validation samples.

    Decoded samples are cached on the site's disk (:mod:`client.cache`), so only the first call
    for a given set of files and settings decodes DICOM.

    Args:
        site_dir: The site folder (see the module docstring for its layout).
        cfg: The ``data.*`` group of the run config.
        seed: The run seed; the patient split depends on it and the site's name.
        use_cache: Read and write the site's sample cache.

    Returns:
        The site's samples, split by patient.

    Raises:
        DicomError: If the folder has no usable labelled series or fewer than two patients.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DicomError(f"site folder {site_dir} does not exist")
    name = site_name_of(site_dir)
    settings = {"pipeline": PIPELINE_VERSION, "image_size": cfg.image_size, "spacing_mm": cfg.spacing_mm}
    if use_cache:
        read = cached(site_dir, name="samples", settings=settings, build=lambda: _read_samples(site_dir, cfg))
    else:
        read = _read_samples(site_dir, cfg)
    samples = read["samples"]
    rejected = [Rejection(r["file"], r["reason"]) for r in read["rejected"]]
    if not samples:
        raise DicomError(
            f"site folder {site_dir} has no usable labelled series ({read['series_found']} series found, "
            f"{len(rejected)} files or series rejected); run `fedsite site check {site_dir}` for the reasons"
        )
    site_seed = seed ^ int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
    train_p, val_p = split_by_patient([s["patient"] for s in samples], val_fraction=cfg.val_fraction, seed=site_seed)
    return SiteData(
        name=name,
        train=[s for s in samples if s["patient"] in train_p],
        val=[s for s in samples if s["patient"] in val_p],
        train_patients=len(train_p),
        val_patients=len(val_p),
        series_used=read["series_used"],
        rejected=rejected,
    )
