"""The names inside a site folder, defined once.

A site folder looks like::

    <site>/dicom/...                         images, any structure (every file not reserved below)
    <site>/labels/<SeriesInstanceUID>.nii.gz segmentation masks (NIfTI, NRRD or DICOM SEG)
    <site>/labels.csv                        classification labels
    <site>/site.json                         optional: {"name": "my-hospital"}, the public site name
    <site>/privacy.json                      optional: the site's own privacy policy (client/policy.py)
    <site>/.fedsite-cache/                   decoded samples (made by fedsite, safe to delete)
    <site>/.fedsite-privacy/                 the privacy ledger (made by fedsite, never delete)

Everything that reads or writes a site folder (the site client, ``fedsite site check``, the
simulated-site generator) takes these names from here.
"""

from __future__ import annotations

__all__ = [
    "CACHE_DIR",
    "LABELS_CSV",
    "LABELS_DIR",
    "LEDGER_DIR",
    "POLICY_FILE",
    "RESERVED",
    "SITE_FILE",
    "sim_site_name",
]

SITE_FILE = "site.json"
LABELS_DIR = "labels"
LABELS_CSV = "labels.csv"
CACHE_DIR = ".fedsite-cache"
LEDGER_DIR = ".fedsite-privacy"
POLICY_FILE = "privacy.json"

#: Top-level names of a site folder that are not searched for images.
RESERVED = (LABELS_DIR, SITE_FILE, LABELS_CSV, CACHE_DIR, LEDGER_DIR, POLICY_FILE)


def sim_site_name(index: int) -> str:
    """The folder (and public) name of simulated site ``index`` (0-based): ``site-01``, ``site-02``, ..."""
    return f"site-{index + 1:02d}"
