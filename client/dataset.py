"""A site's folder -> training and validation samples, split by patient.

Site folder layout (what ``fedsite data synth`` writes and what a site prepares)::

    <site>/dicom/...                       DICOM files, any folder structure; NIfTI/NRRD image
                                           volumes (.nii.gz, .nii, .nrrd) are read too
    <site>/labels/<SeriesInstanceUID>.nii.gz   lesion mask (0/1) on the series' grid (or .nii,
                                           .nrrd, or a DICOM SEG with any name; see client.masks)
    <site>/site.json                       optional; {"name": ...} sets the site's public name
    <site>/labels.csv                      classification: one class name per PatientID, study or
                                           series (see client.labels); replaces labels/

Everything in the site folder except ``labels/``, ``site.json``, ``labels.csv`` and the cache
(:data:`client.layout.RESERVED`) is searched for images, so images may also live in ``<site>/images/``.

Every slice of a labelled series becomes one sample dict ``{"image", "label", "patient",
"series", "slice"}`` where patient and series are hashes; ``label`` is the slice's mask
(segmentation) or the series' class index in ``task.classes`` (classification). Samples go through one MONAI
dictionary pipeline in two stages:

1. per series (:func:`volume_pipeline`): image and mask put in the canonical orientation,
   **RAS** (MONAI ``Orientationd``, axis codes ``"RAS"``: array axes run towards the patient's
   Right, Anterior and Superior), whatever the stored orientation (row/column directions,
   slice order, a NIfTI written in RAS or LPS). This only permutes and flips axes: voxel values
   are never interpolated here. The series is then cut into 2-D slices across the axis nearest
   to its acquisition's slice normal (axial series -> ``(R, A)`` slices, coronal ``(R, S)``,
   sagittal ``(A, S)``). Projection images (CR, DX, ... without patient coordinates) keep their
   stored display orientation ``(rows, columns)``.
2. per slice (:func:`sample_pipeline`): resample in-plane to ``data.spacing-mm`` (image
   bilinear, label nearest), pad or crop to ``data.image-size``, scale the image's 1st..99th
   percentile to 0..1. A class label is not an image: only the image goes through this stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from client.cache import cached
from client.discovery import read_usable
from client.errors import DicomError
from client.geometry import LPS_TO_RAS, ras_affine
from client.labels import LabelManifestError, class_labels
from client.layout import LABELS_CSV, LABELS_DIR
from client.masks import index_masks, read_mask
from client.records import Rejection, SeriesRecord
from client.site import scan_site, site_name_of, site_split_seed, split_by_patient
from common.config import DataConfig, TaskConfig

__all__ = [
    "CANONICAL_AXCODES",
    "SiteData",
    "canonical_slices",
    "canonical_volume",
    "load_site",
    "sample_pipeline",
    "scan_site",
    "site_name_of",
    "site_split_seed",
    "split_by_patient",
    "volume_pipeline",
]

#: The canonical orientation of every sample (MONAI axis codes).
CANONICAL_AXCODES = "RAS"

log = logging.getLogger("fedsite.client")


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


def volume_pipeline() -> Compose:
    """The per-series stage: image and label to the canonical orientation (:data:`CANONICAL_AXCODES`)."""
    labels = (("L", "R"), ("P", "A"), ("I", "S"))  # the affine is in RAS patient coordinates
    return Compose([Orientationd(keys=["image", "label"], axcodes=CANONICAL_AXCODES, labels=labels)])


def canonical_volume(volume: np.ndarray, mask: np.ndarray, series: SeriesRecord) -> dict:
    """A series and its mask in the canonical orientation (stage 1 of the pipeline, before slicing).

    Args:
        volume: ``(Z, Y, X)`` image from :func:`client.discovery.read_series`.
        mask: ``(Z, Y, X)`` mask on the same grid.
        series: The series' record (its geometry; not a projection series).

    Returns:
        ``{"image", "label"}``: ``(1, R, A, S)``-ordered MetaTensors whose affine maps voxel
        indices to RAS mm with axes pointing Right, Anterior, Superior (closest axes for oblique
        series).
    """
    affine = torch.as_tensor(ras_affine(series))
    item = {
        "image": MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.transpose(2, 1, 0))[None]), affine=affine),
        "label": MetaTensor(
            torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 1, 0))[None].astype(np.float32)), affine=affine
        ),
    }
    return volume_pipeline()(item)


def canonical_slices(volume: np.ndarray, mask: np.ndarray, series: SeriesRecord) -> list[dict]:
    """Cut a series into 2-D items in the canonical orientation (stage 1 of the pipeline).

    Args:
        volume: ``(Z, Y, X)`` image from :func:`client.discovery.read_series`.
        mask: ``(Z, Y, X)`` mask on the same grid.
        series: The series' record (its geometry).

    Returns:
        One ``{"image", "label"}`` dict per slice, each a ``(1, H, W)`` MetaTensor whose affine
        holds the in-plane spacing (mm); slices in increasing position along the cut axis.
    """
    if series.kind == "projection":
        row, col = series.pixel_spacing
        affine = torch.diag(torch.tensor([row, col, 1.0], dtype=torch.float64))
        return [
            {
                "image": MetaTensor(torch.from_numpy(volume[z][None].copy()), affine=affine),
                "label": MetaTensor(torch.from_numpy(mask[z][None].astype(np.float32)), affine=affine),
            }
            for z in range(volume.shape[0])
        ]
    out = canonical_volume(volume, mask, series)
    oriented = out["image"].affine.numpy()
    iop = np.asarray(series.orientation, dtype=float)
    normal = LPS_TO_RAS[:3, :3] @ np.cross(iop[:3], iop[3:])
    axes = oriented[:3, :3] / np.linalg.norm(oriented[:3, :3], axis=0, keepdims=True)
    axis = int(np.argmax(np.abs(axes.T @ normal)))
    in_plane = [a for a in range(3) if a != axis]
    spacing = [float(np.linalg.norm(oriented[:3, a])) for a in in_plane]
    affine2d = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    # One copy with the cut axis first, then each slice is a contiguous view.
    image = out["image"].as_tensor().movedim(1 + axis, 0).contiguous()
    label = out["label"].as_tensor().movedim(1 + axis, 0).contiguous()
    return [
        {"image": MetaTensor(image[k], affine=affine2d), "label": MetaTensor(label[k], affine=affine2d)}
        for k in range(image.shape[0])
    ]


def sample_pipeline(cfg: DataConfig, *, with_mask: bool = True) -> Compose:
    """The per-slice stage of the MONAI dictionary pipeline (stage 2, see the module docstring).

    Args:
        cfg: The ``data.*`` group of the run config.
        with_mask: The label is a mask on the image's grid (segmentation) and is resampled with it
            (nearest neighbour); False for a class label, which is left alone.
    """
    keys = ["image", "label"] if with_mask else ["image"]
    modes = ("bilinear", "nearest") if with_mask else ("bilinear",)
    return Compose(
        [
            Spacingd(keys=keys, pixdim=(cfg.spacing_mm, cfg.spacing_mm), mode=modes),
            ResizeWithPadOrCropd(keys=keys, spatial_size=(cfg.image_size, cfg.image_size)),
            ScaleIntensityRangePercentilesd(keys="image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True),
            EnsureTyped(keys=keys, data_type="tensor", track_meta=False),
        ]
    )


PIPELINE_VERSION = 4
"""Bump when the sample pipeline changes: it invalidates every site's sample cache."""


def _class_targets(
    site_dir: Path, series: list[SeriesRecord], task: TaskConfig, rejected: list[Rejection]
) -> dict[str, int]:
    """Series hash -> class index from ``labels.csv``; series without a usable label are rejected."""
    path = site_dir / LABELS_CSV
    if not path.is_file():
        raise DicomError(
            f"site folder {site_dir} has no {LABELS_CSV}: a classification site lists one class per PatientID, "
            "StudyInstanceUID or SeriesInstanceUID there "
            f"(header e.g. 'PatientID,label'; classes {', '.join(task.class_names)})"
        )
    try:
        found = class_labels(path, series)
    except LabelManifestError as exc:
        raise DicomError(str(exc)) from None
    index = {name: i for i, name in enumerate(task.class_names)}
    first_file = {s.series_hash: s.first_file for s in series}
    targets: dict[str, int] = {}
    for series_hash, label in found.labels.items():
        if label in index:
            targets[series_hash] = index[label]
        else:
            reason = (
                f"series {series_hash}: label {label!r} in {LABELS_CSV} is not one of task.classes "
                f"({', '.join(task.class_names)})"
            )
            rejected.append(Rejection(first_file[series_hash], reason))
    for series_hash in found.unlabelled:
        rejected.append(
            Rejection(first_file[series_hash], f"series {series_hash}: no row of {LABELS_CSV} names this series")
        )
    for series_hash in found.ambiguous:
        rejected.append(
            Rejection(first_file[series_hash], f"series {series_hash}: rows of {LABELS_CSV} give it different labels")
        )
    return targets


def _rel(site_dir: Path, path: Path) -> str:
    try:
        return path.relative_to(site_dir).as_posix()
    except ValueError:
        return path.name


def _read_samples(site_dir: Path, cfg: DataConfig, task: TaskConfig = TaskConfig()) -> dict:
    """Decode and preprocess every labelled series of the site (the slow, cached part)."""
    scan = scan_site(site_dir, volume=cfg.volume)
    series, rejected = scan.series, list(scan.rejected)
    classify = task.name == "classification"
    if classify:
        targets = _class_targets(site_dir, list(series), task, rejected)
    else:
        masks = index_masks(site_dir / LABELS_DIR)
    pipeline = sample_pipeline(cfg, with_mask=not classify)
    samples: list[dict] = []
    used = 0
    for s in series:
        if classify:
            if s.series_hash not in targets:
                continue  # rejected above, with its reason
        else:
            found = masks.masks_for(s)
            if len(found) != 1:
                why = (
                    f"no mask in {LABELS_DIR}/ for this series"
                    if not found
                    else f"{len(found)} masks in {LABELS_DIR}/ for this series; keep one"
                )
                rejected.append(Rejection(s.first_file, f"series {s.series_hash}: {why}"))
                continue
        try:
            volume, s, dropped = read_usable(s)  # damaged files dropped, each with its reason
            rejected.extend(Rejection(scan.redactor.redact(_rel(site_dir, p)), why) for p, why in dropped)
            if not s.slices:
                continue
            mask = np.zeros(volume.shape, dtype=np.uint8) if classify else read_mask(found[0], s, volume.shape)
            items = canonical_slices(volume, mask, s)
        except DicomError as exc:
            reason = str(exc) if str(exc).startswith("series ") else f"series {s.series_hash}: {exc}"
            rejected.append(Rejection(s.first_file, reason))
            continue
        used += 1
        for z, item in enumerate(items):
            out = pipeline(item)
            label = (
                torch.tensor(targets[s.series_hash], dtype=torch.uint8)
                if classify
                else out["label"].round().to(torch.uint8).contiguous()
            )
            samples.append(
                {
                    "image": out["image"].float().contiguous(),
                    "label": label,
                    "patient": s.patient_hash,
                    "series": s.series_hash,
                    "slice": z,
                }
            )
    # Stored as two stacked tensors (not one small tensor per sample): the cache then loads in
    # about a millisecond, which keeps an epoch that starts from the disk cache close to one
    # that starts from memory (benchmarks/ingest.py).
    return {
        "images": torch.stack([x["image"] for x in samples]) if samples else torch.zeros(0, 1, 1, 1),
        "labels": torch.stack([x["label"] for x in samples])
        if samples
        else torch.zeros(0, *(() if classify else (1, 1, 1)), dtype=torch.uint8),
        "patients": [x["patient"] for x in samples],
        "series": [x["series"] for x in samples],
        "slices": [x["slice"] for x in samples],
        "rejected": [{"file": r.file, "reason": r.reason} for r in rejected],
        "series_found": len(series),
        "series_used": used,
    }


def load_site(
    site_dir: Path, cfg: DataConfig, *, seed: int, use_cache: bool = True, task: TaskConfig = TaskConfig()
) -> SiteData:
    """Read a site's labelled DICOM series and make its train/validation samples.

    Decoded samples are cached on the site's disk (:mod:`client.cache`), so only the first call
    for a given set of files and settings decodes DICOM.

    Args:
        site_dir: The site folder (see the module docstring for its layout).
        cfg: The ``data.*`` group of the run config.
        seed: The run seed; the patient split depends on it and the site's name.
        use_cache: Read and write the site's sample cache.
        task: The ``task.*`` group: segmentation reads masks from ``labels/``, classification
            reads class names from ``labels.csv``.

    Returns:
        The site's samples, split by patient.

    Raises:
        DicomError: If the folder has no usable labelled series or fewer than two patients.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DicomError(f"site folder {site_dir} does not exist")
    name = site_name_of(site_dir)
    settings = {
        "pipeline": PIPELINE_VERSION,
        "image_size": cfg.image_size,
        "spacing_mm": cfg.spacing_mm,
        "volume": cfg.volume,
        "task": task.name,
    }
    if task.name == "classification":
        settings["classes"] = list(task.class_names)
    if use_cache:
        read = cached(site_dir, name="samples", settings=settings, build=lambda: _read_samples(site_dir, cfg, task))
    else:
        read = _read_samples(site_dir, cfg, task)
    images, labels = read["images"], read["labels"]
    samples = [  # views into the stacked tensors
        {"image": images[i], "label": labels[i], "patient": p, "series": se, "slice": z}
        for i, (p, se, z) in enumerate(zip(read["patients"], read["series"], read["slices"], strict=True))
    ]
    rejected = [Rejection(r["file"], r["reason"]) for r in read["rejected"]]
    if not samples:
        raise DicomError(
            f"site folder {site_dir} has no usable labelled series ({read['series_found']} series found, "
            f"{len(rejected)} files or series rejected); run `fedsite site check {site_dir}` for the reasons"
        )
    train_p, val_p = split_by_patient(
        [s["patient"] for s in samples], val_fraction=cfg.val_fraction, seed=site_split_seed(name, seed)
    )
    return SiteData(
        name=name,
        train=[s for s in samples if s["patient"] in train_p],
        val=[s for s in samples if s["patient"] in val_p],
        train_patients=len(train_p),
        val_patients=len(val_p),
        series_used=read["series_used"],
        rejected=rejected,
    )
