"""Image helpers shared by the generator's tests (test_synth.py, test_profiles.py)."""

from __future__ import annotations

import numpy as np


def ring(mask: np.ndarray, width_px: int) -> np.ndarray:
    """In-plane ring of ``width_px`` pixels around ``mask`` ``(Z, Y, X)`` bool (per slice)."""
    grown = mask.copy()
    for _ in range(width_px):
        g = grown.copy()
        g[:, 1:, :] |= grown[:, :-1, :]
        g[:, :-1, :] |= grown[:, 1:, :]
        g[:, :, 1:] |= grown[:, :, :-1]
        g[:, :, :-1] |= grown[:, :, 1:]
        grown = g
    return grown & ~mask
