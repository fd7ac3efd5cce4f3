"""The site check: what a site folder holds, what the client can use, and why the rest is rejected.

``fedsite site check DIR`` runs :func:`check_site` before a site joins a federation. Every file
under the site's image folders is accepted (it gives at least one slice of a usable series) or
rejected with a reason; pixel data is decoded unless ``decode=False``, so damaged pixel data is
found too. Masks in ``labels/`` are checked against their series' grid, a ``labels.csv``
classification manifest (:mod:`client.labels`) is matched, and the train/validation split by
patient is computed as a run would.

The report holds counts, modality and manufacturer names, SOP class and transfer syntax names,
hashes, and paths relative to the site folder with every identifying part hashed
(:class:`client.phi.PathRedactor`). It never holds patient names, IDs, birth dates,
accession numbers, institution names or raw UIDs.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from client.discovery import read_usable
from client.errors import DicomError
from client.layout import LABELS_CSV, LABELS_DIR
from client.masks import index_masks, read_mask
from client.phi import hash_id
from client.records import Rejection, SeriesRecord

__all__ = ["SiteReport", "check_site", "count_reasons", "format_report", "reason_group", "write_report"]

_HASH_IN_REASON = re.compile(r"\b(series|file) [0-9a-f]{12}: ")
_SERIES_PREFIX = re.compile(r"series ([0-9a-f]{12}): ")


@dataclass
class SiteReport:
    """What :func:`check_site` found; :meth:`to_json` is the ``--json`` report."""

    site: str
    files_total: int = 0
    files_accepted: int = 0
    files_rejected: int = 0
    series_total: int = 0
    series_usable: int = 0
    slices_usable: int = 0
    pixels_decoded: bool = True
    by_modality: dict[str, dict[str, int]] = field(default_factory=dict)
    by_manufacturer: dict[str, dict[str, int]] = field(default_factory=dict)
    by_sop_class: dict[str, dict[str, int]] = field(default_factory=dict)
    by_transfer_syntax: dict[str, dict[str, int]] = field(default_factory=dict)
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    volumes: dict[str, Any] = field(default_factory=dict)
    """Multi-volume series: the policy, how many series were split and by which header value."""
    labels: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    rejected_by_reason: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-able dict."""
        return asdict(self)


def reason_group(reason: str) -> str:
    """A rejection reason without the series hash, so that like reasons group together."""
    return _HASH_IN_REASON.sub("", reason)


def _count(table: dict[str, dict[str, int]], key: str, s: SeriesRecord) -> None:
    row = table.setdefault(key, {"series": 0, "slices": 0, "files": 0})
    row["series"] += 1
    row["slices"] += len(s.slices)
    row["files"] += len(s.files)


def _decode_check(series: list[SeriesRecord], redact) -> tuple[list[SeriesRecord], list[Rejection]]:
    """Decode every series. A file that fails is dropped with its own reason; the rest of its series
    is kept (a 2D slice task uses the slices that decode)."""
    good: list[SeriesRecord] = []
    rejected: list[Rejection] = []
    for s in series:
        try:
            _, kept, failed = read_usable(s)
        except DicomError as exc:
            reason = str(exc) if str(exc).startswith("series ") else f"series {s.series_hash}: {exc}"
            rejected.extend(Rejection(redact(path), reason) for path in s.files)
            continue
        except Exception as exc:
            reason = f"series {s.series_hash}: unexpected error while decoding ({type(exc).__name__})"
            rejected.extend(Rejection(redact(path), reason) for path in s.files)
            continue
        rejected.extend(Rejection(redact(path), reason) for path, reason in failed)
        if kept.slices:
            good.append(kept if not failed else replace(kept, first_file=redact(kept.slices[0].path)))
    return good, rejected


def _mask_check(site_dir: Path, series: list[SeriesRecord], redact) -> tuple[dict[str, Any], set[str]]:
    """Label coverage of the segmentation masks; returns (summary, hashes of series with a good mask)."""
    index = index_masks(site_dir / LABELS_DIR)
    problems: list[dict[str, str]] = [{"file": redact(p), "reason": r} for p, r in index.problems]
    good: set[str] = set()
    keys = {s.label_key for s in series}
    for s in series:
        found = index.masks_for(s)
        if len(found) > 1:
            for p in found:
                problems.append(
                    {
                        "file": redact(p),
                        "reason": f"series {s.series_hash}: {len(found)} masks name this series; keep one",
                    }
                )
            continue
        if not found:
            continue
        try:
            read_mask(found[0], s, (len(s.slices), s.rows, s.columns))
        except DicomError as exc:
            problems.append({"file": redact(found[0]), "reason": f"series {s.series_hash}: {exc}"})
            continue
        except Exception as exc:
            problems.append(
                {
                    "file": redact(found[0]),
                    "reason": f"series {s.series_hash}: mask cannot be read ({type(exc).__name__})",
                }
            )
            continue
        good.add(s.series_hash)
    for key, paths in index.by_key.items():
        if key not in keys:
            for p in paths:
                problems.append(
                    {"file": redact(p), "reason": "mask names no usable series (its series is missing or was rejected)"}
                )
    n = len(series)
    return (
        {
            "mask_files": index.files_total,
            "series_with_mask": len(good),
            "series_without_mask": n - len(good),
            "coverage": round(len(good) / n, 4) if n else 0.0,
            "problems": sorted(problems, key=lambda p: p["file"]),
        },
        good,
    )


def _manifest_check(site_dir: Path, series: list[SeriesRecord]) -> dict[str, Any] | None:
    from client.labels import LabelManifestError, class_labels

    path = site_dir / LABELS_CSV
    if not path.is_file():
        return None
    try:
        found = class_labels(path, series)
    except LabelManifestError as exc:
        return {"error": str(exc)}
    n = len(series)
    return {
        "labelled": len(found.labels),
        "unlabelled": len(found.unlabelled),
        "ambiguous": len(found.ambiguous),
        "ambiguous_series": found.ambiguous,
        "unmatched_rows": found.unmatched_rows,
        "rows_without_label": found.rows_without_label,
        "coverage": round(len(found.labels) / n, 4) if n else 0.0,
        "classes": found.classes,
    }


def check_site(
    site_dir: Path,
    *,
    modalities: tuple[str, ...] | None = None,
    decode: bool = True,
    seed: int = 42,
    val_fraction: float = 0.25,
    volume: str = "first",
) -> SiteReport:
    """Audit a site folder: files, usable series, labels and the split, with reasons for every rejection.

    Args:
        site_dir: The site folder (``dicom/``, ``labels/``, ``site.json``; or any tree of images).
        modalities: Keep only these Modality values; ``None`` keeps all.
        decode: Decode every series' pixel data (finds damaged pixel data; slower).
        seed: The run seed (the split depends on it and the site's name).
        val_fraction: The run's ``data.val-fraction``.
        volume: The run's ``data.volume`` (which volumes of a multi-volume series are used).

    Returns:
        The report; nothing in it identifies a patient.

    Raises:
        DicomError: If ``site_dir`` is not a folder.
    """
    from client.dataset import scan_site, site_name_of, site_split_seed, split_by_patient

    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DicomError(
            f"{site_dir} is not a folder; give the site's data folder (the one holding dicom/ and {LABELS_DIR}/)"
        )
    scan = scan_site(site_dir, modalities=modalities, volume=volume)

    def redact(path: Path | str) -> str:
        p = Path(path)
        rel = p.relative_to(site_dir).as_posix() if p.is_absolute() and p.is_relative_to(site_dir) else p.as_posix()
        return scan.redactor.redact(rel)

    rejected = list(scan.rejected)
    series = scan.series
    if decode:
        series, bad = _decode_check(series, redact)
        rejected.extend(bad)
    # A series counts once (or once per volume used); a series only named by rejections counts once.
    named = {m.group(1) for r in rejected if (m := _SERIES_PREFIX.match(r.reason))}
    usable = {hash_id(s.series_uid) for s in series} | {s.series_hash for s in series}
    series_total = len(series) + len(named - usable)
    name = site_name_of(site_dir)
    report = SiteReport(site=f"~{hash_id(name)}" if scan.redactor.identifying(name) else name)
    report.pixels_decoded = decode
    report.files_total = scan.files_total
    report.files_rejected = len(rejected)
    report.files_accepted = len({p for s in series for p in s.files})
    report.series_total = series_total
    report.series_usable = len(series)
    report.slices_usable = sum(len(s.slices) for s in series)
    for s in series:
        _count(report.by_modality, s.modality, s)
        _count(report.by_manufacturer, s.manufacturer, s)
        if s.model:
            _count(report.by_model, f"{s.manufacturer} {s.model}", s)
        _count(report.by_sop_class, s.sop_class, s)
        for ts in s.transfer_syntaxes:
            _count(report.by_transfer_syntax, ts, s)
    multi = [s for s in series if s.split_by]
    report.volumes = {
        "policy": volume,
        "series_split": len({s.series_uid for s in multi}),
        "volumes_used": len(multi),
        "split_by": dict(Counter(s.split_by.split(" (")[0] for s in {x.series_uid: x for x in multi}.values())),
    }
    masks, with_mask = _mask_check(site_dir, series, redact)
    report.labels = {"segmentation": masks}
    manifest = _manifest_check(site_dir, series)
    if manifest is not None:
        report.labels["classification"] = manifest
    labelled = [s for s in series if s.series_hash in with_mask]
    patients = sorted({s.patient_hash for s in labelled})
    split: dict[str, Any] = {"seed": seed, "val_fraction": val_fraction, "labelled_patients": len(patients)}
    try:
        train, val = split_by_patient(patients, val_fraction=val_fraction, seed=site_split_seed(name, seed))
        split.update(
            train_patients=len(train),
            val_patients=len(val),
            train_slices=sum(len(s.slices) for s in labelled if s.patient_hash in train),
            val_slices=sum(len(s.slices) for s in labelled if s.patient_hash in val),
        )
    except DicomError as exc:
        split.update(train_patients=0, val_patients=0, problem=str(exc))
    report.split = split
    report.rejected = [{"file": r.file, "reason": r.reason} for r in sorted(rejected, key=lambda r: r.file)]
    groups: dict[str, list[str]] = defaultdict(list)
    for r in report.rejected:
        groups[reason_group(r["reason"])].append(r["file"])
    report.rejected_by_reason = [
        {"reason": reason, "files": len(files), "example": files[0]}
        for reason, files in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    ]
    return report


def _table(title: str, table: dict[str, dict[str, int]]) -> list[str]:
    if not table:
        return []
    width = min(48, max(len(k) for k in table))
    lines = [f"  {title}:"]
    for key, row in sorted(table.items(), key=lambda kv: (-kv[1]["slices"], kv[0])):
        lines.append(
            f"    {key:<{width}}  {row['series']:>5} series  {row['slices']:>7} slices  {row['files']:>7} files"
        )
    return lines


def format_report(report: SiteReport, *, max_reasons: int = 20) -> str:
    """The human summary that ``fedsite site check`` prints."""
    out = [
        f"site {report.site}: {report.files_total} files, {report.files_accepted} accepted, "
        f"{report.files_rejected} rejected"
        + ("" if report.pixels_decoded else " (headers only: pixel data not decoded)"),
        f"usable series: {report.series_usable} of {report.series_total} ({report.slices_usable} slices)"
        + ("; a multi-volume series counts once per volume used" if report.volumes.get("series_split") else ""),
    ]
    vol = report.volumes
    if vol.get("series_split"):
        how = ", ".join(f"{n} by {k}" for k, n in sorted(vol["split_by"].items()))
        out.append(
            f"multi-volume series: {vol['series_split']} split into volumes ({how}); "
            f"{vol['volumes_used']} volumes used (data.volume={vol['policy']})"
        )
    out += _table("by modality", report.by_modality)
    out += _table("by manufacturer", report.by_manufacturer)
    out += _table("by scanner model", report.by_model)
    out += _table("by SOP class", report.by_sop_class)
    out += _table("by transfer syntax", report.by_transfer_syntax)
    seg = report.labels.get("segmentation", {})
    out.append(
        f"labels: {seg.get('series_with_mask', 0)} of {report.series_usable} usable series have a mask on their grid "
        f"({100 * seg.get('coverage', 0.0):.0f}%), {len(seg.get('problems', []))} mask problem(s)"
    )
    for p in seg.get("problems", [])[:max_reasons]:
        out.append(f"    {p['file']}: {p['reason']}")
    cls = report.labels.get("classification")
    if cls is not None:
        if "error" in cls:
            out.append(f"classification labels ({LABELS_CSV}): {cls['error']}")
        else:
            classes = ", ".join(f"{k} {v}" for k, v in cls["classes"].items()) or "none"
            out.append(
                f"classification labels ({LABELS_CSV}): {cls['labelled']} labelled, {cls['unlabelled']} unlabelled, "
                f"{cls['ambiguous']} ambiguous series; {cls['unmatched_rows']} rows match no usable series; "
                f"classes: {classes}"
            )
    sp = report.split
    if "problem" in sp:
        out.append(f"split: not possible: {sp['problem']}")
    else:
        out.append(
            f"split (seed {sp['seed']}, validation fraction {sp['val_fraction']}): "
            f"{sp['labelled_patients']} labelled patients -> "
            f"{sp['train_patients']} train ({sp['train_slices']} slices), "
            f"{sp['val_patients']} validation ({sp['val_slices']} slices)"
        )
    if report.rejected_by_reason:
        out.append("rejected files by reason:")
        for group in report.rejected_by_reason[:max_reasons]:
            out.append(f"  {group['files']:>6}  {group['reason']}")
            out.append(f"          e.g. {group['example']}")
        more = len(report.rejected_by_reason) - max_reasons
        if more > 0:
            out.append(f"  ... and {more} more reasons (see the JSON report)")
    return "\n".join(out)


def write_report(report: SiteReport, path: Path) -> None:
    """Write the JSON report."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def count_reasons(report: SiteReport) -> Counter:
    """Rejected files per grouped reason."""
    return Counter({g["reason"]: g["files"] for g in report.rejected_by_reason})
