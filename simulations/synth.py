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

This module writes the sites; the rooms it uses: the phantom and its imaging
(:mod:`simulations.phantom`), the DICOM and mask files (:mod:`simulations.dicom_writer`), the site
folder's sizes, checks, reuse and index (:mod:`simulations.sitefolder`), the names inside a site
folder (:mod:`client.layout`), and the command line (:mod:`simulations.cli`).

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
  patients (or images), ``z`` standard normal clipped to +-2 (:func:`simulations.sitefolder.site_patients`): a
  lognormal spread with mean about ``patients``, at most ``e**2 * patients``.
* ``label_skew = s`` on phantom sites varies the lesion burden: ``b = exp(s * z)`` (``z`` as
  above, :func:`simulations.sitefolder.lesion_burden`); lesion radii scale by ``b ** (1/3)`` (clipped to 0.4..2 and to
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

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.layout import LABELS_DIR, SITE_FILE, sim_site_name
from simulations import xray
from simulations.dicom_writer import draw_meta, series_dataset, uid, write_mask, write_slice
from simulations.phantom import (
    MR_TISSUES,
    acquire_ct,
    acquire_mr,
    draw_phantom,
    lesion_mask,
    render,
    render_ct,
)
from simulations.profiles import SITE_MODALITIES, ScannerProfile, profile_for_site, profile_to_dict
from simulations.sitefolder import (
    GENERATOR_VERSION,
    INDEX_FILE,
    check_int,
    check_skew,
    json_text,
    lesion_burden,
    patient_id,
    site_patients,
    storage_overrides,
    with_storage,
    write_folder,
    write_json_atomic,
)

__all__ = ["MIN_LESION_SLICE_FRACTION", "PHANTOM_MODALITIES", "REVERSED_PATIENT", "write_site", "write_sites"]

#: Patient index (0-based) whose InstanceNumbers run against slice position.
REVERSED_PATIENT = 1
#: Fraction of a patient's slices that must show lesion (patients with lesions).
MIN_LESION_SLICE_FRACTION = 0.6
#: Modalities of phantom (segmentation) sites.
PHANTOM_MODALITIES = ("MR", "CT")

# Random stream of the lesion-free patients: [seed, index, _STREAM_LESION_FREE] (see simulations.sitefolder).
_STREAM_LESION_FREE = 1_000_003


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
    """Write simulated site ``index`` to ``root / sim_site_name(index)``, or reuse it.

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
        if sites is None:
            raise ValueError(
                "sites=None is invalid with source=...: pass sites=<the total number of sites> so that "
                "the source's images can be checked to suffice for all of them"
            )
        check_int("sites", sites, low=1, high=9_999)
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
        profile=with_storage(_checked_profile(profile, modality), storage),
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
    check_int("sites", sites, low=1, high=9_999)
    out = Path(out)
    storage = storage_overrides(out, transfer_syntax=transfer_syntax, photometric=photometric)
    if source is not None:
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
    check_skew(label_skew, quantity_skew)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(sites):
        profile = with_storage(profile_for_site(index, modality), storage)
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
    write_json_atomic(out / INDEX_FILE, index_doc)
    return paths


def _check_args(seed: int, patients: int, slices: int) -> None:
    check_int("seed", seed, low=0, high=2**63 - 1)
    check_int("patients", patients, low=1, high=99_999)
    check_int("slices", slices, low=1, high=9_999)


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
        f"{', '.join(map(repr, xray.SOURCE_MODALITIES))} with source=<a .npz>"
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
        free = [patient_id(index, int(p), n) for p in sorted(order[:n_free])]
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
    check_int("index", index, low=0)
    name = sim_site_name(index)
    _check_args(seed, patients, slices)
    check_skew(label_skew, quantity_skew)
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
    return write_folder(root, name, doc, lambda tmp: _build_site(tmp, index, doc, profile))


def _build_site(folder: Path, index: int, doc: dict[str, Any], profile: ScannerProfile) -> None:
    seed, slices, n_patients = doc["seed"], doc["slices"], doc["site_patients"]
    ct = profile.modality == "CT"
    lesion_free = set(doc["lesion_free_patients"])
    lesion_scale = float(np.clip(doc["lesion_burden"] ** (1.0 / 3.0), 0.4, 2.0))
    # One key for every UID of the site: generator version, seed, index, parameters, profile.
    site_key = hashlib.sha256(json_text(doc).encode()).hexdigest()
    n, dx, thk = profile.matrix, profile.pixel_spacing_mm, profile.slice_thickness_mm
    fov = n * dx
    # Pixel centres in mm (DICOM patient coordinates, LPS): columns along +x, rows along +y.
    x0 = round(-fov / 2.0 + dx / 2.0, 4)
    x = x0 + dx * np.arange(n, dtype=np.float64)
    y = x.copy()
    z_rel = (np.arange(slices, dtype=np.float64) - (slices - 1) / 2.0) * thk
    (folder / "dicom").mkdir()
    (folder / LABELS_DIR).mkdir()
    i_width = max(4, len(str(slices)))
    for p in range(n_patients):
        pid = patient_id(index, p, n_patients)
        rng = np.random.default_rng([seed, index, p])
        meta = draw_meta(rng, seed)
        phantom = draw_phantom(rng, z_rel, thk, lesion_scale=lesion_scale)
        if pid in lesion_free:
            phantom = dataclasses.replace(phantom, lesions=())
        else:
            for _attempt in range(20):
                covered = lesion_mask(phantom, x, y, z_rel).any(axis=(1, 2)).mean()
                if covered >= MIN_LESION_SLICE_FRACTION:
                    break
                phantom = draw_phantom(rng, z_rel, thk, lesion_scale=lesion_scale)
        if ct:
            hu, mask = render_ct(phantom, x, y, z_rel, thk)
            stored = acquire_ct(hu, profile, rng)
        else:
            tissues = dataclasses.replace(MR_TISSUES, lesion_contrast=profile.lesion_contrast)
            signal, mask = render(phantom, x, y, z_rel, tissues)
            stored = acquire_mr(signal, profile, rng, x, y, z_rel)
        z = np.round(meta.z_centre + z_rel, 4)
        series_uid = uid(site_key, p, "series")
        series_dir = folder / "dicom" / pid / f"SE{meta.series_number:04d}"
        series_dir.mkdir(parents=True)
        instances = list(range(slices, 0, -1)) if p == REVERSED_PATIENT else list(range(1, slices + 1))
        common = series_dataset(
            profile,
            meta,
            site_index=index,
            patient_index=p,
            patient_id=pid,
            seed=seed,
            study_uid=uid(site_key, p, "study"),
            series_uid=series_uid,
            frame_uid=uid(site_key, p, "frame"),
        )
        for k in range(slices):
            write_slice(
                series_dir / f"IM{instances[k]:0{i_width}d}.dcm",
                common,
                profile,
                sop_uid=uid(site_key, p, "sop", k),
                instance=instances[k],
                position=(x0, x0, float(z[k])),
                pixels=stored[k],
            )
        write_mask(
            folder / LABELS_DIR / f"{series_uid}.nii.gz", mask, origin=(x0, x0, float(z[0])), spacing=(dx, dx, thk)
        )
    (folder / SITE_FILE).write_text(json_text(doc), encoding="utf-8")


if __name__ == "__main__":
    from simulations.cli import synth_main

    raise SystemExit(synth_main())
