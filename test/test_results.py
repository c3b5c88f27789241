"""Results: scoring one method (summarize), the PR plot."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.metrics import first_hit_ranks
from vpr_ros.results import plot_pr_curve, summarize


def test_summarize_marks_recall_beyond_the_returned_candidates_unknown() -> None:
    predictions = np.array([[0, 1], [2, 1]])
    method = summarize(
        'x', predictions, [0.5, 0.2], [{0}, {1}], [0.01, 0.03], num_db=10, ns=(1, 2, 5)
    )
    assert method.recalls == {1: 0.5, 2: 1.0, 5: None}
    assert method.correct.tolist() == [True, False]
    assert method.recall_at_100_precision == 0.5
    assert method.latency_median_ms == pytest.approx(20.0)
    # A reference of only 2 places: all of it was returned, so Recall@5 is known.
    small = summarize('x', predictions, [0.5, 0.2], [{0}, {1}], [0.01, 0.03], num_db=2, ns=(5,))
    assert small.recalls == {5: 1.0}


def test_summarize_scores_an_empty_query_set_without_a_reshape_error() -> None:
    method = summarize('x', np.zeros((0, 4), np.int64), [], [], [], num_db=3, ns=(1, 5))
    assert method.predictions.shape == (0, 4)
    assert all(math.isnan(r) for r in method.recalls.values())
    assert first_hit_ranks(np.zeros((0, 4), np.int64), []).shape == (0,)


def test_queries_without_a_positive_are_out_of_recall_but_wrong_if_accepted() -> None:
    # Query 1 is off the map; the method answers it with the highest confidence.
    predictions = np.array([[0, 1], [2, 0], [1, 2], [3, 2]])
    positives = [[0], [], [1], [2]]
    confidences = [0.5, 0.9, 0.4, 0.3]
    method = summarize('x', predictions, confidences, positives, [0.01] * 4, num_db=4, ns=(1, 2))
    # Recall@N over the three queries with a positive only.
    assert method.recalls == pytest.approx({1: 2 / 3, 2: 1.0})
    assert method.correct.tolist() == [True, False, True, False]
    # Accepting the off-map query first breaks 100 % precision at once ...
    assert method.recall_at_100_precision == 0.0
    np.testing.assert_allclose(method.precision, [0.0, 0.5, 2 / 3, 0.5])
    # ... and recall's denominator is the 3 queries with a positive.
    np.testing.assert_allclose(method.recall, [0.0, 1 / 3, 2 / 3, 2 / 3])
    # Rejecting it (lowest confidence) costs no recall.
    confidences = [0.5, 0.1, 0.4, 0.3]
    rejected = summarize('x', predictions, confidences, positives, [0.01] * 4, num_db=4)
    assert rejected.recall_at_100_precision == pytest.approx(2 / 3)


def test_plot_pr_curve_writes_a_png(tmp_path: Path) -> None:
    path = plot_pr_curve(
        {'a': (np.array([1.0, 0.5]), np.array([0.5, 0.5])), 'empty': (np.zeros(0), np.zeros(0))},
        tmp_path / 'plots' / 'pr.png',
    )
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100
