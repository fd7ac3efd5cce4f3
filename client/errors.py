"""The site's errors: one base class whose messages fedsite writes and keeps free of patient values.

A handler that fails with a :class:`~common.errors.FedsiteError` (this module's errors, and the
config and record errors of :mod:`common`) tells the coordinator the message; any other exception
reaches the coordinator as its type only, and its message stays in the site's own log.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import FedsiteError

__all__ = ["DicomError", "SiteDataError"]


class SiteDataError(FedsiteError):
    """The site's data folder or its files cannot be used; the message says why and what to do."""


class DicomError(SiteDataError):
    """A file or series cannot be used; the message says why, never with patient values.

    Attributes:
        file: The file that failed, when one did (a site-local path; never log it).
    """

    def __init__(self, message: str, *, file: Path | None = None) -> None:
        super().__init__(message)
        self.file = file
