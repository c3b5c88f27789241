"""MNN re-ranking: the matches and scores against a brute-force reference, and the order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_ros.rerankers.mnn import mnn_scores, mutual_nn_mask, mutual_nn_matches


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force_matches(
    query: np.ndarray, candidate: np.ndarray, min_similarity: float
) -> list[tuple[int, int]]:
    """(i, j) where j is i's best candidate, i is j's best query, and they are similar."""
    matches = []
    for i in range(len(query)):
        best_j = max(range(len(candidate)), key=lambda j: float(query[i] @ candidate[j]))
        best_i = max(range(len(query)), key=lambda k: float(query[k] @ candidate[best_j]))
        if best_i == i and float(query[i] @ candidate[best_j]) >= min_similarity:
            matches.append((i, best_j))
    return matches


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('min_similarity', [-1.0, 0.5, 0.8])
def test_mnn_matches_and_scores_agree_with_a_brute_force_double_loop(
    seed: int, min_similarity: float
) -> None:
    rng = np.random.default_rng(seed)
    query, candidates = unit(rng, 7, 4), unit(rng, 5, 9, 4)
    expected = [brute_force_matches(query, c, min_similarity) for c in candidates]
    for candidate, pairs in zip(candidates, expected):
        rows, cols = mutual_nn_matches(query, candidate, min_similarity)
        assert list(zip(rows.tolist(), cols.tolist())) == pairs
    scores = mnn_scores(query, candidates, min_similarity)
    np.testing.assert_allclose(scores, [len(pairs) / len(query) for pairs in expected])


def test_min_similarity_removes_matches_in_these_inputs() -> None:
    # Guards the test above: the thresholds do change the answer on its inputs.
    rng = np.random.default_rng(0)
    query, candidates = unit(rng, 7, 4), unit(rng, 5, 9, 4)
    assert (mnn_scores(query, candidates, 0.8) < mnn_scores(query, candidates)).all()


def test_mutual_nn_mask_works_on_a_batch_of_similarity_matrices() -> None:
    sim = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(0))
    mask, nn12 = mutual_nn_mask(sim)
    assert mask.shape == nn12.shape == (3, 6) and mask.dtype == torch.bool
    for k in range(3):
        one_mask, one_nn12 = mutual_nn_mask(sim[k])
        assert torch.equal(mask[k], one_mask) and torch.equal(nn12[k], one_nn12)
