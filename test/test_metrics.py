"""Metrics: Recall@N, the precision-recall curves, recall at 100 % precision and the area
under the curve, on hand-computed queries.

The standard figures follow stschubert/VPR_Tutorial ``evaluation/metrics.py``
(``createPR``/``recallAt100precision`` with ``matching='single'``, ``np.trapz(P, R)``): the
hand-computed values of the standard curves below are what those functions return for the
same inputs (near misses aside: VPR_Tutorial refuses soft ground truth for single matching).
"""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.metrics import (
    area_under_pr_curve,
    best_match_per_query,
    precision_recall_curve,
    recall_at_100_precision,
    recall_at_full_precision,
    recall_at_n,
    sampled_precision_recall,
)


def test_recall_at_n_is_cumulative_over_hand_computed_queries() -> None:
    predictions = np.array(
        [
            [3, 1, 2, 0, 4],  # first positive at rank 0
            [0, 5, 7, 6, 2],  # first positive at rank 2
            [1, 2, 3, 4, 5],  # none
            [9, 8, 7, 6, -1],  # first positive at rank 3 (-1 pads)
        ]
    )
    positives = [{3}, {7, 9}, {0}, [6]]
    recalls = recall_at_n(predictions, positives, ns=(1, 2, 3, 4, 5, 20))
    assert recalls == {1: 0.25, 2: 0.25, 3: 0.5, 4: 0.75, 5: 0.75, 20: 0.75}


def test_recall_at_n_never_counts_padding_as_a_match() -> None:
    assert recall_at_n(np.array([[-1, -1]]), [{-1}], ns=(1, 2)) == {1: 0.0, 2: 0.0}


def test_precision_recall_curve_on_hand_computed_queries_with_a_tie() -> None:
    correct = np.array([True, True, False, True])
    confidence = np.array([0.9, 0.8, 0.8, 0.1])
    precision, recall, thresholds = precision_recall_curve(correct, confidence)
    # >= 0.9: 1 accepted, 1 right; >= 0.8: 3 accepted (tie), 2 right; >= 0.1: 4, 3 right.
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.1])
    np.testing.assert_allclose(precision, [1.0, 2 / 3, 0.75])
    np.testing.assert_allclose(recall, [0.25, 0.5, 0.75])
    assert recall_at_100_precision(correct, confidence) == 0.25


def test_recall_at_100_precision_takes_the_largest_perfect_threshold() -> None:
    correct = np.array([True, True, True, False, True])
    confidence = np.array([0.9, 0.7, 0.5, 0.3, 0.2])
    assert recall_at_100_precision(correct, confidence) == pytest.approx(0.6)


def test_recall_at_100_precision_is_zero_when_the_most_confident_answer_is_wrong() -> None:
    correct = np.array([False, True, True])
    assert recall_at_100_precision(correct, np.array([0.9, 0.5, 0.4])) == 0.0


# -- the standard figures (stschubert/VPR_Tutorial evaluation/metrics.py, single match) ------


def test_the_standard_curve_samples_evenly_spaced_thresholds_from_a_start_point() -> None:
    correct = np.array([True, False, True, True, False])
    scores = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    precision, recall, thresholds = sampled_precision_recall(
        correct, scores, num_relevant=4, num_thresholds=5
    )
    # Start (R 0, P 1); then >= 1: 1 of 1 right; >= .75: 1 of 2; >= .5: 2 of 3; >= .25: 3 of 4;
    # >= 0: 3 of 5. Recall over the 4 queries with a positive.
    np.testing.assert_allclose(thresholds, [np.inf, 1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(precision, [1.0, 1.0, 0.5, 2 / 3, 0.75, 0.6])
    np.testing.assert_allclose(recall, [0.0, 0.25, 0.25, 0.5, 0.75, 0.75])
    assert recall_at_full_precision(precision, recall) == 0.25
    # Trapezoids: .25 * (1 + 1) / 2 + .25 * (.5 + 2/3) / 2 + .25 * (2/3 + .75) / 2 = 55/96.
    assert area_under_pr_curve(precision, recall) == pytest.approx(55 / 96)


def test_the_standard_curve_reports_what_its_thresholds_see_not_every_threshold() -> None:
    correct = np.array([True, True, False, True])
    scores = np.array([1.0, 0.95, 0.9, 0.0])
    # Three thresholds 1, .5, 0 skip the perfect point at .95 (2 of 2 right) ...
    precision, recall, _ = sampled_precision_recall(correct, scores, num_thresholds=3)
    np.testing.assert_allclose(precision, [1.0, 1.0, 2 / 3, 0.75])
    np.testing.assert_allclose(recall, [0.0, 0.25, 0.5, 0.75])
    assert recall_at_full_precision(precision, recall) == 0.25
    # ... which the curve over every distinct value (the confidence curve's kind) keeps.
    assert recall_at_100_precision(correct, scores) == 0.5


def test_float32_scores_get_float32_thresholds_as_numpy_linspace_makes_them() -> None:
    scores = np.array([0.3, 0.1, 0.2], np.float32)
    _, _, thresholds = sampled_precision_recall(np.ones(3, bool), scores, num_thresholds=4)
    assert thresholds.dtype == np.float32


def test_the_area_counts_the_start_point_once() -> None:
    # Without the start point the area still runs from (0, 1): .5 * (1 + .5) / 2 + 0.
    assert area_under_pr_curve(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.375
    assert area_under_pr_curve(np.array([1.0, 0.5]), np.array([0.0, 0.5])) == 0.375


HARD = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]], bool)  # 4 references x 3 queries
SOFT = HARD | np.array([[0, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
SIMILARITY = np.array(
    [
        [0.9, 0.1, 0.2],
        [0.8, 0.7, 0.45],  # query 1's best: a near miss; query 2's best: wrong
        [0.1, 0.6, 0.4],
        [0.2, 0.5, 0.35],
    ]
)


def test_best_match_per_query_marks_near_misses_of_soft_ground_truth() -> None:
    best = best_match_per_query(SIMILARITY, HARD, SOFT)
    assert best.reference.tolist() == [0, 1, 1]
    np.testing.assert_allclose(best.score, [0.9, 0.7, 0.45])
    assert best.correct.tolist() == [True, False, False]
    assert best.near_miss.tolist() == [False, True, False]
    assert not best_match_per_query(SIMILARITY, HARD).near_miss.any()


def test_a_near_miss_is_neither_right_nor_wrong_in_the_standard_curve() -> None:
    best = best_match_per_query(SIMILARITY, HARD, SOFT)
    judged = ~best.near_miss
    precision, recall, _ = sampled_precision_recall(
        best.correct[judged], best.score[judged], num_relevant=3, num_thresholds=3
    )
    # Queries 0 (.9, right) and 2 (.45, wrong); thresholds .9, .675, .45.
    np.testing.assert_allclose(precision, [1.0, 1.0, 1.0, 0.5])
    np.testing.assert_allclose(recall, [0.0, 1 / 3, 1 / 3, 1 / 3])
    assert recall_at_full_precision(precision, recall) == pytest.approx(1 / 3)
    assert area_under_pr_curve(precision, recall) == pytest.approx(1 / 3)
    # Counted wrong instead, query 1 (.7) breaks 100 % precision at the second threshold.
    precision, recall, _ = sampled_precision_recall(
        best.correct, best.score, num_relevant=3, num_thresholds=3
    )
    np.testing.assert_allclose(precision, [1.0, 1.0, 0.5, 1 / 3])


def test_precision_recall_curves_refuse_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match='correctness flags'):
        sampled_precision_recall(np.ones(2, bool), np.ones(3))
    with pytest.raises(ValueError, match='num_thresholds must be > 1'):
        sampled_precision_recall(np.ones(2, bool), np.ones(2), num_thresholds=1)
    with pytest.raises(ValueError, match='finite'):
        sampled_precision_recall(np.ones(2, bool), np.array([1.0, np.nan]))


def test_expected_calibration_error_is_zero_when_confidence_matches_accuracy() -> None:
    from vpr_ros.metrics import expected_calibration_error, reliability_bins

    correct = np.array([True] * 8 + [False] * 2 + [True] * 5 + [False] * 5)
    confidence = np.array([0.8] * 10 + [0.5] * 10)
    assert expected_calibration_error(correct, confidence) == pytest.approx(0.0, abs=1e-12)
    overconfident = np.array([0.95] * 10 + [0.9] * 10)
    assert expected_calibration_error(correct, overconfident) == pytest.approx(0.275)
    _, accuracy, count = reliability_bins(correct, confidence)
    assert count[8] == 10 and accuracy[8] == pytest.approx(0.8)
    assert np.isnan(accuracy[0]) and count[0] == 0
