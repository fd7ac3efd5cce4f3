"""Classification metrics in plain numpy: ROC AUC, accuracy, sensitivity/specificity, calibration.

No sklearn and no torch: a site computes these on its own predictions and shares only the
numbers. Every function takes array-likes (numpy arrays, lists, or CPU torch tensors).

Conventions:
    * ``probs`` is ``(N, C)`` softmax probabilities with ``C >= 2`` classes; ``labels`` is ``(N,)``
      integer class indices in ``[0, C)``.
    * A metric that is undefined for the data (e.g. AUC when only one class is present, or
      sensitivity when there are no positives) is ``nan``, never an exception: one site may well
      hold no positive case in its validation split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "HIGHER_IS_WORSE",
    "average_ranks",
    "classification_metrics",
    "expected_calibration_error",
    "roc_auc",
    "summarize_sites",
]

#: Metrics whose worst site is the highest value (any key containing "loss" too).
HIGHER_IS_WORSE = frozenset({"ece", "mia-auc", "mia-auc-initial"})


def summarize_sites(per_site: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and worst site of each metric, every site counting the same.

    The worst is the lowest value of a score and the highest of a loss, calibration error or
    attack AUC (:data:`HIGHER_IS_WORSE`). A metric counts over the sites that report it with a
    finite value (a site whose validation split holds one class has no AUC; it is left out of the
    AUC mean rather than counted as 0).

    Args:
        per_site: Site name -> metric name -> value.

    Returns:
        ``(mean, worst)``, each metric name -> value.
    """
    mean: dict[str, float] = {}
    worst: dict[str, float] = {}
    keys = sorted({k for m in per_site.values() for k in m})
    for k in keys:
        values = [float(m[k]) for m in per_site.values() if k in m and math.isfinite(float(m[k]))]
        if not values:
            continue
        mean[k] = sum(values) / len(values)
        worst[k] = max(values) if k in HIGHER_IS_WORSE or "loss" in k else min(values)
    return mean, worst


def average_ranks(x: Any) -> np.ndarray:
    """Ranks of ``x`` (1-based), tied values sharing the average of the ranks they span.

    Args:
        x: A 1-D array-like of numbers, shape ``(N,)``.

    Returns:
        float64 array of shape ``(N,)``; e.g. ``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``.
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(a.size, dtype=np.float64)
    # boundaries of runs of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of the 1-based ranks s+1 .. e
    return ranks


def roc_auc(scores: Any, labels01: Any) -> float:
    """Area under the ROC curve via the rank (Mann-Whitney U) formula, ties counted as one half.

    Args:
        scores: Shape ``(N,)``; higher means "more likely positive" (e.g. the positive class's
            probability).
        labels01: Shape ``(N,)``; 1 (or True) for positives, 0 for negatives.

    Returns:
        The AUC in ``[0, 1]``: 1.0 when every positive outscores every negative, 0.0 when the
        ranking is reversed, 0.5 when all scores tie. ``nan`` when ``labels01`` holds only one
        class (the AUC is undefined without both positives and negatives).

    Raises:
        ValueError: If the inputs are empty, differ in length, ``labels01`` holds values other than
            0 and 1, or ``scores`` holds NaN or infinite values.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels01)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"roc_auc needs 1-D scores and labels, got shapes {s.shape} and {y.shape}; flatten them first")
    if s.size == 0:
        raise ValueError("roc_auc got no examples (empty scores); evaluate on at least one sample of each class")
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: scores has {s.size} entries but labels01 has {y.size}; pass one label per score")
    if not np.all(np.isfinite(s)):
        raise ValueError(
            f"roc_auc: scores hold {int(np.sum(~np.isfinite(s)))} NaN/infinite values; check the model output"
        )
    bad = ~np.isin(y, (0, 1))
    if np.any(bad):
        raise ValueError(
            f"roc_auc: labels01 must be 0 or 1, got {np.unique(y[bad])[:5].tolist()}; "
            "binarise the labels (labels == positive)"
        )
    pos = y.astype(bool)
    n_pos = int(pos.sum())
    n_neg = int(pos.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _check_probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(
            f"probs must have shape (N, C) with C >= 2 classes, got {p.shape}; "
            "for a single sigmoid output pass np.stack([1 - p, p], axis=1)"
        )
    if p.shape[0] == 0:
        raise ValueError("no examples: probs has shape (0, C); evaluate on at least one sample")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"labels must have shape (N,) = ({p.shape[0]},) to match probs {p.shape}, got {y.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"probs hold {int(np.sum(~np.isfinite(p)))} NaN/infinite values; check the model output")
    integral = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
    if not integral and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype} with fractional values")
    y = y.astype(np.int64)
    out = (y < 0) | (y >= p.shape[1])
    if np.any(out):
        raise ValueError(
            f"labels must lie in [0, {p.shape[1]}) for {p.shape[1]} classes, got {np.unique(y[out])[:5].tolist()}"
        )
    return p, y


def expected_calibration_error(probs: Any, labels: Any, bins: int = 10) -> float:
    """Expected calibration error of the top-class confidence.

    Confidence is the largest probability of each row, the prediction its argmax. The unit
    interval is cut into ``bins`` equal-width bins ``(lo, hi]`` (the first bin also holds 0);
    ECE is the sum over non-empty bins of ``(n_bin / N) * |accuracy_bin - mean_confidence_bin|``.

    Args:
        probs: Shape ``(N, C)``, softmax probabilities, ``C >= 2``.
        labels: Shape ``(N,)``, integer class indices.
        bins: Number of equal-width confidence bins on ``[0, 1]``; at least 1.

    Returns:
        ECE in ``[0, 1]``; 0 for a perfectly calibrated model.

    Raises:
        ValueError: On empty input, mismatched shapes, labels out of range, or ``bins < 1``.
    """
    p, y = _check_probs_labels(probs, labels)
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}; 10 or 15 are usual")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    idx = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, int(bins) - 1)
    n = conf.size
    ece = 0.0
    for b in range(int(bins)):
        m = idx == b
        k = int(m.sum())
        if k:
            ece += k / n * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_metrics(probs: Any, labels: Any, *, positive: int = 1, bins: int = 10) -> dict[str, float]:
    """The classification metrics a site reports for one evaluation.

    Args:
        probs: Shape ``(N, C)``, softmax probabilities, ``C >= 2``.
        labels: Shape ``(N,)``, integer class indices in ``[0, C)``.
        positive: The class index counted as "positive" for AUC (binary case), sensitivity and
            specificity.
        bins: Number of confidence bins for the ECE.

    Returns:
        A dict of floats:

        * ``"auc"``: for ``C == 2`` the ROC AUC of ``probs[:, positive]``; for ``C > 2`` the
          macro one-vs-rest AUC, averaged over the classes that have both positive and negative
          examples in ``labels``. ``nan`` when ``labels`` holds a single class.
        * ``"accuracy"``: fraction whose argmax equals the label.
        * ``"sensitivity"``: recall of ``positive`` (``nan`` without positive examples).
        * ``"specificity"``: among examples whose label is not ``positive``, the fraction not
          predicted ``positive`` (``nan`` without such examples).
        * ``"balanced-accuracy"``: mean per-class recall over the classes present in
          ``labels``; for ``C == 2`` with both classes present it is
          ``(sensitivity + specificity) / 2``.
        * ``"ece"``: expected calibration error (see :func:`expected_calibration_error`).
        * ``"num-examples"``: ``N``.

    Raises:
        ValueError: On empty input, mismatched shapes, labels out of range, or ``positive``
            not a class index.
    """
    p, y = _check_probs_labels(probs, labels)
    n, c = p.shape
    if not (0 <= positive < c):
        raise ValueError(f"positive={positive!r} is not a class index for {c} classes; use 0..{c - 1}")
    pred = p.argmax(axis=1)
    if c == 2:
        auc = roc_auc(p[:, positive], (y == positive).astype(np.int64))
    else:
        per_class = [roc_auc(p[:, k], (y == k).astype(np.int64)) for k in range(c)]
        finite = [a for a in per_class if not np.isnan(a)]
        auc = float(np.mean(finite)) if finite else float("nan")
    is_pos = y == positive
    sens = float(np.mean(pred[is_pos] == positive)) if is_pos.any() else float("nan")
    spec = float(np.mean(pred[~is_pos] != positive)) if (~is_pos).any() else float("nan")
    recalls = [float(np.mean(pred[y == k] == k)) for k in np.unique(y)]
    return {
        "auc": auc,
        "accuracy": float(np.mean(pred == y)),
        "sensitivity": sens,
        "specificity": spec,
        "balanced-accuracy": float(np.mean(recalls)),
        "ece": expected_calibration_error(p, y, bins=bins),
        "num-examples": float(n),
    }
