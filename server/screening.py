"""Update screening: reject a site's update that lies far outside the others' (a plain numpy rule).

Each accepted training reply's update is measured by its L2 distance to the global model sent that
round. With ``k = strategy.screen-mad`` > 0 and at least :data:`MIN_SITES` updates, an update is
rejected when its distance exceeds the median distance by more than ``k`` scaled median absolute
deviations (MAD x 1.4826, the normal-consistent scale). The rule is one-sided: an update that moved
the model *less* than the others (few samples, an early stop) does no harm to the average and is kept.

The scale has a floor of :data:`REL_FLOOR` x the median: with three sites whose honest updates happen
to be almost equal, the MAD is near zero and would otherwise reject an honest site by a hair.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["MAD_SCALE", "MIN_SITES", "REL_FLOOR", "screen_distances", "update_distance"]

#: MAD x 1.4826 estimates the standard deviation of normally distributed values.
MAD_SCALE = 1.4826
#: Fewer updates than this are never screened (a median of two says nothing about which is odd).
MIN_SITES = 3
#: The scale is at least this fraction of the median distance.
REL_FLOOR = 0.1


def update_distance(local: Mapping[str, np.ndarray], global_ref: Mapping[str, np.ndarray]) -> float:
    """L2 distance between a site's returned weights and the global model, over every shared array."""
    total = 0.0
    for key, ref in global_ref.items():
        if key in local:
            diff = np.asarray(local[key], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
            total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def screen_distances(distances: Mapping[str, float], k: float) -> dict[str, str]:
    """Sites whose update distance is far above the others', with the reason.

    Args:
        distances: Each site's update distance to the global model.
        k: How many scaled MADs above the median is too far; 0 turns screening off.

    Returns:
        ``{site: reason}`` for each rejected site (empty when off or with fewer than 3 sites).
    """
    if k <= 0 or len(distances) < MIN_SITES:
        return {}
    values = np.array(list(distances.values()), dtype=np.float64)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    scale = max(MAD_SCALE * mad, REL_FLOOR * median, 1e-12)
    limit = median + k * scale
    return {
        site: (
            f"update distance {d:.4g} to the global model is more than strategy.screen-mad = {k:g} scaled MADs "
            f"above the sites' median {median:.4g} (limit {limit:.4g})"
        )
        for site, d in distances.items()
        if d > limit
    }
