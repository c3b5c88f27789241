"""Place-recognition metrics: Recall@N, precision-recall curves, recall at 100 % precision.

Two kinds of precision-recall curve of the top-1 answers:

* over every distinct value (``precision_recall_curve``, ``recall_at_100_precision``):
  evaluate ranks the node's confidences so;
* the standard one of stschubert/VPR_Tutorial ``evaluation/metrics.py`` (``createPR`` and
  ``recallAt100precision`` with ``matching='single'``): ``sampled_precision_recall`` at
  evenly spaced thresholds from a start point (recall 0, precision 1),
  ``recall_at_full_precision`` and ``area_under_pr_curve`` (its demo's ``np.trapz(P, R)``);
  ``best_match_per_query`` takes the answers from a similarity matrix. On the same inputs
  these return the same numbers as VPR_Tutorial (checked against its code, and pinned by
  hand-computed cases in test/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

DEFAULT_RECALL_NS = (1, 5, 10, 20)


def first_hit_ranks(predictions: np.ndarray, positives: Sequence[Iterable[int]]) -> np.ndarray:
    """For each query the 0-based rank of its first positive prediction (-1 if none)."""
    predictions = _prediction_rows(predictions, len(positives))
    ranks = np.full(len(predictions), -1, np.int64)
    for q, (row, pos) in enumerate(zip(predictions, positives)):
        hits = np.flatnonzero(np.isin(row, np.asarray(list(pos), np.int64)) & (row >= 0))
        if len(hits):
            ranks[q] = hits[0]
    return ranks


def _prediction_rows(predictions: np.ndarray, count: int) -> np.ndarray:
    """``predictions`` as (count, K) int64; a 1-D array is one prediction per query."""
    predictions = np.asarray(predictions, np.int64)
    if predictions.ndim < 2:
        predictions = predictions.reshape(-1, 1)
    return predictions.reshape(count, predictions.shape[-1])


def recall_at_n(
    predictions: np.ndarray,
    positives: Sequence[Iterable[int]],
    ns: Sequence[int] = DEFAULT_RECALL_NS,
) -> dict[int, float]:
    """Cumulative Recall@N: the fraction of queries with a positive among the first N.

    Args:
        predictions: (Q, K) reference indices, best first; -1 pads.
        positives: for each query, its positive reference indices.
        ns: the N to report; for N > K all K predictions count.

    Returns:
        {N: recall in [0, 1]}.
    """
    if len(positives) == 0:
        return {int(n): float('nan') for n in ns}
    ranks = first_hit_ranks(predictions, positives)
    return {int(n): float(np.mean((ranks >= 0) & (ranks < n))) for n in ns}


def precision_recall_curve(
    is_correct: np.ndarray, confidence: np.ndarray, *, num_relevant: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of the top-1 answers accepted at each confidence threshold.

    A query is accepted when its confidence is >= the threshold. Precision = correct
    accepted / accepted; recall = correct accepted / ``num_relevant`` (so a perfect system
    reaches recall 1 only if it accepts every query that has a positive, correctly).
    Queries without a positive belong in ``is_correct`` as False: accepting one is a wrong
    answer that lowers precision, and rejecting it costs no recall.

    Args:
        is_correct: (Q,) whether each query's top-1 answer is a positive.
        confidence: (Q,) its confidence.
        num_relevant: the queries that have a positive (the recall denominator; default
            all Q).

    Returns:
        precision, recall, thresholds: each (T,), thresholds decreasing (recall increasing),
        one entry per distinct confidence.
    """
    is_correct = np.asarray(is_correct, bool).reshape(-1)
    confidence = np.asarray(confidence, np.float64).reshape(-1)
    if is_correct.shape != confidence.shape:
        msg = f'{is_correct.shape!r} correctness flags for {confidence.shape!r} confidences'
        raise ValueError(msg)
    if len(confidence) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    confidence = np.where(np.isnan(confidence), -np.inf, confidence)
    order = np.argsort(-confidence, kind='stable')
    scores = confidence[order]
    true_positives = np.cumsum(is_correct[order])
    accepted = np.arange(1, len(scores) + 1)
    last_of_threshold = np.r_[scores[1:] != scores[:-1], True]
    true_positives = true_positives[last_of_threshold]
    accepted = accepted[last_of_threshold]
    precision = true_positives / accepted
    relevant = len(scores) if num_relevant is None else int(num_relevant)
    recall = true_positives / relevant if relevant > 0 else np.zeros(len(true_positives))
    return precision, recall, scores[last_of_threshold]


def recall_at_100_precision(
    is_correct: np.ndarray, confidence: np.ndarray, *, num_relevant: int | None = None
) -> float:
    """The largest recall at a confidence threshold where every accepted answer is correct.

    0 when the most confident answer is already wrong. ``num_relevant`` as in
    ``precision_recall_curve``.
    """
    precision, recall, _ = precision_recall_curve(
        is_correct, confidence, num_relevant=num_relevant
    )
    perfect = precision >= 1.0 - 1e-12
    return float(recall[perfect].max()) if perfect.any() else 0.0


# -- the standard figures: the top-1 similarity, as stschubert/VPR_Tutorial ranks it ---------

DEFAULT_PR_THRESHOLDS = 100
"""Thresholds of the standard precision-recall curve (VPR_Tutorial ``createPR``'s default)."""


def sampled_precision_recall(
    is_correct: np.ndarray,
    scores: np.ndarray,
    *,
    num_relevant: int | None = None,
    num_thresholds: int = DEFAULT_PR_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The standard single-best-match precision-recall curve (VPR_Tutorial's convention).

    The curve starts at recall 0, precision 1; then, for ``num_thresholds`` thresholds
    evenly spaced from the highest top-1 score down to the lowest (both included), the
    answers with a score >= the threshold are accepted: precision = correct accepted /
    accepted, recall = correct accepted / ``num_relevant``. These are the points
    ``evaluation/metrics.py::createPR(S, GThard, GTsoft, matching='single')`` returns for
    the same per-query best scores and correctness (``best_match_per_query`` makes those
    from a similarity matrix; leave near misses out).

    Args:
        is_correct: (Q,) whether each query's top-1 answer is a positive.
        scores: (Q,) the top-1 answer's score (higher = more similar); all finite.
        num_relevant: the recall denominator (default Q).
        num_thresholds: how many thresholds (> 1).

    Returns:
        precision, recall, thresholds: each (num_thresholds + 1,), the first entry the
        start point (threshold +inf); empty for no queries.
    """
    is_correct, scores = _flags_and_values(is_correct, scores, 'scores')
    if num_thresholds < 2:
        raise ValueError(f'num_thresholds must be > 1, got {num_thresholds!r}')
    if not np.isfinite(scores).all():
        raise ValueError('top-1 scores must be finite; leave queries without an answer out')
    if len(scores) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    thresholds = np.linspace(scores.max(), scores.min(), num_thresholds)
    accepted = scores[None, :] >= thresholds[:, None]  # (T, Q)
    true_positives = np.count_nonzero(accepted & is_correct[None, :], axis=1)
    precision = true_positives / np.count_nonzero(accepted, axis=1)  # the top one is accepted
    relevant = len(scores) if num_relevant is None else int(num_relevant)
    recall = true_positives / relevant if relevant > 0 else np.zeros(num_thresholds)
    return np.r_[1.0, precision], np.r_[0.0, recall], np.r_[np.inf, thresholds]


def recall_at_full_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """The largest recall among the curve's points with precision exactly 1 (0 if none)."""
    precision = np.asarray(precision, np.float64)
    perfect = precision == 1.0
    return float(np.asarray(recall, np.float64)[perfect].max()) if perfect.any() else 0.0


def area_under_pr_curve(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under a precision-recall curve by trapezoids, from (recall 0, precision 1).

    VPR_Tutorial's ``demo.py`` reports ``np.trapz(P, R)`` over ``createPR``'s points,
    which start there; a curve that already starts at that point gets no extra area.
    """
    precision = np.r_[1.0, np.asarray(precision, np.float64)]
    recall = np.r_[0.0, np.asarray(recall, np.float64)]
    return float(np.trapezoid(precision, recall))


class BestMatches(NamedTuple):
    """Each query's single best match: its reference index, similarity, whether it is a
    positive, and whether it is a near miss (a soft but not a hard positive)."""

    reference: np.ndarray
    score: np.ndarray
    correct: np.ndarray
    near_miss: np.ndarray


def best_match_per_query(
    similarity: np.ndarray, hard: np.ndarray, soft: np.ndarray | None = None
) -> BestMatches:
    """Single-best-match answers of a similarity matrix, as VPR_Tutorial takes them.

    Each query's answer is its most similar reference (the first on ties); its correctness
    is the hard ground truth there. With soft ground truth, an answer that is a soft but
    not a hard positive is a near miss: the tutorial paper counts a match as a true
    positive where ``GThard`` holds and as a false positive where ``GTsoft`` does not, so a
    near miss is neither (leave it out of ``sampled_precision_recall``).

    Args:
        similarity: (N, Q) reference x query similarities (higher = more similar).
        hard: (N, Q) bool, the positives.
        soft: (N, Q) bool, the positives within the wider tolerance (None: none).
    """
    similarity = np.asarray(similarity)
    hard = np.asarray(hard, bool)
    if similarity.ndim != 2 or hard.shape != similarity.shape:
        msg = f'similarity {similarity.shape!r} and hard {hard.shape!r} must be equal (N, Q)'
        raise ValueError(msg)
    columns = np.arange(similarity.shape[1])
    best = np.argmax(similarity, axis=0)
    correct = hard[best, columns]
    near_miss = np.zeros(len(columns), bool)
    if soft is not None:
        soft = np.asarray(soft, bool)
        if soft.shape != similarity.shape:
            raise ValueError(f'soft {soft.shape!r} must be {similarity.shape!r}')
        near_miss = soft[best, columns] & ~correct
    return BestMatches(best, similarity[best, columns], correct, near_miss)


def _flags_and_values(
    flags: np.ndarray, values: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Flat flags and values; floating values keep their precision (float32 scores give
    float32 thresholds, as numpy's ``linspace`` makes them for VPR_Tutorial)."""
    flags = np.asarray(flags, bool).reshape(-1)
    values = np.asarray(values).reshape(-1)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if flags.shape != values.shape:
        raise ValueError(f'{flags.shape!r} correctness flags for {values.shape!r} {what}')
    return flags, values


# -- calibration: is a confidence of 0.8 right 80 % of the time? ----------------------------


def reliability_bins(
    is_correct: np.ndarray, confidence: np.ndarray, *, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, fraction correct and count.

    Answers without a confidence (NaN) are left out. Empty bins hold NaN and 0.

    Returns:
        mean_confidence (bins,), accuracy (bins,), count (bins,).
    """
    is_correct = np.asarray(is_correct, bool).reshape(-1)
    confidence = np.asarray(confidence, np.float64).reshape(-1)
    known = np.isfinite(confidence)
    is_correct, confidence = is_correct[known], np.clip(confidence[known], 0.0, 1.0)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid='ignore', divide='ignore'):
        mean_confidence = np.bincount(index, confidence, bins) / count
        accuracy = np.bincount(index, is_correct.astype(np.float64), bins) / count
    return mean_confidence, accuracy, count


def expected_calibration_error(
    is_correct: np.ndarray, confidence: np.ndarray, *, bins: int = 10
) -> float:
    """The count-weighted mean gap between confidence and accuracy over the bins (ECE)."""
    mean_confidence, accuracy, count = reliability_bins(is_correct, confidence, bins=bins)
    total = int(count.sum())
    if total == 0:
        return float('nan')
    filled = count > 0
    gaps = np.abs(mean_confidence[filled] - accuracy[filled])
    return float(np.sum(count[filled] * gaps) / total)
