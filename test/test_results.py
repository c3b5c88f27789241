"""Results: scoring one method (summarize), the table, results.json and the PR plot, on
hand-computed queries."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_metrics import HARD, SIMILARITY, SOFT

from vpr_ros.metrics import first_hit_ranks
from vpr_ros.results import (
    PR_BY_CONFIDENCE,
    PR_BY_SIMILARITY,
    PR_LABELS,
    EvaluationResult,
    ScoringConf,
    labelled_curves,
    plot_pr_curve,
    summarize,
    write_results,
)


def test_summarize_marks_recall_beyond_the_returned_candidates_unknown() -> None:
    predictions = np.array([[0, 1], [2, 1]])
    method = summarize(
        'x', predictions, [0.5, 0.2], [{0}, {1}], [0.01, 0.03], num_db=10, ns=(1, 2, 5)
    )
    assert method.recalls == {1: 0.5, 2: 1.0, 5: None}
    assert method.correct.tolist() == [True, False]
    assert method.by_confidence.recall_at_100_precision == 0.5
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
    assert method.by_confidence.recall_at_100_precision == 0.0
    np.testing.assert_allclose(method.by_confidence.precision, [0.0, 0.5, 2 / 3, 0.5])
    # ... and recall's denominator is the 3 queries with a positive.
    np.testing.assert_allclose(method.by_confidence.recall, [0.0, 1 / 3, 2 / 3, 2 / 3])
    # Rejecting it (lowest confidence) costs no recall.
    confidences = [0.5, 0.1, 0.4, 0.3]
    rejected = summarize('x', predictions, confidences, positives, [0.01] * 4, num_db=4)
    assert rejected.by_confidence.recall_at_100_precision == pytest.approx(2 / 3)


def test_plot_pr_curve_writes_a_png(tmp_path: Path) -> None:
    path = plot_pr_curve(
        {'a': (np.array([1.0, 0.5]), np.array([0.5, 0.5])), 'empty': (np.zeros(0), np.zeros(0))},
        tmp_path / 'plots' / 'pr.png',
    )
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100


def test_summarize_ranks_the_same_answers_by_confidence_and_by_similarity() -> None:
    predictions = np.array([[0, 9], [1, 9], [5, 9], [3, 9]])
    positives = [[0], [1], [2], [3]]  # the top-1 answers are right, right, wrong, right
    confidences = [0.2, 0.9, 0.8, 0.5]
    scores = [1.0, 0.5, 0.0, 0.75]
    method = summarize(
        'x',
        predictions,
        confidences,
        positives,
        [0.01] * 4,
        num_db=10,
        ns=(1,),
        scores=scores,
        scoring=ScoringConf(pr_thresholds=5),
    )
    by_confidence, by_similarity = method.by_confidence, method.by_similarity
    assert by_similarity is not None
    assert (by_confidence.ranked_by, by_similarity.ranked_by) == (
        PR_BY_CONFIDENCE,
        PR_BY_SIMILARITY,
    )
    # By confidence: .9 right, .8 wrong, .5 right, .2 right; every value a threshold.
    np.testing.assert_allclose(by_confidence.precision, [1.0, 0.5, 2 / 3, 0.75])
    np.testing.assert_allclose(by_confidence.recall, [0.25, 0.25, 0.5, 0.75])
    assert by_confidence.recall_at_100_precision == 0.25
    # Trapezoids from (0, 1): .25 + .25 * (.5 + 2/3) / 2 + .25 * (2/3 + .75) / 2.
    assert by_confidence.auc == pytest.approx(55 / 96)
    # By similarity (thresholds 1, .75, .5, .25, 0): the wrong answer has the lowest score.
    np.testing.assert_allclose(by_similarity.precision, [1.0, 1.0, 1.0, 1.0, 1.0, 0.75])
    np.testing.assert_allclose(by_similarity.recall, [0.0, 0.25, 0.5, 0.75, 0.75, 0.75])
    assert by_similarity.recall_at_100_precision == 0.75
    assert by_similarity.auc == pytest.approx(0.75)
    assert method.recalls == {1: 0.75}


def test_summarize_of_a_ranking_gives_the_standard_figures_of_its_similarity_matrix() -> None:
    # The queries of test_metrics' hand-made matrix, as evaluate sees them: each query's
    # places by similarity and its best similarity, and the soft positives.
    predictions = np.argsort(-SIMILARITY, axis=0).T
    method = summarize(
        'retrieval',
        predictions,
        SIMILARITY.max(0),
        [np.flatnonzero(column) for column in HARD.T],
        [0.01] * 3,
        num_db=4,
        ns=(1, 2, 3),
        scores=SIMILARITY.max(0),
        soft_positives=[np.flatnonzero(column) for column in SOFT.T],
        scoring=ScoringConf(pr_thresholds=3),
    )
    assert method.predictions[:, 0].tolist() == [0, 1, 1]
    assert method.correct.tolist() == [True, False, False]
    assert method.near_miss.tolist() == [False, True, False]
    assert method.by_similarity is not None
    np.testing.assert_allclose(method.by_similarity.precision, [1.0, 1.0, 1.0, 0.5])
    np.testing.assert_allclose(method.by_similarity.recall, [0.0, 1 / 3, 1 / 3, 1 / 3])
    assert method.by_similarity.recall_at_100_precision == pytest.approx(1 / 3)
    # By confidence (here the same values, every one a threshold): .9 right, .45 wrong.
    np.testing.assert_allclose(method.by_confidence.precision, [1.0, 0.5])
    assert method.by_confidence.recall_at_100_precision == pytest.approx(1 / 3)
    # Recall@N counts hard positives only: query 1's positive is 2nd, query 2's 3rd.
    assert method.recalls == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_the_recall_denominator_can_count_queries_without_a_positive_as_misses() -> None:
    predictions = np.array([[0, 1], [2, 0], [1, 2], [3, 2]])
    positives = [[0], [], [1], [2]]
    confidences = [0.5, 0.9, 0.4, 0.3]
    every_query = ScoringConf(recall_denominator='all')
    method = summarize(
        'x',
        predictions,
        confidences,
        positives,
        [0.01] * 4,
        num_db=4,
        ns=(1, 2),
        scoring=every_query,
    )
    assert method.recalls == pytest.approx({1: 0.5, 2: 0.75})
    # Accepted in order .9 (no positive: wrong), .5 right, .4 right, .3 wrong; recall / 4.
    np.testing.assert_allclose(method.by_confidence.precision, [0.0, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(method.by_confidence.recall, [0.0, 0.25, 0.5, 0.5])


def test_recall_at_n_is_unknown_where_a_query_got_fewer_than_n_places() -> None:
    # A sequence matcher answers once per exclusion window: query 0 got two places.
    predictions = np.array([[0, 5, -1], [7, 1, 3]])
    method = summarize(
        'x', predictions, [0.5, 0.5], [[0], [1]], [0.01] * 2, num_db=10, ns=(1, 2, 3)
    )
    assert method.recalls == {1: 0.5, 2: 1.0, 3: None}
    # When the places cover the whole (two-place) reference, nothing is missing.
    whole = summarize('x', predictions, [0.5, 0.5], [[0], [1]], [0.01] * 2, num_db=2, ns=(3,))
    assert whole.recalls == {3: 1.0}


def test_a_query_without_an_answer_is_never_accepted() -> None:
    predictions = np.array([[0], [1], [-1]])
    method = summarize(
        'x',
        predictions,
        [0.5, np.nan, np.nan],
        [[0], [2], [0]],
        [0.01] * 3,
        num_db=3,
        ns=(1,),
        scores=[0.7, np.nan, np.nan],
    )
    # Only query 0 answered; recall is still over the 3 queries with a positive.
    np.testing.assert_allclose(method.by_confidence.precision, [1.0])
    np.testing.assert_allclose(method.by_confidence.recall, [1 / 3])
    assert method.by_similarity is not None
    np.testing.assert_allclose(method.by_similarity.recall[-1], 1 / 3)
    assert method.summary()['queries_without_an_answer'] == 2


def test_the_table_results_json_csv_and_plot_label_each_figure(tmp_path: Path) -> None:
    positives = [np.array([0]), np.array([1]), np.zeros(0, np.int64)]
    soft = [np.array([0, 1]), np.array([1, 2]), np.array([2])]
    predictions = np.array([[0, 1], [2, 1], [1, 0]])  # right, near miss, no positive
    method = summarize(
        'retrieval',
        predictions,
        [0.9, 0.8, 0.1],
        positives,
        [0.01] * 3,
        num_db=3,
        ns=(1, 5),
        scores=[0.6, 0.5, 0.4],
        soft_positives=soft,
        recall_counts='the N most similar places',
        similarity='the global cosine similarity',
    )
    result = EvaluationResult(
        {'retrieval': method},
        ['a.png', 'b.png', 'c.png'],
        positives,
        3,
        {},
        skipped_queries=['c.png'],
        soft_positives=soft,
        notes=['soft ground truth: note'],
    )
    table = result.table()
    head = table.splitlines()[0].split('  ')
    assert [c.strip() for c in head if c.strip()][-6:-2] == [
        'R@100%P conf',
        'R@100%P sim',
        'AUC conf',
        'AUC sim',
    ]
    row = table.splitlines()[1].split()
    # R@1 50 %, R@5 n/a (2 places of 3); both curves accept .9/.6 right, then the wrong
    # answer to c.png (b.png is a near miss): R@100%P 50 %, AUC .5 * 1 + .5 * 0 = .5.
    assert row[:7] == ['retrieval', '50.0', 'n/a', '50.0', '50.0', '0.500', '0.500']
    assert 'recall denominator: the 2 queries with a positive' in table
    assert 'R@100%P/AUC sim: the standard figures (VPR_Tutorial' in table
    assert 'retrieval: R@N = a positive among the N most similar places' in table
    assert '1 top-1 answers are near misses' in table and 'soft ground truth: note' in table
    paths = write_results(result, tmp_path)
    saved = json.loads(paths['json'].read_text())
    scores = saved['methods']['retrieval']
    assert scores['pr_by_confidence']['ranked_by'] == PR_LABELS[PR_BY_CONFIDENCE]
    assert scores['pr_by_similarity']['ranked_by'] == PR_LABELS[PR_BY_SIMILARITY]
    assert scores['pr_by_similarity']['recall_at_100_precision'] == 0.5
    assert scores['pr_by_similarity']['pr_curve']['thresholds'][0] is None  # the start point
    assert saved['recall_denominator']['kind'] == 'with_positive'
    assert saved['recall_denominator']['queries'] == 2
    assert scores['recall_at_n'] == {'R@1': 0.5, 'R@5': None}
    with paths['csv'].open() as stream:
        rows = list(csv.DictReader(stream))
    assert [r['retrieval_near_miss'] for r in rows] == ['0', '1', '0']
    assert rows[0]['retrieval_similarity'] == '0.6000'
    curves, dashed, colour_of = labelled_curves(result.methods.values())
    labels = list(curves)
    assert labels == [
        f'retrieval {PR_LABELS[PR_BY_CONFIDENCE]}: R@100%P 50.0 %, AUC 0.500',
        f'retrieval {PR_LABELS[PR_BY_SIMILARITY]}: R@100%P 50.0 %, AUC 0.500',
    ]
    assert dashed == labels[1:] and colour_of == {labels[1]: labels[0]}
    assert cv2.imread(str(paths['png'])) is not None
