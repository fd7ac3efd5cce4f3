"""Apply a trained fedsite model to whole series at their native grid. Nothing here leaves the site.

A series is read with the site's own reader (:func:`client.dicom.read_series`) and put in the
training orientation, RAS, by the training code itself (:func:`client.dataset.canonical_slices`):
the same slices the model was trained on, cut across the axis nearest to the slice normal.

Segmentation, per 2-D slice: resample in-plane to the model's ``data.spacing-mm`` (bilinear, as
in training), scale the 1st..99th intensity percentile of the whole resampled slice to 0..1 (as
in training, where it is done on the ``data.image-size`` crop; on the synthetic sites the crop is
the whole field of view), then MONAI sliding-window inference with ``data.image-size`` windows
over the whole slice (Gaussian-weighted, 25 % overlap). The lesion probability is resampled
back onto the slice's own pixels (bilinear, exact geometry from the affines), thresholded at
0.5, and the slices are put back into the stored orientation, so the mask is ``(Z, Y, X)`` on
the source series' grid: its rows, columns, slice positions and orientation.

Classification: each slice goes through the training sample pipeline
(:func:`client.dataset.sample_pipeline`, which pads or crops to ``data.image-size``); the class
probabilities are averaged over the series' images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError, RunConfig, parse_run_config
from common.errors import FedsiteError

__all__ = [
    "LoadedModel",
    "PredictError",
    "SeriesPrediction",
    "check_task",
    "classify_series",
    "dice",
    "fetch_run",
    "load_model",
    "predict_series",
    "segment_series",
    "series_numbers",
]

log = logging.getLogger("fedsite.client")

#: Output name of the algorithm in every DICOM object fedsite writes.
ALGORITHM_NAME = "fedsite"
#: The run's resolved configuration, beside its ``final_model.pt`` (a run folder, an MLflow run's artifacts).
RESULTS = "results.json"


class PredictError(FedsiteError):
    """A model or a series cannot be used for prediction; the message says why and the fix."""


@dataclass(frozen=True)
class LoadedModel:
    """A trained network and the run configuration it was trained with."""

    model: torch.nn.Module = field(repr=False)
    cfg: RunConfig
    run_id: str
    """The run's MLflow run id when it has one, else the run folder's name (the algorithm version)."""
    source: Path | str
    """The run folder, or the MLflow URI the model was downloaded from."""

    @property
    def task(self) -> str:
        """``"segmentation"`` or ``"classification"``."""
        return self.cfg.task.name


@dataclass
class SeriesPrediction:
    """What the model says about one series (no patient values: the series is named by its hash)."""

    series_hash: str
    task: str
    mask: np.ndarray | None = field(default=None, repr=False)
    """Segmentation: ``(Z, Y, X)`` uint8 0/1 on the source grid."""
    probabilities: dict[str, float] | None = None
    """Classification: class name -> probability (mean over the series' images)."""
    numbers: dict[str, float | int | str | None] = field(default_factory=dict)
    seconds: float = 0.0


def _run_folder(path: Path) -> tuple[Path, Path]:
    """(results.json, final_model.pt) of a run folder or of a final_model.pt."""
    path = Path(path)
    if path.is_dir():
        folder, weights = path, path / "final_model.pt"
    else:
        folder, weights = path.parent, path
    results = folder / RESULTS
    if not weights.is_file():
        raise PredictError(
            f"no model weights at {weights}: give a run folder (results.json, final_model.pt) or its final_model.pt"
        )
    if not results.is_file():
        raise PredictError(
            f"no results.json next to {weights.name} in {folder}: "
            "the run's configuration is needed to rebuild the model"
        )
    return results, weights


def load_model(model: str | Path, *, tracking_uri: str | None = None, timeout: float = 60.0) -> LoadedModel:
    """Rebuild a run's final model from its folder, its ``final_model.pt``, or its MLflow run.

    Args:
        model: A run folder (``results.json`` with the resolved config, ``final_model.pt``), the
            ``final_model.pt`` inside one, or an MLflow URI (:data:`common.model.MLFLOW_SCHEMES`):
            ``runs:/RUN_ID/final_model.pt`` (its ``results.json`` beside it is downloaded too),
            ``runs:/RUN_ID`` or ``models:/NAME/VERSION`` (a folder holding both files).
        tracking_uri: The MLflow tracking server or store of an MLflow URI; default the
            ``MLFLOW_TRACKING_URI`` environment variable.
        timeout: Seconds to wait for each request to an MLflow server.

    Returns:
        The model in evaluation mode on the CPU, its config and run id.

    Raises:
        PredictError: If a file is missing, the MLflow run or artifact cannot be fetched, the
            config is unusable or the weights do not fit.
    """
    from common.model import MLFLOW_SCHEMES

    if str(model).startswith(MLFLOW_SCHEMES):
        uri = str(model)
        # without a run id in results.json: the one in a runs:/ URI, else the model's name and version
        name = uri.split(":/", 1)[1].strip("/").split("/")[0] if uri.startswith("runs:/") else uri.split(":/", 1)[1]
        with tempfile.TemporaryDirectory(prefix="fedsite-model-") as tmp:
            loaded = _load_local(fetch_run(uri, tracking_uri, Path(tmp), timeout=timeout), default_run_id=name)
        return dataclasses.replace(loaded, source=uri)
    return _load_local(Path(model))


def fetch_run(uri: str, tracking_uri: str | None, dst: Path, *, timeout: float = 60.0) -> Path:
    """Download the model an MLflow URI names, with the run's ``results.json``, into ``dst``.

    Returns:
        What :func:`load_model` takes locally: the downloaded ``.pt`` file (``results.json`` beside
        it) or the downloaded folder.

    Raises:
        PredictError: No tracking URI, an unreachable server, an unknown run or model, a missing artifact.
    """
    from common.mlflow_artifacts import download_artifact, shown_uri

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking_uri:
        raise PredictError(
            f"{uri} is an MLflow URI but no tracking server is given: add --tracking-uri URI (or set "
            "MLFLOW_TRACKING_URI), e.g. http://mlflow.example:5000 or a run's own store sqlite:///RUN_FOLDER/mlflow.db"
        )
    shown = shown_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
        if not db.is_file():  # MLflow would create an empty store there
            raise PredictError(
                f"no MLflow store at {db} (--tracking-uri {shown}); give the mlflow.db of the run's output folder"
            )
    wanted = [uri]
    if uri.endswith(".pt"):  # the run's configuration sits beside its weights
        wanted.append(uri.rsplit("/", 1)[0] + "/" + RESULTS)
    got: list[Path] = []
    with _mlflow_http(timeout):
        for item in wanted:
            try:
                got.append(download_artifact(item, tracking_uri, dst))
            except Exception as exc:  # MLflow raises many types; the message names the fix
                raise PredictError(_mlflow_problem(exc, item, shown, is_results=item != uri)) from None
    return got[0]


@contextlib.contextmanager
def _mlflow_http(timeout: float):
    """Fail fast on an unreachable MLflow server (2 retries, ``timeout`` s) unless the user set MLflow's own."""
    values = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout))),
    }
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _mlflow_problem(exc: Exception, uri: str, shown: str, *, is_results: bool) -> str:
    """One line for an MLflow download failure: what is missing or unreachable, and what to check."""
    text = re.sub(r"//[^/@\s]+@", "//***@", (str(exc).strip().splitlines() or [""])[0])[:200]
    if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
        if is_results:
            return (
                f"the MLflow run of {uri.rsplit('/', 1)[0]} has no {RESULTS} beside its weights: "
                "the run's configuration is needed to rebuild the model; give the run folder instead"
            )
        return (
            f"MLflow at {shown} has no {uri} ({text}); check the run id (or model name and version) and --tracking-uri"
        )
    if "Max retries exceeded" in text or "onnection" in text or isinstance(exc, ConnectionError):
        return (
            f"the MLflow tracking server {shown} is unreachable; check --tracking-uri and the network, "
            "or copy the run folder here and give it instead"
        )
    return (
        f"MLflow could not download {uri} from {shown} ({type(exc).__name__}: {text}); check the URI and --tracking-uri"
    )


def _load_local(path: Path, *, default_run_id: str | None = None) -> LoadedModel:
    """:func:`load_model` of a run folder or its ``.pt`` file on this machine."""
    from common.model import build_model

    results_path, weights = _run_folder(path)
    try:
        results = json.loads(results_path.read_text())
        flat = results["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PredictError(
            f"{results_path} is not a fedsite results.json (no 'config'); point at the run folder the run wrote"
        ) from None
    # Only what the network and its inputs need: other groups may come from another fedsite version.
    wanted = {k: v for k, v in flat.items() if k.split(".", 1)[0] in ("data", "task", "model") or k == "seed"}
    try:
        cfg = parse_run_config(wanted)
    except ConfigError as exc:
        raise PredictError(f"the run's configuration in {results_path} cannot be used: {exc}") from None
    model = build_model(cfg.model, cfg.task)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise PredictError(
            f"{weights} does not hold this run's model weights ({type(exc).__name__}); was it replaced?"
        ) from None
    model.eval()
    run_id = ((results.get("mlflow") or {}).get("run_id")) or default_run_id or results_path.parent.name
    return LoadedModel(model=model, cfg=cfg, run_id=str(run_id), source=results_path.parent)


def check_task(loaded: LoadedModel, series) -> str | None:
    """Why this model cannot be applied to this series, or None when it can.

    A segmentation model was trained on cross-sectional slices (MR, CT, ...: series with patient
    geometry); a classification model on projection images (CR, DX, ...).
    """
    if loaded.task == "segmentation" and series.kind == "projection":
        return (
            "the model segments cross-sectional series (MR/CT) but this series is a "
            f"{series.modality} projection image "
            "without patient geometry; use a classification model for it"
        )
    if loaded.task == "classification" and series.kind != "projection":
        return (
            f"the model classifies projection images (CR/DX) but this series is a {series.modality or 'volume'} "
            "cross-sectional series; use a segmentation model for it"
        )
    return None


def _orientation(series) -> np.ndarray:
    """nibabel orientation of the series' ``(x, y, z)`` voxel axes in RAS (what MONAI's Orientation uses)."""
    import nibabel as nib

    from client.geometry import series_affine

    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return nib.orientations.io_orientation(lps_to_ras @ series_affine(series))


def _to_source_grid(canonical_xyz: np.ndarray, series) -> np.ndarray:
    """A ``(R, A, S)``-ordered array back to the series' stored ``(Z, Y, X)`` order."""
    import nibabel as nib

    ornt = _orientation(series)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    xyz = nib.orientations.apply_orientation(canonical_xyz, back)
    return np.ascontiguousarray(np.asarray(xyz).transpose(2, 1, 0))


def _cut_axis(series) -> int:
    """The canonical axis the training slices are cut across (as :func:`client.dataset.canonical_slices`)."""
    from client.dataset import canonical_volume

    probe = canonical_volume(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.uint8), series)
    oriented = probe["image"].affine.numpy()
    iop = np.asarray(series.orientation, dtype=float)
    normal = np.diag([-1.0, -1.0, 1.0]) @ np.cross(iop[:3], iop[3:])
    axes = oriented[:3, :3] / np.linalg.norm(oriented[:3, :3], axis=0, keepdims=True)
    return int(np.argmax(np.abs(axes.T @ normal)))


def _prepare_slice(item: dict, cfg: RunConfig):
    """A canonical slice resampled to the model's spacing and scaled as in training: ``(1, h, w)`` MetaTensor."""
    from monai.transforms import ScaleIntensityRangePercentiles, Spacing

    resampled = Spacing(pixdim=(cfg.data.spacing_mm, cfg.data.spacing_mm), mode="bilinear")(item["image"])
    with warnings.catch_warnings():  # a blank slice (1st == 99th percentile) scales to 0, as in training
        warnings.filterwarnings("ignore", message="Divide by zero")
        return ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)(resampled)


@torch.no_grad()
def _segment_slices(model: torch.nn.Module, items: list[dict], cfg: RunConfig, *, batch: int = 16) -> list[np.ndarray]:
    """Lesion probability ``(H, W)`` of each canonical slice, on the slice's own pixels.

    Sliding-window inference runs on ``batch`` slices at a time (all slices of a series share a
    shape); each probability map goes back onto its slice's pixels with the exact affines.
    """
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import SpatialResample

    size = cfg.data.image_size
    resample = SpatialResample(mode="bilinear", padding_mode="zeros")
    out: list[np.ndarray] = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        prepared = [_prepare_slice(item, cfg) for item in chunk]
        x = torch.stack([torch.as_tensor(p.as_tensor(), dtype=torch.float32) for p in prepared])
        logits = sliding_window_inference(
            x,
            roi_size=(size, size),
            sw_batch_size=8,
            predictor=model,
            overlap=0.25,
            mode="gaussian",
            padding_mode="constant",
            cval=0.0,
        )
        probs = torch.softmax(logits.float(), dim=1)[:, 1:2]  # (n, 1, h, w) lesion probability
        for item, prep, prob in zip(chunk, prepared, probs, strict=True):
            src = item["image"]
            back = resample(
                MetaTensor(prob, affine=prep.affine), dst_affine=src.affine, spatial_size=tuple(src.shape[1:])
            )
            out.append(np.asarray(back.as_tensor()[0].numpy(), dtype=np.float32))
    return out


def segment_series(loaded: LoadedModel, series, volume: np.ndarray | None = None) -> np.ndarray:
    """Segment one series and return the mask on its own grid.

    Args:
        loaded: A segmentation model (:func:`load_model`).
        series: A :class:`client.dicom.SeriesRecord` with patient geometry.
        volume: The series' pixels if already read (``(Z, Y, X)``, :func:`client.dicom.read_series`).

    Returns:
        ``(Z, Y, X)`` uint8 mask (1 = lesion), voxel for voxel on the series.

    Raises:
        PredictError: If the model is not a segmentation model for this kind of series.
        client.errors.DicomError: If the series' pixels cannot be read.
    """
    from client.dataset import canonical_slices
    from client.discovery import read_series

    problem = check_task(loaded, series)
    if problem:
        raise PredictError(f"series {series.series_hash}: {problem}")
    volume = read_series(series) if volume is None else volume
    items = canonical_slices(volume, np.zeros(volume.shape, np.uint8), series)
    probs = _segment_slices(loaded.model, items, loaded.cfg)
    axis = _cut_axis(series)
    canonical = np.moveaxis(np.stack(probs), 0, axis)  # (R, A, S)
    mask = (_to_source_grid(canonical, series) >= 0.5).astype(np.uint8)
    if mask.shape != volume.shape:  # a broken invariant, not a data problem
        raise PredictError(
            f"series {series.series_hash}: mask shape {mask.shape} differs from the series {volume.shape}"
        )
    return mask


@torch.no_grad()
def classify_series(loaded: LoadedModel, series, volume: np.ndarray | None = None) -> dict[str, float]:
    """Class probabilities of one series (mean over its images), by class name.

    Raises:
        PredictError: If the model is not a classification model for this kind of series.
    """
    from client.dataset import canonical_slices, sample_pipeline
    from client.discovery import read_series

    problem = check_task(loaded, series)
    if problem:
        raise PredictError(f"series {series.series_hash}: {problem}")
    volume = read_series(series) if volume is None else volume
    pipeline = sample_pipeline(loaded.cfg.data, with_mask=False)
    images = [
        pipeline(item)["image"].float() for item in canonical_slices(volume, np.zeros(volume.shape, np.uint8), series)
    ]
    logits = loaded.model(torch.stack(images))
    probs = torch.softmax(logits.float(), dim=1).mean(dim=0).numpy()
    return {name: float(p) for name, p in zip(loaded.cfg.task.class_names, probs, strict=True)}


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks on the same grid (1.0 when both are empty)."""
    p, r = pred.astype(bool), ref.astype(bool)
    denom = int(p.sum()) + int(r.sum())
    return 1.0 if denom == 0 else float(2 * int((p & r).sum()) / denom)


def series_numbers(mask: np.ndarray, series, reference: np.ndarray | None = None) -> dict[str, float | int | None]:
    """Per-series numbers of a segmentation: lesion volume (ml), slices with findings, Dice.

    Args:
        mask: ``(Z, Y, X)`` 0/1 on the series' grid.
        series: Its record (pixel spacing and slice spacing give the voxel volume).
        reference: A reference mask on the same grid, if one exists.
    """
    row, col = series.pixel_spacing
    voxel_ml = row * col * series.slice_spacing / 1000.0
    out: dict[str, float | int | None] = {
        "lesion_volume_ml": round(float(mask.sum()) * voxel_ml, 3),
        "slices_with_findings": int(mask.reshape(mask.shape[0], -1).any(axis=1).sum()),
        "slices": int(mask.shape[0]),
        "dice": None,
    }
    if reference is not None:
        out["dice"] = round(dice(mask, reference), 4)
        out["reference_volume_ml"] = round(float(reference.sum()) * voxel_ml, 3)
    return out


def predict_series(loaded: LoadedModel, series, *, reference_mask: Path | None = None) -> SeriesPrediction:
    """Apply the model to one series; segmentation also reads its reference mask when given.

    Raises:
        PredictError: The model's task does not fit the series.
        client.errors.DicomError: The series (or its reference mask) cannot be read.
    """
    from client.discovery import read_series

    started = time.perf_counter()
    problem = check_task(loaded, series)
    if problem:
        raise PredictError(f"series {series.series_hash}: {problem}")
    volume = read_series(series)
    out = SeriesPrediction(series_hash=series.series_hash, task=loaded.task)
    if loaded.task == "segmentation":
        out.mask = segment_series(loaded, series, volume)
        reference = None
        if reference_mask is not None:
            from client.masks import read_mask

            reference = read_mask(reference_mask, series, volume.shape)
        out.numbers = series_numbers(out.mask, series, reference)
    else:
        out.probabilities = classify_series(loaded, series, volume)
        names = loaded.cfg.task.class_names
        finding = max(names, key=lambda n: out.probabilities[n])  # type: ignore[index]
        out.numbers = {
            "finding": finding,
            "probability": round(out.probabilities[finding], 4),
            "positive_class": names[-1],
            "positive_probability": round(out.probabilities[names[-1]], 4),
        }
    out.seconds = time.perf_counter() - started
    out.numbers["seconds"] = round(out.seconds, 3)
    return out
