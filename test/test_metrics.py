"""Metrics: Recall@N, the precision-recall curve and recall at 100 % precision, on
hand-computed queries."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.metrics import precision_recall_curve, recall_at_100_precision, recall_at_n


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
