"""A measure of scanner shift between sites, built only from what a site may share.

A site never shares images, but it may share an aggregate intensity histogram of what its model
sees (model inputs are float images scaled to ``[0, 1]``). Two sites whose histograms differ a
lot are likely far apart in scanner, protocol or reconstruction; the study checks whether that
distance predicts how badly a model trained at one site does at another.

Plain numpy (torch tensors are accepted as input but torch is not imported here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common.metrics import average_ranks

__all__ = ["distance_matrix", "intensity_histogram", "js_distance", "spearman"]


def _to_numpy(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor, possibly on a GPU
        images = images.detach().cpu().numpy()
    return np.asarray(images, dtype=np.float64)


def intensity_histogram(images: Any, *, bins: int = 64, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Pooled intensity histogram of a batch of images, normalized to sum to 1.

    Args:
        images: A torch tensor or numpy array of any shape, typically ``(N, 1, H, W)`` model
            inputs with intensities in ``[0, 1]``; all voxels are pooled.
        bins: Number of equal-width bins over ``value_range``.
        value_range: ``(low, high)`` of the bins. Values below ``low`` are counted in the first
            bin, values above ``high`` in the last.

    Returns:
        float64 array of shape ``(bins,)``, the fraction of voxels per bin (sums to 1).

    Raises:
        ValueError: If ``images`` is empty or holds NaN/infinite values, ``bins < 1``, or
            ``value_range`` is not increasing.
    """
    x = _to_numpy(images).ravel()
    if x.size == 0:
        raise ValueError("intensity_histogram got no voxels (empty images); pass at least one non-empty image")
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"intensity_histogram: images hold {int(np.sum(~np.isfinite(x)))} NaN/infinite values; "
            "fix the intensity scaling before sharing a histogram"
        )
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}; 64 is the default")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(
            f"value_range must be (low, high) with low < high, got {value_range!r}; model inputs use (0.0, 1.0)"
        )
    counts, _ = np.histogram(np.clip(x, lo, hi), bins=int(bins), range=(lo, hi))
    return counts.astype(np.float64) / counts.sum()


def _as_distribution(h: Any, name: str) -> np.ndarray:
    a = np.asarray(h, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"histogram {name} is empty; pass the output of intensity_histogram")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"histogram {name} must hold finite non-negative counts or densities")
    total = a.sum()
    if total <= 0:
        raise ValueError(f"histogram {name} sums to 0; it has no mass to compare")
    return a / total


def js_distance(p: Any, q: Any) -> float:
    """Jensen-Shannon distance between two histograms over the same bins.

    The square root of the Jensen-Shannon divergence with base-2 logarithms, so it is a metric
    with values in ``[0, 1]``. Inputs are normalized to sum to 1 first; empty bins are fine.

    Args:
        p: Histogram, shape ``(B,)``, non-negative counts or densities.
        q: Histogram, shape ``(B,)``, over the same bins as ``p``.

    Returns:
        0.0 for identical distributions, 1.0 for distributions with disjoint support.

    Raises:
        ValueError: If the histograms differ in length, are empty, negative, or sum to 0.
    """
    a = _as_distribution(p, "p")
    b = _as_distribution(q, "q")
    if a.shape != b.shape:
        raise ValueError(f"histograms have {a.size} and {b.size} bins; compute both with the same bins and value_range")
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        nz = x > 0  # 0 * log(0 / m) = 0; where x > 0, m > 0 too
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    js = 0.5 * kl(a) + 0.5 * kl(b)
    return float(np.sqrt(min(max(js, 0.0), 1.0)))


def distance_matrix(hists: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Pairwise Jensen-Shannon distances between named histograms.

    Args:
        hists: Site name -> histogram of shape ``(B,)`` (all over the same bins).

    Returns:
        ``d[a][b]`` for every pair of names, including ``d[a][a] == 0.0``; symmetric.

    Raises:
        ValueError: As :func:`js_distance`, for any pair.
    """
    names = list(hists)
    out: dict[str, dict[str, float]] = {a: {} for a in names}
    for i, a in enumerate(names):
        out[a][a] = 0.0
        for b in names[i + 1 :]:
            d = js_distance(hists[a], hists[b])
            out[a][b] = d
            out[b][a] = d
    return out


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation, tied values given their average rank.

    Pairs where either value is NaN or infinite are dropped first.

    Args:
        x: Shape ``(N,)``.
        y: Shape ``(N,)``.

    Returns:
        rho in ``[-1, 1]``: 1 for a monotone increasing relation, -1 for a decreasing one.
        ``nan`` with fewer than 3 (finite) pairs or when either input is constant.

    Raises:
        ValueError: If ``x`` and ``y`` differ in length.
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs paired values: x has {a.size} and y has {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3:
        return float("nan")
    ra = average_ranks(a) - (a.size + 1) / 2.0
    rb = average_ranks(b) - (b.size + 1) / 2.0
    denom = float(np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.sum(ra * rb) / denom, -1.0, 1.0))
