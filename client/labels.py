"""Classification labels from a CSV manifest, keyed by PatientID, StudyInstanceUID or SeriesInstanceUID.

A site that trains a classification task lists its labels in a CSV file (usually
``<site>/labels.csv``)::

    PatientID,label                    or   SeriesInstanceUID,label
    P0001,pneumonia                         1.2.840.113619....,normal

The file needs a ``label`` column and at least one key column: ``PatientID``,
``StudyInstanceUID`` or ``SeriesInstanceUID`` (case, spaces and underscores in the header do not
matter: ``patient_id`` works). Rows may mix key levels; a series takes the label of the most
specific row that names it (series over study over patient). Two rows at that level with
different labels make the series **ambiguous**: it gets no label and is reported. Delimiters
``,``, ``;`` and tab are recognised; a UTF-8 byte order mark is ignored.

Keys are compared as salted hashes (:func:`client.phi.hash_id`) with the hashes a
:class:`~client.records.SeriesRecord` already holds, so nothing here keeps or reports a raw
identifier: results are keyed by series hash, errors name columns and row numbers only.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.errors import SiteDataError
from client.phi import hash_id
from client.records import SeriesRecord

__all__ = ["KEY_COLUMNS", "ClassLabels", "LabelManifestError", "class_labels", "match_labels", "read_manifest"]

#: Key columns, most specific first.
KEY_COLUMNS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID")


class LabelManifestError(SiteDataError):
    """The label manifest cannot be used; the message names the problem and the fix (columns and row numbers only)."""


@dataclass(frozen=True)
class ClassLabels:
    """Which series got which class label, and which did not."""

    labels: dict[str, str]
    """Series hash -> label."""
    unlabelled: list[str] = field(default_factory=list)
    """Series hashes no row names."""
    ambiguous: list[str] = field(default_factory=list)
    """Series hashes named by rows with different labels at the same level."""
    unmatched_rows: int = 0
    """Rows (with a key and a label) that name no given series."""
    rows_without_label: int = 0
    """Rows with an empty label or no key value (ignored)."""

    @property
    def classes(self) -> dict[str, int]:
        """Label -> number of labelled series."""
        return dict(sorted(Counter(self.labels.values()).items()))


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


_ROW = tuple[int, str, str]  # (level index in KEY_COLUMNS, key hash, label)


def read_manifest(path: Path, *, label_column: str = "label") -> list[_ROW]:
    """Read a label manifest into ``(level, key hash, label)`` rows.

    Args:
        path: The CSV file.
        label_column: Name of the label column.

    Returns:
        One entry per row with a key and a label; level 0 = series, 1 = study, 2 = patient.

    Raises:
        LabelManifestError: If the file cannot be read or lacks the label or a key column.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelManifestError(
            f"label manifest {Path(path).name} cannot be read ({type(exc).__name__}); save it as UTF-8 CSV"
        ) from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    try:
        header = next(reader)
    except StopIteration:
        raise LabelManifestError(
            f"label manifest {Path(path).name} is empty; it needs a header row with '{label_column}' and a key column"
        ) from None
    columns = {_norm(h): i for i, h in enumerate(header)}
    if _norm(label_column) not in columns:
        raise LabelManifestError(
            f"label manifest {Path(path).name} has no '{label_column}' column "
            f"(columns: {', '.join(h.strip() for h in header)}); add one"
        )
    keys = [(level, columns[_norm(k)]) for level, k in enumerate(KEY_COLUMNS) if _norm(k) in columns]
    if not keys:
        raise LabelManifestError(
            f"label manifest {Path(path).name} has no key column; name one of {', '.join(KEY_COLUMNS)} "
            f"(columns found: {', '.join(h.strip() for h in header)})"
        )
    label_index = columns[_norm(label_column)]
    rows: list[_ROW] = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        label = cells[label_index].strip() if label_index < len(cells) else ""
        named = [(level, cells[i].strip()) for level, i in keys if i < len(cells) and cells[i].strip()]
        if not label or not named:
            rows.append((-1, "", ""))
            continue
        level, value = named[0]  # the most specific key given in this row
        rows.append((level, hash_id(value), label))
    return rows


def match_labels(rows: Sequence[_ROW], series: Sequence[SeriesRecord]) -> ClassLabels:
    """Give each series the label of the most specific manifest rows that name it.

    Args:
        rows: From :func:`read_manifest`.
        series: The site's usable series.

    Returns:
        Labels by series hash, and the series left unlabelled or ambiguous.
    """
    by_level: list[dict[str, set[str]]] = [{}, {}, {}]
    skipped = 0
    for level, key, label in rows:
        if level < 0:
            skipped += 1
            continue
        by_level[level].setdefault(key, set()).add(label)
    used: set[tuple[int, str]] = set()
    labels: dict[str, str] = {}
    unlabelled: list[str] = []
    ambiguous: list[str] = []
    for s in series:
        keys = (s.series_hash, s.study_hash, s.patient_hash)
        named = [(level, key) for level, key in enumerate(keys) if key and key in by_level[level]]
        used.update(named)  # a row shadowed by a more specific one still names this series
        if not named:
            unlabelled.append(s.series_hash)
            continue
        level, key = named[0]
        found = by_level[level][key]
        if len(found) == 1:
            labels[s.series_hash] = next(iter(found))
        else:
            ambiguous.append(s.series_hash)
    unmatched = sum(1 for level, key, _ in rows if level >= 0 and (level, key) not in used)
    return ClassLabels(
        labels=labels,
        unlabelled=sorted(unlabelled),
        ambiguous=sorted(ambiguous),
        unmatched_rows=unmatched,
        rows_without_label=skipped,
    )


def class_labels(path: Path, series: Sequence[SeriesRecord], *, label_column: str = "label") -> ClassLabels:
    """Read a label manifest and label the site's series (:func:`read_manifest` + :func:`match_labels`).

    Args:
        path: The CSV manifest, e.g. ``<site>/labels.csv``.
        series: The site's usable series (from :func:`client.discovery.discover_series`).
        label_column: Name of the label column.

    Returns:
        A mapping series hash -> label, and the series left unlabelled or ambiguous.

    Raises:
        LabelManifestError: If the manifest cannot be read or lacks the label or a key column.
    """
    return match_labels(read_manifest(path, label_column=label_column), series)
