"""Patient values kept out of everything the site reports: salted hashes, scrubbed messages, redacted paths.

Patients and series are named by salted hashes (:func:`hash_id`); a library's error message has
the identifying values of its file removed before it is shown (:func:`scrub`); a reported path
has every folder or file name that contains a patient value (name, ID, birth date, accession
number, institution, a UID) replaced by its hash (:class:`PathRedactor`). The identifying values
are those a header actually holds (:func:`identifiers`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from pydicom.multival import MultiValue

from client.layout import LABELS_DIR

__all__ = ["IDENTIFYING_KEYWORDS", "PathRedactor", "hash_id", "identifiers", "scrub"]

_HASH_SALT = b"fedsite-v1"

#: Header keywords whose values identify a patient, a study or an institution.
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)


_PERSON_NAMES = ("PatientName", "ReferringPhysicianName")


def hash_id(value: str) -> str:
    """A short, salted SHA-256 of an identifier (UID, PatientID, a path part) that is safe to log."""
    return hashlib.sha256(_HASH_SALT + value.encode("utf-8", "replace")).hexdigest()[:12]


def scrub(text: str, values: Iterable[str]) -> str:
    """Remove identifying ``values`` (and any file path) from a library's error message and keep it short."""
    out = str(text)
    for v in sorted({v for v in values if v and len(v) >= 2}, key=len, reverse=True):
        out = re.sub(re.escape(v), "<redacted>", out, flags=re.IGNORECASE)
    out = re.sub(r"(/|[A-Za-z]:\\)[^\s'\"]+", "<path>", out)  # file paths may hold patient names
    out = " ".join(out.split())
    return out[:200] + ("..." if len(out) > 200 else "")


def identifiers(ds: Any) -> set[str]:
    """Identifying values of a header (a pydicom ``Dataset``), as strings, for redaction of paths and messages.

    Person names also give their components (``Doe^Jane`` or ``Jane Doe`` -> ``Doe``, ``Jane``); other
    values (an institution's name) are kept whole (:class:`PathRedactor` matches them as token runs).
    """
    values: set[str] = set()
    for key in IDENTIFYING_KEYWORDS:
        try:
            elem = ds.get(key)
        except Exception:
            continue
        if elem in (None, ""):
            continue
        items = list(elem) if isinstance(elem, (list, tuple, MultiValue)) else [elem]
        for item in items:
            text = str(item).strip()
            if text:
                values.add(text)
                if key in _PERSON_NAMES:  # every name component, however the name is written
                    values.update(p.strip() for p in re.split(r"[\^=\s,]+", text) if p.strip())
    return values


_TOKEN = re.compile(r"[^0-9A-Za-z.]+")
_RESERVED_PARTS = {"dicom", "images", LABELS_DIR}


def _strip_suffixes(name: str) -> str:
    low = name.lower()
    for suffix in (".nii.gz", ".dcm", ".dicom", ".ima", ".img", ".nii", ".nrrd", ".gz"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


class PathRedactor:
    """Hashes every part of a relative path that holds an identifying value seen in the headers.

    Values and path parts are cut into tokens (characters other than letters, digits and ``.``
    separate them). A part is identifying when it equals an identifying value, or holds one: a
    one-token value (a PatientID, a name component such as ``Doe``, a UID) as one of its tokens,
    a longer value (``St Mary Hospital``) as a run of at least two consecutive tokens of it. A
    folder that only shares a common word with a value (``hospital-a`` with ``St Mary Hospital``,
    a site or project folder) is not a patient value and is kept. Tokens shorter than three
    characters never match alone. ``dicom``, ``images`` and ``labels`` are never hashed.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._whole: set[str] = set()
        self._tokens: set[str] = set()
        self._runs: set[tuple[str, ...]] = set()
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        """Learn more identifying values."""
        for v in values:
            v = v.strip().lower()
            if not v:
                continue
            self._whole.add(v)
            tokens = [t for t in _TOKEN.split(v) if t]
            if len(tokens) == 1 and len(tokens[0]) >= 3:
                self._tokens.add(tokens[0])
            self._runs.update(tuple(tokens[i : i + 2]) for i in range(len(tokens) - 1))

    def identifying(self, part: str) -> bool:
        """Whether a file or folder name holds an identifying value."""
        low = part.lower()
        stem = _strip_suffixes(low)
        if low in self._whole or stem in self._whole:
            return True
        for text in (stem, low):
            tokens = [t for t in _TOKEN.split(text) if t]
            if any(t in self._tokens or any(x in self._tokens for x in t.split(".")) for t in tokens):
                return True
            if any(tuple(tokens[i : i + 2]) in self._runs for i in range(len(tokens) - 1)):
                return True
        return False

    def redact(self, rel: str | Path) -> str:
        """``rel`` with each identifying part replaced by ``~<hash>`` (file suffix kept)."""
        parts = PurePosixPath(Path(rel).as_posix()).parts
        out = []
        for part in parts:
            if part.lower() in _RESERVED_PARTS or not self.identifying(part):
                out.append(part)
                continue
            stem = _strip_suffixes(part)
            out.append(f"~{hash_id(part)}{part[len(stem) :]}")
        return "/".join(out)
