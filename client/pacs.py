"""The hospital's PACS over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) or DIMSE.

DICOMweb uses ``dicomweb-client`` (the client MONAI Label and MONAI Deploy use), for a URL
``http(s)://host:port/dicom-web``. For an archive without DICOMweb, ``dimse://AET@host:port``
uses ``pynetdicom``: C-FIND (study root) to search, C-GET to retrieve, C-STORE to store; fedsite
calls as AE title ``FEDSITE`` (the PACS must know it, or accept any caller). The PACS is the site's
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

from client.phi import hash_id
from common.errors import FedsiteError

__all__ = ["DimsePacs", "Pacs", "PacsError", "connect", "is_reference_seg", "parse_query", "pull_site"]

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
            def request(self, *args, **kwargs):
                kwargs.setdefault("timeout", timeout)
                return super().request(*args, **kwargs)

        if not url.startswith(("http://", "https://")):
            raise PacsError(
                f"PACS URL {url!r} is not an http(s) URL; give the DICOMweb root, e.g. http://pacs:8042/dicom-web"
            )
        self.url = url.rstrip("/")
        self._client = DICOMwebClient(url=self.url, session=_Session())
        # A busy PACS (HTTP 429/503/504) gets two more tries after 1 s and 2 s; an unreachable one fails fast.
        self._client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            if status == 404:
                raise PacsError(
                    f"{what}: the PACS at {self.url} has no such object (HTTP 404); check the UID and the PACS"
                ) from None
            raise PacsError(
                f"{what}: the PACS at {self.url} answered HTTP {status}; "
                "check its DICOMweb configuration and access rights"
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise PacsError(
                f"{what}: the PACS at {self.url} is unreachable ({type(exc).__name__}); "
                "check the URL, that the PACS is running, "
                "and the network between this machine and it"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"{what}: request to the PACS at {self.url} failed ({type(exc).__name__})") from None

    def search_series(self, filters: dict[str, str] | None = None, *, study_uid: str | None = None) -> list[dict]:
        """QIDO-RS series search: ``[{"study", "series", "modality"}]`` (UIDs stay in memory, never logged)."""
        items = (
            self._call(
                "searching series",
                self._client.search_for_series,
                study_instance_uid=study_uid,
                search_filters=dict(filters or {}),
            )
            or []
        )
        return [
            {"study": _value(i, _STUDY), "series": _value(i, _SERIES), "modality": _value(i, _MODALITY)} for i in items
        ]

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """WADO-RS: the series' instances."""
        return list(
            self._call(f"retrieving series {hash_id(series_uid)}", self._client.retrieve_series, study_uid, series_uid)
        )

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
        response = self._call(
            f"storing {len(datasets)} objects", self._client.store_instances, datasets, study_instance_uid=study
        )
        failed = response.get("00081198") if response is not None else None  # FailedSOPSequence
        if failed and failed.get("Value"):
            raise PacsError(
                f"the PACS at {self.url} refused {len(failed['Value'])} of {len(datasets)} objects; see its log"
            )


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
            raise PacsError(
                f"query term {term!r} is not KEY=VALUE; e.g. --query 'Modality=MR StudyDate=20240101-20241231'"
            )
        out[key] = value
    return out


_NOT_IMAGES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC", "REG"}


def is_reference_seg(ds: Dataset) -> bool:
    """A SEG drawn by a person (every segment MANUAL or SEMIAUTOMATIC), not a model's output (AUTOMATIC)."""
    segments = list(getattr(ds, "SegmentSequence", []))
    return bool(segments) and all(
        str(getattr(s, "SegmentAlgorithmType", "")) in ("MANUAL", "SEMIAUTOMATIC") for s in segments
    )


def pull_site(
    pacs: Pacs,
    filters: dict[str, str],
    out: Path,
    *,
    limit: int | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, int]:
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


#: The AE title fedsite calls a DIMSE PACS with.
CALLING_AET = "FEDSITE"


class DimsePacs:
    """A PACS over DIMSE at ``dimse://AET@host:port`` (the same methods as :class:`Pacs`)."""

    def __init__(self, url: str, *, timeout: float = 60.0) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme != "dimse" or not parts.hostname or not parts.port or not parts.username:
            raise PacsError(f"PACS address {url!r} is not dimse://AET@host:port, e.g. dimse://ORTHANC@pacs.local:4242")
        self.url, self.aet, self.host, self.port, self.timeout = (
            url,
            parts.username,
            parts.hostname,
            parts.port,
            timeout,
        )

    def _associate(self, what: str, contexts: list, *, roles: list | None = None, handlers: list | None = None):
        from pynetdicom import AE

        ae = AE(ae_title=CALLING_AET)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for ctx in contexts:
            if isinstance(ctx, tuple):
                ae.add_requested_context(*ctx)
            else:
                ae.add_requested_context(ctx)
        assoc = ae.associate(self.host, self.port, ae_title=self.aet, ext_neg=roles or [], evt_handlers=handlers or [])
        if not assoc.is_established:
            raise PacsError(
                f"{what}: the PACS at {self.url} is unreachable or refused the association (AE title {self.aet!r}, "
                f"calling {CALLING_AET!r}); check the address, that the PACS runs and that it knows {CALLING_AET!r}"
            )
        return assoc

    def _find(self, what: str, query: Dataset) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        assoc = self._associate(what, [StudyRootQueryRetrieveInformationModelFind])
        out: list[Dataset] = []
        try:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status is None:
                    raise PacsError(f"{what}: the PACS at {self.url} did not answer in {self.timeout:.0f}s")
                if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    out.append(identifier)
                elif status.Status != 0x0000:
                    raise PacsError(f"{what}: the PACS at {self.url} answered C-FIND status 0x{status.Status:04X}")
        finally:
            assoc.release()
        return out

    def search_series(self, filters: dict[str, str] | None = None, *, study_uid: str | None = None) -> list[dict]:
        """C-FIND at series level: ``[{"study", "series", "modality"}]``."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid or ""
        query.SeriesInstanceUID = ""
        query.Modality = ""
        for key, value in (filters or {}).items():
            try:
                setattr(query, key, value)
            except (ValueError, TypeError):
                raise PacsError(
                    f"query key {key!r} is not a DICOM attribute keyword (e.g. Modality, StudyDate)"
                ) from None
        found = self._find("searching series", query)
        return [
            {
                "study": str(d.StudyInstanceUID),
                "series": str(d.SeriesInstanceUID),
                "modality": str(d.get("Modality", "")),
            }
            for d in found
        ]

    def _get(self, what: str, query: Dataset) -> list[Dataset]:
        from pynetdicom import build_role, evt
        from pynetdicom.presentation import StoragePresentationContexts
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        received: list[Dataset] = []

        def on_store(event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            received.append(ds)
            return 0x0000

        # A C-GET association carries the retrieve context and the storage classes we accept back (max 128).
        storage = [c.abstract_syntax for c in StoragePresentationContexts][:120]
        roles = [build_role(uid, scp_role=True) for uid in storage]
        assoc = self._associate(
            what,
            [StudyRootQueryRetrieveInformationModelGet, *storage],
            roles=roles,
            handlers=[(evt.EVT_C_STORE, on_store)],
        )
        try:
            for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                if status is None:
                    raise PacsError(f"{what}: the PACS at {self.url} did not answer in {self.timeout:.0f}s")
                if status.Status not in (0x0000, 0xFF00, 0xFF01, 0xB000):
                    raise PacsError(f"{what}: the PACS at {self.url} answered C-GET status 0x{status.Status:04X}")
        finally:
            assoc.release()
        return received

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """C-GET of one series."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
        return self._get(f"retrieving series {hash_id(series_uid)}", query)

    def retrieve_study(self, study_uid: str, dest: Path) -> int:
        """C-GET of a study into ``dest/<series-hash>/<instance-hash>.dcm``; the number of instances."""
        what = f"retrieving study {hash_id(study_uid)}"
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        datasets = self._get(what, query)
        if not datasets:
            raise PacsError(f"{what}: the PACS at {self.url} has no such study; check the StudyInstanceUID")
        for ds in datasets:
            _write(ds, Path(dest) / hash_id(str(ds.SeriesInstanceUID)) / f"{hash_id(str(ds.SOPInstanceUID))}.dcm")
        return len(datasets)

    def store(self, paths: Iterable[Path]) -> None:
        """C-STORE each file in one association; a refused file stops and is reported."""
        datasets = [pydicom.dcmread(str(p)) for p in paths]
        if not datasets:
            return
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        pairs = {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}
        contexts = [
            (sop, list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
            for sop, ts in sorted(pairs)
        ]
        assoc = self._associate(f"storing {len(datasets)} objects", contexts)
        try:
            for i, ds in enumerate(datasets):
                status = assoc.send_c_store(ds)
                if status is None or getattr(status, "Status", 0xFFFF) not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise PacsError(
                        f"the PACS at {self.url} refused object {i + 1} of {len(datasets)} (C-STORE); see its log"
                    )
        finally:
            assoc.release()


def connect(url: str, *, timeout: float = 60.0) -> Pacs | DimsePacs:
    """The PACS at ``url``: ``http(s)://.../dicom-web`` (DICOMweb) or ``dimse://AET@host:port`` (DIMSE)."""
    if url.startswith("dimse://"):
        return DimsePacs(url, timeout=timeout)
    return Pacs(url, timeout=timeout)
