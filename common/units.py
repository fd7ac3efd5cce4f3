"""The unit of a site's privacy guarantee, as a reply carries it (replies carry numbers only).

A DP site's training reply holds ``epsilon``, ``delta`` and :data:`UNIT_KEY`, a code of what that
epsilon protects: one *patient* (all of the patient's slices) or one *slice*. The server turns the
code back into its name (:func:`unit_name`) for ``results.json``.
"""

from __future__ import annotations

__all__ = ["UNIT_CODES", "UNIT_KEY", "unit_code", "unit_name"]

#: Metric key of the unit code in a reply.
UNIT_KEY = "privacy-unit"

#: Code of each unit in a reply.
UNIT_CODES = {"patient": 1.0, "slice": 2.0}


def unit_code(unit: str) -> float:
    """The reply code of ``unit`` (``"patient"`` or ``"slice"``).

    Raises:
        ValueError: For another unit.
    """
    if unit not in UNIT_CODES:
        raise ValueError(f"privacy unit {unit!r}; use one of {sorted(UNIT_CODES)}")
    return UNIT_CODES[unit]


def unit_name(code: object) -> str | None:
    """The unit a reply's code names; None for a missing or unknown code."""
    for name, value in UNIT_CODES.items():
        if isinstance(code, (int, float)) and float(code) == value:
            return name
    return None
