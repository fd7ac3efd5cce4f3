"""Synthetic scanner sites: folders of real DICOM MR or CT series with lesion masks, or X-ray sites.

A phantom site is one simulated hospital: several patients, each with one axial MR or CT series
of a synthetic abdomen phantom (body with a subcutaneous fat ring, soft tissue, an organ, a
spine, vessels and 1-3 ellipsoidal lesions inside the organ), plus the lesion mask. Sites differ
the way scanners differ, through their :class:`~simulations.profiles.ScannerProfile` (grid,
contrast curve, bias field, k-space truncation, reconstruction kernel, calibration, noise, stored
bits, rescale, photometric interpretation, transfer syntax), so a model trained on one site
measurably degrades on another. With ``source=<a MedMNIST-layout .npz>`` the sites are instead
CR/DX X-ray sites made from that labelled image set, for classification (see
:mod:`simulations.xray`).

On-disk layout of one phantom site (the client relies on it)::

    <root>/<site>/site.json
        {"name", "generator_version", "seed", "task": "segmentation", "modality", "patients",
         "slices", "site_patients", "label_skew", "quantity_skew", "lesion_burden",
         "lesion_free_patients", "profile": {...}}
    <root>/<site>/dicom/<PatientID>/SE<SeriesNumber:04d>/IM<InstanceNumber:04d>.dcm
        one Part-10 MR Image Storage (or CT Image Storage) file per slice, e.g.
        dicom/S01-P003/SE0005/IM0001.dcm
    <root>/<site>/labels/<SeriesInstanceUID>.nii.gz
        uint8 lesion mask (0 background, 1 lesion) on the series' grid: size (columns, rows,
        slices), spacing (pixel spacing, pixel spacing, slice spacing), origin = the
        ImagePositionPatient of the lowest slice, direction from ImageOrientationPatient
        (identity: axial, [1, 0, 0, 0, 1, 0]); what SimpleITK's ImageSeriesReader gives for
        the series' files sorted by position.

``write_sites`` also writes ``<out>/fedsite-sites.json`` = ``{"generator_version", "seed",
"task", "modality", "patients", "slices", "label_skew", "quantity_skew", "sites": [names]}``
(an X-ray index has ``"source"``, ``"source_sha256"`` and ``"class_names"`` instead of
``"slices"``), plus ``"storage"`` when the sites were written with a storage override (below).
Every setting is also in each ``site.json``; a later call for the same folder with other settings
(seed, patients, modality, skew, source, profile, generator version, ...) raises
FileExistsError naming the difference instead of reusing or overwriting a site.

Storage overrides: ``write_sites(..., transfer_syntax="jpeg-ls", photometric="MONOCHROME1")``
(or ``python -m simulations.synth --transfer-syntax jpeg-ls --photometric MONOCHROME1``) writes
every site with that lossless transfer syntax (``explicit``, ``rle``, ``jpeg-ls``,
``jpeg2000``, ``deflate``) and/or photometric interpretation instead of its profile's; the
images decode to the same modality values. The override is recorded in the index, and later
calls for the same folder without an override (e.g. ``fedsite simulate --data-root <out>``)
keep it, so they reuse the sites. Without overrides the output is what it always was.

Skew (both off, 0, by default; each drawn per site from ``seed`` and the site index alone, so
site ``i`` does not depend on how many sites follow it):

* ``quantity_skew = q``: site ``i`` gets ``max(4, round(patients * exp(q * z - q**2 / 2)))``
  patients (or images), ``z`` standard normal clipped to +-2 (:func:`site_patients`): a
  lognormal spread with mean about ``patients``, at most ``e**2 * patients``.
* ``label_skew = s`` on phantom sites varies the lesion burden: ``b = exp(s * z)`` (``z`` as
  above, :func:`lesion_burden`); lesion radii scale by ``b ** (1/3)`` (clipped to 0.4..2 and to
  the organ), and a share ``min(0.75, 1 - b)`` of the site's patients (at least one patient keeps
  lesions) has no lesion at all (an all-zero mask). On X-ray sites it skews the class mix with a
  Dirichlet draw (:mod:`simulations.xray`).

Traps a client must handle, on purpose: file names follow InstanceNumber, and for patient
index 1 of every phantom site (PatientID ``S..-P002``) InstanceNumber runs against the slice
position (sort slices by ImagePositionPatient along the slice normal, not by InstanceNumber or
file name); MONOCHROME1 stores inverted values; stored values need RescaleSlope/Intercept; some
profiles are 16-bit signed; some are RLE or JPEG-LS Lossless.

MR intensities: tissue signal in ``[0, 1]`` -> ``signal ** contrast_gamma`` -> times a smooth
bias field (peak-to-peak ``bias_field``) -> k-space truncation to the central ``gibbs`` fraction
(Gibbs ringing; image only) -> noise (rician ``sqrt((s + n1)**2 + n2**2)`` or gaussian ``s + n``,
sigma ``noise_level``) -> modality value ``v = s * intensity_scale * 1000`` -> stored
``round((v - RescaleIntercept) / RescaleSlope)`` clipped to the BitsStored range -> for
MONOCHROME1 ``lo + hi - stored``. So ``stored * RescaleSlope + RescaleIntercept`` (after undoing
MONOCHROME1) gives ``v``.

CT intensities: tissues in HU (air -1000, fat -100, soft tissue 40, organ about 60, lesions 30-60
HU below the organ, contrast-filled vessels 180, spine 550), averaged over the slice thickness
(partial volume) -> in-plane system blur and reconstruction kernel (``kernel_sharpness`` < 0 a
further Gaussian blur, > 0 an edge-enhancing boost of high frequencies) -> calibration
``hu_offset + hu_scale * HU`` -> white noise filtered by the same kernel, sigma ``noise_level *
1000`` HU at the standard kernel (so smooth kernels are less noisy, sharp ones noisier) -> stored
as above (``stored * RescaleSlope + RescaleIntercept`` = HU).

Everything is deterministic: one ``numpy.random.default_rng([seed, site index, patient index])``
per patient, UIDs from ``pydicom.uid.generate_uid(entropy_srcs=...)``, dates derived from the
seed. The same seed and parameters give byte-identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from simulations.profiles import (
    PHOTOMETRICS,
    SIGNAL_UNITS,
    SITE_MODALITIES,
    TRANSFER_SYNTAXES,
    ScannerProfile,
    profile_for_site,
    profile_to_dict,
    stored_limits,
)

#: Version of the generator; recorded in every site.json and index. 2: CT and X-ray sites, Gibbs
#: ringing on two MR profiles, skew settings. A folder written by another version is not reused.
GENERATOR_VERSION = 3
#: Name of the per-site metadata file.
SITE_FILE = "site.json"
#: Name of the index ``write_sites`` writes next to the site folders.
INDEX_FILE = "fedsite-sites.json"
#: Patient index (0-based) whose InstanceNumbers run against slice position.
REVERSED_PATIENT = 1
#: Fraction of a patient's slices that must show lesion (patients with lesions).
MIN_LESION_SLICE_FRACTION = 0.6
#: Modalities of phantom (segmentation) sites.
PHANTOM_MODALITIES = ("MR", "CT")
#: What ``modality`` may be with an image ``source`` ("MR", the default, means "auto").
SOURCE_MODALITIES = ("CR", "DX", "auto")
TASKS = ("segmentation", "classification")
#: Smallest site under quantity skew, patients (or images).
MIN_SKEWED_PATIENTS = 4
#: Largest skew value accepted.
MAX_SKEW = 100.0

# Random streams besides the per-patient ones ([seed, index, patient]; patient < 1_000_000).
_STREAM_QUANTITY = 1_000_001
_STREAM_LABEL = 1_000_002
_STREAM_LESION_FREE = 1_000_003

_TRANSFER_SYNTAX_UIDS = {
    "ExplicitVRLittleEndian": ExplicitVRLittleEndian,
    "RLELossless": RLELossless,
    "JPEGLSLossless": JPEGLSLossless,
    "JPEG2000Lossless": JPEG2000Lossless,
    "DeflatedExplicitVRLittleEndian": DeflatedExplicitVRLittleEndian,
}
#: Short names of the transfer syntaxes for options (``--transfer-syntax jpeg-ls``).
TRANSFER_SYNTAX_NAMES = {
    "explicit": "ExplicitVRLittleEndian",
    "rle": "RLELossless",
    "jpeg-ls": "JPEGLSLossless",
    "jpeg2000": "JPEG2000Lossless",
    "deflate": "DeflatedExplicitVRLittleEndian",
}
_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# MR tissue signals in [0, 1] before the scanner's contrast curve.
_FAT = 0.62
_SOFT = 0.30
_ORGAN = 0.48
_SPINE = 0.12
_VESSEL = 0.95

# CT tissue values, HU.
_AIR_HU = -1000.0
_FAT_HU = -100.0
_SOFT_HU = 40.0
_ORGAN_HU = 60.0
_SPINE_HU = 550.0
_VESSEL_HU = 180.0
#: Sub-slices averaged across a CT slice's thickness (partial volume).
_CT_SUBSLICES = 3
#: Gaussian sigma (mm) of the CT system blur at the standard kernel.
_CT_SYSTEM_BLUR_MM = 0.5


def site_name(index: int) -> str:
    """The folder name of site ``index``: ``"site-01"`` for index 0, ``"site-02"``, ...

    Args:
        index: Site index, 0-based.

    Returns:
        The site's name (also its public name in ``site.json``).

    Raises:
        ValueError: If ``index`` is not a non-negative integer.
    """
    _check_int("index", index, low=0)
    return f"site-{index + 1:02d}"


def site_patients(index: int, *, seed: int, patients: int, quantity_skew: float = 0.0) -> int:
    """How many patients (or images) site ``index`` gets under quantity skew.

    Args:
        index: Site index, 0-based.
        seed: Generation seed.
        patients: The mean size, the ``patients`` argument of :func:`write_sites`.
        quantity_skew: 0 = every site gets ``patients``; ``q > 0`` = ``max(4, round(patients *
            exp(q * z - q**2 / 2)))`` with ``z`` standard normal (clipped to +-2) drawn from
            ``seed`` and ``index``.

    Returns:
        The site's size, >= 1 (>= 4 under skew).
    """
    if quantity_skew == 0:
        return int(patients)
    z = float(np.clip(np.random.default_rng([seed, index, _STREAM_QUANTITY]).standard_normal(), -2.0, 2.0))
    return max(MIN_SKEWED_PATIENTS, round(patients * math.exp(quantity_skew * z - quantity_skew**2 / 2.0)))


def lesion_burden(index: int, *, seed: int, label_skew: float = 0.0) -> float:
    """The lesion-burden factor ``b`` of phantom site ``index`` under label skew (1.0 without).

    Args:
        index: Site index, 0-based.
        seed: Generation seed.
        label_skew: 0 = every site 1.0; ``s > 0`` = ``exp(s * z)``, ``z`` standard normal
            (clipped to +-2) drawn from ``seed`` and ``index``.

    Returns:
        ``b``: lesion volumes scale by about ``b`` and a share ``min(0.75, 1 - b)`` of the
        site's patients are lesion-free (see the module docstring).
    """
    if label_skew == 0:
        return 1.0
    z = float(np.clip(np.random.default_rng([seed, index, _STREAM_LABEL]).standard_normal(), -2.0, 2.0))
    return math.exp(label_skew * z)


def synth_arguments_error(*, task: str | None, source: object, modality: str | None, classes: str | None) -> str | None:
    """Check the command-line combination of task, source, modality and class names.

    Args:
        task: ``--task`` (``None`` = implied by ``source``).
        source: ``--source`` (``None`` = phantom sites).
        modality: ``--modality`` (``None`` = the default for the task).
        classes: ``--classes``.

    Returns:
        The error message for the parser, or None if the combination is valid.
    """
    if task == "classification" and source is None:
        return (
            "--task classification needs --source PATH.npz (a MedMNIST-layout image set, e.g. "
            "../shared/data/pneumoniamnist/pneumoniamnist_merged.npz); phantom sites are for segmentation"
        )
    if task == "segmentation" and source is not None:
        return "--source gives class-labelled images (classification): drop --task segmentation or --source"
    if source is None and modality not in (None, *PHANTOM_MODALITIES):
        return f"--modality {modality} needs --source PATH.npz (X-ray sites are made from a labelled image set); phantom sites are MR or CT"
    if source is not None and modality == "CT":
        return "--modality CT is for phantom sites; with --source use CR, DX or auto"
    if classes is not None and source is None:
        return "--classes names the labels of --source; give --source PATH.npz or drop --classes"
    return None


def write_site(
    root: Path,
    index: int,
    *,
    seed: int,
    patients: int = 6,
    slices: int = 8,
    profile: ScannerProfile | None = None,
    transfer_syntax: str | None = None,
    photometric: str | None = None,
    modality: str = "MR",
    source: Path | str | None = None,
    sites: int | None = None,
    label_skew: float = 0.0,
    quantity_skew: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write simulated site ``index`` to ``root / site_name(index)``, or reuse it.

    The folder is built in a temporary folder next to it and renamed into place, so it either
    exists complete or not at all. Two processes may write different indices at once; if two
    race on the same index, the first rename wins and the other returns the winner's folder.

    Args:
        root: Folder that holds the site folders; created if missing.
        index: Site index, 0-based; names the folder and seeds its patients.
        seed: Generation seed, >= 0; the same seed and parameters give byte-identical files.
        patients: Patients (one series each) in the site, >= 1; the mean under quantity skew.
            For an image source: images (one patient each).
        slices: Axial slices per series, >= 1 (ignored for an image source).
        profile: Scanner profile; default ``profile_for_site(index, modality)``. Its modality
            must match ``modality`` (CR or DX for an image source).
        transfer_syntax: Storage override (see the module docstring), e.g. ``"jpeg-ls"``;
            ``None`` keeps what ``root``'s index recorded, else the profile's.
        photometric: Storage override, ``"MONOCHROME1"`` or ``"MONOCHROME2"``; ``None`` as above.
        modality: ``"MR"`` or ``"CT"`` phantom sites; with ``source`` ``"CR"``, ``"DX"`` or
            ``"auto"`` (``"MR"`` means ``"auto"``: CR and DX profiles mixed over the sites).
        source: A MedMNIST-layout ``.npz`` of labelled images: the site is an X-ray site of
            ``patients`` of its images (see :mod:`simulations.xray`).
        sites: The total number of sites (needed with ``source``: the images of all sites must
            fit in the source; the site's own images depend only on ``index``, not on ``sites``).
        label_skew: 0 = no skew; > 0 = per-site lesion burden (phantoms) or class mix (source).
        quantity_skew: 0 = every site has ``patients``; > 0 = lognormal site sizes.
        class_names: Class name of each label value of ``source`` (default from its file name).

    Returns:
        The site folder.

    Raises:
        FileExistsError: If the folder exists but was written with other parameters (or is not
            a finished site): delete it or choose another ``root``.
        FileNotFoundError: If ``source`` does not exist.
        TypeError: If ``profile`` is not a ScannerProfile.
        ValueError: If an argument is out of range or the source is unusable.
    """
    root = Path(root)
    storage = storage_overrides(root, transfer_syntax=transfer_syntax, photometric=photometric)
    if source is not None:
        from simulations import xray

        if sites is None:
            raise ValueError(
                "sites=None is invalid with source=...: pass sites=<the total number of sites> so that "
                "the source's images can be checked to suffice for all of them"
            )
        _check_int("sites", sites, low=1, high=9_999)
        src = xray.load_source(source, class_names=class_names)
        path, _ = xray.write_xray_site(
            root,
            index,
            src=src,
            seed=seed,
            patients=patients,
            sites=sites,
            profile=profile,
            storage=storage,
            modality=modality,
            label_skew=label_skew,
            quantity_skew=quantity_skew,
        )
        return path
    _check_phantom_modality(modality)
    if class_names is not None:
        raise ValueError("class_names=... names the labels of an image source: pass source=... or drop class_names")
    profile = profile if profile is not None else profile_for_site(index, modality)
    path, _ = _write_site(
        root,
        index,
        seed=seed,
        patients=patients,
        slices=slices,
        profile=_with_storage(_checked_profile(profile, modality), storage),
        modality=modality,
        label_skew=label_skew,
        quantity_skew=quantity_skew,
    )
    return path


def write_sites(
    out: Path,
    *,
    sites: int,
    seed: int,
    patients: int = 6,
    slices: int = 8,
    progress: Callable[[str], None] | None = None,
    transfer_syntax: str | None = None,
    photometric: str | None = None,
    modality: str = "MR",
    source: Path | str | None = None,
    label_skew: float = 0.0,
    quantity_skew: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write sites ``0 .. sites - 1`` under ``out``, each with ``profile_for_site(i, modality)``.

    Also writes the index ``out / "fedsite-sites.json"`` (see the module docstring). Sites
    already present with the same parameters are reused.

    Args:
        out: Folder for the site folders; created if missing.
        sites: Number of sites, >= 1.
        seed: Generation seed, >= 0.
        patients: Patients per site, >= 1 (the mean under quantity skew; images for a source).
        slices: Slices per series, >= 1 (ignored for an image source).
        progress: Called with one human-readable message per site.
        transfer_syntax: Storage override for every site, e.g. ``"jpeg-ls"`` (see the module
            docstring); ``None`` keeps what ``out``'s index recorded, else each profile's.
        photometric: Storage override, ``"MONOCHROME1"`` or ``"MONOCHROME2"``; ``None`` as above.
        modality: ``"MR"`` or ``"CT"`` phantoms; with ``source`` ``"CR"``, ``"DX"`` or ``"auto"``
            (``"MR"`` means ``"auto"``).
        source: A MedMNIST-layout ``.npz``: write X-ray classification sites from its images.
        label_skew: 0 = no skew; > 0 = per-site lesion burden (phantoms) or class mix (source).
        quantity_skew: 0 = equal site sizes; > 0 = lognormal site sizes, at least 4.
        class_names: Class name of each label value of ``source`` (default from its file name).

    Returns:
        The site folders, in index order.

    Raises:
        FileExistsError: If a site folder exists with other parameters.
        FileNotFoundError: If ``source`` does not exist.
        ValueError: If an argument is out of range or the source is unusable.
    """
    _check_int("sites", sites, low=1, high=9_999)
    out = Path(out)
    storage = storage_overrides(out, transfer_syntax=transfer_syntax, photometric=photometric)
    if source is not None:
        from simulations import xray

        return xray.write_xray_sites(
            out,
            sites=sites,
            seed=seed,
            patients=patients,
            progress=progress,
            storage=storage,
            modality=modality,
            source=source,
            label_skew=label_skew,
            quantity_skew=quantity_skew,
            class_names=class_names,
        )
    _check_phantom_modality(modality)
    if class_names is not None:
        raise ValueError("class_names=... names the labels of an image source: pass source=... or drop class_names")
    _check_args(seed, patients, slices)
    _check_skew(label_skew, quantity_skew)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(sites):
        profile = _with_storage(profile_for_site(index, modality), storage)
        path, created = _write_site(
            out,
            index,
            seed=seed,
            patients=patients,
            slices=slices,
            profile=profile,
            modality=modality,
            label_skew=label_skew,
            quantity_skew=quantity_skew,
        )
        paths.append(path)
        if progress is not None:
            what = "wrote" if created else "already present,"
            n = site_patients(index, seed=seed, patients=patients, quantity_skew=quantity_skew)
            progress(
                f"{path.name}: {what} {n} patients x {slices} slices, {modality} scanner {profile.name} "
                f"({index + 1}/{sites}) in {path}"
            )
    index_doc: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "task": "segmentation",
        "modality": modality,
        "patients": int(patients),
        "slices": int(slices),
        "label_skew": float(label_skew),
        "quantity_skew": float(quantity_skew),
        "sites": [p.name for p in paths],
    }
    if storage:
        index_doc["storage"] = storage
    _write_json_atomic(out / INDEX_FILE, index_doc)
    return paths


def storage_overrides(
    out: Path, *, transfer_syntax: str | None = None, photometric: str | None = None
) -> dict[str, str]:
    """The storage overrides for the sites under ``out``: the arguments, else what its index recorded.

    Args:
        out: The folder of the site folders.
        transfer_syntax: A short name (``"jpeg-ls"``) or a profile value (``"JPEGLSLossless"``).
        photometric: ``"MONOCHROME1"`` or ``"MONOCHROME2"``.

    Returns:
        ``{"transfer_syntax": ..., "photometric": ...}`` with the keys that are overridden.

    Raises:
        ValueError: If a value is not allowed (the message lists what is).
    """
    given: dict[str, str] = {}
    if transfer_syntax is not None:
        value = TRANSFER_SYNTAX_NAMES.get(str(transfer_syntax).lower(), transfer_syntax)
        if value not in TRANSFER_SYNTAXES:
            raise ValueError(
                f"transfer_syntax={transfer_syntax!r} is invalid: use one of {', '.join(TRANSFER_SYNTAX_NAMES)} (all lossless)"
            )
        given["transfer_syntax"] = value
    if photometric is not None:
        if str(photometric).upper() not in PHOTOMETRICS:
            raise ValueError(f"photometric={photometric!r} is invalid: use one of {', '.join(PHOTOMETRICS)}")
        given["photometric"] = str(photometric).upper()
    if given:
        return given
    try:
        recorded = json.loads((Path(out) / INDEX_FILE).read_text(encoding="utf-8")).get("storage")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {k: str(recorded[k]) for k in ("transfer_syntax", "photometric") if k in recorded}


def _with_storage(profile: ScannerProfile, storage: dict[str, str]) -> ScannerProfile:
    return dataclasses.replace(profile, **storage) if storage else profile


# --------------------------------------------------------------------------------------------
# Site folder: parameters, reuse, atomic creation


def _check_int(key: str, value: Any, *, low: int, high: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise ValueError(f"{key}={value!r} is invalid: use {allowed}")


def _check_args(seed: int, patients: int, slices: int) -> None:
    _check_int("seed", seed, low=0, high=2**63 - 1)
    _check_int("patients", patients, low=1, high=99_999)
    _check_int("slices", slices, low=1, high=9_999)


def _check_skew(label_skew: float, quantity_skew: float) -> None:
    for key, value in (("label_skew", label_skew), ("quantity_skew", quantity_skew)):
        ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not 0.0 <= value <= MAX_SKEW:
            raise ValueError(f"{key}={value!r} is invalid: use a number from 0 (no skew) to {MAX_SKEW:g}")


def _check_phantom_modality(modality: str) -> None:
    if modality in PHANTOM_MODALITIES:
        return
    if modality in SITE_MODALITIES:
        raise ValueError(
            f"modality={modality!r} needs source=<a MedMNIST-layout .npz> (X-ray sites are made from a labelled "
            f"image set); phantom sites are {' or '.join(map(repr, PHANTOM_MODALITIES))}"
        )
    raise ValueError(
        f"modality={modality!r} is invalid: use {' or '.join(map(repr, PHANTOM_MODALITIES))} (phantom sites), or "
        f"{', '.join(map(repr, SOURCE_MODALITIES))} with source=<a .npz>"
    )


def _checked_profile(profile: Any, modality: str) -> ScannerProfile:
    if not isinstance(profile, ScannerProfile):
        raise TypeError(f"profile={profile!r} is invalid: use a ScannerProfile or None")
    if profile.modality != modality:
        raise ValueError(
            f"profile {profile.name!r} is a {profile.modality} profile but modality={modality!r}: pass "
            f"modality={profile.modality!r} or a {modality} profile"
        )
    return profile


def _phantom_doc(
    name: str,
    index: int,
    *,
    seed: int,
    patients: int,
    slices: int,
    profile: ScannerProfile,
    modality: str,
    label_skew: float,
    quantity_skew: float,
) -> dict[str, Any]:
    n = site_patients(index, seed=seed, patients=patients, quantity_skew=quantity_skew)
    burden = lesion_burden(index, seed=seed, label_skew=label_skew)
    free: list[str] = []
    share = min(0.75, max(0.0, 1.0 - burden))
    n_free = min(n - 1, round(share * n))
    if n_free > 0:
        order = np.random.default_rng([seed, index, _STREAM_LESION_FREE]).permutation(n)
        free = [_patient_id(index, int(p), n) for p in sorted(order[:n_free])]
    return {
        "name": name,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "task": "segmentation",
        "modality": modality,
        "patients": int(patients),
        "slices": int(slices),
        "site_patients": n,
        "label_skew": float(label_skew),
        "quantity_skew": float(quantity_skew),
        "lesion_burden": round(burden, 6),
        "lesion_free_patients": free,
        "profile": profile_to_dict(profile),
    }


def _patient_id(index: int, patient: int, n_patients: int, *, min_width: int = 3) -> str:
    return f"S{index + 1:02d}-P{patient + 1:0{max(min_width, len(str(n_patients)))}d}"


def _write_site(
    root: Path,
    index: int,
    *,
    seed: int,
    patients: int,
    slices: int,
    profile: ScannerProfile | None,
    modality: str = "MR",
    label_skew: float = 0.0,
    quantity_skew: float = 0.0,
) -> tuple[Path, bool]:
    """:func:`write_site` for a phantom site, also telling whether the folder was created (True) or reused."""
    name = site_name(index)
    _check_args(seed, patients, slices)
    _check_skew(label_skew, quantity_skew)
    _check_phantom_modality(modality)
    profile = _checked_profile(profile if profile is not None else profile_for_site(index, modality), modality)
    doc = _phantom_doc(
        name,
        index,
        seed=seed,
        patients=patients,
        slices=slices,
        profile=profile,
        modality=modality,
        label_skew=label_skew,
        quantity_skew=quantity_skew,
    )
    return _write_folder(root, name, doc, lambda tmp: _build_site(tmp, index, doc, profile))


def _write_folder(root: Path, name: str, doc: dict[str, Any], build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Build ``root / name`` with ``build(tmp)`` in a temporary folder and rename it into place.

    Returns ``(folder, created)``; an existing folder is reused if its ``site.json`` equals ``doc``.
    """
    final = root / name
    if final.exists() or final.is_symlink():
        _check_existing(final, doc)
        return final, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a site folder is a normal folder
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # Lost a race: another process finished the same site first.
            shutil.rmtree(tmp, ignore_errors=True)
            _check_existing(final, doc)
            return final, False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


def _check_existing(folder: Path, doc: dict[str, Any]) -> None:
    """Raise FileExistsError unless ``folder`` is a finished site written with ``doc``."""
    fix = "delete it or choose another folder"
    if not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder: {fix}")
    try:
        found = json.loads((folder / SITE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict):
        raise FileExistsError(
            f"{folder} exists but has no readable {SITE_FILE}, so it is not a finished site of this generator: {fix}"
        )
    diffs: list[str] = []
    if found.get("generator_version") != doc["generator_version"]:
        # Everything else may differ too; the version says it all.
        diffs.append(
            f"generator_version {found.get('generator_version')!r} on disk, {doc['generator_version']!r} requested"
        )
    else:
        first = [k for k in ("seed", "task", "modality", "source", "patients", "slices") if k in doc or k in found]
        for key in first + sorted((set(doc) | set(found)) - set(first) - {"name", "profile", "generator_version"}):
            if key not in found:
                diffs.append(f"{key} missing on disk, {doc[key]!r} requested")
            elif key not in doc:
                diffs.append(f"{key} {found[key]!r} on disk, not requested")
            elif found[key] != doc[key]:
                diffs.append(f"{key} {found[key]!r} on disk, {doc[key]!r} requested")
        found_profile = found.get("profile")
        if not isinstance(found_profile, dict):
            diffs.append("profile missing on disk")
        else:
            for key, want in doc["profile"].items():
                if found_profile.get(key) != want:
                    diffs.append(f"profile.{key} {found_profile.get(key)!r} on disk, {want!r} requested")
            for key in sorted(set(found_profile) - set(doc["profile"])):
                diffs.append(f"profile.{key} {found_profile[key]!r} on disk, not in the requested profile")
    if diffs:
        raise FileExistsError(
            f"{folder} already holds a site written with other parameters ({'; '.join(diffs)}): {fix}"
        )


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(_json_text(doc))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------------------------
# Phantom: anatomy in physical millimetres, independent of the scanner's grid


@dataclass(frozen=True)
class _Ellipse:
    """An axis-rotated ellipse in the axial plane (mm); ``theta`` in radians."""

    cx: float
    cy: float
    a: float
    b: float
    theta: float

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if np.ndim(x) == 2 and np.ndim(y) == 2 and x.shape[0] == 1 and y.shape[1] == 1:
            # A grid (row of x, column of y): evaluate only the ellipse's bounding box (same result, faster).
            reach = max(self.a, self.b) + 1e-3
            xs, ys = x[0], y[:, 0]
            cols = np.flatnonzero(np.abs(xs - self.cx) <= reach)
            rows = np.flatnonzero(np.abs(ys - self.cy) <= reach)
            out = np.zeros((len(ys), len(xs)), dtype=bool)
            if len(cols) and len(rows):
                box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
                out[box] = self._formula(xs[None, box[1]], ys[box[0], None])
            return out
        return self._formula(x, y)

    def _formula(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx, dy = x - self.cx, y - self.cy
        u = (dx * c + dy * s) / self.a
        v = (dy * c - dx * s) / self.b
        return u * u + v * v <= 1.0


@dataclass(frozen=True)
class _Vessel:
    cx: float
    cy: float
    r: float
    tx: float  # in-plane drift per mm of z
    ty: float


@dataclass(frozen=True)
class _Lesion:
    cx: float
    cy: float
    cz: float  # relative to the slab centre
    rx: float
    ry: float
    rz: float
    theta: float
    signal: float

    def section(self, z: float) -> _Ellipse | None:
        k = 1.0 - ((z - self.cz) / self.rz) ** 2
        if k <= 0.0:
            return None
        f = math.sqrt(k)
        return _Ellipse(self.cx, self.cy, self.rx * f, self.ry * f, self.theta)


@dataclass(frozen=True)
class _Phantom:
    body: _Ellipse
    interior: _Ellipse
    organ: _Ellipse
    spine: _Ellipse
    vessels: tuple[_Vessel, ...]
    lesions: tuple[_Lesion, ...]
    organ_signal: float


@dataclass(frozen=True)
class _Meta:
    study_date: dt.date
    study_time: str
    birth_date: dt.date
    sex: str
    series_number: int
    z_centre: float


def _rotate(theta: float, x: float, y: float) -> tuple[float, float]:
    c, s = math.cos(theta), math.sin(theta)
    return x * c - y * s, x * s + y * c


def _draw_meta(rng: np.random.Generator, seed: int, *, age_years: tuple[int, int] = (30, 80)) -> _Meta:
    # Study dates spread over 2019-2023, anchored on the seed so a new seed moves them too.
    base = dt.date(2019, 1, 1) + dt.timedelta(days=int(seed % 997))
    study = base + dt.timedelta(days=int(rng.integers(0, 730)))
    hour, minute, second = int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    age_days = int(rng.integers(age_years[0] * 365, age_years[1] * 365))
    return _Meta(
        study_date=study,
        study_time=f"{hour:02d}{minute:02d}{second:02d}",
        birth_date=study - dt.timedelta(days=age_days),
        sex="F" if rng.random() < 0.5 else "M",
        series_number=int(rng.integers(2, 10)),
        z_centre=float(np.round(rng.uniform(-60.0, 60.0) * 2.0) / 2.0),
    )


def _draw_phantom(
    rng: np.random.Generator, z_rel: np.ndarray, thickness: float, *, lesion_scale: float = 1.0
) -> _Phantom:
    """Draw one patient's anatomy; ``z_rel`` are the slice positions relative to the slab centre.

    ``lesion_scale`` multiplies the lesion radii (label skew); 1.0 draws exactly what it always did.
    """
    theta = float(rng.uniform(-0.15, 0.15))
    bx, by = (float(v) for v in rng.uniform(-8.0, 8.0, 2))
    ba, bb = float(rng.uniform(75.0, 100.0)), float(rng.uniform(55.0, 80.0))
    fat = float(rng.uniform(8.0, 14.0))
    body = _Ellipse(bx, by, ba, bb, theta)
    ia, ib = ba - fat, bb - fat
    interior = _Ellipse(bx, by, ia, ib, theta)

    # Organ: anterior (-y) part of the interior.
    oa, ob = ia * float(rng.uniform(0.6, 0.8)), ib * float(rng.uniform(0.65, 0.85))
    ox = float(rng.uniform(-1.0, 1.0)) * (ia - oa) * 0.6
    oy = -float(rng.uniform(0.0, 1.0)) * (ib - ob) * 0.6
    dx, dy = _rotate(theta, ox, oy)
    organ = _Ellipse(bx + dx, by + dy, oa, ob, theta + float(rng.uniform(-0.3, 0.3)))

    # Spine: dark disk at the posterior (+y) edge of the interior.
    rs = float(rng.uniform(10.0, 14.0))
    dx, dy = _rotate(theta, 0.0, ib - rs - 3.0)
    spine = _Ellipse(bx + dx, by + dy, rs, rs, 0.0)

    vessels: list[_Vessel] = []
    for _ in range(int(rng.integers(2, 6))):
        r = float(rng.uniform(2.5, 5.0))
        tx, ty = (float(v) for v in rng.uniform(-0.15, 0.15, 2))
        for _attempt in range(50):
            rho, phi = 0.85 * math.sqrt(float(rng.random())), float(rng.uniform(0.0, 2.0 * math.pi))
            px, py = _rotate(theta, ia * rho * math.cos(phi), ib * rho * math.sin(phi))
            cx, cy = bx + px, by + py
            grown = _Ellipse(organ.cx, organ.cy, organ.a + r + 3.0, organ.b + r + 3.0, organ.theta)
            near_spine = math.hypot(cx - spine.cx, cy - spine.cy) < rs + r + 3.0
            if not grown.inside(np.float64(cx), np.float64(cy)) and not near_spine:
                vessels.append(_Vessel(cx, cy, r, tx, ty))
                break

    organ_signal = _ORGAN * float(rng.uniform(0.93, 1.07))
    lesions = _draw_lesions(rng, organ, organ_signal, z_rel, thickness, scale=lesion_scale)
    return _Phantom(body, interior, organ, spine, tuple(vessels), lesions, organ_signal)


def _draw_lesions(
    rng: np.random.Generator,
    organ: _Ellipse,
    organ_signal: float,
    z_rel: np.ndarray,
    thickness: float,
    *,
    scale: float = 1.0,
) -> tuple[_Lesion, ...]:
    """1-3 ellipsoids inside the organ, spread in z so most slices of the slab show lesion."""
    slab = len(z_rel) * thickness
    n = int(rng.integers(1, 4))
    r_max = 0.7 * min(organ.a, organ.b)
    rx = np.minimum(rng.uniform(10.0, 22.0, n) * scale, r_max)
    ry = np.minimum(rng.uniform(10.0, 22.0, n) * scale, r_max)
    rz = rng.uniform(10.0, 22.0, n) * scale
    # Elongate in z when the lesions together would not span ~85% of the slab.
    rz *= max(1.0, 0.85 * slab / float(np.sum(2.0 * rz)))
    jitter = float(rng.uniform(-0.08, 0.08)) * slab
    if float(np.sum(2.0 * rz)) <= slab:
        edges = np.concatenate([[0.0], np.cumsum(2.0 * rz)])
        cz = edges[:-1] + rz - edges[-1] / 2.0 + jitter
    else:
        cz = np.linspace(-0.3 * slab, 0.3 * slab, n) if n > 1 else np.zeros(1)
        cz = cz + jitter
    lesions = []
    for i in range(n):
        rho, phi = 0.75 * math.sqrt(float(rng.random())), float(rng.uniform(0.0, 2.0 * math.pi))
        reach = max(rx[i], ry[i])
        px, py = _rotate(organ.theta, (organ.a - reach) * rho * math.cos(phi), (organ.b - reach) * rho * math.sin(phi))
        lesions.append(
            _Lesion(
                cx=organ.cx + px,
                cy=organ.cy + py,
                cz=float(cz[i]),
                rx=float(rx[i]),
                ry=float(ry[i]),
                rz=float(rz[i]),
                theta=float(rng.uniform(0.0, math.pi)),
                signal=organ_signal * float(rng.uniform(1.5, 1.7)),
            )
        )
    return tuple(lesions)


@dataclass(frozen=True)
class _Tissues:
    """Value of each tissue in a rendered map: MR signal in [0, 1] or CT HU."""

    background: float
    fat: float
    soft: float
    spine: float
    vessel: float
    hu: bool  # organ and lesion values: from the phantom's MR signals (False) or mapped to HU (True)
    lesion_contrast: float = 1.0  # MR: scales the lesion's excess signal over the organ (the profile's)

    def organ(self, ph: _Phantom) -> float:
        if not self.hu:
            return ph.organ_signal
        return _ORGAN_HU + (ph.organ_signal / _ORGAN - 1.0) * 150.0  # about 50..70 HU

    def lesion(self, ph: _Phantom, lesion: _Lesion) -> float:
        if not self.hu:
            return ph.organ_signal + (lesion.signal - ph.organ_signal) * self.lesion_contrast
        # MR lesions are 1.5-1.7x the organ signal; in CT they are hypodense, 30-60 HU below the organ.
        return self.organ(ph) - 30.0 - (lesion.signal / ph.organ_signal - 1.5) * 150.0


_MR_TISSUES = _Tissues(background=0.0, fat=_FAT, soft=_SOFT, spine=_SPINE, vessel=_VESSEL, hu=False)
_CT_TISSUES = _Tissues(background=_AIR_HU, fat=_FAT_HU, soft=_SOFT_HU, spine=_SPINE_HU, vessel=_VESSEL_HU, hu=True)


def _render(
    ph: _Phantom, x: np.ndarray, y: np.ndarray, z_rel: np.ndarray, tissues: _Tissues = _MR_TISSUES
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue values ``(Z, Y, X)`` float32 (MR signal in [0, 1] or CT HU) and lesion mask ``(Z, Y, X)`` uint8."""
    xx, yy = x[None, :], y[:, None]
    n_z = len(z_rel)
    signal = np.full((n_z, len(y), len(x)), tissues.background, dtype=np.float32)
    mask = np.zeros(signal.shape, dtype=np.uint8)
    body = ph.body.inside(xx, yy)
    interior = ph.interior.inside(xx, yy)
    spine = ph.spine.inside(xx, yy)
    organ = ph.organ.inside(xx, yy) & interior & ~spine
    organ_value = tissues.organ(ph)
    for k, z in enumerate(z_rel):
        s = signal[k]
        s[body] = tissues.fat
        s[interior] = tissues.soft
        s[spine] = tissues.spine
        s[organ] = organ_value
        for v in ph.vessels:
            disk = _Ellipse(v.cx + v.tx * z, v.cy + v.ty * z, v.r, v.r, 0.0).inside(xx, yy)
            s[disk & interior & ~organ & ~spine] = tissues.vessel
        for lesion in ph.lesions:
            sec = lesion.section(float(z))
            if sec is None:
                continue
            inside = sec.inside(xx, yy) & organ
            s[inside] = tissues.lesion(ph, lesion)
            mask[k][inside] = 1
    return signal, mask


def _render_ct(
    ph: _Phantom, x: np.ndarray, y: np.ndarray, z_rel: np.ndarray, thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    """HU ``(Z, Y, X)`` float32 averaged over each slice's thickness, and the mask at the slice centres."""
    hu, mask = _render(ph, x, y, z_rel, _CT_TISSUES)
    offsets = (np.arange(_CT_SUBSLICES) - (_CT_SUBSLICES - 1) / 2.0) * (thickness / _CT_SUBSLICES)
    total = np.zeros(hu.shape, dtype=np.float64)
    for off in offsets:
        part = hu if off == 0.0 else _render(ph, x, y, z_rel + off, _CT_TISSUES)[0]
        total += part
    return (total / len(offsets)).astype(np.float32), mask


def _lesion_mask(ph: _Phantom, x: np.ndarray, y: np.ndarray, z_rel: np.ndarray) -> np.ndarray:
    xx, yy = x[None, :], y[:, None]
    organ = ph.organ.inside(xx, yy) & ph.interior.inside(xx, yy) & ~ph.spine.inside(xx, yy)
    out = np.zeros((len(z_rel), len(y), len(x)), dtype=bool)
    for k, z in enumerate(z_rel):
        for lesion in ph.lesions:
            sec = lesion.section(float(z))
            if sec is not None:
                out[k] |= sec.inside(xx, yy) & organ
    return out


def _truncate_kspace(s: np.ndarray, keep: float) -> np.ndarray:
    """Keep the central ``keep`` fraction of each slice's in-plane k-space (Gibbs ringing)."""
    n_y, n_x = s.shape[-2:]
    fy = np.abs(np.fft.fftfreq(n_y))[:, None]
    fx = np.abs(np.fft.rfftfreq(n_x))[None, :]
    window = (fy <= keep * 0.5) & (fx <= keep * 0.5)
    k = np.fft.rfft2(s.astype(np.float64), axes=(-2, -1))
    return np.fft.irfft2(k * window, s=(n_y, n_x), axes=(-2, -1)).astype(np.float32)


def _acquire(
    signal: np.ndarray,
    profile: ScannerProfile,
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    z_rel: np.ndarray,
) -> np.ndarray:
    """MR tissue signal -> stored pixel values ``(Z, Y, X)`` (uint16 or int16) for ``profile``."""
    s = np.power(signal, np.float32(profile.contrast_gamma), dtype=np.float32)

    # Smooth multiplicative bias field with a random orientation; drawn even when unused so
    # the noise that follows is the same whatever the profile's bias strength.
    phi = float(rng.uniform(0.0, 2.0 * math.pi))
    c2, cz = float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.3, 0.3))
    if profile.bias_field > 0:
        u = (x[None, None, :] * math.cos(phi) + y[None, :, None] * math.sin(phi)) / 120.0
        p = u + c2 * u * u + cz * (z_rel[:, None, None] / 120.0)
        p = (p - p.min()) / max(float(p.max() - p.min()), 1e-9) - 0.5
        s = s * (1.0 + profile.bias_field * p).astype(np.float32)

    # The object's k-space sampled only up to a fraction of the grid's Nyquist frequency.
    if 0.0 < profile.gibbs < 1.0:
        s = _truncate_kspace(s, profile.gibbs)

    noise = rng.standard_normal((2, *s.shape), dtype=np.float32) * np.float32(profile.noise_level)
    if profile.noise_kind == "rician":
        s = np.sqrt((s + noise[0]) ** 2 + noise[1] ** 2)
    else:
        s = s + noise[0]

    value = s.astype(np.float64) * (profile.intensity_scale * SIGNAL_UNITS)
    return _store(value, profile)


def _store(value: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Modality values -> stored values: rescale, round, clip to BitsStored, invert for MONOCHROME1."""
    lo, hi = stored_limits(profile)
    stored = np.clip(np.rint((value - profile.rescale_intercept) / profile.rescale_slope), lo, hi)
    if profile.photometric == "MONOCHROME1":
        stored = (lo + hi) - stored
    return stored.astype(np.int16 if profile.pixel_representation == 1 else np.uint16)


def _ct_kernel(n: int, dx: float, sharpness: float, *, full: bool = False) -> np.ndarray:
    """Transfer function of system blur times reconstruction kernel on the (r)fft grid of an n x n slice."""
    fy = np.fft.fftfreq(n, d=dx)[:, None]
    fx = (np.fft.fftfreq(n, d=dx) if full else np.fft.rfftfreq(n, d=dx))[None, :]
    f2 = fy * fy + fx * fx
    h = np.exp(-2.0 * math.pi**2 * _CT_SYSTEM_BLUR_MM**2 * f2)
    if sharpness < 0:  # smooth kernel: a further Gaussian blur, sigma up to 1.5 mm
        h = h * np.exp(-2.0 * math.pi**2 * (1.5 * -sharpness) ** 2 * f2)
    elif sharpness > 0:  # sharp kernel: boost frequencies above ~0.2 cycles/mm, up to 2.5x
        h = h * (1.0 + 1.5 * sharpness * (1.0 - np.exp(-2.0 * math.pi**2 * 1.0**2 * f2)))
    return h


def _acquire_ct(hu: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """True HU ``(Z, Y, X)`` -> stored pixel values for a CT ``profile`` (see the module docstring)."""
    n = hu.shape[-1]
    dx = profile.pixel_spacing_mm
    h = _ct_kernel(n, dx, profile.kernel_sharpness)
    # Noise: white noise through the same kernel, scaled so the standard kernel gives noise_level * 1000 HU.
    white = rng.standard_normal(hu.shape, dtype=np.float32).astype(np.float64)
    standard = math.sqrt(float(np.mean(_ct_kernel(n, dx, 0.0, full=True) ** 2)))
    # One filtering pass for both (linear): calibrated anatomy, as deviation from air so the periodic
    # FFT sees a zero background, plus noise.
    before = profile.hu_scale * (hu.astype(np.float64) - _AIR_HU) + white * (profile.noise_level * 1000.0 / standard)
    filtered = np.fft.irfft2(np.fft.rfft2(before, axes=(-2, -1)) * h, s=(n, n), axes=(-2, -1))
    value = profile.hu_offset + profile.hu_scale * _AIR_HU + filtered
    return _store(value, profile)


# --------------------------------------------------------------------------------------------
# Writing one phantom site


def _ds(value: float) -> str:
    """A DICOM DS string (<= 16 characters) for ``value``."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.10g}"
    return text


def _uid(key: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=[key, *map(str, parts)])


def _build_site(folder: Path, index: int, doc: dict[str, Any], profile: ScannerProfile) -> None:
    seed, slices, n_patients = doc["seed"], doc["slices"], doc["site_patients"]
    ct = profile.modality == "CT"
    lesion_free = set(doc["lesion_free_patients"])
    lesion_scale = float(np.clip(doc["lesion_burden"] ** (1.0 / 3.0), 0.4, 2.0))
    # One key for every UID of the site: generator version, seed, index, parameters, profile.
    site_key = hashlib.sha256(_json_text(doc).encode()).hexdigest()
    n, dx, thk = profile.matrix, profile.pixel_spacing_mm, profile.slice_thickness_mm
    fov = n * dx
    # Pixel centres in mm (DICOM patient coordinates, LPS): columns along +x, rows along +y.
    x0 = round(-fov / 2.0 + dx / 2.0, 4)
    x = x0 + dx * np.arange(n, dtype=np.float64)
    y = x.copy()
    z_rel = (np.arange(slices, dtype=np.float64) - (slices - 1) / 2.0) * thk
    (folder / "dicom").mkdir()
    (folder / "labels").mkdir()
    i_width = max(4, len(str(slices)))
    for p in range(n_patients):
        patient_id = _patient_id(index, p, n_patients)
        rng = np.random.default_rng([seed, index, p])
        meta = _draw_meta(rng, seed)
        phantom = _draw_phantom(rng, z_rel, thk, lesion_scale=lesion_scale)
        if patient_id in lesion_free:
            phantom = dataclasses.replace(phantom, lesions=())
        else:
            for _attempt in range(20):
                covered = _lesion_mask(phantom, x, y, z_rel).any(axis=(1, 2)).mean()
                if covered >= MIN_LESION_SLICE_FRACTION:
                    break
                phantom = _draw_phantom(rng, z_rel, thk, lesion_scale=lesion_scale)
        if ct:
            hu, mask = _render_ct(phantom, x, y, z_rel, thk)
            stored = _acquire_ct(hu, profile, rng)
        else:
            tissues = dataclasses.replace(_MR_TISSUES, lesion_contrast=profile.lesion_contrast)
            signal, mask = _render(phantom, x, y, z_rel, tissues)
            stored = _acquire(signal, profile, rng, x, y, z_rel)
        z = np.round(meta.z_centre + z_rel, 4)
        series_uid = _uid(site_key, p, "series")
        series_dir = folder / "dicom" / patient_id / f"SE{meta.series_number:04d}"
        series_dir.mkdir(parents=True)
        instances = list(range(slices, 0, -1)) if p == REVERSED_PATIENT else list(range(1, slices + 1))
        common = _series_dataset(
            profile,
            meta,
            site_index=index,
            patient_index=p,
            patient_id=patient_id,
            seed=seed,
            study_uid=_uid(site_key, p, "study"),
            series_uid=series_uid,
            frame_uid=_uid(site_key, p, "frame"),
        )
        for k in range(slices):
            _write_slice(
                series_dir / f"IM{instances[k]:0{i_width}d}.dcm",
                common,
                profile,
                sop_uid=_uid(site_key, p, "sop", k),
                instance=instances[k],
                position=(x0, x0, float(z[k])),
                pixels=stored[k],
            )
        _write_mask(
            folder / "labels" / f"{series_uid}.nii.gz", mask, origin=(x0, x0, float(z[0])), spacing=(dx, dx, thk)
        )
    (folder / SITE_FILE).write_text(_json_text(doc), encoding="utf-8")


def _patient_dataset(
    profile: ScannerProfile,
    meta: _Meta,
    *,
    sop_class: str,
    site_index: int,
    patient_index: int,
    patient_id: str,
    seed: int,
    study_uid: str,
    series_uid: str,
) -> Dataset:
    """Attributes every synthetic image has: patient, study, series, equipment and pixel format."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    date = meta.study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = meta.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = meta.study_time
    ds.AccessionNumber = f"SYN{site_index + 1:02d}{patient_index + 1:04d}{seed % 100000:05d}"[-16:]
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = f"Synthetic Hospital {site_index + 1:02d}"
    ds.ReferringPhysicianName = ""
    ds.ManufacturerModelName = profile.model_name
    ds.PatientName = "SYNTH^" + patient_id.replace("-", "")
    ds.PatientID = patient_id
    ds.PatientBirthDate = meta.birth_date.strftime("%Y%m%d")
    ds.PatientSex = meta.sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(patient_index + 1)
    ds.SeriesNumber = meta.series_number
    ds.AcquisitionNumber = 1
    ds.ImageComments = f"SYNTHETIC DATA (fedsite generator v{GENERATOR_VERSION}); not a real patient"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows = profile.matrix
    ds.Columns = profile.matrix
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = profile.pixel_representation
    return ds


def _series_dataset(
    profile: ScannerProfile,
    meta: _Meta,
    *,
    site_index: int,
    patient_index: int,
    patient_id: str,
    seed: int,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
) -> Dataset:
    """The attributes shared by every slice of one MR or CT series."""
    ct = profile.modality == "CT"
    ds = _patient_dataset(
        profile,
        meta,
        sop_class=CTImageStorage if ct else MRImageStorage,
        site_index=site_index,
        patient_index=patient_index,
        patient_id=patient_id,
        seed=seed,
        study_uid=study_uid,
        series_uid=series_uid,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = _ds(profile.slice_thickness_mm)
    ds.PatientPosition = "HFS"
    if ct:
        ds.StudyDescription = "SYNTHETIC CT ABDOMEN"
        kernel = profile.convolution_kernel or "STANDARD"
        ds.SeriesDescription = f"ABDOMEN {profile.slice_thickness_mm:g}MM {kernel} SYNTHETIC"[:64]
        if profile.kvp is not None:
            ds.KVP = _ds(profile.kvp)
        ds.ConvolutionKernel = kernel
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(profile.matrix * profile.pixel_spacing_mm)
        ds.GantryDetectorTilt = "0"
        ds.RotationDirection = "CW"
        ds.XRayTubeCurrent = 200
        ds.ExposureTime = 500
    else:
        ds.StudyDescription = "SYNTHETIC MR ABDOMEN"
        ds.SeriesDescription = "T1 AX SYNTHETIC"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = 1
        if profile.field_strength is not None:
            ds.MagneticFieldStrength = _ds(profile.field_strength)
            ds.ImagingFrequency = _ds(42.577478 * profile.field_strength)
        ds.SpacingBetweenSlices = _ds(profile.slice_thickness_mm)
    ds.ImageOrientationPatient = [_ds(v) for v in _ORIENTATION]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [_ds(profile.pixel_spacing_mm), _ds(profile.pixel_spacing_mm)]
    if ct:
        ds.WindowCenter = "40"  # abdomen soft-tissue window
        ds.WindowWidth = "400"
    else:
        full = profile.intensity_scale * SIGNAL_UNITS
        ds.WindowCenter = _ds(0.5 * full)
        ds.WindowWidth = _ds(full)
    ds.RescaleIntercept = _ds(profile.rescale_intercept)
    ds.RescaleSlope = _ds(profile.rescale_slope)
    ds.RescaleType = "HU" if ct else "US"
    return ds


def _implementation_uid() -> str:
    return _uid("fedsite-synth-implementation", GENERATOR_VERSION)


def _write_slice(
    path: Path,
    common: Dataset,
    profile: ScannerProfile,
    *,
    sop_uid: str,
    instance: int,
    position: tuple[float, float, float] | None,
    pixels: np.ndarray,
) -> None:
    """Write one image file: ``common`` plus the instance's own attributes and pixels.

    ``position`` is the ImagePositionPatient of an axial slice, or None for a projection image.
    """
    ds = Dataset()
    for elem in common:  # shared, never mutated
        ds.add(elem)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(position[2])

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = common.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _implementation_uid()
    meta.ImplementationVersionName = f"FEDSITE_SYNTH_{GENERATOR_VERSION}"
    ds.file_meta = meta

    arr = np.ascontiguousarray(pixels)
    ts = _TRANSFER_SYNTAX_UIDS[profile.transfer_syntax]
    if ts == RLELossless:
        # generate_instance_uid=False: pydicom 3 would otherwise replace the SOPInstanceUID with
        # a random one, breaking determinism and the file meta's MediaStorageSOPInstanceUID.
        ds.compress(RLELossless, arr, encoding_plugin=_rle_plugin(), generate_instance_uid=False)
    elif ts in (JPEGLSLossless, JPEG2000Lossless):
        ds.compress(ts, arr, generate_instance_uid=False)
    elif ts == DeflatedExplicitVRLittleEndian:
        ds.PixelData = arr.astype("<i2" if profile.pixel_representation == 1 else "<u2").tobytes()
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    else:
        ds.PixelData = arr.astype("<i2" if profile.pixel_representation == 1 else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


_RLE_PLUGIN: str | None = None


def _rle_plugin() -> str:
    """The RLE encoder to use: pylibjpeg-rle (fast, compiled) if installed, else pydicom's own.

    Both produce the same bytes (checked in the tests); pydicom's is ~15x slower.
    """
    global _RLE_PLUGIN
    if _RLE_PLUGIN is None:
        from pydicom.pixels.encoders import RLELosslessEncoder

        _RLE_PLUGIN = "pylibjpeg" if "pylibjpeg" in RLELosslessEncoder.available_plugins else "pydicom"
    return _RLE_PLUGIN


def _write_mask(
    path: Path, mask: np.ndarray, *, origin: tuple[float, float, float], spacing: tuple[float, float, float]
) -> None:
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))  # (Z, Y, X) -> (x, y, z)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.synth``: write simulated sites (phantoms, or X-ray sites from an image set)."""
    from common.config import RunConfig

    p = argparse.ArgumentParser(
        prog="python -m simulations.synth", description="Write simulated scanner sites (DICOM + masks or labels)."
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the site folders")
    p.add_argument("--sites", type=int, default=3)
    defaults = RunConfig()
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--patients", type=int, default=defaults.sim.patients, help="patients (images for --source) per site"
    )
    p.add_argument("--slices", type=int, default=defaults.sim.slices, help="slices per patient (phantoms only)")
    p.add_argument(
        "--transfer-syntax",
        choices=sorted(TRANSFER_SYNTAX_NAMES),
        help="write every site with this lossless transfer syntax",
    )
    p.add_argument("--photometric", choices=PHOTOMETRICS, help="write every site with this photometric interpretation")
    p.add_argument(
        "--modality",
        choices=SITE_MODALITIES,
        help="MR or CT phantoms (default MR); CR, DX or auto (mixed, default) with --source",
    )
    p.add_argument(
        "--source",
        type=Path,
        metavar="PATH.npz",
        help="a MedMNIST-layout .npz of labelled images: write X-ray classification sites",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        help="segmentation (phantoms) or classification (needs --source); default from --source",
    )
    p.add_argument(
        "--label-skew",
        type=float,
        default=0.0,
        help="0 = same class mix / lesion burden on every site; > 0 = per-site skew",
    )
    p.add_argument("--quantity-skew", type=float, default=0.0, help="0 = equal site sizes; > 0 = lognormal site sizes")
    p.add_argument(
        "--classes", help="comma-separated class names of the source's labels 0, 1, ... (default from the file name)"
    )
    args = p.parse_args(argv)
    problem = synth_arguments_error(task=args.task, source=args.source, modality=args.modality, classes=args.classes)
    if problem:
        p.error(problem)
    try:
        paths = write_sites(
            args.out,
            sites=args.sites,
            seed=args.seed,
            patients=args.patients,
            slices=args.slices,
            transfer_syntax=args.transfer_syntax,
            photometric=args.photometric,
            progress=print,
            modality=args.modality or ("auto" if args.source is not None else "MR"),
            source=args.source,
            label_skew=args.label_skew,
            quantity_skew=args.quantity_skew,
            class_names=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {len(paths)} sites under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
