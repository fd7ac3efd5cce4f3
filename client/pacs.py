"""The hospital's PACS over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store).

Uses ``dicomweb-client`` (the client MONAI Label and MONAI Deploy use). The PACS is the site's
own: images and outputs never leave the hospital. Every request has a timeout; every failure is
a :class:`PacsError` whose one-line message names the PACS URL and the fix, never a patient
value (studies and series are named by salted hashes).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from client.dicom import hash_id
from common.errors import FedsiteError

__all__ = ["PacsError", "Pacs", "parse_query", "pull_site", "is_reference_seg"]

log = logging.getLogger("fedsite.client")

_STUDY, _SERIES, _MODALITY, _SOP = "0020000D", "0020000E", "00080060", "00080018"


class PacsError(FedsiteError):
    """The PACS cannot be reached or refused a request; the message says which and what to do."""


def _value(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


class Pacs:
    """A DICOMweb PACS at ``url`` (its DICOMweb root, e.g. ``http://pacs:8042/dicom-web``)."""

    def __init__(self, url: str, *, timeout: float = 60.0) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        class _Session(requests.Session):
            def request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                kwargs.setdefault("timeout", timeout)
                return super().request(*args, **kwargs)

        if not url.startswith(("http://", "https://")):
            raise PacsError(f"PACS URL {url!r} is not an http(s) URL; give the DICOMweb root, e.g. http://pacs:8042/dicom-web")
        self.url = url.rstrip("/")
        self._client = DICOMwebClient(url=self.url, session=_Session())
        # A busy PACS (HTTP 429/503/504) gets two more tries after 1 s and 2 s; an unreachable one fails fast.
        self._client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)

    def _call(self, what: str, fn: Callable, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            if status == 404:
                raise PacsError(f"{what}: the PACS at {self.url} has no such object (HTTP 404); check the UID and the PACS") from None
            raise PacsError(f"{what}: the PACS at {self.url} answered HTTP {status}; check its DICOMweb configuration and access rights") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise PacsError(
                f"{what}: the PACS at {self.url} is unreachable ({type(exc).__name__}); check the URL, that the PACS is running, "
                "and the network between this machine and it"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"{what}: request to the PACS at {self.url} failed ({type(exc).__name__})") from None

    def search_series(self, filters: dict[str, str] | None = None, *, study_uid: str | None = None) -> list[dict]:
        """QIDO-RS series search: ``[{"study", "series", "modality"}]`` (UIDs stay in memory, never logged)."""
        items = self._call(
            "searching series", self._client.search_for_series, study_instance_uid=study_uid, search_filters=dict(filters or {})
        ) or []
        return [{"study": _value(i, _STUDY), "series": _value(i, _SERIES), "modality": _value(i, _MODALITY)} for i in items]

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """WADO-RS: the series' instances."""
        return list(self._call(f"retrieving series {hash_id(series_uid)}", self._client.retrieve_series, study_uid, series_uid))

    def retrieve_study(self, study_uid: str, dest: Path) -> int:
        """WADO-RS: write every instance of the study under ``dest/<series-hash>/<instance-hash>.dcm``.

        Returns:
            The number of instances written.

        Raises:
            PacsError: If the PACS is unreachable or has no such study.
        """
        what = f"retrieving study {hash_id(study_uid)}"
        datasets = self._call(what, self._client.retrieve_study, study_uid)
        if not datasets:
            raise PacsError(f"{what}: the PACS at {self.url} has no such study; check the StudyInstanceUID")
        for ds in datasets:
            _write(ds, Path(dest) / hash_id(str(ds.SeriesInstanceUID)) / f"{hash_id(str(ds.SOPInstanceUID))}.dcm")
        return len(datasets)

    def store(self, paths: Iterable[Path]) -> None:
        """STOW-RS: store the files in one request (all of them, or the request fails).

        Raises:
            PacsError: If the PACS refused the request.
        """
        datasets = [pydicom.dcmread(str(p)) for p in paths]
        if not datasets:
            return
        study = str(datasets[0].StudyInstanceUID)
        response = self._call(f"storing {len(datasets)} objects", self._client.store_instances, datasets, study_instance_uid=study)
        failed = response.get("00081198") if response is not None else None  # FailedSOPSequence
        if failed and failed.get("Value"):
            raise PacsError(f"the PACS at {self.url} refused {len(failed['Value'])} of {len(datasets)} objects; see its log")


def _write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(str(tmp), enforce_file_format=True)
    tmp.replace(path)


def parse_query(text: str) -> dict[str, str]:
    """``"Modality=MR StudyDate=20240101-20241231"`` -> QIDO-RS search filters.

    Raises:
        PacsError: If a term is not ``KEY=VALUE``.
    """
    out: dict[str, str] = {}
    for term in shlex.split(text or ""):
        key, sep, value = term.partition("=")
        if not sep or not key:
            raise PacsError(f"query term {term!r} is not KEY=VALUE; e.g. --query 'Modality=MR StudyDate=20240101-20241231'")
        out[key] = value
    return out


_NOT_IMAGES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC", "REG"}


def is_reference_seg(ds: Dataset) -> bool:
    """A SEG drawn by a person (every segment MANUAL or SEMIAUTOMATIC), not a model's output (AUTOMATIC)."""
    segments = list(getattr(ds, "SegmentSequence", []))
    return bool(segments) and all(str(getattr(s, "SegmentAlgorithmType", "")) in ("MANUAL", "SEMIAUTOMATIC") for s in segments)


def pull_site(pacs: Pacs, filters: dict[str, str], out: Path, *, limit: int | None = None,
              say: Callable[[str], None] = lambda _m: None) -> dict[str, int]:
    """Fill a site folder from the PACS: matching image series and their studies' reference SEGs.

    Images go to ``out/dicom/<study-hash>/<series-hash>/<instance-hash>.dcm``. Each SEG object
    of the same studies that references a pulled series and was drawn by a person (every segment
    MANUAL or SEMIAUTOMATIC; a model's AUTOMATIC output, fedsite's own included, is not a
    reference) goes to ``out/labels/<instance-hash>.dcm``, where :mod:`client.masks` reads it as
    the series' mask.

    Args:
        pacs: The PACS.
        filters: QIDO-RS series filters (:func:`parse_query`).
        out: The site folder (created).
        limit: At most this many image series.
        say: Progress lines (hashes only).

    Returns:
        Counts: ``series``, ``instances``, ``masks``.
    """
    from client.layout import LABELS_DIR

    out = Path(out)
    found = [s for s in pacs.search_series(filters) if s["modality"].upper() not in _NOT_IMAGES]
    if limit:
        found = found[:limit]
    counts = {"series": 0, "instances": 0, "masks": 0}
    pulled: dict[str, set[str]] = {}
    for s in found:
        datasets = pacs.retrieve_series(s["study"], s["series"])
        folder = out / "dicom" / hash_id(s["study"]) / hash_id(s["series"])
        for ds in datasets:
            _write(ds, folder / f"{hash_id(str(ds.SOPInstanceUID))}.dcm")
        counts["series"] += 1
        counts["instances"] += len(datasets)
        pulled.setdefault(s["study"], set()).add(s["series"])
        say(f"series {hash_id(s['series'])}: {len(datasets)} instances")
    for study, series_uids in pulled.items():
        for seg in pacs.search_series({"Modality": "SEG"}, study_uid=study):
            for ds in pacs.retrieve_series(study, seg["series"]):
                if not is_reference_seg(ds):
                    continue
                refs = {str(r.SeriesInstanceUID) for r in getattr(ds, "ReferencedSeriesSequence", [])}
                if refs & series_uids:
                    _write(ds, out / LABELS_DIR / f"{hash_id(str(ds.SOPInstanceUID))}.dcm")
                    counts["masks"] += 1
    return counts
