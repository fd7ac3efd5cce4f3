"""X-ray scanner sites from a labelled image set: MedMNIST npz -> DICOM CR/DX sites for classification.

Any ``.npz`` in MedMNIST's layout (keys ``train_images``, ``train_labels``, ``val_images``,
``val_labels``, ``test_images``, ``test_labels``; images ``(N, H, W)`` uint8, square; labels
``(N, 1)`` or ``(N,)`` non-negative integers) becomes scanner sites written as DICOM. The three
splits are pooled and partitioned disjointly across the sites; every image becomes one synthetic
patient with one study, one series and one file. Called through
:func:`simulations.synth.write_sites` / :func:`~simulations.synth.write_site` with ``source=``.

On-disk layout of one site::

    <root>/<site>/site.json
        {"name", "generator_version", "seed", "task": "classification", "modality", "source",
         "source_sha256", "patients", "images", "class_names", "class_counts", "label_skew",
         "quantity_skew", "profile": {...}}
    <root>/<site>/dicom/<PatientID>/SE0001/IM0001.dcm    (PatientID e.g. S01-P0001)
        one Part-10 CR Image Storage or Digital X-Ray Image Storage - For Presentation file:
        2-D, no ImagePositionPatient; CR has PixelSpacing, DX ImagerPixelSpacing
    <root>/<site>/labels.csv
        ``PatientID,label`` with the class name as label (what :mod:`client.labels` reads)

Class names: ``class_names`` if given (one per label value 0, 1, ...), else ``("normal",
"pneumonia")`` for a file whose name starts with ``pneumoniamnist``, else the label numbers as
strings (``"0"``, ``"1"``, ...).

Partition (deterministic from the seed): each class's images are shuffled once
(``default_rng([seed, POOL, class])``); site 0 takes its images from the front of these class
queues, then site 1 from what is left, and so on, so a site's images depend on the seed and the
sites before it, never on how many sites follow. Site ``i`` takes
:func:`~simulations.sitefolder.site_patients` images (``patients``, or lognormal under quantity skew)
with class shares ``p_i``: the pooled class mix ``g`` with ``label_skew = 0``, else a Dirichlet
draw with concentration ``K * g / label_skew`` (``K`` classes: mean ``g``, total concentration
``K / label_skew``, so larger skew = more lopsided sites). Counts are ``p_i * n_i`` rounded by
largest remainder; a class that runs out is made up from the classes with most images left.

Image physics: the source image is the object ``o`` in ``[0, 1]`` (bright = attenuating). It is
resampled to the profile's ``matrix`` over a :data:`~simulations.profiles.XRAY_FOV_MM` (240 mm)
field of view (linear interpolation up, area average down), exposed with ``N0 = QUANTA_PER_MM2 *
exposure * pixel area`` photons per pixel through attenuation ``exp(-ATTENUATION * o)`` (Poisson
quantum noise), blurred by the detector (Gaussian ``blur_mm``), given detector noise (Gaussian,
sigma ``noise_level * N0``), log-transformed back to ``p = -log(counts / N0) / ATTENUATION``, sharpened by the vendor's
processing (unsharp mask ``p + edge_enhance * (p - blur(p))``, Gaussian of ``EDGE_KERNEL_MM``),
put through the display curve ``v = clip(p, 0, 1) ** contrast_gamma`` and stored as ``round(v *
(2**BitsStored - 1))`` (MONOCHROME1: ``2**BitsStored - 1 - that``), RescaleSlope 1,
RescaleIntercept 0.

What the client reads: every file has a VOI window (VOILUTFunction LINEAR, WindowCenter
``2**(BitsStored-1)``, WindowWidth ``2**BitsStored``) that spans exactly the stored range
``0 .. 2**BitsStored - 1``, so :func:`client.discovery.read_series` returns ``v`` (the display value
in ``0..1``, bright = attenuating) for MONOCHROME1 and MONOCHROME2 alike. Gamma, noise, blur and
resolution survive the client's resampling and percentile normalisation; a linear scale would not.
"""

from __future__ import annotations

import hashlib
import math
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from client.layout import LABELS_CSV, SITE_FILE, sim_site_name
from simulations.dicom_writer import draw_meta, ds_value, patient_dataset, uid, write_slice
from simulations.profiles import (
    EDGE_KERNEL_MM,
    XRAY_MODALITIES,
    ScannerProfile,
    profile_for_site,
    profile_to_dict,
)
from simulations.sitefolder import (
    GENERATOR_VERSION,
    INDEX_FILE,
    STREAM_LABEL,
    check_int,
    check_skew,
    json_text,
    patient_id,
    site_patients,
    with_storage,
    write_folder,
    write_json_atomic,
)

__all__ = [
    "SOURCE_MODALITIES",
    "SPLITS",
    "ImageSource",
    "allocate",
    "default_class_names",
    "expose",
    "load_source",
    "write_xray_site",
    "write_xray_sites",
]

#: The npz splits pooled into one set of images, in this order.
SPLITS = ("train", "val", "test")
#: Default class names by file-name prefix.
KNOWN_CLASS_NAMES: dict[str, tuple[str, ...]] = {"pneumoniamnist": ("normal", "pneumonia")}
#: Photons per mm^2 reaching the detector without attenuation at ``exposure == 1``.
QUANTA_PER_MM2 = 100.0
#: Line integral of attenuation for object value 1 (transmission ``exp(-3)`` = 5%).
ATTENUATION = 3.0
#: What ``modality`` may be with an image source (``"MR"``, the phantoms' default, means ``"auto"``).
SOURCE_MODALITIES = ("CR", "DX", "auto")

# Random stream of the class queues: [seed, _STREAM_POOL, class] (site indices are < 10_000).
_STREAM_POOL = 1_000_010
# Per site: [seed, index, stream]; per image: [seed, index, image position] (< 1_000_000).
_STREAM_ORDER = 1_000_011
_SOP_CLASSES = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}
_CLASS_NAME = re.compile(r"^[^,;\t\r\n\"]{1,64}$")


@dataclass(frozen=True, eq=False)
class ImageSource:
    """A labelled image set, pooled over its splits."""

    name: str
    """The file name (recorded in site.json; never the full path)."""
    sha256: str
    """SHA-256 of the file's bytes."""
    images: np.ndarray = field(repr=False)
    """``(N, H, W)`` uint8, splits concatenated in :data:`SPLITS` order."""
    labels: np.ndarray = field(repr=False)
    """``(N,)`` int64 label values."""
    class_names: tuple[str, ...]
    """Name of label value 0, 1, ..."""

    @property
    def class_counts(self) -> dict[str, int]:
        """Class name -> number of images in the whole set."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(counts[k]) for k, name in enumerate(self.class_names)}


def default_class_names(file_name: str, labels: np.ndarray) -> tuple[str, ...]:
    """The class names of a source without explicit ``class_names``.

    Args:
        file_name: The npz file's name, e.g. ``"pneumoniamnist_merged.npz"``.
        labels: Its label values.

    Returns:
        The known names for the file (e.g. ``("normal", "pneumonia")``) if they cover every label
        value, else ``("0", "1", ...)`` up to the largest label value.
    """
    n = int(labels.max()) + 1 if labels.size else 0
    for prefix, names in KNOWN_CLASS_NAMES.items():
        if file_name.lower().startswith(prefix) and len(names) >= n:
            return names
    return tuple(str(k) for k in range(n))


def load_source(path: Path | str, *, class_names: Sequence[str] | None = None) -> ImageSource:
    """Read and check a MedMNIST-layout npz (nothing is copied anywhere).

    Args:
        path: The ``.npz`` file.
        class_names: Name of each label value 0, 1, ...; default :func:`default_class_names`.

    Returns:
        The pooled images and labels with their class names.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not an npz in MedMNIST's layout (the message says what is
            missing or wrong), or ``class_names`` does not name every label value.
    """
    path = Path(path)
    layout = "a MedMNIST-layout .npz has " + ", ".join(f"{s}_images, {s}_labels" for s in SPLITS)
    if not path.is_file():
        raise FileNotFoundError(
            f"source {path} does not exist: pass the path of a MedMNIST-layout .npz, e.g. "
            "../shared/data/pneumoniamnist/pneumoniamnist_merged.npz"
        )
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"source {path.name} is not a readable .npz ({type(exc).__name__}): {layout}") from None
    with npz:
        if not hasattr(npz, "files"):
            raise ValueError(f"source {path.name} holds a single array, not an .npz archive: {layout}")
        missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in npz.files]
        if missing:
            raise ValueError(f"source {path.name} lacks the keys {', '.join(missing)}: {layout}")
        images, labels = [], []
        for s in SPLITS:
            img, lab = npz[f"{s}_images"], npz[f"{s}_labels"]
            if img.ndim != 3 or img.dtype != np.uint8 or img.shape[1] != img.shape[2] or img.shape[1] < 2:
                raise ValueError(
                    f"source {path.name}: {s}_images has shape {img.shape} and dtype {img.dtype}: use square "
                    "(N, H, W) uint8 grayscale images (colour MedMNIST sets are not supported)"
                )
            if lab.ndim == 2 and lab.shape[1] == 1:
                lab = lab[:, 0]
            if lab.ndim != 1 or lab.shape[0] != img.shape[0] or not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(
                    f"source {path.name}: {s}_labels has shape {lab.shape} and dtype {lab.dtype} for {img.shape[0]} "
                    "images: use one integer class label per image, shape (N, 1) or (N,) "
                    "(multi-label sets are not supported)"
                )
            if lab.size and lab.min() < 0:
                raise ValueError(f"source {path.name}: {s}_labels has negative values: use class labels 0, 1, ...")
            images.append(img)
            labels.append(lab.astype(np.int64))
    shapes = {im.shape[1:] for im in images}
    if len(shapes) != 1:
        raise ValueError(f"source {path.name}: the splits have different image sizes {sorted(shapes)}: use one size")
    all_labels = np.concatenate(labels)
    if all_labels.size == 0:
        raise ValueError(f"source {path.name} has no images: {layout}")
    names = _class_names(path.name, all_labels, class_names)
    return ImageSource(name=path.name, sha256=sha, images=np.concatenate(images), labels=all_labels, class_names=names)


def _class_names(file_name: str, labels: np.ndarray, given: Sequence[str] | None) -> tuple[str, ...]:
    if given is None:
        return default_class_names(file_name, labels)
    names = tuple(given) if not isinstance(given, str) else tuple(given.split(","))
    names = tuple(str(n).strip() for n in names)
    n_needed = int(labels.max()) + 1
    bad = [n for n in names if not _CLASS_NAME.match(n)]
    if bad or len(set(names)) != len(names) or len(names) < n_needed:
        raise ValueError(
            f"class_names={list(names)!r} is invalid for source {file_name} (label values 0..{n_needed - 1}): give "
            f"{n_needed} different names, one per label value, without commas, quotes or line breaks"
        )
    return names


def allocate(
    labels: np.ndarray,
    *,
    seed: int,
    sites: int,
    patients: int,
    label_skew: float = 0.0,
    quantity_skew: float = 0.0,
    upto: int | None = None,
) -> list[np.ndarray]:
    """Partition images disjointly across sites (see the module docstring).

    Args:
        labels: ``(N,)`` label values of the pooled source.
        seed: Generation seed.
        sites: Total number of sites; their images together must fit in the source.
        patients: Images per site (the mean under quantity skew).
        label_skew: 0 = every site has the pooled class mix; > 0 = Dirichlet class shares.
        quantity_skew: 0 = every site ``patients`` images; > 0 = lognormal sizes, >= 4.
        upto: Return the first ``upto`` sites only (default all): site ``i`` does not depend on
            the sites after it.

    Returns:
        Per site, the indices into ``labels`` of its images, in the site's patient order.

    Raises:
        ValueError: If the sites need more images than the source has.
    """
    n_total = int(labels.shape[0])
    sizes = [site_patients(i, seed=seed, patients=patients, quantity_skew=quantity_skew) for i in range(sites)]
    if sum(sizes) > n_total:
        skew = f" with quantity_skew={quantity_skew:g}" if quantity_skew else ""
        raise ValueError(
            f"the source has {n_total} images but {sites} sites x patients={patients}{skew} need {sum(sizes)}: lower "
            "sites or patients, or use a larger source"
        )
    classes = np.unique(labels)
    queues = [
        np.random.default_rng([seed, _STREAM_POOL, int(c)]).permutation(np.flatnonzero(labels == c)) for c in classes
    ]
    left = np.array([len(q) for q in queues], dtype=np.int64)
    used = np.zeros(len(classes), dtype=np.int64)
    mix = left / left.sum()
    out: list[np.ndarray] = []
    for i in range(sites if upto is None else min(upto, sites)):
        n = sizes[i]
        if label_skew == 0:
            shares = mix
        else:
            alpha = np.maximum(len(classes) * mix / label_skew, 1e-3)
            shares = np.random.default_rng([seed, i, STREAM_LABEL]).dirichlet(alpha)
        take = np.minimum(_largest_remainder(n, shares), left)
        short = n - int(take.sum())
        for k in np.argsort(-(left - take), kind="stable"):
            if short <= 0:
                break
            extra = min(short, int(left[k] - take[k]))
            take[k] += extra
            short -= extra
        picks = np.concatenate([queues[k][used[k] : used[k] + take[k]] for k in range(len(classes))])
        used += take
        left -= take
        order = np.random.default_rng([seed, i, _STREAM_ORDER]).permutation(len(picks))
        out.append(picks[order])
    return out


def _largest_remainder(n: int, shares: np.ndarray) -> np.ndarray:
    raw = n * np.asarray(shares, dtype=np.float64)
    base = np.floor(raw).astype(np.int64)
    rest = n - int(base.sum())
    if rest > 0:
        base[np.argsort(-(raw - base), kind="stable")[:rest]] += 1
    return base


# --------------------------------------------------------------------------------------------
# Physics


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights resampling a line of pixels over the same extent.

    Linear interpolation at the output pixel centres when enlarging, area averaging when shrinking.
    """
    w = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    if n_out >= n_in:
        src = np.clip((rows + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = src - i0
        np.add.at(w, (rows, i0), 1.0 - f)
        np.add.at(w, (rows, i1), f)
        return w
    edges = np.arange(n_out + 1) * (n_in / n_out)
    cols = np.arange(n_in)
    overlap = np.clip(
        np.minimum(edges[1:, None], cols[None, :] + 1.0) - np.maximum(edges[:-1, None], cols[None, :]), 0.0, None
    )
    return overlap / overlap.sum(axis=1, keepdims=True)


def _blur_matrix(n: int, sigma_px: float) -> np.ndarray:
    """``(n, n)`` Gaussian blur weights, each row normalised (edges keep their mean)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    w = np.exp(-0.5 * (d / sigma_px) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def expose(image: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """One source image -> the stored pixels of a CR/DX acquisition with ``profile``.

    Args:
        image: ``(H, W)`` object values in ``[0, 1]`` (bright = attenuating), e.g. ``uint8 / 255``.
        profile: A CR or DX profile.
        rng: The image's random generator (quantum and detector noise).

    Returns:
        ``(matrix, matrix)`` uint16 stored values (see the module docstring).
    """
    m = profile.matrix
    obj = np.clip(
        _resample_matrix(image.shape[0], m)
        @ np.asarray(image, dtype=np.float64)
        @ _resample_matrix(image.shape[1], m).T,
        0.0,
        1.0,
    )
    n0 = QUANTA_PER_MM2 * profile.exposure * profile.pixel_spacing_mm**2
    counts = rng.poisson(n0 * np.exp(-ATTENUATION * obj)).astype(np.float64)
    if profile.blur_mm > 0:
        b = _blur_matrix(m, profile.blur_mm / profile.pixel_spacing_mm)
        counts = b @ counts @ b.T
    counts += rng.standard_normal(counts.shape) * (profile.noise_level * n0)
    p = -np.log(np.maximum(counts, 0.5) / n0) / ATTENUATION
    if profile.edge_enhance > 0:  # the vendor's unsharp mask, in the log domain
        k = _blur_matrix(m, EDGE_KERNEL_MM / profile.pixel_spacing_mm)
        p = p + profile.edge_enhance * (p - k @ p @ k.T)
    v = np.clip(p, 0.0, 1.0) ** profile.contrast_gamma
    top = 2**profile.bits_stored - 1
    stored = np.rint(v * top)
    if profile.photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint16)


# --------------------------------------------------------------------------------------------
# Sites


def _source_modality(modality: str) -> str:
    if modality == "MR":  # the default of write_sites: with a source, mixed CR and DX
        return "auto"
    if modality not in SOURCE_MODALITIES:
        raise ValueError(
            f"modality={modality!r} is invalid with source=...: an image source gives X-ray sites; use "
            f"{', '.join(map(repr, SOURCE_MODALITIES))} ('auto' mixes CR and DX profiles)"
        )
    return modality


def _checked_xray_profile(profile: Any, modality: str) -> ScannerProfile:
    if not isinstance(profile, ScannerProfile):
        raise TypeError(f"profile={profile!r} is invalid: use a ScannerProfile or None")
    if profile.modality not in XRAY_MODALITIES:
        raise ValueError(
            f"profile {profile.name!r} is a {profile.modality} profile: "
            "an image source is written as CR or DX, use one "
            "of simulations.profiles.XRAY_PROFILES"
        )
    if modality in XRAY_MODALITIES and profile.modality != modality:
        raise ValueError(
            f"profile {profile.name!r} is a {profile.modality} profile but modality={modality!r}: pass "
            f"modality={profile.modality!r} or 'auto', or a {modality} profile"
        )
    return profile


def write_xray_site(
    root: Path,
    index: int,
    *,
    src: ImageSource,
    seed: int,
    patients: int,
    sites: int,
    profile: ScannerProfile | None,
    storage: dict[str, str],
    modality: str = "auto",
    label_skew: float = 0.0,
    quantity_skew: float = 0.0,
) -> tuple[Path, bool]:
    """Write X-ray site ``index`` of ``sites`` from ``src`` (see :func:`simulations.synth.write_site`).

    Returns:
        ``(folder, created)``: created False when an identical site was already there.

    Raises:
        FileExistsError: If the folder exists with other parameters.
        ValueError: If an argument is out of range or the sites need more images than ``src`` has.
    """
    modality = _source_modality(modality)
    _check_common(seed, patients, label_skew, quantity_skew)
    check_int("index", index, low=0, high=sites - 1)
    picks = allocate(
        src.labels,
        seed=seed,
        sites=sites,
        patients=patients,
        label_skew=label_skew,
        quantity_skew=quantity_skew,
        upto=index + 1,
    )[index]
    chosen = profile if profile is not None else profile_for_site(index, modality)
    chosen = with_storage(_checked_xray_profile(chosen, modality), storage)
    return _write(
        root,
        index,
        src=src,
        picks=picks,
        seed=seed,
        patients=patients,
        profile=chosen,
        label_skew=label_skew,
        quantity_skew=quantity_skew,
    )


def write_xray_sites(
    out: Path,
    *,
    sites: int,
    seed: int,
    patients: int,
    progress: Callable[[str], None] | None,
    storage: dict[str, str],
    modality: str,
    source: Path | str,
    label_skew: float = 0.0,
    quantity_skew: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write X-ray sites ``0 .. sites - 1`` from ``source`` and the index.

    See :func:`simulations.synth.write_sites`.
    """
    modality = _source_modality(modality)
    _check_common(seed, patients, label_skew, quantity_skew)
    src = load_source(source, class_names=class_names)
    parts = allocate(
        src.labels, seed=seed, sites=sites, patients=patients, label_skew=label_skew, quantity_skew=quantity_skew
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(sites):
        profile = with_storage(profile_for_site(index, modality), storage)
        path, created = _write(
            out,
            index,
            src=src,
            picks=parts[index],
            seed=seed,
            patients=patients,
            profile=profile,
            label_skew=label_skew,
            quantity_skew=quantity_skew,
        )
        paths.append(path)
        if progress is not None:
            what = "wrote" if created else "already present,"
            counts = np.bincount(src.labels[parts[index]], minlength=len(src.class_names))
            mix = ", ".join(f"{int(c)} {name}" for name, c in zip(src.class_names, counts, strict=True))
            progress(
                f"{path.name}: {what} {len(parts[index])} images ({mix}), {profile.modality} scanner {profile.name} "
                f"({index + 1}/{sites}) in {path}"
            )
    index_doc: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "task": "classification",
        "modality": modality,
        "source": src.name,
        "source_sha256": src.sha256,
        "class_names": list(src.class_names),
        "patients": int(patients),
        "label_skew": float(label_skew),
        "quantity_skew": float(quantity_skew),
        "sites": [p.name for p in paths],
    }
    if storage:
        index_doc["storage"] = storage
    write_json_atomic(out / INDEX_FILE, index_doc)
    return paths


def _check_common(seed: int, patients: int, label_skew: float, quantity_skew: float) -> None:
    check_int("seed", seed, low=0, high=2**63 - 1)
    check_int("patients", patients, low=1, high=99_999)
    check_skew(label_skew, quantity_skew)


def _write(
    root: Path,
    index: int,
    *,
    src: ImageSource,
    picks: np.ndarray,
    seed: int,
    patients: int,
    profile: ScannerProfile,
    label_skew: float,
    quantity_skew: float,
) -> tuple[Path, bool]:
    name = sim_site_name(index)
    labels = src.labels[picks]
    counts = np.bincount(labels, minlength=len(src.class_names))
    doc = {
        "name": name,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "task": "classification",
        "modality": profile.modality,
        "source": src.name,
        "source_sha256": src.sha256,
        "patients": int(patients),
        "images": len(picks),
        "class_names": list(src.class_names),
        "class_counts": {n: int(counts[k]) for k, n in enumerate(src.class_names)},
        "label_skew": float(label_skew),
        "quantity_skew": float(quantity_skew),
        "profile": profile_to_dict(profile),
    }
    return write_folder(
        Path(root),
        name,
        doc,
        lambda tmp: _build_xray_site(tmp, index, doc, profile, src.images[picks], labels, src.class_names),
    )


def _build_xray_site(
    folder: Path,
    index: int,
    doc: dict[str, Any],
    profile: ScannerProfile,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
) -> None:
    seed, n = doc["seed"], len(images)
    site_key = hashlib.sha256(json_text(doc).encode()).hexdigest()
    source = str(doc["source"])
    chest = source.lower().startswith(("pneumoniamnist", "chestmnist"))
    ages = (1, 6) if source.lower().startswith("pneumoniamnist") else (20, 80)
    (folder / "dicom").mkdir()
    rows = ["PatientID,label"]
    for j in range(n):
        pid = patient_id(index, j, n, min_width=4)
        rng = np.random.default_rng([seed, index, j])
        meta = draw_meta(rng, seed, age_years=ages)
        stored = expose(images[j].astype(np.float64) / 255.0, profile, rng)
        ds = _xray_dataset(
            profile,
            meta,
            site_index=index,
            patient_index=j,
            patient_id=pid,
            seed=seed,
            chest=chest,
            source=source,
            study_uid=uid(site_key, j, "study"),
            series_uid=uid(site_key, j, "series"),
        )
        series_dir = folder / "dicom" / pid / "SE0001"
        series_dir.mkdir(parents=True)
        write_slice(
            series_dir / "IM0001.dcm",
            ds,
            profile,
            sop_uid=uid(site_key, j, "sop"),
            instance=1,
            position=None,
            pixels=stored,
        )
        rows.append(f"{pid},{class_names[int(labels[j])]}")
    (folder / LABELS_CSV).write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / SITE_FILE).write_text(json_text(doc), encoding="utf-8")


def _xray_dataset(
    profile: ScannerProfile,
    meta: Any,
    *,
    site_index: int,
    patient_index: int,
    patient_id: str,
    seed: int,
    chest: bool,
    source: str,
    study_uid: str,
    series_uid: str,
) -> Dataset:
    """The attributes of one CR or DX (For Presentation) image."""
    cr = profile.modality == "CR"
    ds = patient_dataset(
        profile,
        meta,
        sop_class=_SOP_CLASSES[profile.modality],
        site_index=site_index,
        patient_index=patient_index,
        patient_id=patient_id,
        seed=seed,
        study_uid=study_uid,
        series_uid=series_uid,
    )
    ds.SeriesNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDescription = "SYNTHETIC XR CHEST" if chest else "SYNTHETIC XR"
    ds.SeriesDescription = "CHEST AP SYNTHETIC" if chest else "AP SYNTHETIC"
    if chest:
        ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    ds.PatientOrientation = ["L", "F"]
    ds.DerivationDescription = (
        f"Simulated {profile.modality} acquisition of an image of a public labelled set ({source})"[:1024]
    )
    if profile.kvp is not None:
        ds.KVP = ds_value(profile.kvp)
    ds.DistanceSourceToDetector = "1000"
    ds.Exposure = max(1, round(2.0 * profile.exposure))  # mAs
    ds.ExposureInuAs = round(2000.0 * profile.exposure)
    spacing = [ds_value(profile.pixel_spacing_mm)] * 2
    if cr:
        ds.RelativeXRayExposure = round(1000.0 * profile.exposure)
        ds.PixelSpacing = spacing
    else:
        exposure_index = 400.0 * profile.exposure
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImagerPixelSpacing = spacing
        ds.ExposureIndex = ds_value(exposure_index)
        ds.TargetExposureIndex = "400"
        ds.DeviationIndex = ds_value(round(10.0 * math.log10(exposure_index / 400.0), 2))
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher values = less X-ray intensity (MONOCHROME2 presentation: bright = attenuating).
        ds.PixelIntensityRelationshipSign = -1 if profile.photometric == "MONOCHROME2" else 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    top = 2**profile.bits_stored - 1
    # LINEAR window whose output range is exactly 0..top (PS3.3 C.11.2.1.2.1): the client reads stored / top.
    ds.WindowCenter = ds_value(top / 2.0 + 0.5)
    ds.WindowWidth = ds_value(top + 1.0)
    ds.VOILUTFunction = "LINEAR"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    return ds
