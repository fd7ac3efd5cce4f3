"""Classification metrics (common/metrics.py) and the shift measure (simulations/shift_measure.py), on hand-computed
cases.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from common.metrics import (
    average_ranks,
    classification_metrics,
    expected_calibration_error,
    roc_auc,
)
from simulations.shift_measure import distance_matrix, intensity_histogram, js_distance, spearman


def _binary(p1: list[float]) -> np.ndarray:
    """(N, 2) probabilities from the positive class's probability."""
    p = np.asarray(p1, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1)


# ------------------------------------------------------------------------------------------ AUC


def test_auc_is_one_when_every_positive_outscores_every_negative() -> None:
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0


def test_auc_is_zero_when_the_ranking_is_reversed() -> None:
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_auc_is_one_half_when_all_scores_tie() -> None:
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


def test_auc_counts_a_tied_positive_negative_pair_as_one_half() -> None:
    """Pairs (pos, neg): (0.5, 0.1)=1, (0.5, 0.5)=0.5, (0.9, 0.1)=1, (0.9, 0.5)=1 -> 3.5 / 4."""
    assert roc_auc([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.875)


def test_auc_equals_the_fraction_of_correctly_ordered_pairs_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)])
    assert roc_auc(scores, labels) == pytest.approx(brute)


def test_auc_is_nan_when_only_one_class_is_present() -> None:
    assert math.isnan(roc_auc([0.2, 0.7, 0.9], [1, 1, 1]))
    assert math.isnan(classification_metrics(_binary([0.2, 0.7]), [0, 0])["auc"])


def test_average_ranks_share_the_mean_rank_among_ties() -> None:
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]


def test_macro_auc_averages_the_one_vs_rest_aucs_of_each_class() -> None:
    """Class 0 and 2 separate perfectly (1.0); class 1's positives {0.7, 0.2} vs negatives {0.1, 0.3, 0.3, 0.1}: 6/8."""
    probs = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.3, 0.1],
            [0.1, 0.7, 0.2],
            [0.3, 0.2, 0.5],
            [0.1, 0.3, 0.6],
            [0.2, 0.1, 0.7],
        ]
    )
    labels = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(probs, labels)
    assert m["auc"] == pytest.approx((1.0 + 0.75 + 1.0) / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)  # row 3 is predicted 2
    # balanced accuracy is the mean per-class recall: (1 + 0.5 + 1) / 3
    assert m["balanced-accuracy"] == pytest.approx(2.5 / 3)


# ---------------------------------------------------------------------- sensitivity/specificity


def test_sensitivity_and_specificity_come_from_the_confusion_matrix() -> None:
    """TP 8, FN 2, TN 15, FP 5: sensitivity 0.8, specificity 0.75, accuracy 23/30."""
    labels = [1] * 8 + [1] * 2 + [0] * 15 + [0] * 5
    p1 = [0.9] * 8 + [0.2] * 2 + [0.1] * 15 + [0.7] * 5
    m = classification_metrics(_binary(p1), labels)
    assert m["sensitivity"] == pytest.approx(0.8)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["balanced-accuracy"] == pytest.approx((0.8 + 0.75) / 2)
    assert m["accuracy"] == pytest.approx(23 / 30)
    assert m["num-examples"] == 30.0
    assert set(m) == {"auc", "accuracy", "sensitivity", "specificity", "balanced-accuracy", "ece", "num-examples"}


def test_positive_class_can_be_chosen() -> None:
    """With class 0 as positive, sensitivity and specificity swap; the binary AUC does not change."""
    labels = [1] * 8 + [1] * 2 + [0] * 15 + [0] * 5
    p1 = [0.9] * 8 + [0.2] * 2 + [0.1] * 15 + [0.7] * 5
    m = classification_metrics(_binary(p1), labels, positive=0)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(0.8)
    assert m["auc"] == pytest.approx(classification_metrics(_binary(p1), labels)["auc"])


def test_sensitivity_is_nan_without_positive_examples() -> None:
    m = classification_metrics(_binary([0.1, 0.6]), [0, 0])
    assert math.isnan(m["sensitivity"]) and m["specificity"] == 0.5


# ----------------------------------------------------------------------------------- calibration


def test_ece_is_zero_for_a_perfectly_calibrated_set() -> None:
    """Confidence 0.8 right 8 times in 10, confidence 0.6 right 6 times in 10."""
    p1 = [0.8] * 10 + [0.6] * 10
    labels = [1] * 8 + [0] * 2 + [1] * 6 + [0] * 4
    assert expected_calibration_error(_binary(p1), labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_set_is_the_weighted_confidence_gap() -> None:
    """Half the set says 0.9 but is right 2/5 times (gap 0.5), half says 0.6 and is right 3/5: ECE = 0.5 * 0.5."""
    p1 = [0.9] * 5 + [0.6] * 5
    labels = [1, 1, 0, 0, 0] + [1, 1, 1, 0, 0]  # noqa: RUF005 - the two halves, as in p1
    assert expected_calibration_error(_binary(p1), labels) == pytest.approx(0.25)
    assert classification_metrics(_binary(p1), labels)["ece"] == pytest.approx(0.25)


def test_ece_with_one_bin_is_the_gap_between_mean_confidence_and_accuracy() -> None:
    p1 = [0.9, 0.7, 0.2, 0.4]  # confidences 0.9, 0.7, 0.8, 0.6 -> mean 0.75
    labels = [1, 0, 0, 0]  # correct: yes, no, yes, yes -> 0.75
    assert expected_calibration_error(_binary(p1), labels, bins=1) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.zeros((0, 2)), np.zeros(0, dtype=int), "no examples"),
        (np.full((3, 2), 0.5), np.array([0, 1]), "shape"),
        (np.full(3, 0.5), np.array([0, 1, 1]), r"\(N, C\)"),
        (np.full((2, 2), 0.5), np.array([0, 2]), r"\[0, 2\)"),
    ],
)
def test_bad_input_raises_a_value_error_that_names_the_problem(
    probs: np.ndarray, labels: np.ndarray, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, labels)


def test_roc_auc_rejects_mismatched_and_empty_input() -> None:
    with pytest.raises(ValueError, match="3 entries but labels01 has 2"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([0.1, 0.2], [0, 2])


# ----------------------------------------------------------------------------------------- shift


def test_histogram_is_a_normalized_float64_density_of_the_requested_bins() -> None:
    rng = np.random.default_rng(1)
    h = intensity_histogram(rng.random((4, 1, 8, 8)), bins=16)
    assert h.shape == (16,) and h.dtype == np.float64
    assert h.sum() == pytest.approx(1.0)


def test_histogram_clips_out_of_range_values_into_the_end_bins() -> None:
    h = intensity_histogram(np.array([-3.0, 0.1, 0.9, 7.0]), bins=2)
    assert h.tolist() == [0.5, 0.5]


def test_histogram_accepts_a_torch_tensor() -> None:
    t = torch.linspace(0, 1, 100).reshape(1, 1, 10, 10)
    np.testing.assert_allclose(intensity_histogram(t, bins=4), intensity_histogram(t.numpy(), bins=4))


def test_histogram_of_empty_images_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        intensity_histogram(np.zeros((0, 1, 4, 4)))


def test_js_distance_is_zero_for_identical_histograms_and_one_for_disjoint() -> None:
    p = np.array([0.2, 0.3, 0.5, 0.0])
    assert js_distance(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_distance(p, p * 7) == pytest.approx(0.0, abs=1e-12)  # inputs are normalized
    assert js_distance([1, 1, 0, 0], [0, 0, 2, 3]) == pytest.approx(1.0)


def test_js_distance_matches_the_closed_form_value() -> None:
    """p = [1, 0], q = [0.5, 0.5]: JS = 0.5*log2(4/3) + 0.25*log2(2/3) + 0.25 -> distance 0.5579."""
    expected = math.sqrt(0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25)
    assert js_distance([1, 0], [0.5, 0.5]) == pytest.approx(expected)
    assert expected == pytest.approx(0.557923, abs=1e-6)


def test_js_distance_is_symmetric_and_obeys_the_triangle_inequality() -> None:
    rng = np.random.default_rng(2)
    hs = [rng.random(12) * (rng.random(12) > 0.3) + 1e-3 * i for i in range(6)]
    for a, b, c in itertools.permutations(hs, 3):
        assert js_distance(a, b) == pytest.approx(js_distance(b, a))
        assert js_distance(a, c) <= js_distance(a, b) + js_distance(b, c) + 1e-12
        assert 0.0 <= js_distance(a, b) <= 1.0


def test_js_distance_rejects_histograms_of_different_bins() -> None:
    with pytest.raises(ValueError, match="same bins"):
        js_distance([1, 2, 3], [1, 2])


def test_distance_matrix_is_symmetric_with_a_zero_diagonal() -> None:
    hists = {"site-01": np.array([1.0, 0, 0]), "site-02": np.array([0, 1.0, 0]), "site-03": np.array([1.0, 1.0, 0])}
    d = distance_matrix(hists)
    assert set(d) == set(hists)
    for a in hists:
        assert d[a][a] == 0.0
        for b in hists:
            assert d[a][b] == d[b][a]
    assert d["site-01"]["site-02"] == pytest.approx(1.0)
    assert 0.0 < d["site-01"]["site-03"] < 1.0


def test_spearman_is_one_for_monotone_data_and_minus_one_for_reversed() -> None:
    x = np.arange(1.0, 8.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


def test_spearman_gives_ties_their_average_rank() -> None:
    """Ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: rho = 4.5 / sqrt(4.5 * 5)."""
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_spearman_is_nan_with_fewer_than_three_points_or_constant_input() -> None:
    assert math.isnan(spearman([1, 2], [2, 1]))
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    assert math.isnan(spearman([1, 2, float("nan"), 4], [1, 2, 3, float("nan")]))  # only 2 finite pairs left


def test_spearman_rejects_unpaired_inputs() -> None:
    with pytest.raises(ValueError, match="paired"):
        spearman([1, 2, 3], [1, 2])
