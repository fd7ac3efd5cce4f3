"""A site folder's light helpers: its public name, its image scan and its patient split.

Kept apart from :mod:`client.dataset` (which imports torch and MONAI) so that ``fedsite site
check`` starts fast; :mod:`client.dataset` re-exports these names.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path

from client.discovery import scan_images
from client.errors import DicomError
from client.layout import RESERVED, SITE_FILE
from client.records import Scan

__all__ = ["scan_site", "site_name_of", "site_split_seed", "split_by_patient"]

log = logging.getLogger("fedsite.client")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def site_name_of(site_dir: Path) -> str:
    """The site's public name: ``name`` in ``site.json`` if valid, else the folder name."""
    meta = site_dir / SITE_FILE
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("name")
            if isinstance(name, str) and _SAFE_NAME.match(name):
                return name
        except (OSError, ValueError):
            log.warning("%s in the site folder is not valid JSON; using the folder name", SITE_FILE)
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
        raise DicomError(
            f"the site has {len(unique)} labelled patient(s); at least 2 are needed to split train/validation"
        )
    rng = random.Random(seed)
    rng.shuffle(unique)
    n_val = min(max(1, math.ceil(val_fraction * len(unique))), len(unique) - 1)
    return set(unique[n_val:]), set(unique[:n_val])


def site_split_seed(name: str, seed: int) -> int:
    """The seed of a site's patient split: the run seed mixed with the site's public name."""
    return seed ^ int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")


def scan_site(site_dir: Path, *, modalities: tuple[str, ...] | None = None, volume: str = "first") -> Scan:
    """Index a site folder's images (headers only); paths are reported relative to ``site_dir``.

    ``volume`` is the ``data.volume`` policy for multi-volume series (:mod:`client.volume_split`).

    Raises:
        DicomError: If ``site_dir`` is not a folder.
    """
    return scan_images(site_dir, modalities=modalities, skip=RESERVED, relative_to=site_dir, volume=volume)
