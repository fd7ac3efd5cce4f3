"""The root of fedsite's own errors.

An error that derives from :class:`FedsiteError` carries a message that fedsite wrote itself: it
names the problem and the fix, and never holds a patient value (name, ID, birth date, accession
number, a UID, or a path that may contain one). Such a message may be shown to the coordinator;
any other exception's message stays in the site's own log.
"""

from __future__ import annotations

__all__ = ["FedsiteError"]


class FedsiteError(Exception):
    """An error whose message fedsite wrote and keeps free of patient values."""
