"""Simulated site folders: per-site sizes and skew, checks, reuse, atomic creation, the index.

What every simulated site has in common, phantom (:mod:`simulations.synth`) or X-ray
(:mod:`simulations.xray`): its folder is built in a temporary folder and renamed into place
(:func:`write_folder`), reused only when its ``site.json`` matches the requested settings
(:func:`check_existing`), and listed in the index ``<out>/fedsite-sites.json`` (:data:`INDEX_FILE`).
Site-folder names (``site.json``, ``labels/``, ``site-01`` ...) come from :mod:`client.layout`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from client.layout import SITE_FILE
from simulations.profiles import PHOTOMETRICS, TRANSFER_SYNTAX_NAMES, TRANSFER_SYNTAXES, ScannerProfile

__all__ = [
    "GENERATOR_VERSION",
    "INDEX_FILE",
    "MAX_SKEW",
    "MIN_SKEWED_PATIENTS",
    "STREAM_LABEL",
    "check_existing",
    "check_int",
    "check_skew",
    "json_text",
    "lesion_burden",
    "patient_id",
    "site_patients",
    "storage_overrides",
    "with_storage",
    "write_folder",
    "write_json_atomic",
]

#: Version of the generator; recorded in every site.json and index. 2: CT and X-ray sites, Gibbs
#: ringing on two MR profiles, skew settings. A folder written by another version is not reused.
GENERATOR_VERSION = 3
#: Name of the index ``write_sites`` writes next to the site folders.
INDEX_FILE = "fedsite-sites.json"
#: Smallest site under quantity skew, patients (or images).
MIN_SKEWED_PATIENTS = 4
#: Largest skew value accepted.
MAX_SKEW = 100.0

# Random streams besides the per-patient ones ([seed, index, patient]; patient < 1_000_000).
# 1_000_003 is the phantom sites' lesion-free draw (simulations.synth), 1_000_010 and 1_000_011
# the X-ray sites' (simulations.xray).
_STREAM_QUANTITY = 1_000_001
#: Stream of a site's label-skew draw, ``[seed, index, STREAM_LABEL]`` (lesion burden or class mix).
STREAM_LABEL = 1_000_002


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
    z = float(np.clip(np.random.default_rng([seed, index, STREAM_LABEL]).standard_normal(), -2.0, 2.0))
    return math.exp(label_skew * z)


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
                f"transfer_syntax={transfer_syntax!r} is invalid: use one of "
                f"{', '.join(TRANSFER_SYNTAX_NAMES)} (all lossless)"
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


def with_storage(profile: ScannerProfile, storage: dict[str, str]) -> ScannerProfile:
    """``profile`` with the storage overrides of :func:`storage_overrides` applied."""
    return dataclasses.replace(profile, **storage) if storage else profile


def check_int(key: str, value: Any, *, low: int, high: int | None = None) -> None:
    """Raise ValueError naming ``key`` unless ``value`` is an integer in ``low .. high``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise ValueError(f"{key}={value!r} is invalid: use {allowed}")


def check_skew(label_skew: float, quantity_skew: float) -> None:
    """Raise ValueError naming the argument unless both skews are finite numbers in ``0 .. MAX_SKEW``."""
    for key, value in (("label_skew", label_skew), ("quantity_skew", quantity_skew)):
        ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not 0.0 <= value <= MAX_SKEW:
            raise ValueError(f"{key}={value!r} is invalid: use a number from 0 (no skew) to {MAX_SKEW:g}")


def patient_id(index: int, patient: int, n_patients: int, *, min_width: int = 3) -> str:
    """The PatientID of patient ``patient`` (0-based) of site ``index``, e.g. ``S01-P003``."""
    return f"S{index + 1:02d}-P{patient + 1:0{max(min_width, len(str(n_patients)))}d}"


def write_folder(root: Path, name: str, doc: dict[str, Any], build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Build ``root / name`` with ``build(tmp)`` in a temporary folder and rename it into place.

    Returns ``(folder, created)``; an existing folder is reused if its ``site.json`` equals ``doc``.
    """
    final = root / name
    if final.exists() or final.is_symlink():
        check_existing(final, doc)
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
            check_existing(final, doc)
            return final, False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


def check_existing(folder: Path, doc: dict[str, Any]) -> None:
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


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as :func:`json_text` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json_text(doc))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(doc: dict[str, Any]) -> str:
    """The canonical JSON text of a site.json or index (sorted keys; also the site's UID key)."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
