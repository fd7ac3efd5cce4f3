"""The reader seam: one reader per image format, chosen by the file (as MONAI's ``ImageReader`` classes are).

A reader answers three questions:

* :meth:`ImageReader.can_read`: is this file mine? (from its name, or its first bytes);
* :meth:`ImageReader.read_header`: what does its header say? (no pixels; raises
  :class:`~client.errors.DicomError` with the reason when the file cannot be used);
* :meth:`ImageReader.series`: which series do the headers it read form? (grouping, ordering and
  consistency checks; files that fit no usable series come back with their reason);

and decodes the series it found (:meth:`ImageReader.read`). Discovery
(:mod:`client.discovery`) gives each file to the first reader that can read it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.records import SeriesRecord

__all__ = ["FileHeader", "ImageReader"]


@dataclass(frozen=True)
class FileHeader:
    """What a reader learned from one file's header."""

    path: Path
    rel: str
    """The path relative to the reported folder (site-local: not yet redacted)."""
    modality: str | None
    """The Modality to filter on; None for formats without one (always kept)."""
    identifiers: frozenset[str] = field(default=frozenset(), repr=False)
    """Identifying values seen in the header (used to redact reported paths)."""
    facts: Any = field(default=None, repr=False)
    """The reader's own description of the file."""


class ImageReader(ABC):
    """Reads one image format: finds its files' series from headers and decodes their pixels."""

    #: A short name of the format, e.g. ``"dicom"``.
    name: str = ""
    #: The :attr:`SeriesRecord.kind` values of the series this reader finds (and decodes).
    kinds: tuple[str, ...] = ()

    @abstractmethod
    def can_read(self, path: Path) -> bool:
        """Whether this reader takes ``path`` (cheap: its name or first bytes)."""

    @abstractmethod
    def read_header(self, path: Path, *, rel: str) -> FileHeader:
        """Read a file's header (never its pixels).

        Args:
            path: The file.
            rel: Its path relative to the reported folder.

        Raises:
            DicomError: If the file cannot be used; the message is the reason, free of patient values.
        """

    @abstractmethod
    def series(self, headers: list[FileHeader]) -> tuple[list[SeriesRecord], list[tuple[Path, str]]]:
        """Form series from the headers this reader read (in walk order).

        Returns:
            The usable series (``first_file`` not yet redacted), and ``(file, reason)`` for every
            file of ``headers`` that is in none of them.
        """

    @abstractmethod
    def read(self, series: SeriesRecord) -> np.ndarray:
        """Decode a series this reader found as a ``(Z, Y, X)`` float32 array in slice order.

        Raises:
            DicomError: If a file cannot be decoded; its ``file`` attribute names the file.
        """

    def read_usable(self, series: SeriesRecord) -> tuple[np.ndarray, SeriesRecord, list[tuple[Path, str]]]:
        """Decode what can be decoded: ``(array, series of the decoded slices, [(file, reason), ...])``.

        The default decodes the whole series (:meth:`read`); a reader whose series span several files
        overrides it to drop only the files that fail, each named with its own reason.

        Raises:
            DicomError: If nothing of the series can be decoded.
        """
        return self.read(series), series, []
