"""Place-recognition metrics: Recall@N, the precision-recall curve, recall at 100 % precision."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
